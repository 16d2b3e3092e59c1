"""Parquet output shared by the jobs: atomic file writes, resumable runs, tensor columns.

A file appears under the output path only once it is complete (local: write a hidden temporary
file, then rename; object stores: one upload that becomes visible when it finishes). Files and
folders starting with "_" or "." are ignored by readers, which is where errors and temporaries go.
"""

import os
import uuid
from typing import Any, Dict, Iterable, List, Optional, Set

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from .sources import filesystem, url_for

ERRORS_DIR = "_errors"


def ensure_writable(output: str, storage_options: Optional[Dict[str, Any]] = None) -> None:
    """Create the output location and prove it writable before any work starts."""
    fs, path = filesystem(output, storage_options)
    try:
        fs.makedirs(path, exist_ok=True)
        probe = f"{path.rstrip('/')}/.write-probe-{uuid.uuid4().hex}"
        with fs.open(probe, "wb") as f:
            f.write(b"ok")
        fs.rm(probe)
    except Exception as e:  # permissions, missing bucket, read-only file system ...
        raise PermissionError(f"{output}: output location is not writable ({type(e).__name__}: {e})") from e


def write_table_atomic(table: pa.Table, output: str, name: str,
                       storage_options: Optional[Dict[str, Any]] = None) -> int:
    """Write `table` as `<output>/<name>` so that no partial file is ever visible; returns bytes written."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return write_bytes_atomic(sink.getvalue().to_pybytes(), output, name, storage_options)


def write_bytes_atomic(data: bytes, output: str, name: str,
                       storage_options: Optional[Dict[str, Any]] = None) -> int:
    """Write `data` as `<output>/<name>`, visible only once complete; returns bytes written."""
    fs, path = filesystem(output, storage_options)
    final = f"{path.rstrip('/')}/{name}"
    fs.makedirs(os.path.dirname(final), exist_ok=True)
    if _is_local(fs):
        tmp = f"{os.path.dirname(final)}/.{os.path.basename(final)}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    else:  # a single object upload is atomic: readers see all of it or nothing
        fs.pipe_file(final, data)
    return len(data)


def _is_local(fs) -> bool:
    return "file" in fs.protocol or "local" in fs.protocol


def existing_ids(output: str, column: str = "image_id",
                 storage_options: Optional[Dict[str, Any]] = None) -> Set[str]:
    """Ids already written under `output` (complete files only), to skip them on a rerun."""
    fs, path = filesystem(output, storage_options)
    files = _complete_files(fs, path)
    if not files:
        return set()
    dataset = pads.dataset(files, filesystem=fs, format="parquet")
    return set(dataset.to_table(columns=[column]).column(column).to_pylist())


def parquet_files(output: str, storage_options: Optional[Dict[str, Any]] = None) -> List[str]:
    """URLs of the complete Parquet files under `output`, sorted (errors and temporaries excluded)."""
    fs, path = filesystem(output, storage_options)
    return [url_for(fs, f) for f in _complete_files(fs, path)]


def _complete_files(fs, path: str) -> List[str]:
    """Sorted paths of the Parquet files under `path` that readers should see."""
    if not fs.exists(path):
        return []
    return sorted(f for f in fs.find(path) if f.endswith(".parquet") and not _hidden(f, path))


def ids_by_file(output: str, column: str = "image_id",
                storage_options: Optional[Dict[str, Any]] = None) -> Dict[str, str]:
    """{id: URL of the Parquet file holding it} for every complete file under `output`."""
    files = parquet_files(output, storage_options)
    if not files:
        raise FileNotFoundError(f"{output}: no Parquet files")
    found: Dict[str, str] = {}
    for url in files:
        fs, path = filesystem(url, storage_options)
        for image_id in pq.read_table(path, columns=[column], filesystem=fs)[column].to_pylist():
            found[image_id] = url
    return found


def _hidden(file: str, root: str) -> bool:
    rel = file[len(root.rstrip("/")) + 1:]
    return any(part.startswith((".", "_")) for part in rel.split("/"))


def tensor_column(array: np.ndarray) -> pa.ExtensionArray:
    """A fixed-shape tensor column (Arrow's canonical extension type, readable by plain pyarrow)."""
    return pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(array))


def read_table(output: str, columns: Optional[List[str]] = None,
               storage_options: Optional[Dict[str, Any]] = None, filter: Optional[pads.Expression] = None) -> pa.Table:
    """All complete Parquet files under `output` as one table (errors and temporaries excluded);
    `filter` (a pyarrow expression) is pushed down into the read."""
    fs, path = filesystem(output, storage_options)
    files = _complete_files(fs, path)
    if not files:
        raise FileNotFoundError(f"{output}: no Parquet files")
    return pads.dataset(files, filesystem=fs, format="parquet").to_table(columns=columns, filter=filter)


def read_errors(output: str, storage_options: Optional[Dict[str, Any]] = None) -> pa.Table:
    fs, path = filesystem(output, storage_options)
    folder = f"{path.rstrip('/')}/{ERRORS_DIR}"
    files = sorted(f for f in fs.find(folder) if f.endswith(".parquet")) if fs.exists(folder) else []
    if not files:
        return pa.table({"image_id": pa.array([], pa.string()), "source": pa.array([], pa.string()),
                         "reason": pa.array([], pa.string())})
    return pads.dataset(files, filesystem=fs, format="parquet").to_table()


def rows_to_table(rows: Iterable[Dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(list(rows))
