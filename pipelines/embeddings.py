"""Precompute teacher image embeddings with Ray Data: images -> encoder actors -> Parquet.

Stages, top to bottom:
  list images (driver)   -> skip ids already in the output
  prepare_images (CPU)   -> bytes, decode, resize + pad (the library's one preprocessing path)
  TeacherEncoder (pool)  -> the image encoder, loaded once per actor, autocast on GPU
  write_batch (CPU)      -> one atomic Parquet file per batch; bad images to the errors table
"""

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import torch

from tinysam.build_sam import build_sam, check_checkpoint
from tinysam.transforms import IMAGE_SIZE, normalize_and_pad, resize_longest_side, to_rgb_uint8
from tinysam.weights import resolve_checkpoint, sha256_file

from .parquet import ERRORS_DIR, ensure_writable, existing_ids, tensor_column, write_table_atomic
from .sources import decode_image, list_images, read_bytes

EMBEDDING_SHAPE = (256, 64, 64)


def prepare_images(batch: Dict[str, np.ndarray], storage_options: Optional[dict] = None) -> Dict[str, Any]:
    """Read, decode, convert and resize each image; a bad one becomes a row with `error` set.

    Pixels travel as padded 1024x1024x3 uint8 (a quarter of float32); normalisation happens on the
    encoder's device.
    """
    n = len(batch["image_id"])
    pixels = np.zeros((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    out = {k: [] for k in ("orig_h", "orig_w", "input_h", "input_w", "error", "annotations")}
    for i, source in enumerate(batch["source"]):
        try:
            data, annotations = read_bytes(str(source), storage_options)
            rgb = to_rgb_uint8(decode_image(data, str(source)), str(source))
            resized = resize_longest_side(rgb)
            pixels[i, : resized.shape[0], : resized.shape[1]] = resized
            values = (rgb.shape[0], rgb.shape[1], resized.shape[0], resized.shape[1], "",
                      json.dumps(annotations) if annotations else "")
        except Exception as e:  # one bad image must not stop the corpus
            reason = str(e) if str(source) in str(e) else f"{source}: {type(e).__name__}: {e}"
            values = (0, 0, 0, 0, reason, "")
        for key, value in zip(out, values):
            out[key].append(value)
    return {"image_id": batch["image_id"], "source": batch["source"], "pixels": pixels,
            **{k: np.array(v) for k, v in out.items()}}


class TeacherEncoder:
    """Ray actor: loads the teacher's image encoder once, encodes batches of prepared images."""

    def __init__(self, model_type: str, checkpoint: Optional[str], dtype: str = "float16",
                 device: Optional[str] = None, cpu_threads: Optional[int] = None) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if cpu_threads:  # Ray pins worker processes to one thread unless told otherwise
            torch.set_num_threads(cpu_threads)
        sam = build_sam(model_type, checkpoint)
        self.encoder = sam.image_encoder.to(self.device).eval()
        self.mean, self.std = sam.pixel_mean.to(self.device), sam.pixel_std.to(self.device)
        self.out_dtype = np.float16 if dtype == "float16" else np.float32
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else None

    @torch.inference_mode()
    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, Any]:
        ok = np.array([not e for e in batch["error"]], dtype=bool)
        emb = np.zeros((len(ok), *EMBEDDING_SHAPE), self.out_dtype)
        if ok.any():
            # Normalise the resized image, then zero-pad: padding is zero after normalisation.
            x = torch.stack([
                normalize_and_pad(torch.from_numpy(np.array(batch["pixels"][i, :h, :w])).to(self.device).permute(2, 0, 1),
                                  IMAGE_SIZE, self.mean, self.std)
                for i, h, w in zip(np.flatnonzero(ok), batch["input_h"][ok], batch["input_w"][ok])
            ])
            if self.autocast is not None:
                with self.autocast:
                    y = self.encoder(x)
            else:
                y = self.encoder(x)
            emb[ok] = y.float().cpu().numpy().astype(self.out_dtype)
        out = {k: v for k, v in batch.items() if k != "pixels"}
        out["embedding"] = emb
        return out


def write_batch(batch: Dict[str, np.ndarray], output: str, teacher: str, checkpoint_sha256: str,
                storage_options: Optional[dict] = None) -> Dict[str, Any]:
    """Write the batch's good rows as one Parquet file and its bad rows to the errors table."""
    ok = np.array([not e for e in batch["error"]], dtype=bool)
    ids = [str(i) for i in batch["image_id"]]
    name = hashlib.sha1("\n".join(ids).encode()).hexdigest()[:16]
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
    if (~ok).any():
        errors = pa.table({
            "image_id": pa.array(np.asarray(ids)[~ok].tolist(), pa.string()),
            "source": pa.array([str(s) for s in batch["source"][~ok]], pa.string()),
            "reason": pa.array([str(r) for r in batch["error"][~ok]], pa.string()),
        })
        write_table_atomic(errors, output, f"{ERRORS_DIR}/errors-{name}.parquet", storage_options)
    per_row = np.where(ok, written // max(1, int(ok.sum())), 0)
    return {"image_id": np.asarray(ids), "ok": ok, "bytes": per_row}


@dataclass
class PrecomputeSummary:
    images: int = 0  # inputs listed
    skipped: int = 0  # already in the output
    written: int = 0
    failed: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    failures: List[str] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return (self.written + self.failed) / self.seconds if self.seconds else 0.0

    @property
    def mib_per_image(self) -> float:
        return self.bytes_written / max(1, self.written) / 2**20

    def as_dict(self) -> Dict[str, Any]:
        return {**asdict(self), "images_per_second": self.images_per_second, "mib_per_image": self.mib_per_image}


class TooManyFailures(RuntimeError):
    pass


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
    import ray

    if dtype not in ("float16", "float32"):
        raise ValueError(f"dtype must be float16 or float32, got {dtype!r}")
    # Fail before any work: an unreadable checkpoint or output location stops here.
    checkpoint_sha = sha256_file(resolve_checkpoint(checkpoint)) if checkpoint else "random-init"
    if checkpoint:
        check_checkpoint(teacher, checkpoint)  # a file of the wrong model type stops here too
    ensure_writable(output, storage_options)

    refs = list_images(input, limit=limit, storage_options=storage_options)
    done = existing_ids(output, storage_options=storage_options)
    todo = [r for r in refs if r.image_id not in done]
    summary = PrecomputeSummary(images=len(refs), skipped=len(refs) - len(todo))
    if not todo:
        return summary

    start = time.perf_counter()
    ds = ray.data.from_items([{"image_id": r.image_id, "source": r.source} for r in todo],
                             override_num_blocks=max(1, min(len(todo), 64)))
    # Decoding runs in its own tasks (0.5 CPU: it mostly waits on I/O), not fused into the actors.
    ds = ds.map_batches(prepare_images, batch_size=batch_size, num_cpus=0.5,
                        fn_kwargs={"storage_options": storage_options})
    ds = ds.map_batches(
        TeacherEncoder,
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_gpus=num_gpus_per_actor,
        num_cpus=num_cpus_per_actor,
        fn_constructor_kwargs={"model_type": teacher, "checkpoint": checkpoint, "dtype": dtype,
                               "cpu_threads": None if num_gpus_per_actor else num_cpus_per_actor},
    )
    ds = ds.map_batches(
        write_batch,
        batch_size=rows_per_file or batch_size,
        num_cpus=0.5,
        fn_kwargs={"output": output, "teacher": teacher, "checkpoint_sha256": checkpoint_sha,
                   "storage_options": storage_options},
    )
    sources = {r.image_id: r.source for r in todo}
    for result in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for image_id, ok, nbytes in zip(result["image_id"], result["ok"], result["bytes"]):
            if ok:
                summary.written += 1
                summary.bytes_written += int(nbytes)
            else:
                summary.failed += 1
                summary.failures.append(sources.get(str(image_id), str(image_id)))
        if max_failures is not None and summary.failed > max_failures:
            summary.seconds = time.perf_counter() - start
            raise TooManyFailures(f"{summary.failed} images failed (more than --max-failures {max_failures}); "
                                  f"see {output}/{ERRORS_DIR}")
    summary.seconds = time.perf_counter() - start
    return summary


def load_embeddings(output: str, image_ids: Optional[List[str]] = None,
                    storage_options: Optional[dict] = None) -> Tuple[List[str], torch.Tensor]:
    """Read stored embeddings back as (ids, tensor (N, 256, 64, 64)), zero-copy from Arrow where it can."""
    import pyarrow.compute as pc

    from .parquet import read_table

    table = read_table(output, columns=["image_id", "embedding"], storage_options=storage_options)
    if image_ids is not None:
        table = table.filter(pc.is_in(table["image_id"], value_set=pa.array(image_ids)))
    column = table["embedding"].combine_chunks()
    array = column.to_numpy_ndarray()  # a view of the Arrow buffer, no copy
    if not array.flags.writeable:  # torch wants writable memory; this is the one copy
        array = array.copy()
    return table["image_id"].to_pylist(), torch.from_numpy(array)
