"""The actor's callable class, run in-process: contract, error rows, equality with torchvision."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from pipeline import columns as C
from pipeline import models
from pipeline.decode import Preprocess, decode_batch
from pipeline.predict import Predictor, PredictorSpec, is_out_of_memory, resolve_precision
from tests.conftest import ALL, FIDELITY_IDS, reference


def make_predictor(weights, task="both", **kw) -> Predictor:
    return Predictor(PredictorSpec.from_weights(weights, task=task, **kw))


def raw(keys):
    """A batch as the read stage hands it on."""
    return {
        C.ID: np.array(keys, dtype=object),
        C.SOURCE: np.array(["file:///x"] * len(keys), dtype=object),
        C.BYTES: np.array([ALL[k] for k in keys], dtype=object),
        C.ERROR: np.array([None] * len(keys), dtype=object),
    }


def decoded(weights, keys):
    return decode_batch(raw(keys), Preprocess.from_transforms(weights.transforms))


@pytest.fixture(scope="module")
def weights(resnet18_checkpoint):
    return models.resolve("resnet18", resnet18_checkpoint)


def test_both_matches_torchvision_and_keeps_error_rows(weights, resnet18_checkpoint):
    keys = FIDELITY_IDS + ["bad/truncated.jpg"]
    table = make_predictor(weights)(decoded(weights, keys))
    assert table.schema.equals(C.output_schema("both", 512), check_metadata=False)
    rows = {r[C.ID]: r for r in table.to_pylist()}
    bad = rows.pop("bad/truncated.jpg")
    assert bad[C.STATUS] == "error" and "truncated" in bad[C.ERROR]
    assert all(bad[c] is None for c in (C.CLASS_INDEX, C.TOPK_INDEX, C.EMBEDDING))
    assert bad[C.WEIGHTS] == weights.tag

    ref = reference("resnet18", resnet18_checkpoint, {k: ALL[k] for k in FIDELITY_IDS})
    for key, (feats, probs) in ref.items():
        row = rows[key]
        np.testing.assert_allclose(row[C.EMBEDDING], feats, rtol=1e-4, atol=1e-4 * np.abs(feats).max())
        top = np.argsort(-probs)[:5]
        assert row[C.TOPK_INDEX] == top.tolist()
        np.testing.assert_allclose(row[C.TOPK_SCORE], probs[top], rtol=1e-4, atol=1e-6)
        assert row[C.CLASS_INDEX] == top[0] and row[C.SCORE] == row[C.TOPK_SCORE][0]
        assert row[C.TOPK_NAME] == [weights.categories[i] for i in top]
        assert row[C.TOPK_SCORE] == sorted(row[C.TOPK_SCORE], reverse=True)


def test_classify_only_and_top_k(weights):
    table = make_predictor(weights, task="classify", top_k=3)(decoded(weights, FIDELITY_IDS[:2]))
    assert C.EMBEDDING not in table.column_names
    assert all(len(v) == 3 for v in table[C.TOPK_INDEX].to_pylist())


def test_features_normalized(weights):
    table = make_predictor(weights, task="features", normalize=True)(decoded(weights, FIDELITY_IDS[:2]))
    assert C.CLASS_INDEX not in table.column_names
    emb = np.array(table[C.EMBEDDING].to_pylist())
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)


def test_batch_of_only_errors(weights):
    table = make_predictor(weights)(decoded(weights, ["bad/empty.jpg", "bad/page.jpg"]))
    assert table[C.STATUS].to_pylist() == ["error", "error"]
    assert table[C.EMBEDDING].null_count == 2


def test_bf16_stays_close_to_fp32(weights):
    batch = decoded(weights, FIDELITY_IDS)
    fp32 = np.array(make_predictor(weights, precision="fp32")(batch)[C.EMBEDDING].to_pylist())
    bf16 = np.array(make_predictor(weights, precision="bf16")(batch)[C.EMBEDDING].to_pylist())
    cos = (fp32 * bf16).sum(1) / np.linalg.norm(fp32, axis=1) / np.linalg.norm(bf16, axis=1)
    assert cos.min() > 0.99


def test_decode_gpu_on_a_cpu_actor_gives_the_same_rows(weights):
    """``--decode gpu``: the batch holds bytes and the actor decodes them on its device (here
    the CPU). Same rows, statuses and reasons as the CPU decode stage; near-equal features."""
    keys = sorted(ALL)
    on_cpu = make_predictor(weights, task="features")(decoded(weights, keys))
    in_actor = make_predictor(weights, task="features", decode="gpu")(raw(keys))
    for column in (C.ID, C.STATUS, C.ERROR):
        assert in_actor[column].to_pylist() == on_cpu[column].to_pylist()
    ok = on_cpu.filter(on_cpu[C.STATUS].to_numpy(zero_copy_only=False) == "ok")
    a = np.array(ok[C.EMBEDDING].to_pylist())
    b = np.array(
        in_actor.filter(in_actor[C.STATUS].to_numpy(zero_copy_only=False) == "ok")[C.EMBEDDING].to_pylist()
    )
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.999


def test_auto_precision_is_fp16_on_cuda_and_fp32_on_cpu():
    assert resolve_precision("auto", torch.device("cuda")) == "fp16"
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"


def test_compile_gives_torchvision_numbers(weights):
    """--compile once failed in __init__ (its warm-up ran before the normalisation was set)."""
    batch = decoded(weights, FIDELITY_IDS[:2])
    eager = make_predictor(weights, task="features", batch_size=2)(batch)
    compiled = make_predictor(weights, task="features", batch_size=2, compile=True)(batch)
    a, b = (np.array(t[C.EMBEDDING].to_pylist()) for t in (eager, compiled))
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * np.abs(a).max())


@pytest.mark.parametrize("decode", ["cpu", "gpu"])
def test_concurrent_calls_give_the_rows_of_serial_calls(weights, decode):
    """GPU actors run two calls at once in threads (run.GPU_CALLS_PER_ACTOR)."""
    keys = sorted(ALL)
    batches = [raw(keys[i : i + 3]) for i in range(0, len(keys), 3)]
    if decode == "cpu":
        spec = Preprocess.from_transforms(weights.transforms)
        batches = [decode_batch(b, spec) for b in batches]
    pred = make_predictor(weights, task="both", decode=decode, threads=1)
    serial = [pred(b) for b in batches]
    with ThreadPoolExecutor(2) as pool:
        threaded = list(pool.map(pred, batches * 2))
    for got, want in zip(threaded, serial * 2, strict=True):
        assert got.column_names == want.column_names
        for column in (C.ID, C.STATUS, C.ERROR, C.TOPK_INDEX):
            assert got[column].to_pylist() == want[column].to_pylist()
        a, b = (np.array([e or [0.0] * 512 for e in t[C.EMBEDDING].to_pylist()]) for t in (got, want))
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_non_finite_model_output_becomes_an_error_row(resnet18_checkpoint):
    """A checkpoint whose numbers overflow must not write inf or NaN into the output."""
    sd = torch.load(resnet18_checkpoint, weights_only=True)
    sd["fc.bias"][7] = float("inf")
    w = models.resolve("resnet18", "none")
    pred = Predictor(PredictorSpec.from_weights(w, state_dict=sd, task="both"))
    table = pred(decoded(w, ["good/cat.jpg", "bad/empty.jpg"]))
    assert table[C.STATUS].to_pylist() == ["error", "error"]
    assert table[C.ERROR][0].as_py() == "non-finite model output at fp32; try --precision fp32"
    assert table[C.EMBEDDING].null_count == 2 and table[C.CLASS_INDEX].null_count == 2


class _OutOfMemoryAbove(torch.nn.Module):
    """The model, behind a CUDA memory limit: batches above ``limit`` images raise as CUDA does."""

    def __init__(self, model, limit):
        super().__init__()
        self.model, self.limit, self.sizes = model, limit, []

    def forward(self, x):
        self.sizes.append(len(x))
        if len(x) > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        return self.model(x)


def test_out_of_memory_halves_the_batch_and_keeps_the_smaller_size(weights):
    pred = make_predictor(weights, task="features", batch_size=8)
    images = decoded(weights, FIDELITY_IDS + FIDELITY_IDS[:3])[C.IMAGE]
    want, _ = pred.forward(images)
    pred.model = _OutOfMemoryAbove(pred.model, limit=2)
    got, _ = pred.forward(images)
    assert pred.max_batch == 2 and pred.model.sizes[:3] == [8, 4, 2]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    pred.model.sizes.clear()
    pred.forward(images[:4])
    assert pred.model.sizes == [2, 2]  # the smaller batch is kept
    assert not is_out_of_memory(ValueError("out of memory")) and is_out_of_memory(
        RuntimeError("CUDA error: out of memory")
    )


def test_to_table_encodes_numpy_predictions_with_error_rows_as_nulls():
    """The output contract from plain numpy arrays, no model: good rows' values, error rows' nulls."""
    errors = [None, "cannot decode: truncated", None]
    table = C.to_table(
        "both",
        np.array(["a", "b", "c"], dtype=object),
        ["s3://x/a", "s3://x/b", "s3://x/c"],
        errors,
        model="resnet18",
        weights="sha256:00",
        topk_index=np.array([[2, 0], [1, 3]]),
        topk_score=np.array([[0.7, 0.2], [0.6, 0.3]], np.float32),
        categories=["zero", "one", "two", "three"],
        embeddings=np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], np.float32),
    )
    assert table.schema.equals(C.output_schema("both", 3))
    rows = table.to_pylist()
    assert [r[C.STATUS] for r in rows] == ["ok", "error", "ok"]
    assert [r[C.ERROR] for r in rows] == errors
    assert rows[0][C.CLASS_INDEX] == 2 and rows[0][C.CLASS_NAME] == "two"
    assert rows[0][C.SCORE] == pytest.approx(0.7)
    assert rows[2][C.TOPK_INDEX] == [1, 3] and rows[2][C.TOPK_NAME] == ["one", "three"]
    assert rows[2][C.TOPK_SCORE] == pytest.approx([0.6, 0.3])
    assert rows[0][C.EMBEDDING] == [1.0, 2.0, 3.0] and rows[2][C.EMBEDDING] == [4.0, 5.0, 6.0]
    bad = rows[1]
    assert bad[C.ID] == "b" and bad[C.SOURCE] == "s3://x/b"
    for column in (C.CLASS_INDEX, C.CLASS_NAME, C.SCORE, C.TOPK_INDEX, C.TOPK_NAME, C.TOPK_SCORE):
        assert bad[column] is None
    assert bad[C.EMBEDDING] is None
    assert {(r[C.MODEL], r[C.WEIGHTS]) for r in rows} == {("resnet18", "sha256:00")}

    # One task at a time, with the caller's schema (metadata included); no good rows at all.
    schema = C.output_schema("features", 3, {"k": "v"})
    only_errors = C.to_table(
        "features", ["a"], ["s"], ["broken"], model="m", weights="w",
        embeddings=np.zeros((0, 3), np.float32), schema=schema,
    )  # fmt: skip
    assert only_errors.schema.equals(schema, check_metadata=True)
    assert only_errors[C.EMBEDDING].null_count == 1 and C.CLASS_INDEX not in only_errors.column_names
    with pytest.raises(ValueError, match="needs embeddings"):
        C.to_table("features", ["a"], ["s"], [None], model="m", weights="w")
