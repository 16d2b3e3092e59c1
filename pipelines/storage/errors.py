"""The errors table, `<output>/_errors`: one row per image that could not be processed (id,
source, reason). Readers of the output ignore it (a "_" folder); the job summary counts it."""

from typing import Any, Dict, Optional

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads

from ..sources import filesystem
from .files import hidden_files, write_table_atomic

ERRORS_DIR = "_errors"
SCHEMA = pa.schema([("image_id", pa.string()), ("source", pa.string()), ("reason", pa.string())])


def write_errors(
    batch: Dict[str, np.ndarray],
    ok: np.ndarray,
    output: str,
    name: str,
    storage_options: Optional[Dict[str, Any]] = None,
) -> None:
    """The batch's bad rows (id, source, reason) to `<output>/_errors/errors-<name>.parquet`."""
    if ok.all():
        return
    bad = ~ok
    errors = pa.table(
        {
            "image_id": pa.array([str(i) for i in batch["image_id"][bad]], pa.string()),
            "source": pa.array([str(s) for s in batch["source"][bad]], pa.string()),
            "reason": pa.array([str(r) for r in batch["error"][bad]], pa.string()),
        },
        schema=SCHEMA,
    )
    write_table_atomic(errors, output, f"{ERRORS_DIR}/errors-{name}.parquet", storage_options)


def read_errors(output: str, storage_options: Optional[Dict[str, Any]] = None) -> pa.Table:
    """Every error row written under `output` (an empty table when there is none)."""
    files = hidden_files(output, ERRORS_DIR, storage_options)
    if not files:
        return SCHEMA.empty_table()
    fs, _ = filesystem(output, storage_options)
    return pads.dataset(files, filesystem=fs, format="parquet").to_table()
