"""Parquet files shared by every table: atomic writes, complete-file listing and the resume skip
set (the provenance that keeps one model per dataset: provenance.py).

A file appears under the output path only once it is complete (local: write a hidden temporary
file, then rename; object stores: one upload that becomes visible when it finishes). Files and
folders starting with "_" or "." are ignored by readers, which is where errors, shard manifests
and temporaries go. Every data file carries its provenance (model, checkpoint, settings) in its
Parquet footer, so a rerun can check it without reading any rows.
"""

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from ..sources import filesystem, url_for

PROVENANCE_KEY = b"tinysam.provenance"
# Rows per output file aim at ~128 MiB: millions of small objects are slow to list and costly on S3.
TARGET_FILE_BYTES = 128 * 2**20


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


def write_table_atomic(
    table: pa.Table,
    output: str,
    name: str,
    storage_options: Optional[Dict[str, Any]] = None,
    provenance: Optional[Dict[str, Any]] = None,
) -> int:
    """Write `table` as `<output>/<name>` so that no partial file is ever visible (with
    `provenance` in its footer); returns bytes written."""
    if provenance is not None:
        metadata = dict(table.schema.metadata or {})
        metadata[PROVENANCE_KEY] = json.dumps(provenance, sort_keys=True).encode()
        table = table.replace_schema_metadata(metadata)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return write_bytes_atomic(sink.getvalue().to_pybytes(), output, name, storage_options)


def write_bytes_atomic(data: bytes, output: str, name: str, storage_options: Optional[Dict[str, Any]] = None) -> int:
    """Write `data` as `<output>/<name>`, visible only once complete; returns bytes written."""
    fs, path = filesystem(output, storage_options)
    final = f"{path.rstrip('/')}/{name}"
    fs.makedirs(os.path.dirname(final), exist_ok=True)
    if is_local(fs):
        tmp = f"{os.path.dirname(final)}/.{os.path.basename(final)}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    else:  # a single object upload is atomic: readers see all of it or nothing
        fs.pipe_file(final, data)
    return len(data)


def write_file_atomic(local_file: str, url: str, storage_options: Optional[Dict[str, Any]] = None) -> None:
    """Copy a local file to `url`, visible only once complete: for files too large to hold in
    memory whole (a corpus's COCO results)."""
    fs, target = filesystem(url, storage_options)
    fs.makedirs(os.path.dirname(target) or ".", exist_ok=True)
    if is_local(fs):
        tmp = f"{os.path.dirname(target)}/.{os.path.basename(target)}.{uuid.uuid4().hex}.tmp"
        shutil.copyfile(local_file, tmp)  # unique name: two jobs finishing together do not race
        os.replace(tmp, target)
    else:  # one upload: visible when it completes
        fs.put_file(local_file, target)


def is_local(fs) -> bool:
    return "file" in fs.protocol or "local" in fs.protocol


def parquet_files(output: str, storage_options: Optional[Dict[str, Any]] = None) -> List[str]:
    """URLs of the complete Parquet files under `output`, sorted (errors and temporaries excluded)."""
    fs, path = filesystem(output, storage_options)
    return [url_for(fs, f) for f in _complete_files(fs, path)]


def _complete_files(fs, path: str) -> List[str]:
    """Sorted paths of the Parquet files under `path` that readers should see."""
    if not fs.exists(path):
        return []
    return sorted(f for f in fs.find(path) if f.endswith(".parquet") and not _hidden(f, path))


def _hidden(file: str, root: str) -> bool:
    rel = file[len(root.rstrip("/")) + 1 :]
    return any(part.startswith((".", "_")) for part in rel.split("/"))


def hidden_files(output: str, folder: str, storage_options: Optional[Dict[str, Any]] = None) -> List[str]:
    """Sorted paths of the Parquet files of `<output>/<folder>` (a "_" table: errors, manifests)."""
    fs, path = filesystem(output, storage_options)
    root = f"{path.rstrip('/')}/{folder}"
    return sorted(f for f in fs.find(root) if f.endswith(".parquet")) if fs.exists(root) else []


def tensor_column(array: np.ndarray) -> pa.ExtensionArray:
    """A fixed-shape tensor column (Arrow's canonical extension type, readable by plain pyarrow)."""
    return pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(array))


def read_table(
    output: str,
    columns: Optional[List[str]] = None,
    storage_options: Optional[Dict[str, Any]] = None,
    filter: Optional[pads.Expression] = None,
) -> pa.Table:
    """All complete Parquet files under `output` as one table (errors and temporaries excluded);
    `filter` (a pyarrow expression) is pushed down into the read."""
    fs, path = filesystem(output, storage_options)
    files = _complete_files(fs, path)
    if not files:
        raise FileNotFoundError(f"{output}: no Parquet files")
    return pads.dataset(files, filesystem=fs, format="parquet").to_table(columns=columns, filter=filter)


def id_hashes(ids: Iterable[str]) -> np.ndarray:
    """64-bit hashes of image ids (BLAKE2b): the skip set's compact form."""
    return np.array(
        [int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(), "little") for i in ids], dtype=np.uint64
    )


@dataclass
class DoneIds:
    """Ids already written, as sorted 64-bit hashes: 8 bytes a row on the driver (1,000,000 rows:
    8 MB), whatever the ids' length. Two ids colliding (odds ~n^2/2^65: 3e-6 for SA-1B's 11 M
    images) would skip one image, never duplicate one."""

    hashes: np.ndarray

    @classmethod
    def of(cls, ids: Iterable[str]) -> "DoneIds":
        return cls(np.unique(id_hashes(ids)))

    def __len__(self) -> int:
        return len(self.hashes)

    def __contains__(self, image_id: str) -> bool:
        return bool(self.contains([image_id])[0])

    def contains(self, ids: List[str]) -> np.ndarray:
        h = id_hashes(ids)
        pos = np.searchsorted(self.hashes, h)
        return (
            (pos < len(self.hashes)) & (self.hashes[np.minimum(pos, len(self.hashes) - 1)] == h)
            if len(self.hashes)
            else np.zeros(len(h), bool)
        )


# Files read at once when planning a resume: on an object store each file costs two requests of
# ~50-100 ms (footer, then the id column), so one at a time an SA-1B output (~20,000 files) would
# take half an hour before any work; on local disk it changes nothing.
PLAN_READERS = 16


def read_done(output: str, storage_options: Optional[Dict[str, Any]] = None) -> Tuple[DoneIds, Dict[str, List[str]]]:
    """(ids already written, {provenance JSON: files}) of `output`, reading only the `image_id`
    column and the footers, `PLAN_READERS` files at a time: memory is the skip set's 8 bytes a
    row and a few files' ids."""
    from concurrent.futures import ThreadPoolExecutor

    fs, path = filesystem(output, storage_options)

    def ids_of(file: str) -> Tuple[str, np.ndarray]:
        with fs.open(file, "rb") as f:
            pf = pq.ParquetFile(f)
            meta = pf.schema_arrow.metadata or {}
            hashes = np.unique(id_hashes(pf.read(columns=["image_id"])["image_id"].to_pylist()))
            return meta.get(PROVENANCE_KEY, b"unknown").decode(), hashes

    parts, provenances = [], {}
    files = _complete_files(fs, path)
    with ThreadPoolExecutor(PLAN_READERS) as pool:
        for start in range(0, len(files), PLAN_READERS):  # at most PLAN_READERS files' ids in memory
            window = files[start : start + PLAN_READERS]
            for file, (provenance, hashes) in zip(window, pool.map(ids_of, window)):
                provenances.setdefault(provenance, []).append(url_for(fs, file))
                parts.append(hashes)
    return DoneIds(np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.uint64)), provenances


def rows_per_file(bytes_per_row: float, requested: Optional[int] = None) -> int:
    """`requested`, or the rows that make a file of about TARGET_FILE_BYTES."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"--rows-per-file must be at least 1, got {requested}")
        return requested
    return max(1, int(TARGET_FILE_BYTES // max(1.0, bytes_per_row)))


def batch_file_name(ids: Iterable[str]) -> str:
    """A name for a batch's output file that is the same on a rerun of the same batch."""
    return hashlib.sha1("\n".join(ids).encode()).hexdigest()[:16]
