"""Is the GPU starved? What each stage and model actor measured, and the bottleneck named.

The read and decode tasks, the model actors and the write tasks time their own work and
tell one small Ray actor (``Stats``) after every batch: a fire-and-forget call per batch,
far under 1% of the run. The same counts are the stall watchdog's sign of life.

From them, at the end of a run:
  - per stage (read, decode, model, write): rows, busy seconds, wall seconds (first
    start to last end);
  - per model actor: seconds in the forward pass, waiting for input, preparing input
    (``--decode gpu`` decodes there) and building output; its busy share;
  - the fixed cost (run start until the first batch reaches a model) and the steady
    rate after it;
  - the bottleneck, in one line, with the flag that moves it (``bottleneck``).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

STAGES = ("read", "decode", "model", "write")


@functools.cache
def _stats_actor():
    import ray

    @ray.remote(num_cpus=0, max_restarts=0)
    class Stats:
        def __init__(self):
            self.rows_done = 0
            self.stages: dict[str, dict] = {}
            self.actors: dict[str, dict] = {}

        def record(
            self, stage: str, rows: int, busy: float, start: float, end: float, parts=None, actor=None
        ):
            self.rows_done += rows
            s = self.stages.setdefault(stage, {"rows": 0, "busy_s": 0.0, "first": start, "last": end})
            s["rows"] += rows
            s["busy_s"] += busy
            s["first"], s["last"] = min(s["first"], start), max(s["last"], end)
            if actor is not None:
                a = self.actors.setdefault(actor, {"rows": 0, "first": start, "last": end})
                a["rows"] += rows
                a["first"], a["last"] = min(a["first"], start), max(a["last"], end)
                for k, v in (parts or {}).items():
                    a[k] = a.get(k, 0.0) + v

        def value(self) -> int:
            return self.rows_done

        def snapshot(self) -> dict:
            return {"stages": self.stages, "actors": self.actors}

    return Stats


def start_stats():
    """The run's stats actor, on the driver's node (it lives as long as the driver)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return _stats_actor().options(scheduling_strategy=here).remote()


def tell(stats, stage: str, rows: int, start: float, t0: float, parts=None, actor=None) -> None:
    """Tells the stats actor (None: no one) that ``stage`` did ``rows`` since wall time ``start``
    (``t0`` from ``time.perf_counter``); fire and forget."""
    if stats is not None:
        busy = time.perf_counter() - t0
        stats.record.remote(stage, rows, busy, start, time.time(), parts, actor)


@dataclass(frozen=True)
class Bottleneck:
    stage: str  # "start-up", "reading", "decoding", "the model", "writing"
    line: str  # the one line the summary prints


def report(snapshot: dict, run_start: float, run_end: float, cpus: float) -> dict:
    """The efficiency section of the summary and ``_report.json`` (see the module doc)."""
    stages = {}
    for name in STAGES:
        s = snapshot["stages"].get(name)
        if s:
            stages[name] = {
                "rows": s["rows"],
                "busy_s": round(s["busy_s"], 3),
                "wall_s": round(s["last"] - s["first"], 3),
            }
    actors = {}
    for key, a in sorted(snapshot["actors"].items()):
        life = max(a["last"] - a["first"], 1e-9)
        actors[key] = {
            "images": a["rows"],
            "forward_s": round(a.get("forward", 0.0), 3),
            "waiting_for_input_s": round(a.get("wait", 0.0), 3),
            "preparing_input_s": round(a.get("inputs", 0.0), 3),
            "building_output_s": round(a.get("output", 0.0), 3),
            "busy_fraction": round(min(1.0, a.get("forward", 0.0) / life), 3),
        }
    model = snapshot["stages"].get("model")
    ready = snapshot["stages"].get("ready")
    wall = max(run_end - run_start, 1e-9)
    out: dict = {"wall_s": round(wall, 3), "stages": stages, "actors": actors}
    if ready:
        out["start_up_s"] = round(ready["first"] - run_start, 3)
    if model:
        first = model["first"]
        out["fixed_cost_s"] = round(first - run_start, 3)
        steady = max(run_end - first, 1e-9)
        out["steady_images_per_s"] = round(model["rows"] / steady, 3)
        forward = sum(a.get("forward", 0.0) for a in snapshot["actors"].values())
        lives = sum(max(a["last"] - a["first"], 1e-9) for a in snapshot["actors"].values())
        waits = sum(a.get("wait", 0.0) for a in snapshot["actors"].values())
        out["model_busy_fraction"] = round(min(1.0, forward / lives), 3) if lives else 0.0
        out["model_waiting_fraction"] = round(min(1.0, waits / lives), 3) if lives else 0.0
    b = bottleneck(out, cpus)
    out["bottleneck"] = b.stage
    out["bottleneck_line"] = b.line
    return out


def bottleneck(r: dict, cpus: float) -> Bottleneck:
    """Names what limited the run, from the measured shares, and the flag that moves it.

    - start-up: over half the wall time passed before a model actor was ready (Ray,
      the actor's start, the model's load and compile);
    - the model: its actors spent at least half their time in the forward pass;
    - otherwise the actors waited for input (or for their output to go): the stage of
      read, decode and write with the most busy seconds per CPU it could use is named.
    """
    wall = r["wall_s"]
    start_up = r.get("start_up_s", wall)
    if start_up > 0.5 * wall:
        return Bottleneck(
            "start-up",
            f"bottleneck: start-up ({start_up:.1f} of {wall:.1f} s before a model actor was ready): "
            "give a run more images, or keep a cluster up and join it (RAY_ADDRESS)",
        )
    busy = r.get("model_busy_fraction", 0.0)
    if busy >= 0.5:
        return Bottleneck(
            "the model",
            f"bottleneck: the model (its actors in the forward pass {busy:.0%} of their time): more "
            "--actors, GPUs (--num-gpus-per-actor), --precision fp16/bf16 on GPU, or --compile",
        )
    st = r["stages"]
    share = {name: st[name]["busy_s"] for name in ("read", "decode", "write") if name in st}
    actors = r.get("actors", {})
    prepare = sum(a["preparing_input_s"] for a in actors.values())
    if prepare > share.get("decode", 0.0):  # --decode gpu: decoding happens in the actor
        share["decode"] = prepare
    worst = max(share, key=share.get) if share else "read"
    waiting = r.get("model_waiting_fraction", 0.0)
    why = f"the model actors waited for input {waiting:.0%} of their time, busy {busy:.0%}"
    advice = {
        "read": ("reading", "more CPUs per model actor, or inputs nearer the cluster (larger shards)"),
        "decode": ("decoding", "more CPUs per model actor (decode tasks), or --decode gpu on GPUs"),
        "write": ("writing", "a faster --output, or larger --rows-per-file"),
    }[worst]
    return Bottleneck(
        advice[0],
        f"bottleneck: {advice[0]} ({why}; {worst} busy {share.get(worst, 0.0):.1f} s on "
        f"{cpus:g} CPUs): {advice[1]}",
    )


def lines(r: dict) -> list[str]:
    """The summary's efficiency lines."""
    out = []
    for name, s in r["stages"].items():
        out.append(f"stage     {name}: {s['rows']} rows, busy {s['busy_s']:.1f} s, wall {s['wall_s']:.1f} s")
    for key, a in r["actors"].items():
        out.append(
            f"actor     {key}: {a['images']} images; forward {a['forward_s']:.1f} s "
            f"({a['busy_fraction']:.0%}), waiting for input {a['waiting_for_input_s']:.1f} s, "
            f"preparing input {a['preparing_input_s']:.1f} s, building output {a['building_output_s']:.1f} s"
        )
    if "fixed_cost_s" in r:
        out.append(
            f"start-up  {r.get('start_up_s', 0):.1f} s until a model actor was ready, "
            f"{r['fixed_cost_s']:.1f} s until the first batch reached it; then "
            f"{r['steady_images_per_s']:.1f} images/s"
        )
    out.append(r["bottleneck_line"])
    return out
