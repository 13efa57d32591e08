"""Stage 5, the sink: the rows become a Delta Lake table, one commit per run.

- ``parquet``: one data file (Parquet, zstd, provenance in the footer) and what Delta
  records of it; plain pyarrow.
- ``delta``: the table: its snapshot, what it holds of each input (the nightly job plans
  from it), the one commit of a run (``Transaction``), upkeep, history, vacuum.
- ``datasink``: Ray Data's write tasks (``TableSink``, whose ``on_write_complete`` commits),
  and the rows a night keeps from the files it replaces (``kept_rows``). Imports Ray: the
  driver's run code imports it from here lazily.
- ``migrate``: the previous Parquet layout, converted once into a table.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from datetime import datetime, timezone

from pipeline.sinks.delta import (
    APP_ID,
    RETENTION_HOURS,
    Committed,
    ConcurrentCommit,
    LiveFile,
    Table,
    TableError,
    Transaction,
    history_lines,
    maintain,
    open_existing,
    vacuum,
)
from pipeline.sinks.parquet import DataFile, write_file
from pipeline.storage import redact_all

METADATA_PREFIX = "pipeline."

__all__ = [
    "APP_ID",
    "RETENTION_HOURS",
    "Committed",
    "ConcurrentCommit",
    "DataFile",
    "KeptRows",
    "LiveFile",
    "Table",
    "TableError",
    "TableSink",
    "Transaction",
    "history_lines",
    "kept_rows",
    "maintain",
    "open_existing",
    "provenance",
    "vacuum",
    "write_file",
]


@dataclass(frozen=True)
class KeptRows:
    """What a commit replaces but keeps: the rows of ``files`` not of the inputs ``drop``."""

    files: list  # LiveFile
    drop: set  # source URIs whose rows go
    rows: int  # the rows kept


def provenance(model: str, weights: str, task: str, preprocessing: dict, precision: str) -> dict[str, str]:
    """File-level key-value metadata written into every data file's footer."""
    import pyarrow as pa
    import ray
    import torch
    import torchvision

    from pipeline import __version__

    versions = {
        "pipeline": __version__,
        "python": platform.python_version(),
        "ray": ray.__version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "pyarrow": pa.__version__,
    }
    try:
        import deltalake

        versions["deltalake"] = deltalake.__version__
    except ImportError:  # the GPU machine's bench runs without it
        pass
    values = {
        "model": model,
        "weights": weights,
        "task": task,
        "precision": precision,
        "preprocessing": json.dumps(preprocessing, sort_keys=True),
        "versions": json.dumps(versions, sort_keys=True),
        "run_time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return {METADATA_PREFIX + k: v for k, v in redact_all(values).items()}


def __getattr__(name: str):
    # The Ray side, imported when first used: the sink's users without Ray (history,
    # vacuum, migrate, the tests of the table) never load it.
    if name in ("TableSink", "kept_rows"):
        from pipeline.sinks import datasink

        return getattr(datasink, name)
    raise AttributeError(name)
