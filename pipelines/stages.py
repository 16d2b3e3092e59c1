"""Stages and plumbing shared by every batch job (precompute, automask).

  preflight        -> refuse a bad checkpoint or an unwritable output before any work
  pending_images   -> list the input, skip ids already in the output
  prepare_images   -> bytes, decode, resize + pad (the library's one preprocessing path), per-row errors
  SamActor         -> a model loaded once per actor; encodes prepared images on its device
  write_errors     -> bad rows to the output's errors table
  run_to_output    -> drive the dataset, count results, stop after too many failures

Module level imports stay light (numpy, PIL, pyarrow): Ray's decoding and writing workers import
this module, and on a small machine torch's import would compete with the model for the cores.
Torch and the models are imported where they are used.
"""

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Optional, Tuple

import numpy as np
import pyarrow as pa

from tinysam.transforms import IMAGE_SIZE, normalize_and_pad, resize_longest_side, to_rgb_uint8

from .parquet import ERRORS_DIR, ensure_writable, existing_ids, write_table_atomic
from .sources import ImageRef, decode_image, list_images, read_bytes

if TYPE_CHECKING:
    import torch


class TooManyFailures(RuntimeError):
    pass


@dataclass
class JobSummary:
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

    def as_dict(self) -> Dict[str, Any]:
        return {**asdict(self), "images_per_second": self.images_per_second}


def preflight(model_type: str, checkpoint: Optional[str], output: str,
              storage_options: Optional[dict] = None) -> str:
    """Fail before any work on an unreadable checkpoint, one of the wrong model type, or an
    unwritable output; returns the checkpoint's SHA-256 ("random-init" without one) for provenance."""
    from tinysam.build_sam import check_checkpoint
    from tinysam.weights import resolve_checkpoint, sha256_file

    checkpoint_sha = sha256_file(resolve_checkpoint(checkpoint)) if checkpoint else "random-init"
    if checkpoint:
        check_checkpoint(model_type, checkpoint)
    ensure_writable(output, storage_options)
    return checkpoint_sha


def image_pipeline(todo: List[ImageRef], actor_cls: type, actor_kwargs: Dict[str, Any], write_fn: Callable,
                   write_kwargs: Dict[str, Any], batch_size: int, concurrency: int = 1,
                   num_gpus_per_actor: float = 0.0, num_cpus_per_actor: int = 1,
                   rows_per_file: Optional[int] = None, storage_options: Optional[dict] = None,
                   keep_original: bool = False, read_fn: Optional[Callable] = None,
                   extra_columns: Optional[Dict[str, Dict[str, Any]]] = None):
    """images -> read tasks -> an actor pool of `actor_cls` -> `write_fn` tasks (a lazy Dataset).

    The read stage is `prepare_images` unless `read_fn` replaces it (e.g. reading stored
    embeddings); `extra_columns` ({column: {image_id: value}}) adds per-image inputs it needs.
    """
    import ray

    extra_columns = extra_columns or {}
    items = [{"image_id": r.image_id, "source": r.source, **{k: v[r.image_id] for k, v in extra_columns.items()}}
             for r in todo]
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(todo), 64)))
    # Reading runs in its own tasks (0.5 CPU: it mostly waits on I/O), not fused into the actors.
    read_kwargs = {"storage_options": storage_options} if read_fn else {"storage_options": storage_options,
                                                                        "keep_original": keep_original}
    ds = ds.map_batches(read_fn or prepare_images, batch_size=batch_size, num_cpus=0.5, fn_kwargs=read_kwargs)
    ds = ds.map_batches(
        actor_cls,
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_gpus=num_gpus_per_actor,
        num_cpus=num_cpus_per_actor,
        fn_constructor_kwargs={**actor_kwargs, "cpu_threads": None if num_gpus_per_actor else num_cpus_per_actor},
    )
    return ds.map_batches(write_fn, batch_size=rows_per_file or batch_size, num_cpus=0.5,
                          fn_kwargs={**write_kwargs, "storage_options": storage_options})


def pending_images(input: str, output: str, limit: Optional[int] = None,
                   storage_options: Optional[dict] = None) -> Tuple[List[ImageRef], List[ImageRef]]:
    """(all images of `input`, those not yet written to `output`)."""
    refs = list_images(input, limit=limit, storage_options=storage_options)
    done = existing_ids(output, storage_options=storage_options)
    return refs, [r for r in refs if r.image_id not in done]


def prepare_images(batch: Dict[str, np.ndarray], storage_options: Optional[dict] = None,
                   keep_original: bool = False) -> Dict[str, Any]:
    """Read, decode, convert and resize each image; a bad one becomes a row with `error` set.

    Pixels travel as padded 1024x1024x3 uint8 (a quarter of float32); normalisation happens on the
    model's device. `keep_original` adds the full-resolution RGB image (for crop layers).
    """
    n = len(batch["image_id"])
    pixels = np.zeros((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    out = {k: [] for k in ("orig_h", "orig_w", "input_h", "input_w", "error", "annotations")}
    originals = []
    for i, source in enumerate(batch["source"]):
        rgb = np.zeros((1, 1, 3), np.uint8)
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
        originals.append(rgb)
        for key, value in zip(out, values):
            out[key].append(value)
    result = {"image_id": batch["image_id"], "source": batch["source"], "pixels": pixels,
              **{k: np.array(v) for k, v in out.items()}}
    if keep_original:
        result["image"] = originals
    return result


class SamActor:
    """Base of the Ray actors: builds the model once, on GPU when there is one, and encodes
    prepared rows. With `bf16` the encoder runs under bf16 autocast on CUDA (SAM-H: 3.4x)."""

    def __init__(self, model_type: str, checkpoint: Optional[str], device: Optional[str] = None,
                 cpu_threads: Optional[int] = None, bf16: bool = True) -> None:
        import torch

        from tinysam.build_sam import build_sam

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if cpu_threads:  # Ray pins worker processes to one thread unless told otherwise
            torch.set_num_threads(cpu_threads)
        self.sam = build_sam(model_type, checkpoint).to(self.device).eval()
        self.mean, self.std = self.sam.pixel_mean, self.sam.pixel_std
        self.autocast = bf16 and self.device.type == "cuda"

    def encode(self, batch: Dict[str, np.ndarray], rows: np.ndarray) -> "torch.Tensor":
        """Image embeddings (len(rows), 256, 64, 64) of the prepared rows `rows`."""
        import torch

        # Normalise the resized image, then zero-pad: padding is zero after normalisation.
        x = torch.stack([
            normalize_and_pad(torch.from_numpy(np.array(batch["pixels"][i, :h, :w])).to(self.device).permute(2, 0, 1),
                              IMAGE_SIZE, self.mean, self.std)
            for i, h, w in zip(rows, batch["input_h"][rows], batch["input_w"][rows])
        ])
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return self.sam.image_encoder(x).float()


def ok_rows(batch: Dict[str, np.ndarray]) -> np.ndarray:
    return np.array([not e for e in batch["error"]], dtype=bool)


def batch_file_name(ids: Iterable[str]) -> str:
    """A name for a batch's output file that is the same on a rerun of the same batch."""
    return hashlib.sha1("\n".join(ids).encode()).hexdigest()[:16]


def write_errors(batch: Dict[str, np.ndarray], ok: np.ndarray, output: str, name: str,
                 storage_options: Optional[dict] = None) -> None:
    """The batch's bad rows (id, source, reason) to `<output>/_errors/errors-<name>.parquet`."""
    if ok.all():
        return
    bad = ~ok
    errors = pa.table({
        "image_id": pa.array([str(i) for i in batch["image_id"][bad]], pa.string()),
        "source": pa.array([str(s) for s in batch["source"][bad]], pa.string()),
        "reason": pa.array([str(r) for r in batch["error"][bad]], pa.string()),
    })
    write_table_atomic(errors, output, f"{ERRORS_DIR}/errors-{name}.parquet", storage_options)


def run_to_output(ds, summary: JobSummary, sources: Dict[str, str], output: str,
                  max_failures: Optional[int] = None,
                  on_row: Optional[Callable[[Dict[str, Any], int], None]] = None) -> JobSummary:
    """Drive `ds` (rows of image_id, ok, bytes from a write stage) to the end, counting into `summary`.

    `on_row(result_batch, i)` sees each written row (e.g. to count masks). Raises TooManyFailures
    once more than `max_failures` images failed; what was written stays written.
    """
    start = time.perf_counter()
    for result in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for i, (image_id, ok, nbytes) in enumerate(zip(result["image_id"], result["ok"], result["bytes"])):
            if ok:
                summary.written += 1
                summary.bytes_written += int(nbytes)
                if on_row is not None:
                    on_row(result, i)
            else:
                summary.failed += 1
                summary.failures.append(sources.get(str(image_id), str(image_id)))
        if max_failures is not None and summary.failed > max_failures:
            summary.seconds = time.perf_counter() - start
            raise TooManyFailures(f"{summary.failed} images failed (more than --max-failures {max_failures}); "
                                  f"see {output}/{ERRORS_DIR}")
    summary.seconds = time.perf_counter() - start
    return summary
