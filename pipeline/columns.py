"""The output contract: column names and the Arrow schema, defined once.

Other teams code against these names and types; change them only with a version bump.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from pipeline.config import TASKS
from pipeline.errors import BadInputError

if TYPE_CHECKING:  # pyarrow is imported where a schema or table is built: the GPU bench runs without it
    import pyarrow as pa

# Columns every row has.
ID = "id"
SOURCE = "source"
STATUS = "status"
ERROR = "error"
MODEL = "model"
WEIGHTS = "weights"
# What a nightly run plans with (the table is its own ledger): the input's version when it
# was read (size:ETag, or size:mtime), and the fingerprint of what made the row
# (``run.Plan.fingerprint``: model, weights, preprocessing, task and heads).
SOURCE_VERSION = "source_version"
FINGERPRINT = "fingerprint"

# --task classify
CLASS_INDEX = "class_index"
CLASS_NAME = "class_name"
SCORE = "score"
TOPK_INDEX = "topk_index"
TOPK_NAME = "topk_name"
TOPK_SCORE = "topk_score"

# --task features
EMBEDDING = "embedding"

STATUS_OK = "ok"
STATUS_ERROR = "error"

# The nightly table's partition column: its value lives in Delta's log, not in the data files.
PARTITION = "dt"
# The embedding column's field metadata: the dimension, which a list<float32> does not carry.
EMBEDDING_DIM_KEY = "pipeline.embedding_dim"

# Intermediate columns between stages (not in the output).
BYTES = "bytes"
IMAGE = "image"


def wants_classes(task: str) -> bool:
    return task in ("classify", "both")


def wants_features(task: str) -> bool:
    return task in ("features", "both")


def output_schema(task: str, embedding_dim: int, metadata: dict[str, str] | None = None) -> pa.Schema:
    """The Arrow schema of the output Parquet for ``task``.

    Args:
        task: one of ``TASKS``.
        embedding_dim: length of the pooled feature vector (512 or 2048 for ResNets).
        metadata: file-level key-value metadata written into every Parquet footer.
    """
    import pyarrow as pa

    if task not in TASKS:
        raise BadInputError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    fields = [
        pa.field(ID, pa.string(), nullable=False),
        pa.field(SOURCE, pa.string(), nullable=False),
        pa.field(STATUS, pa.string(), nullable=False),
        pa.field(ERROR, pa.string()),
    ]
    if wants_classes(task):
        fields += [
            pa.field(CLASS_INDEX, pa.int32()),
            pa.field(CLASS_NAME, pa.string()),
            pa.field(SCORE, pa.float32()),
            pa.field(TOPK_INDEX, pa.list_(pa.int32())),
            pa.field(TOPK_NAME, pa.list_(pa.string())),
            pa.field(TOPK_SCORE, pa.list_(pa.float32())),
        ]
    if wants_features(task):
        # A list, not a fixed_size_list: Delta Lake has no fixed-size type. The dimension is
        # in the field's metadata (and every list of a table is that long).
        fields.append(
            pa.field(EMBEDDING, pa.list_(pa.float32()), metadata={EMBEDDING_DIM_KEY: str(embedding_dim)})
        )
    fields += [
        pa.field(MODEL, pa.string(), nullable=False),
        pa.field(WEIGHTS, pa.string(), nullable=False),
        pa.field(SOURCE_VERSION, pa.string()),
        pa.field(FINGERPRINT, pa.string()),
    ]
    return pa.schema(fields, metadata=metadata)


def to_table(
    task: str,
    ids: Sequence[str],
    sources: Sequence[str],
    errors: Sequence[str | None],
    *,
    model: str,
    weights: str,
    topk_index: np.ndarray | None = None,
    topk_score: np.ndarray | None = None,
    categories: Sequence[str] | None = None,
    embeddings: np.ndarray | None = None,
    source_versions: Sequence[str | None] | None = None,
    fingerprint: str | None = None,
    schema: pa.Schema | None = None,
) -> pa.Table:
    """One batch's predictions as rows of the output contract.

    Args:
        task: one of ``TASKS``; it decides which of the arrays below are needed.
        ids, sources: one per row.
        errors: one per row; None for a good row. An error row gets status "error" and
            nulls in every prediction column.
        model, weights: the ``model`` and ``weights`` columns, the same on every row.
        topk_index, topk_score: (good rows, k), best first (classify, both).
        categories: class index → name (classify, both).
        embeddings: (good rows, D) float32, already normalized if asked (features, both).
        source_versions: one per row, the input's version (None: unknown).
        fingerprint: the ``fingerprint`` column, the same on every row.
        schema: ``output_schema(task, D, metadata)``; built without metadata when None.

    The prediction arrays hold the good rows only, in batch order; with none, pass
    (0, k) and (0, D) arrays: k and D still shape the (null) lists.
    """
    import pyarrow as pa

    n = len(ids)
    if len(errors) != n or len(sources) != n:
        raise ValueError(f"{n} ids, {len(sources)} sources and {len(errors)} errors")
    ok = np.array([e is None for e in errors], dtype=bool)
    classes, feats = wants_classes(task), wants_features(task)
    if schema is None:
        schema = output_schema(task, embeddings.shape[1] if feats and embeddings is not None else 0)
    cols: dict[str, pa.Array] = {
        ID: pa.array(ids, pa.string()),
        SOURCE: pa.array(sources, pa.string()),
        STATUS: pa.array(np.where(ok, STATUS_OK, STATUS_ERROR), pa.string()),
        ERROR: pa.array(errors, pa.string()),
    }
    missing = pa.array(~ok)  # null mask for error rows
    if classes:
        if topk_index is None or topk_score is None or categories is None:
            raise ValueError(f"task {task!r} needs topk_index, topk_score and categories")
        idx = _fill(ok, topk_index, np.int32)
        score = _fill(ok, topk_score, np.float32)
        k = idx.shape[1]
        offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32))
        names = np.asarray(categories, dtype=object)[idx.reshape(-1)]
        cols[CLASS_INDEX] = pa.array(idx[:, 0], mask=~ok)
        cols[CLASS_NAME] = pa.array(names[::k], pa.string(), mask=~ok)
        cols[SCORE] = pa.array(score[:, 0], mask=~ok)
        cols[TOPK_INDEX] = pa.ListArray.from_arrays(offsets, idx.reshape(-1), mask=missing)
        cols[TOPK_NAME] = pa.ListArray.from_arrays(offsets, pa.array(names, pa.string()), mask=missing)
        cols[TOPK_SCORE] = pa.ListArray.from_arrays(offsets, score.reshape(-1), mask=missing)
    if feats:
        if embeddings is None:
            raise ValueError(f"task {task!r} needs embeddings")
        emb = _fill(ok, embeddings, np.float32)
        d = emb.shape[1]
        offsets = pa.array(np.arange(0, (n + 1) * d, d, dtype=np.int32))
        cols[EMBEDDING] = pa.ListArray.from_arrays(offsets, emb.reshape(-1), mask=missing)
    cols[MODEL] = pa.array([model] * n, pa.string())
    cols[WEIGHTS] = pa.array([weights] * n, pa.string())
    versions = (
        [None] * n
        if source_versions is None
        else [v if isinstance(v, str) else None for v in source_versions]
    )
    cols[SOURCE_VERSION] = pa.array(versions, pa.string())
    cols[FINGERPRINT] = pa.array([fingerprint] * n, pa.string())
    return pa.Table.from_arrays([cols[f.name] for f in schema], schema=schema)


def _fill(ok: np.ndarray, good: np.ndarray, dtype) -> np.ndarray:
    """(good rows, width) → (rows, width), zeros on error rows (nulls once masked)."""
    good = np.asarray(good)
    if good.ndim != 2 or len(good) != int(ok.sum()):
        raise ValueError(f"expected ({int(ok.sum())} good rows, width), got shape {good.shape}")
    out = np.zeros((len(ok), good.shape[1]), dtype=dtype)
    out[ok] = good
    return out
