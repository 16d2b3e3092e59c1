"""The audit table, `<output>/_audit`: for a deterministic sample of the images, how far the
auto-masking model's masks are from a reference model's (the teacher) on the same image, in the
same everything mode. One row per audited image: image_id, source, agreement (the mean of the
best-IoU means each way), teacher_to_student (mean best IoU of each teacher mask among the
student's), student_to_teacher, teacher_masks, student_masks, found / missed (teacher masks with
a student mask of IoU >= 0.5, or without), unmatched (student masks matching no teacher mask).

Readers of the masks ignore it (a "_" folder). Its files carry the masks' provenance, which names
the audit's model, checkpoint and fraction: a rerun that keeps them extends the table, one with
--overwrite deletes the rows of other settings with the masks."""

import hashlib
import json
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..sources import filesystem, url_for
from .files import PROVENANCE_KEY, hidden_files, write_table_atomic

AUDIT_DIR = "_audit"
METRICS = ("agreement", "teacher_to_student", "student_to_teacher")
COUNTS = ("teacher_masks", "student_masks", "found", "missed", "unmatched")
SCHEMA = pa.schema(
    [("image_id", pa.string()), ("source", pa.string())]
    + [(k, pa.float64()) for k in METRICS]
    + [(k, pa.int32()) for k in COUNTS]
)


def is_audited(image_id: str, fraction: float) -> bool:
    """Whether `image_id` is in the audit sample: a hash of the id, not its place in a listing, so
    the sample is the same on every run, in any order, and grows with the fraction (a 2% sample
    holds the 1% one)."""
    if fraction <= 0:
        return False
    digest = hashlib.sha256(str(image_id).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def write_audit(
    batch: Dict[str, np.ndarray],
    ok: np.ndarray,
    output: str,
    name: str,
    provenance: Dict[str, Any],
    storage_options: Optional[Dict[str, Any]] = None,
) -> None:
    """The batch's audited good rows (a non-empty `audit` JSON) to `_audit/audit-<name>.parquet`."""
    rows = [i for i in np.flatnonzero(ok) if batch["audit"][i]]
    if not rows:
        return
    audits = [json.loads(batch["audit"][i]) for i in rows]
    columns = {
        "image_id": [str(batch["image_id"][i]) for i in rows],
        "source": [str(batch["source"][i]) for i in rows],
        **{k: [a[k] for a in audits] for k in METRICS + COUNTS},
    }
    table = pa.table(columns, schema=SCHEMA)
    write_table_atomic(table, output, f"{AUDIT_DIR}/audit-{name}.parquet", storage_options, provenance)


def _audit_files(output: str, storage_options: Optional[Dict[str, Any]]) -> Iterator[Tuple[Any, str, str]]:
    """(filesystem, file, the provenance its footer names) of each audit file under `output`."""
    fs, _ = filesystem(output, storage_options)
    for file in hidden_files(output, AUDIT_DIR, storage_options):
        with fs.open(file, "rb") as f:
            metadata = pq.ParquetFile(f).schema_arrow.metadata or {}
        yield fs, file, metadata.get(PROVENANCE_KEY, b"").decode()


def read_audit(output: str, provenance: Dict[str, Any], storage_options: Optional[Dict[str, Any]] = None) -> pa.Table:
    """The audit rows written with `provenance` (an empty table when there are none)."""
    wanted = json.dumps(provenance, sort_keys=True)
    tables = []
    for fs, file, stored in _audit_files(output, storage_options):
        if stored == wanted:
            with fs.open(file, "rb") as f:
                tables.append(pq.read_table(f).cast(SCHEMA))
    return pa.concat_tables(tables) if tables else SCHEMA.empty_table()


def delete_other_audits(
    output: str, provenance: Dict[str, Any], storage_options: Optional[Dict[str, Any]] = None
) -> List[str]:
    """Delete the audit files written with other settings (--overwrite); returns their URLs."""
    wanted = json.dumps(provenance, sort_keys=True)
    deleted = []
    for fs, file, stored in _audit_files(output, storage_options):
        if stored != wanted:
            fs.rm(file)
            deleted.append(url_for(fs, file))
    return deleted
