"""Wiring: ``prepare`` checks everything cheap on the driver, ``build`` chains the lazy
stages, ``execute`` runs them into the table's one commit, ``run`` is the one-shot job.

    read_shard ─► decode_batch ─► Predictor (actor pool) ─► TableSink ─► one Delta commit
    (CPU tasks, fused)            (one model per actor)     (write tasks)  (driver)

With ``--decode gpu`` there is no decode stage: the bytes go to the actors, which decode
them on their device (``Predictor.inputs``). The commit lifecycle (snapshot, transaction,
commit, checks) is ``sinks.delta``'s, the same for ``run`` and ``nightly``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from functools import cached_property

from pipeline import columns as C
from pipeline import efficiency, models, sinks, sources
from pipeline.config import ConfigError, RunConfig
from pipeline.decode import Preprocess, decode_batch
from pipeline.errors import RunFailedError
from pipeline.predict import Predictor, PredictorSpec, cpu_threads, pick_device, resolve_precision
from pipeline.storage import redact


@dataclass
class Plan:
    """What the driver settled before starting any Ray work."""

    config: RunConfig
    listing: sources.Listing
    weights: models.ResolvedWeights
    precision: str

    @cached_property
    def schema(self):
        """The output schema, with the provenance metadata (built once per run)."""
        w = self.weights
        preprocessing = {**w.preprocessing(), "decode": self.config.compute.decode}
        meta = sinks.provenance(w.model, w.tag, self.config.model.task, preprocessing, self.precision)
        return C.output_schema(self.config.model.task, w.embedding_dim, meta)

    @cached_property
    def table(self) -> sinks.Table:
        """The output table, its snapshot read once (``sinks.delta``)."""
        return sinks.Table(self.config.sink.output, self.config.storage_options)

    def facts(self) -> dict:
        """What commitInfo records of every run (``sinks.delta``), credentials removed."""
        w, c = self.weights, self.config
        return {
            "input": c.source.input,
            "format": self.listing.format,
            "model": w.model,
            "weights": w.tag,
            "weights_source": w.pretrained_source,
            "fingerprint": self.fingerprint,
            "task": c.model.task,
            "precision": self.precision,
            "preprocessing": w.preprocessing(),
            "decode": c.compute.decode,
            "embedding_dim": w.embedding_dim if C.wants_features(c.model.task) else None,
            "versions": json.loads(self.schema.metadata[b"pipeline.versions"]),
        }

    @cached_property
    def fingerprint(self) -> str:
        """What the rows' values depend on: the model, its weights, the preprocessing, the task
        and its heads' settings (top-k and class names, normalisation); ``"<model> <weights>
        <digest>"``. A nightly root keeps it per input, so that embeddings of two models never
        mix in one dataset. Precision and decoder are left out: they move values by rounding,
        not by meaning."""
        w, m = self.weights, self.config.model
        what: dict = {"model": w.model, "weights": w.tag, "preprocessing": w.preprocessing(), "task": m.task}
        if C.wants_classes(m.task):  # the heads' settings only where the task has that head
            what |= {"top_k": m.top_k, "categories": w.categories}  # --labels names the classes
        if C.wants_features(m.task):
            what["normalize"] = m.normalize
        digest = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]
        return f"{w.model} {w.tag} {digest}"


@dataclass(frozen=True)
class Summary:
    input_files: int
    skipped_files: int
    rows: int
    ok: int
    errors: int
    seconds: float
    output: str
    files: tuple[str, ...]
    weights: str
    run_id: str = ""
    stages: dict[str, float] = field(default_factory=dict)  # Ray Data operator → wall seconds
    efficiency: dict = field(default_factory=dict)  # efficiency.report: stages, actors, bottleneck

    version: int | None = None  # the table's version that the run committed
    skipped_why: dict[str, int] = field(default_factory=dict)  # why files were skipped → how many

    @property
    def images_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d["images_per_second"] = round(self.images_per_second, 3)
        return d

    def lines(self) -> list[str]:
        out = [
            f"rows      {self.rows} ({self.ok} ok, {self.errors} error) from {self.input_files} input files"
            + (f", {self.skipped_files} other files skipped" if self.skipped_files else "")
            + (
                f" ({', '.join(f'{n} {why}' for why, n in self.skipped_why.items())})"
                if self.skipped_why
                else ""
            ),
            f"speed     {self.images_per_second:.1f} images/s ({self.seconds:.1f} s wall)",
        ]
        if self.efficiency:
            out += efficiency.lines(self.efficiency)
        else:
            out += [f"stage     {name}: {secs:.1f} s" for name, secs in self.stages.items()]
        out += [
            f"weights   {self.weights}",
            f"output    {self.output}: Delta table version {self.version}, {len(self.files)} files added",
        ]
        return out


def stage_times(summary) -> dict[str, float]:
    """Wall seconds per Ray Data operator, from its structured stats (``Dataset.get_stats_summary``)."""
    out: dict[str, float] = {}

    def walk(s) -> None:
        for parent in s.parents:
            walk(parent)
        for op in s.operators_stats:
            out[op.operator_name] = round(op.time_total_s, 3)

    walk(summary)
    return out


def prepare(
    config: RunConfig,
    listing: sources.Listing | None = None,
    check_output: bool = True,
    load_weights: bool = True,
) -> Plan:
    """Validates input, output and weights, cheapest first; no Ray, no model built.

    Args:
        listing: an input listing already made (incremental runs pass the new files only).
        check_output: refuse an output ``run`` cannot write (incremental runs check theirs).
        load_weights: load the weights' tensors now (a model-zoo file from the torch hub
            cache, or downloaded); incremental runs wait until they know there is work.

    Raises:
        ValueError (InputError, TableError, WeightsError, ConfigError): one line each.
    """
    so = config.storage_options
    listing = listing or sources.list_input(config.source.input, config.source.format, so)
    m = config.model
    weights = models.resolve(m.name, m.weights, m.labels, m.resize_size, m.crop_size, so)
    if load_weights:
        weights.state_dict  # noqa: B018  (loads them: a missing file is one line, before Ray)
    precision = resolve_precision(m.precision, _device(config))
    plan = Plan(config, listing, weights, precision)
    if check_output:
        plan.table.check_writable(plan.schema, partitioned=False, replace=config.sink.overwrite)
    return plan


def _device(config: RunConfig) -> object:
    return pick_device("cuda" if config.compute.num_gpus_per_actor > 0 else "cpu")


def init_ray() -> bool:
    """Joins ``RAY_ADDRESS`` when set, and says which cluster; otherwise starts a Ray of its
    own. Never a cluster found on the machine: a plain ``ray.init()`` joins whatever
    ``ray start`` left there (or waits on its address if it died), and a relative output
    then lands in that cluster's working folder. True if this call started Ray."""
    import ray

    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        res = ray.cluster_resources()
        print(
            redact(
                f"joined the Ray cluster at {address} (RAY_ADDRESS): {len(nodes)} nodes, "
                f"{res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs"
            ),
            file=sys.stderr,
        )
    else:
        ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING)
    return True


def _check_shared_output(config: RunConfig) -> None:
    """A local output on a cluster of several nodes is written by each node to its own disk."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1 and "://" not in config.sink.output:
        print(
            f"warning: --output {config.sink.output} is a local path and the cluster has {len(nodes)} "
            "nodes: it must be storage that every node shares (NFS, a mounted bucket), or use an "
            "object-store URI",
            file=sys.stderr,
        )


def _check_reservations(config: RunConfig) -> None:
    """Over-reserving CPUs makes Ray Data wait forever with no error: refuse it up front."""
    import ray

    c = config.compute
    cpus = ray.cluster_resources().get("CPU", 0)
    reserved = c.actors[1] * c.cpus_per_actor
    if cpus and reserved > cpus - 1:
        raise ConfigError(
            f"--actors {c.actors[1]} x --cpus-per-actor {c.cpus_per_actor:g} reserves {reserved:g} "
            f"of the cluster's {cpus:g} CPUs and leaves none for reading, decoding and writing; "
            "lower --actors or --cpus-per-actor"
        )
    if c.num_gpus_per_actor > 0:
        gpus = ray.cluster_resources().get("GPU", 0)
        if gpus < c.num_gpus_per_actor:
            raise ConfigError(
                f"--num-gpus-per-actor {c.num_gpus_per_actor:g} but the cluster has {gpus:g} GPUs"
            )


def predictor_spec(plan: Plan, state_dict) -> PredictorSpec:
    c, m, w = plan.config.compute, plan.config.model, plan.weights
    threads = c.threads_per_actor
    if threads is None and c.num_gpus_per_actor == 0:
        # The model takes the node's cores, shared between the actors a node may hold.
        threads = max(1, cpu_threads() // c.actors[1])
    return PredictorSpec.from_weights(
        w,
        state_dict,
        task=m.task,
        top_k=m.top_k,
        normalize=m.normalize,
        precision=plan.precision,
        batch_size=c.batch_size,
        decode=c.decode,
        max_pixels=plan.config.source.max_pixels,
        compile=c.compile,
        device="cuda" if c.num_gpus_per_actor > 0 else "cpu",
        threads=threads,
        schema_metadata=plan.schema.metadata,
        fingerprint=plan.fingerprint,
    )


def decode_cpus(cpus_per_actor: float) -> float:
    """CPUs reserved per read+decode task.

    Half a CPU: decoding is light next to the model, so on a 2-core node two decode
    tasks, or a decode and a write task, fit beside a one-CPU model actor. It must also
    differ from the actor's reservation: Ray fuses a task stage into the next actor
    stage when their resources match, and decoding would then run serially with the
    model inside the actor instead of overlapping with it.
    """
    return 0.25 if cpus_per_actor == 0.5 else 0.5


def _decode(batch, *, spec: Preprocess, max_pixels: int, stats=None):
    start, t0 = time.time(), time.perf_counter()
    out = decode_batch(batch, spec, max_pixels)
    efficiency.tell(stats, "decode", len(out[C.ID]), start, t0)
    return out


def build(plan: Plan, stats=None, slots=None):
    """The lazy dataset: shards → rows → decoded uint8 → predictions (nothing runs yet).

    ``stats``: the run's ``efficiency.start_stats`` actor, told of every batch.
    ``slots``: ``cpu_actor_slots``' placement group for the model actors, or None."""
    import ray

    cfg = plan.config
    # Blocks of about one model batch of decoded crops: Ray Data's default (128 MiB, some
    # 870 crops) held a read+decode task's output back until the task ended, so the model
    # waited for a whole shard to be decoded before its first batch (efficiency report).
    crop = Preprocess.from_transforms(plan.weights.transforms).crop_size
    ray.data.DataContext.get_current().target_max_block_size = max(
        1 << 20, cfg.compute.batch_size * crop * crop * 3
    )
    from pipeline.sources.datasource import ShardDatasource

    cpus = decode_cpus(cfg.compute.cpus_per_actor)
    source = ShardDatasource(
        sources.shards(plan.listing),
        cfg.source.image_column,
        cfg.source.id_column,
        cfg.storage_options,
        stats,
    )
    ds = ray.data.read_datasource(source, num_cpus=cpus)
    c = cfg.compute
    if c.decode == "cpu":
        ds = ds.map_batches(
            _decode,
            # Batches of the model's size: decoding streams into the actors as it goes.
            batch_size=c.batch_size,
            batch_format="numpy",
            num_cpus=cpus,
            fn_kwargs={
                "spec": Preprocess.from_transforms(plan.weights.transforms),
                "max_pixels": cfg.source.max_pixels,
                "stats": stats,
            },
        )
    spec = predictor_spec(plan, ray.put(plan.weights.state_dict))
    placement = {}
    if slots is not None:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        placement["scheduling_strategy"] = PlacementGroupSchedulingStrategy(slots)
        # One actor per node: each takes its node's cores.
        spec = replace(spec, threads=c.threads_per_actor)
    return ds.map_batches(
        Predictor,
        fn_constructor_kwargs={"spec": spec, "stats": stats},
        compute=actor_pool(c, len(slots.bundle_specs) if slots is not None else None),
        batch_size=c.batch_size,
        batch_format="numpy",
        num_cpus=c.cpus_per_actor,
        num_gpus=c.num_gpus_per_actor,
        **placement,
    )


# Calls a GPU actor runs at once, in threads: while one call's model runs on the GPU, the
# other decodes its batch and builds its Arrow output. On an H100 (bench/README.md) two
# calls took ResNet-50 fp16 from 10.0k to 10.6k images/s with --decode cpu and from 3.4k
# to 4.1k with --decode gpu. CPU actors run one call: their model already takes the cores.
GPU_CALLS_PER_ACTOR = 2


def actor_pool(c, max_size: int | None = None) -> object:
    """The model stage's ``ActorPoolStrategy`` for a ``ComputeConfig`` (``max_size``: a cap)."""
    import ray

    calls = GPU_CALLS_PER_ACTOR if c.num_gpus_per_actor > 0 else 1
    hi = min(c.actors[1], max_size or c.actors[1])
    return ray.data.ActorPoolStrategy(
        min_size=min(c.actors[0], hi),
        max_size=hi,
        max_concurrent_calls_per_actor=calls,
        enable_true_multi_threading=calls > 1,
    )


def cpu_actor_slots(config: RunConfig):
    """On a cluster of several nodes, CPU model actors get one slot per node: a placement
    group of STRICT_SPREAD bundles, one actor's CPUs each. None elsewhere (one node, or
    GPU actors, which their GPUs already spread).

    A CPU actor uses its node's cores through its threads, so one per node is the layout
    anyway. The slots are what keeps it so when a node is lost: Ray re-creates the lost
    actor only in its own bundle, which waits for a new node, instead of on the nodes
    left, where it took the CPUs that reading, decoding and writing need, and the run
    waited forever.
    """
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    c = config.compute
    nodes = [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) >= c.cpus_per_actor]
    if c.num_gpus_per_actor > 0 or c.cpus_per_actor <= 0 or len(nodes) < 2:
        return None
    slots = placement_group(
        [{"CPU": c.cpus_per_actor}] * min(c.actors[1], len(nodes)), strategy="STRICT_SPREAD"
    )
    if not slots.wait(timeout_seconds=60):
        remove_placement_group(slots)
        print(
            "warning: could not place one model actor per node; actors go where Ray puts them",
            file=sys.stderr,
        )
        return None
    return slots


def new_run_id() -> str:
    return f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


class RunError(RunFailedError):
    """The run finished but its output is not what it read: nothing may say it succeeded."""


@dataclass(frozen=True)
class Execution:
    committed: sinks.Committed  # the table's version, files and rows after the commit
    seconds: float
    stages: dict[str, float]
    efficiency: dict = field(default_factory=dict)  # efficiency.report


def execute(plan: Plan, tx: sinks.Transaction, kept=None, facts=None) -> Execution:
    """Runs the whole Ray Data chain into ``tx``'s table and commits it (the sink does, on
    the driver, once every write task is done): nothing is visible before, all after.

    ``kept``: ``sinks.KeptRows`` of the files the commit replaces (nightly); ``facts``: called
    with the written files, gives what commitInfo adds (rows, errors, the error budget).
    """
    import ray

    config = plan.config
    run_start = time.time()
    started_here = init_ray()
    slots = None
    try:
        _check_reservations(config)
        _check_shared_output(config)
        t0 = time.perf_counter()
        stats = efficiency.start_stats()
        slots = cpu_actor_slots(config)
        ds = build(plan, stats, slots) if plan.listing.files else None
        if ds is not None:
            # Blocks of exactly rows_per_file rows (the last one fewer): one file each.
            ds = ds.repartition(target_num_rows_per_block=config.sink.rows_per_file, strict=True)
        if kept is not None:
            old = sinks.kept_rows(
                tx.table, kept.files, kept.drop, stats, decode_cpus(config.compute.cpus_per_actor)
            )
            ds = old if ds is None else ds.union(old)

        cpus = ray.cluster_resources().get("CPU", 0)

        def committed_facts(files) -> dict:
            """What commitInfo adds: the command's facts, and the run's efficiency so far
            (every write task is done; the model's last tells may still be on their way)."""
            out = facts(files) if facts is not None else {}
            r = efficiency.report(ray.get(stats.snapshot.remote()), run_start, time.time(), cpus)
            keep = ("bottleneck", "steady_images_per_s", "start_up_s", "model_busy_fraction", "wall_s")
            return {**out, "efficiency": {k: r[k] for k in keep if k in r}}

        def write(stand_down):
            sink = sinks.TableSink(tx, stats, before_commit=stand_down, info=committed_facts)
            ds.write_datasink(sink)
            return sink

        sink = _watched(write, stats, config.compute.stall_timeout)
        seconds = time.perf_counter() - t0
        run_end = time.time()
        committed = sink.committed
        new_rows = committed.added_rows - tx.carried_rows
        # Every stage tells of each row once; the last few tells may still be on their way.
        stages_run = 3 if config.compute.decode == "gpu" else 4
        deadline = time.monotonic() + 10
        while ray.get(stats.value.remote()) < stages_run * new_rows and time.monotonic() < deadline:
            time.sleep(0.1)
        snapshot = ray.get(stats.snapshot.remote())
        report = efficiency.report(snapshot, run_start, run_end, cpus)
        return Execution(committed, seconds, stage_times(ds.get_stats_summary()), report)
    finally:
        if slots is not None and ray.is_initialized():
            from ray.util.placement_group import remove_placement_group

            with contextlib.suppress(Exception):
                remove_placement_group(slots)
        if started_here:
            ray.shutdown()


class _Stalled(KeyboardInterrupt):
    """Raised in the run's own thread by its stall watcher; never by a user's Ctrl+C."""


# After a stall is declared: how long the run may take to stop before it is told again
# (Ray Data may have been in C code), and how often at most.
_RESEND_S = 60.0
_SENDS = 2


def _raise_in(thread_id: int) -> None:
    """Raises ``_Stalled`` in thread ``thread_id`` at its next Python instruction: any thread,
    whatever SIGINT's handler (a signal would only reach the main thread, or nothing)."""
    import ctypes

    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(_Stalled))


def _watched(work, stats, stall_timeout: float):
    """Runs ``work(stand_down)`` (the Ray Data execution) in this thread and returns its
    result, unless no batch is read or predicted for ``stall_timeout`` seconds: then the run
    fails with one line saying what it waited for, instead of hanging (a lost node whose
    re-created actors hold every CPU left would otherwise wait forever).

    ``work`` calls ``stand_down()`` right before its commit: from then on no stall is
    declared, so the interrupt can never land inside a commit; if one was declared just
    before, ``stand_down`` raises it instead, and nothing is committed.

    A watcher thread raises ``_Stalled`` (a KeyboardInterrupt, as Ctrl+C would be) in this
    thread, so that Ray Data stops its own execution on the way out: the execution never
    outlives the run (one left in a thread could start a fresh Ray after ours was shut
    down, and crash at exit)."""
    import ray

    caller = threading.get_ident()
    lock, finished, stalled = threading.Lock(), threading.Event(), {}
    nodes_at_start = len([n for n in ray.nodes() if n.get("Alive")])

    def watch():
        last, changed = -1, time.monotonic()
        while not finished.wait(timeout=min(5.0, stall_timeout / 4)):
            try:
                count = ray.get(stats.value.remote(), timeout=10)
            except Exception:
                count = last
            if count != last:
                last, changed = count, time.monotonic()
                continue
            if time.monotonic() - changed <= stall_timeout:
                continue
            nodes = len([n for n in ray.nodes() if n.get("Alive")])
            free, total = ray.available_resources(), ray.cluster_resources()
            message = (
                f"no progress for {stall_timeout:g} s (--stall-timeout) after {max(last, 0)} "
                f"rows read or predicted: waiting for Ray to schedule the rest, with {nodes} of "
                f"{nodes_at_start} nodes alive and {free.get('CPU', 0):g} of "
                f"{total.get('CPU', 0):g} CPUs free; nothing was committed"
            )
            for _ in range(_SENDS):
                with lock:
                    if finished.is_set():
                        return
                    stalled["message"] = message
                    _raise_in(caller)
                if finished.wait(_RESEND_S):
                    return
            return

    def stand_down() -> None:
        with lock:
            finished.set()
            declared = "message" in stalled
        if declared:  # the watcher's interrupt is on its way: it lands in this wait
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                time.sleep(0.01)
            raise _Stalled

    watcher = threading.Thread(target=watch, name="stall-watchdog", daemon=True)
    watcher.start()
    received = False
    try:
        try:
            value = work(stand_down)
        except _Stalled:
            received = True
            raise
        finally:
            with lock:
                finished.set()
            if "message" in stalled and not received:
                # Declared as the work ended: its exception is on its way; take it here.
                with contextlib.suppress(_Stalled):
                    deadline = time.monotonic() + 5
                    while time.monotonic() < deadline:
                        time.sleep(0.01)
        if "message" in stalled:
            raise RunError(stalled["message"])
        return value
    except _Stalled:
        logging.getLogger("ray.data").setLevel(logging.CRITICAL)
        raise RunError(stalled["message"]) from None
    finally:
        finished.set()  # again: an exception may have landed before the inner finally set it
        watcher.join(timeout=15)


def run(config: RunConfig, plan: Plan | None = None) -> Summary:
    """Runs the whole job and commits it to the output table in one Delta commit (with
    ``--overwrite``, the same commit removes the table's old files), then summarises it."""
    plan = plan or prepare(config)
    run_id = new_run_id()
    table = plan.table
    removes = table.files() if config.sink.overwrite else []
    info = {**plan.facts(), "command": "run", "partition": None}
    tx = table.transaction(run_id, plan.schema, removes=removes, info=info)

    def facts(files) -> dict:
        rows, errors = sum(f.rows for f in files), sum(f.errors for f in files)
        return {"rows": rows, "errors": errors, "rows_replaced": sum(f.rows for f in removes)}

    ex = execute(plan, tx, facts=facts)
    c = ex.committed
    return Summary(
        input_files=len(plan.listing.files),
        skipped_files=plan.listing.skipped,
        rows=c.added_rows,
        ok=c.added_rows - c.added_errors,
        errors=c.added_errors,
        seconds=ex.seconds,
        output=config.sink.output,
        files=tuple(f.path for f in c.files),
        weights=f"{plan.weights.tag} ({plan.weights.pretrained_source})",
        run_id=run_id,
        stages=ex.stages,
        efficiency=ex.efficiency,
        version=c.version,
        skipped_why=plan.listing.skipped_why(),
    )
