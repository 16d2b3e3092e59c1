"""Precompute teacher image embeddings with Ray Data: images -> encoder actors -> Parquet.

Stages, top to bottom:
  list images (driver)   -> skip ids already in the output
  prepare_images (CPU)   -> bytes, decode, resize + pad (the library's one preprocessing path)
  TeacherEncoder (pool)  -> the image encoder, loaded once per actor, autocast on GPU
  write_batch (CPU)      -> one atomic Parquet file per batch; bad images to the errors table
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import numpy as np
import pyarrow as pa

from .parquet import tensor_column, write_table_atomic
from .stages import (  # noqa: F401  (TooManyFailures and prepare_images are part of this module's API)
    JobSummary,
    SamActor,
    TooManyFailures,
    batch_file_name,
    image_pipeline,
    ok_rows,
    pending_images,
    preflight,
    prepare_images,
    run_to_output,
    write_errors,
)

if TYPE_CHECKING:  # torch is imported where used: the write workers import this module
    import torch

EMBEDDING_SHAPE = (256, 64, 64)


class TeacherEncoder(SamActor):
    """Ray actor: loads the teacher once, encodes batches of prepared images."""

    def __init__(self, model_type: str, checkpoint: Optional[str], dtype: str = "float16",
                 device: Optional[str] = None, cpu_threads: Optional[int] = None) -> None:
        super().__init__(model_type, checkpoint, device, cpu_threads)
        self.sam.prompt_encoder = self.sam.mask_decoder = None  # only the encoder is used
        self.out_dtype = np.float16 if dtype == "float16" else np.float32

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, Any]:
        import torch

        ok = ok_rows(batch)
        emb = np.zeros((len(ok), *EMBEDDING_SHAPE), self.out_dtype)
        if ok.any():
            with torch.inference_mode():
                emb[ok] = self.encode(batch, np.flatnonzero(ok)).cpu().numpy().astype(self.out_dtype)
        out = {k: v for k, v in batch.items() if k != "pixels"}
        out["embedding"] = emb
        return out


def write_batch(batch: Dict[str, np.ndarray], output: str, teacher: str, checkpoint_sha256: str,
                storage_options: Optional[dict] = None) -> Dict[str, Any]:
    """Write the batch's good rows as one Parquet file and its bad rows to the errors table."""
    ok = ok_rows(batch)
    ids = [str(i) for i in batch["image_id"]]
    name = batch_file_name(ids)
    written = 0
    if ok.any():
        table = pa.table({
            "image_id": pa.array(np.asarray(ids)[ok].tolist(), pa.string()),
            "source": pa.array([str(s) for s in batch["source"][ok]], pa.string()),
            "orig_h": pa.array(batch["orig_h"][ok], pa.int32()),
            "orig_w": pa.array(batch["orig_w"][ok], pa.int32()),
            "input_h": pa.array(batch["input_h"][ok], pa.int32()),
            "input_w": pa.array(batch["input_w"][ok], pa.int32()),
            "embedding": tensor_column(batch["embedding"][ok]),
            "teacher": pa.array([teacher] * int(ok.sum()), pa.string()),
            "checkpoint_sha256": pa.array([checkpoint_sha256] * int(ok.sum()), pa.string()),
            "annotations": pa.array([str(a) for a in batch["annotations"][ok]], pa.string()),
        })
        written = write_table_atomic(table, output, f"part-{name}.parquet", storage_options)
    write_errors(batch, ok, output, name, storage_options)
    per_row = np.where(ok, written // max(1, int(ok.sum())), 0)
    return {"image_id": np.asarray(ids), "ok": ok, "bytes": per_row}


@dataclass
class PrecomputeSummary(JobSummary):
    @property
    def mib_per_image(self) -> float:
        return self.bytes_written / max(1, self.written) / 2**20

    def as_dict(self) -> Dict[str, Any]:
        return {**super().as_dict(), "mib_per_image": self.mib_per_image}


def precompute_embeddings(
    input: str,
    output: str,
    teacher: str = "vit_h",
    checkpoint: Optional[str] = None,
    batch_size: int = 4,
    concurrency: int = 1,
    num_gpus_per_actor: float = 0.0,
    num_cpus_per_actor: int = 1,
    dtype: str = "float16",
    limit: Optional[int] = None,
    max_failures: Optional[int] = None,
    rows_per_file: Optional[int] = None,
    storage_options: Optional[dict] = None,
) -> PrecomputeSummary:
    """Embed every image of `input` not yet in `output`. Ray must be initialised by the caller."""
    if dtype not in ("float16", "float32"):
        raise ValueError(f"dtype must be float16 or float32, got {dtype!r}")
    checkpoint_sha = preflight(teacher, checkpoint, output, storage_options)
    refs, todo = pending_images(input, output, limit, storage_options)
    summary = PrecomputeSummary(images=len(refs), skipped=len(refs) - len(todo))
    if not todo:
        return summary
    ds = image_pipeline(
        todo, TeacherEncoder, {"model_type": teacher, "checkpoint": checkpoint, "dtype": dtype},
        write_batch, {"output": output, "teacher": teacher, "checkpoint_sha256": checkpoint_sha},
        batch_size, concurrency, num_gpus_per_actor, num_cpus_per_actor, rows_per_file, storage_options)
    return run_to_output(ds, summary, {r.image_id: r.source for r in todo}, output, max_failures)


def load_embeddings(output: str, image_ids: Optional[List[str]] = None,
                    storage_options: Optional[dict] = None) -> Tuple[List[str], "torch.Tensor"]:
    """Read stored embeddings back as (ids, tensor (N, 256, 64, 64)), zero-copy from Arrow where it can;
    with `image_ids`, only those rows are decoded (the filter is pushed down into the read)."""
    import pyarrow.dataset as pads
    import torch

    from .parquet import read_table

    wanted = None if image_ids is None else pads.field("image_id").isin(pa.array(image_ids, pa.string()))
    table = read_table(output, columns=["image_id", "embedding"], storage_options=storage_options, filter=wanted)
    column = table["embedding"].combine_chunks()
    array = column.to_numpy_ndarray()  # a view of the Arrow buffer, no copy
    if not array.flags.writeable:  # torch wants writable memory; this is the one copy
        array = array.copy()
    return table["image_id"].to_pylist(), torch.from_numpy(array)
