"""Stage 5, the sink: the rows out, behind one interface, with the commit protocol behind it.

A ``Sink`` writes a run's rows as files under ``<output>/_staging-<run>/`` (a path table
readers skip) and reads back what it wrote; ``pipeline.commit`` then moves the staged files
into place under the output's lease and journal, whatever their format. What is not format
specific is here: the output check, the provenance every file carries, the staging path,
the run report. Parquet (``pipeline.sinks.parquet``) is the one format today; another table
format is one new module and one line in ``SINKS``.
"""

from __future__ import annotations

import json
import platform
from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from pipeline.errors import BadInputError
from pipeline.storage import is_hidden, redact_all, url_to_fs

if TYPE_CHECKING:
    import pyarrow as pa

METADATA_PREFIX = "pipeline."
REPORT_NAME = "_report.json"


class OutputError(BadInputError):
    """The output location is not usable (exists and is not empty, not writable)."""


@dataclass(frozen=True)
class Staged:
    files: list[str]  # the staged file paths (without protocol) that the driver sees
    rows: int  # the rows Ray Data wrote, as its write tasks counted them
    visible_rows: int  # the rows in ``files``, from their footers
    executed: object = None  # the Ray Dataset that ran, for its stats


@dataclass(frozen=True)
class Written:
    files: tuple[str, ...]
    rows: int
    ok: int
    errors: int


class Sink(ABC):
    """One output format: how a run's rows become staged files, and how they are counted."""

    name: str
    extension: str  # of its data files, e.g. ".parquet"

    def is_data(self, relpath: str) -> bool:
        """Whether a table reader of the root reads ``relpath`` (not ``_``/``.`` paths)."""
        return relpath.endswith(self.extension) and not is_hidden(relpath)

    @abstractmethod
    def write_staged(
        self, ds, staging: str, schema: pa.Schema, rows_per_file: int, storage_options=None, stats=None
    ) -> Staged:
        """Runs the Ray dataset ``ds`` into files under ``staging``; commits nothing."""

    @abstractmethod
    def read_back(self, uri: str, storage_options: dict | None = None) -> Written:
        """Counts the rows, ok and error, that a reader sees under ``uri``."""

    @abstractmethod
    def rows_per_source(self, files: list[str], uri: str, storage_options=None) -> pa.Table:
        """Rows and error rows per file and input (the ``source`` column), for the nightly
        ledger: a table of ``counts_schema()``."""

    @abstractmethod
    def carry(self, src: str, dst: str, drop, uri: str, storage_options=None) -> int:
        """Writes ``src``'s rows but those of the inputs ``drop`` (``source`` values) to
        ``dst``, with ``src``'s schema and footer metadata; returns the rows written.

        How a night replaces the rows of one input in a file that others share: the file is
        carried over, not recomputed, so a changed input redoes that input alone.
        """


def counts_schema() -> pa.Schema:
    """What ``Sink.rows_per_source`` returns: one row per file and input in it."""
    import pyarrow as pa

    return pa.schema(
        [("file", pa.string()), ("source", pa.string()), ("rows", pa.int64()), ("errors", pa.int64())]
    )


def get(name: str = "parquet") -> Sink:
    """The sink registered as ``name``."""
    if name not in SINKS:
        raise OutputError(f"unknown output format {name!r}; choose one of {', '.join(SINKS)}")
    return SINKS[name]()


def check_output(uri: str, overwrite: bool, storage_options: dict | None = None) -> None:
    """Refuses an output that holds data unless ``overwrite``. Changes nothing.

    Leftovers of failed runs (``_staging-*``) and the commit's own files do not count as data.

    Raises:
        OutputError: the output holds data files and ``overwrite`` is false, or is a file,
            or cannot be listed.
    """
    fs, path = url_to_fs(uri, storage_options)
    try:
        if not fs.exists(path):
            bucket = path.split("/", 1)[0]
            if "://" in uri and not uri.startswith("file://") and not fs.exists(bucket):
                raise OutputError(f"output bucket {bucket} does not exist")
            return
        if not fs.isdir(path):
            raise OutputError(f"output {uri} exists and is a file; pass a folder URI")
        data = [p for p in fs.find(path) if not is_hidden(p[len(path) :])]
    except PermissionError as e:
        raise OutputError(f"output {uri} is not accessible: {e}") from None
    if data and not overwrite:
        raise OutputError(f"output {uri} exists and is not empty; pass --overwrite to replace it")


def provenance(model: str, weights: str, task: str, preprocessing: dict, precision: str) -> dict[str, str]:
    """File-level key-value metadata written into every output file's footer."""
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


def staging_dir(uri: str, run_id: str) -> str:
    from pipeline.commit import staging_rel

    return f"{uri.rstrip('/')}/{staging_rel(run_id)}"


def report_json(report: dict) -> dict:
    """The run report as written beside the data (``REPORT_NAME``): credentials removed."""
    return json.loads(json.dumps(redact_all(report), sort_keys=True))


from pipeline.sinks.parquet import ParquetSink  # noqa: E402  (it derives from Sink)

# The output formats: name → Sink class. A new format is a module and a line here.
SINKS: dict[str, type[Sink]] = {ParquetSink.name: ParquetSink}
