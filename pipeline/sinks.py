"""Stage 5: Parquet out: the explicit schema, provenance metadata, file naming, the output check."""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from datetime import datetime, timezone

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import columns as C

COMPRESSION = "zstd"
METADATA_PREFIX = "pipeline."


class OutputError(ValueError):
    """The output location is not usable (exists and is not empty, not writable)."""


def check_output(uri: str, overwrite: bool, storage_options: dict | None = None) -> None:
    """Refuses an existing, non-empty output unless ``overwrite``; then clears it.

    Raises:
        OutputError: the output holds files and ``overwrite`` is false.
    """
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    if not fs.exists(path):
        return
    if not fs.isdir(path):
        raise OutputError(f"output {uri} exists and is a file; pass a folder URI")
    if not fs.find(path):
        return
    if not overwrite:
        raise OutputError(f"output {uri} exists and is not empty; pass --overwrite to replace it")
    fs.rm(path, recursive=True)


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
    return {METADATA_PREFIX + k: v for k, v in values.items()}


def _filename_provider():
    from ray.data.datasource import FilenameProvider

    class PartNames(FilenameProvider):
        """``part-<task>-<write uuid>.parquet``: zero-padded, sortable, unique per run."""

        def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
            return f"part-{task_index:06d}-{write_uuid}.parquet"

    return PartNames(file_format="parquet")


def write_parquet(ds, uri: str, schema: pa.Schema, rows_per_file: int, storage_options=None) -> None:
    """Writes the dataset with the explicit output schema (and its metadata), zstd."""
    ds.write_parquet(
        uri,
        filesystem=_arrow_fs(uri, storage_options),
        schema=schema,
        compression=COMPRESSION,
        min_rows_per_file=rows_per_file,
        max_rows_per_file=rows_per_file,
        filename_provider=_filename_provider(),
    )


def _arrow_fs(uri: str, storage_options: dict | None):
    """The fsspec file system behind ``uri``, wrapped for pyarrow (and so for Ray)."""
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, _ = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    return PyFileSystem(FSSpecHandler(fs))


@dataclass(frozen=True)
class Written:
    files: tuple[str, ...]
    rows: int
    ok: int
    errors: int


def read_back(uri: str, storage_options: dict | None = None) -> Written:
    """Counts what a Parquet reader sees under ``uri`` (files whose names start with _ or . are not data)."""
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    files = sorted(p for p in fs.find(path) if p.endswith(".parquet") and not _hidden(p[len(path) :]))
    if not files:
        return Written((), 0, 0, 0)
    table = pq.read_table(files, columns=[C.STATUS], filesystem=_arrow_fs(uri, storage_options))
    ok = pc.sum(pc.equal(table[C.STATUS], C.STATUS_OK)).as_py() or 0
    return Written(tuple(fs.unstrip_protocol(p) for p in files), table.num_rows, ok, table.num_rows - ok)


def _hidden(relpath: str) -> bool:
    return any(part.startswith(("_", ".")) for part in relpath.split("/") if part)
