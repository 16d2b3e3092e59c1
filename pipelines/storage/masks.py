"""The masks table: one row per image, written by the auto-masking job.

Columns: image_id, source, source_offset / source_length (byte range in its tar shard, -1 for
plain files), width / height (as displayed: EXIF orientation applied), num_masks, masks (a list of
{segmentation: COCO RLE, area, bbox XYWH, predicted_iou, stability_score, point_coords, crop_box
XYWH, and with --polygons `polygons`: COCO polygons, tinysam/utils/polygons.py}), model,
checkpoint_sha256, mode, params (the everything-mode settings, JSON), encode_seconds,
generate_seconds.
"""

from typing import Any, Dict, Iterator, List, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..sources import filesystem
from .files import parquet_files, rows_per_file, write_table_atomic

MASK_TYPE = pa.struct(
    [
        ("segmentation", pa.struct([("size", pa.list_(pa.int32())), ("counts", pa.string())])),
        ("area", pa.int64()),
        ("bbox", pa.list_(pa.float64())),  # XYWH
        ("predicted_iou", pa.float64()),
        ("stability_score", pa.float64()),
        ("point_coords", pa.list_(pa.list_(pa.float64()))),
        ("crop_box", pa.list_(pa.float64())),  # XYWH
    ]
)
# with --polygons (the run's provenance says so: an output holds one kind of row)
MASK_TYPE_WITH_POLYGONS = pa.struct([*MASK_TYPE, ("polygons", pa.list_(pa.list_(pa.float64())))])
RESULT_COLUMNS = ["image_id", "source", "source_offset", "source_length", "width", "height", "masks"]


def default_rows_per_file() -> int:
    """~128 MiB files at ~256 KiB a row (~100 masks of compressed RLE and their fields)."""
    return rows_per_file(256 * 2**10)


def write_masks(
    batch: Dict[str, np.ndarray],
    ok: np.ndarray,
    records: List[List[dict]],
    output: str,
    name: str,
    provenance: Dict[str, Any],
    storage_options: Optional[dict] = None,
) -> int:
    """The batch's good rows (`records`: each image's mask records) as `<output>/part-<name>.parquet`;
    returns bytes written."""
    if not ok.any():
        return 0
    good = np.flatnonzero(ok)
    n = len(good)
    table = pa.table(
        {
            "image_id": pa.array([str(batch["image_id"][i]) for i in good], pa.string()),
            "source": pa.array([str(batch["source"][i]) for i in good], pa.string()),
            "source_offset": pa.array(batch["source_offset"][ok], pa.int64()),
            "source_length": pa.array(batch["source_length"][ok], pa.int64()),
            "width": pa.array(batch["orig_w"][ok], pa.int32()),
            "height": pa.array(batch["orig_h"][ok], pa.int32()),
            "num_masks": pa.array([len(records[i]) for i in good], pa.int32()),
            "masks": pa.array(
                [records[i] for i in good],
                pa.list_(MASK_TYPE_WITH_POLYGONS if "polygons" in provenance else MASK_TYPE),
            ),
            "model": pa.array([provenance["model"]] * n, pa.string()),
            "checkpoint_sha256": pa.array([provenance["checkpoint_sha256"]] * n, pa.string()),
            "mode": pa.array([provenance["mode"]] * n, pa.string()),
            "params": pa.array([provenance["params"]] * n, pa.string()),
            "encode_seconds": pa.array(batch["encode_seconds"][ok], pa.float64()),
            "generate_seconds": pa.array(batch["generate_seconds"][ok], pa.float64()),
        }
    )
    return write_table_atomic(table, output, f"part-{name}.parquet", storage_options, provenance)


def iter_results(
    output: str, image_ids: Optional[set] = None, storage_options: Optional[dict] = None
) -> Iterator[Dict[str, Any]]:
    """Rows of the job's output (RESULT_COLUMNS), file by file, optionally only those of
    `image_ids`; memory holds one file's rows at a time."""
    for file in parquet_files(output, storage_options):
        fs, path = filesystem(file, storage_options)
        table = pq.read_table(path, filesystem=fs, columns=RESULT_COLUMNS)
        if image_ids is not None:
            table = table.filter(pc.is_in(table["image_id"], value_set=pa.array(sorted(image_ids), pa.string())))
        yield from table.to_pylist()
