"""The embeddings table: one row per image, written by the precompute job, read by auto-masking
(--embeddings) and distillation.

Columns: image_id, source, source_offset / source_length (the image's byte range in its tar
shard, -1 for plain files), orig_h / orig_w (displayed size), input_h / input_w (resized, before
padding), embedding (256x64x64 fp16 or fp32 tensor), teacher, checkpoint_sha256, annotations (the
SA-1B JSON of a shard member, "" elsewhere).
"""

from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from ..sources import filesystem
from .files import parquet_files, read_table, rows_per_file, tensor_column, write_table_atomic

if TYPE_CHECKING:  # torch is imported where used: the write workers import this module
    import torch

EMBEDDING_SHAPE = (256, 64, 64)


def default_rows_per_file(dtype: str) -> int:
    """~128 MiB files: 64 fp16 embeddings (2 MiB each), 32 in fp32."""
    return rows_per_file(np.prod(EMBEDDING_SHAPE) * (2 if dtype == "float16" else 4))


def embeddings_table(batch: Dict[str, np.ndarray], ok: np.ndarray, teacher: str, checkpoint_sha256: str) -> pa.Table:
    """The good rows of an encoded batch as the table's schema."""
    n = int(ok.sum())
    return pa.table(
        {
            "image_id": pa.array([str(i) for i in batch["image_id"][ok]], pa.string()),
            "source": pa.array([str(s) for s in batch["source"][ok]], pa.string()),
            "source_offset": pa.array(batch["source_offset"][ok], pa.int64()),
            "source_length": pa.array(batch["source_length"][ok], pa.int64()),
            "orig_h": pa.array(batch["orig_h"][ok], pa.int32()),
            "orig_w": pa.array(batch["orig_w"][ok], pa.int32()),
            "input_h": pa.array(batch["input_h"][ok], pa.int32()),
            "input_w": pa.array(batch["input_w"][ok], pa.int32()),
            "embedding": tensor_column(batch["embedding"][ok]),
            "teacher": pa.array([teacher] * n, pa.string()),
            "checkpoint_sha256": pa.array([checkpoint_sha256] * n, pa.string()),
            "annotations": pa.array([str(a) for a in batch["annotations"][ok]], pa.string()),
        }
    )


def write_embeddings(
    batch: Dict[str, np.ndarray],
    ok: np.ndarray,
    output: str,
    name: str,
    teacher: str,
    checkpoint_sha256: str,
    provenance: Dict[str, Any],
    storage_options: Optional[dict] = None,
) -> int:
    """The batch's good rows as `<output>/part-<name>.parquet`; returns bytes written."""
    if not ok.any():
        return 0
    return write_table_atomic(
        embeddings_table(batch, ok, teacher, checkpoint_sha256),
        output,
        f"part-{name}.parquet",
        storage_options,
        provenance,
    )


def made_by(embeddings: str, storage_options: Optional[dict] = None) -> Tuple[str, str]:
    """(teacher model type, checkpoint SHA-256) of a precompute job's output, refusing one made by
    several; reads two short columns, no embedding."""
    table = read_table(embeddings, columns=["teacher", "checkpoint_sha256"], storage_options=storage_options)
    if table.num_rows == 0:
        raise ValueError(f"{embeddings}: no embeddings (run jobs/precompute_embeddings.py first)")
    pairs = set(zip(table["teacher"].to_pylist(), table["checkpoint_sha256"].to_pylist()))
    if len(pairs) != 1:
        raise ValueError(f"{embeddings}: embeddings of several teachers/checkpoints {sorted(pairs)}; use one")
    return pairs.pop()


def require_made_by(
    embeddings: str, model: str, checkpoint_sha256: str, what: str, storage_options: Optional[dict] = None
) -> None:
    """Refuse embeddings made by another encoder than (`model`, `checkpoint_sha256`): a decoder
    only works on its own encoder's embeddings. `what` names the checkpoint in the message."""
    teacher, sha = made_by(embeddings, storage_options)
    if (teacher, sha) != (model, checkpoint_sha256):
        raise ValueError(
            f"{embeddings}: embeddings were made by {teacher} (checkpoint sha256 {sha[:12]}), not by "
            f"{what} ({model}, sha256 {checkpoint_sha256[:12]}); the decoder must match the encoder"
        )


def read_index(embeddings: str, storage_options: Optional[dict] = None) -> pa.Table:
    """image_id, source and source byte range of every stored row (no embedding read)."""
    return read_table(
        embeddings, columns=["image_id", "source", "source_offset", "source_length"], storage_options=storage_options
    )


def files_by_id(embeddings: str, storage_options: Optional[dict] = None) -> Dict[str, str]:
    """{image_id: URL of the file holding its embedding}."""
    found: Dict[str, str] = {}
    for url in parquet_files(embeddings, storage_options):
        fs, path = filesystem(url, storage_options)
        for image_id in pq.read_table(path, columns=["image_id"], filesystem=fs)["image_id"].to_pylist():
            found[image_id] = url
    if not found:
        raise FileNotFoundError(f"{embeddings}: no Parquet files")
    return found


def read_rows(file: str, image_ids: List[str], storage_options: Optional[dict] = None) -> pa.Table:
    """The rows of `image_ids` in one embeddings file."""
    fs, path = filesystem(file, storage_options)
    wanted = pads.field("image_id").isin(pa.array(image_ids, pa.string()))
    return pads.dataset(path, filesystem=fs, format="parquet").to_table(filter=wanted)


def load_embeddings(
    output: str, image_ids: Optional[List[str]] = None, storage_options: Optional[dict] = None
) -> Tuple[List[str], "torch.Tensor"]:
    """Read stored embeddings back as (ids, tensor (N, 256, 64, 64)), zero-copy from Arrow where it can;
    with `image_ids`, only those rows are decoded (the filter is pushed down into the read)."""
    import torch

    wanted = None if image_ids is None else pads.field("image_id").isin(pa.array(image_ids, pa.string()))
    table = read_table(output, columns=["image_id", "embedding"], storage_options=storage_options, filter=wanted)
    column = table["embedding"].combine_chunks()
    array = column.to_numpy_ndarray()  # a view of the Arrow buffer, no copy
    if not array.flags.writeable:  # torch wants writable memory; this is the one copy
        array = array.copy()
    return table["image_id"].to_pylist(), torch.from_numpy(array)
