"""``efficiency.bottleneck`` names the stage that limited a run, from measured shares: each
branch on crafted measurements (what the e2e test cannot steer without timing)."""

import pytest

from pipeline.efficiency import bottleneck, report


def measured(
    wall=100.0, start_up=10.0, busy=0.2, waiting=0.7, read=1.0, decode=1.0, write=1.0, preparing=0.0
):
    """A report's fields as ``efficiency.report`` makes them."""
    return {
        "wall_s": wall,
        "start_up_s": start_up,
        "model_busy_fraction": busy,
        "model_waiting_fraction": waiting,
        "stages": {name: {"rows": 10, "busy_s": s, "wall_s": s} for name, s in
                   (("read", read), ("decode", decode), ("write", write))},
        "actors": {"h:1": {"images": 10, "forward_s": 1.0, "waiting_for_input_s": 1.0,
                           "preparing_input_s": preparing, "building_output_s": 0.1, "busy_fraction": busy}},
    }  # fmt: skip


@pytest.mark.parametrize(
    "fields, stage, flag",
    [
        ({"start_up": 60.0}, "start-up", "RAY_ADDRESS"),
        ({"start_up": 50.0, "busy": 0.9}, "the model", "--actors"),  # half the wall is not over half
        ({"busy": 0.5}, "the model", "--compile"),
        ({"read": 9.0}, "reading", "larger shards"),
        ({"decode": 9.0}, "decoding", "--decode gpu"),
        ({"write": 9.0}, "writing", "--rows-per-file"),
        ({"decode": 0.0, "preparing": 9.0}, "decoding", "--decode gpu"),  # --decode gpu: in the actor
    ],
)
def test_each_branch_names_its_stage_and_the_flag_that_moves_it(fields, stage, flag):
    b = bottleneck(measured(**fields), cpus=2)
    assert b.stage == stage and b.line.startswith(f"bottleneck: {stage}") and flag in b.line


def test_report_computes_the_shares_the_bottleneck_reads():
    snapshot = {
        "stages": {
            "ready": {"rows": 0, "busy_s": 0.0, "first": 102.0, "last": 102.0},
            "read": {"rows": 8, "busy_s": 0.5, "first": 101.0, "last": 104.0},
            "decode": {"rows": 8, "busy_s": 6.0, "first": 101.5, "last": 108.0},
            "model": {"rows": 8, "busy_s": 2.0, "first": 103.0, "last": 110.0},
            "write": {"rows": 8, "busy_s": 0.1, "first": 105.0, "last": 110.0},
        },
        "actors": {"h:1": {"rows": 8, "first": 103.0, "last": 110.0, "forward": 1.4, "wait": 5.0,
                           "inputs": 0.1, "output": 0.1}},
    }  # fmt: skip
    r = report(snapshot, run_start=100.0, run_end=110.0, cpus=2)
    assert r["start_up_s"] == 2.0 and r["fixed_cost_s"] == 3.0 and r["steady_images_per_s"] == round(8 / 7, 3)
    assert r["model_busy_fraction"] == 0.2 and r["model_waiting_fraction"] == round(5 / 7, 3)
    assert r["bottleneck"] == "decoding" and r["stages"]["decode"] == {
        "rows": 8,
        "busy_s": 6.0,
        "wall_s": 6.5,
    }
