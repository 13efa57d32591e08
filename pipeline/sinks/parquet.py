"""Stage 5: Parquet out: the explicit schema, provenance metadata, file naming, the output check.

Ray writes every file under ``<output>/_staging-<run>/`` (a path Parquet readers skip);
``pipeline.commit`` then moves them into place under the output's lease and journal.
"""

from __future__ import annotations

import functools
import json
import platform
from dataclasses import dataclass
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import columns as C
from pipeline.errors import BadInputError
from pipeline.storage import is_hidden, redact_all, url_to_fs

COMPRESSION = "zstd"
METADATA_PREFIX = "pipeline."


class OutputError(BadInputError):
    """The output location is not usable (exists and is not empty, not writable)."""


REPORT_NAME = "_report.json"


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


def _filename_provider():
    from ray.data.datasource import FilenameProvider

    class PartNames(FilenameProvider):
        """``part-<task>-<write uuid>.parquet``: zero-padded, sortable, unique per run."""

        def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
            return f"part-{task_index:06d}-{write_uuid}.parquet"

    return PartNames(file_format="parquet")


def staging_dir(uri: str, run_id: str) -> str:
    from pipeline.commit import staging_rel

    return f"{uri.rstrip('/')}/{staging_rel(run_id)}"


@dataclass(frozen=True)
class Staged:
    files: list[str]  # the staged file paths (without protocol) that the driver sees
    rows: int  # the rows Ray Data wrote, as its write tasks counted them
    visible_rows: int  # the rows in ``files``, from their footers


def write_staged(
    ds, staging: str, schema: pa.Schema, rows_per_file: int, storage_options=None, stats=None
) -> Staged:
    """Runs the dataset into Parquet under ``staging`` (a path readers skip).

    What Ray wrote and what the driver sees are counted separately: they differ when the
    workers wrote somewhere the driver does not look (a local path on another node).
    """
    import uuid

    sink = _counting_parquet_datasink()(
        staging,
        filesystem=_arrow_fs(staging, storage_options),
        arrow_parquet_args={"schema": schema, "compression": COMPRESSION},
        min_rows_per_file=rows_per_file,
        max_rows_per_file=rows_per_file,
        filename_provider=_filename_provider(),
        dataset_uuid=uuid.uuid4().hex,
    )
    sink.stats = stats  # the run's efficiency.Stats actor: each write task tells of its rows
    ds.write_datasink(sink)
    fs, path = url_to_fs(staging, storage_options)
    fs.invalidate_cache()
    files = sorted(p for p in fs.find(path) if p.endswith(".parquet")) if fs.exists(path) else []
    arrow_fs = _arrow_fs(staging, storage_options)
    visible = sum(pq.read_metadata(f, filesystem=arrow_fs).num_rows for f in files)
    return Staged(files, sink.rows, visible)


@functools.cache
def _counting_parquet_datasink():
    """Ray Data's Parquet datasink, keeping the row count of its write result on the driver."""
    from ray.data._internal.datasource.parquet_datasink import ParquetDatasink

    class CountingParquetDatasink(ParquetDatasink):
        rows = 0
        stats = None

        def write(self, blocks, ctx):
            import time

            from ray.data.block import BlockAccessor

            from pipeline.efficiency import tell

            start, t0 = time.time(), time.perf_counter()
            blocks = list(blocks)
            out = super().write(blocks, ctx)
            tell(self.stats, "write", sum(BlockAccessor.for_block(b).num_rows() for b in blocks), start, t0)
            return out

        def on_write_complete(self, write_result):
            super().on_write_complete(write_result)
            self.rows = write_result.num_rows

    return CountingParquetDatasink


def report_json(report: dict) -> dict:
    """The run report as written beside the data (``REPORT_NAME``): credentials removed."""
    return json.loads(json.dumps(redact_all(report), sort_keys=True))


def _arrow_fs(uri: str, storage_options: dict | None):
    """The fsspec file system behind ``uri``, wrapped for pyarrow (and so for Ray)."""
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, _ = url_to_fs(uri, storage_options)
    return PyFileSystem(FSSpecHandler(fs))


@dataclass(frozen=True)
class Written:
    files: tuple[str, ...]
    rows: int
    ok: int
    errors: int


def read_back(uri: str, storage_options: dict | None = None) -> Written:
    """Counts what a Parquet reader sees under ``uri`` (files whose names start with _ or . are not data)."""
    fs, path = url_to_fs(uri, storage_options)
    files = sorted(p for p in fs.find(path) if p.endswith(".parquet") and not is_hidden(p[len(path) :]))
    if not files:
        return Written((), 0, 0, 0)
    table = pq.read_table(files, columns=[C.STATUS], filesystem=_arrow_fs(uri, storage_options))
    ok = pc.sum(pc.equal(table[C.STATUS], C.STATUS_OK)).as_py() or 0
    return Written(tuple(fs.unstrip_protocol(p) for p in files), table.num_rows, ok, table.num_rows - ok)
