"""The output contract: column names and the Arrow schema, defined once.

Other teams code against these names and types; change them only with a version bump.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.config import TASKS
from pipeline.errors import BadInputError

if TYPE_CHECKING:  # pyarrow is imported where a schema is built: the GPU bench runs without it
    import pyarrow as pa

# Columns every row has.
ID = "id"
SOURCE = "source"
STATUS = "status"
ERROR = "error"
MODEL = "model"
WEIGHTS = "weights"

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
        fields.append(pa.field(EMBEDDING, pa.list_(pa.float32(), embedding_dim)))
    fields += [
        pa.field(MODEL, pa.string(), nullable=False),
        pa.field(WEIGHTS, pa.string(), nullable=False),
    ]
    return pa.schema(fields, metadata=metadata)
