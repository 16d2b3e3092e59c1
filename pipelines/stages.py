"""Stages and plumbing shared by every batch job (precompute, automask).

  preflight        -> refuse a bad checkpoint or an unwritable output before any work
  image_pipeline   -> the read side (pipelines/reading.py), the model actors, the write tasks
  SamActor         -> a model loaded once per actor; encodes prepared images on its device
  run_to_output    -> drive the dataset, count results, stop after too many failures
  finish_summary   -> count what shards passed over, and report the images the run never got back
                      (their batch killed its actor IMAGE_ATTEMPTS times) to the errors table

Module level imports stay light (numpy, PIL, pyarrow): Ray's decoding and writing workers import
this module, and on a small machine torch's import would compete with the model for the cores.
Torch and the models are imported where they are used.
"""

import hashlib
import time
import warnings
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Optional

import numpy as np

from tinysam.transforms import IMAGE_SIZE, normalize_and_pad

from .reading import DEFAULT_MAX_MEGAPIXELS, Plan, prepare_images, read_shards, read_sources
from .sources import TAR_SEP, ImageRef
from .storage.errors import ERRORS_DIR
from .storage.files import DoneIds, ensure_writable, id_hashes

if TYPE_CHECKING:
    import torch


IMAGE_ATTEMPTS = 3  # an image whose batch kills its actor this often is reported, not retried again


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
    unsupported: List[str] = field(default_factory=list)  # input files that are not images or shards
    seen: List[np.ndarray] = field(default_factory=list, repr=False)  # hashes of the ids the run got back

    def as_dict(self) -> Dict[str, Any]:
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "seen"}
        return {**values, "images_per_second": self.images_per_second}

    @property
    def images_per_second(self) -> float:
        return (self.written + self.failed) / self.seconds if self.seconds else 0.0


def preflight(model_type: str, checkpoint: Optional[str], output: str, storage_options: Optional[dict] = None) -> str:
    """Fail before any work on an unreadable checkpoint, one of the wrong model type, or an
    unwritable output; returns the checkpoint's SHA-256 ("random-init" without one) for provenance."""
    from tinysam.build_sam import check_checkpoint
    from tinysam.weights import resolve_checkpoint, sha256_file

    checkpoint_sha = sha256_file(resolve_checkpoint(checkpoint)) if checkpoint else "random-init"
    if checkpoint:
        check_checkpoint(model_type, checkpoint)
    ensure_writable(output, storage_options)
    return checkpoint_sha


def image_pipeline(
    plan: Plan,
    actor_cls: type,
    actor_kwargs: Dict[str, Any],
    write_fn: Callable,
    write_kwargs: Dict[str, Any],
    batch_size: int,
    concurrency: int = 1,
    num_gpus_per_actor: float = 0.0,
    num_cpus_per_actor: int = 1,
    rows_per_file: int = 1,
    storage_options: Optional[dict] = None,
    keep_original: bool = False,
    max_megapixels: Optional[float] = DEFAULT_MAX_MEGAPIXELS,
    output: str = "",
    actor_options: Optional[Dict[str, Any]] = None,
):
    """plan -> `read_dataset` -> an actor pool of `actor_cls` -> `write_fn` tasks, `rows_per_file`
    rows a file (a lazy Dataset). `actor_options` are extra Ray options of the model actors (e.g.
    a scheduling strategy)."""
    ds = read_dataset(plan, output, batch_size, storage_options, max_megapixels, keep_original)
    return model_and_write(
        ds,
        actor_cls,
        actor_kwargs,
        write_fn,
        write_kwargs,
        batch_size,
        concurrency,
        num_gpus_per_actor,
        num_cpus_per_actor,
        rows_per_file,
        storage_options,
        actor_options,
    )


def read_dataset(
    plan: Plan,
    output: str,
    batch_size: int,
    storage_options: Optional[dict] = None,
    max_megapixels: Optional[float] = DEFAULT_MAX_MEGAPIXELS,
    keep_original: bool = False,
):
    """The jobs' read side (a lazy Dataset of prepared rows): read tasks for the files, one task per
    shard streaming it once, then decode tasks."""
    import ray

    parts = []
    if plan.files:
        items = [{"image_id": r.image_id, "source": r.source} for r in plan.files]
        files = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 64)))
        # reading waits on I/O: half a CPU, in its own tasks, ahead of the actors
        parts.append(
            files.map_batches(
                read_sources, batch_size=batch_size, num_cpus=0.5, fn_kwargs={"storage_options": storage_options}
            )
        )
    if plan.shards:
        shards = ray.data.from_items([{"shard": s} for s in plan.shards], override_num_blocks=len(plan.shards))
        read = shards.map_batches(
            read_shards,
            batch_size=1,
            num_cpus=0.5,
            fn_kwargs={"output": output, "done": plan.done, "storage_options": storage_options},
        )
        parts.append(read.limit(plan.limit) if plan.limit is not None else read)
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    return ds.map_batches(
        prepare_images,
        batch_size=batch_size,
        num_cpus=0.5,
        fn_kwargs={"max_megapixels": max_megapixels, "keep_original": keep_original},
    )


def model_and_write(
    ds,
    actor_cls: type,
    actor_kwargs: Dict[str, Any],
    write_fn: Callable,
    write_kwargs: Dict[str, Any],
    batch_size: int,
    concurrency: int,
    num_gpus_per_actor: float,
    num_cpus_per_actor: int,
    rows_per_file: int,
    storage_options: Optional[dict],
    actor_options: Optional[Dict[str, Any]] = None,
):
    """Prepared rows -> an actor pool of `actor_cls` -> `write_fn` tasks of `rows_per_file` rows.

    A batch whose actor dies (out of memory, a crash) is retried on a restarted actor, at most
    IMAGE_ATTEMPTS times in all; then its block is dropped instead of the job stalling or failing,
    and `report_lost` names its images in the errors table."""

    ds.context.max_errored_blocks = -1  # this dataset's own context: lost blocks are reported as lost images
    retries = {"max_restarts": -1, "max_task_retries": IMAGE_ATTEMPTS - 1}
    with warnings.catch_warnings():  # Ray 2.60 takes task retries only as ray_remote_args (deprecated)
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        ds = _actor_stage(
            ds,
            actor_cls,
            actor_kwargs,
            batch_size,
            concurrency,
            num_gpus_per_actor,
            num_cpus_per_actor,
            {**retries, **(actor_options or {})},
        )
    return ds.map_batches(
        write_fn, batch_size=rows_per_file, num_cpus=0.5, fn_kwargs={**write_kwargs, "storage_options": storage_options}
    )


def _actor_stage(
    ds, actor_cls, actor_kwargs, batch_size, concurrency, num_gpus_per_actor, num_cpus_per_actor, remote_args
):
    import ray

    return ds.map_batches(
        actor_cls,
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_gpus=num_gpus_per_actor,
        num_cpus=num_cpus_per_actor,
        fn_constructor_kwargs={**actor_kwargs, "cpu_threads": None if num_gpus_per_actor else num_cpus_per_actor},
        **remote_args,
    )


class SamActor:
    """Base of the Ray actors: builds the model once, on GPU when there is one, and encodes
    prepared rows. With `bf16` the encoder runs under bf16 autocast on CUDA (SAM-H: 3.4x)."""

    def __init__(
        self,
        model_type: str,
        checkpoint: Optional[str],
        device: Optional[str] = None,
        cpu_threads: Optional[int] = None,
        bf16: bool = True,
        memory_gb: Optional[float] = None,
    ) -> None:
        import torch

        from tinysam.build_sam import build_sam

        if memory_gb:
            cap_memory(memory_gb)
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
        x = torch.stack(
            [
                normalize_and_pad(
                    torch.from_numpy(np.array(batch["pixels"][i, :h, :w])).to(self.device).permute(2, 0, 1),
                    IMAGE_SIZE,
                    self.mean,
                    self.std,
                )
                for i, h, w in zip(rows, batch["input_h"][rows], batch["input_w"][rows])
            ]
        )
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return self.sam.image_encoder(x).float()


def cap_memory(gb: float) -> None:
    """Let this process allocate at most `gb` GiB beyond what it has mapped now (RLIMIT_AS): an
    image that needs more fails alone, with a MemoryError (numpy) or an allocation RuntimeError
    (torch), instead of the whole worker being killed by the system for memory."""
    import resource

    with open("/proc/self/status") as f:
        mapped = next(int(line.split()[1]) for line in f if line.startswith("VmSize:")) * 1024
    limit = mapped + int(gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def ok_rows(batch: Dict[str, np.ndarray]) -> np.ndarray:
    return np.array([not e for e in batch["error"]], dtype=bool)


def batch_file_name(ids: Iterable[str]) -> str:
    """A name for a batch's output file that is the same on a rerun of the same batch."""
    return hashlib.sha1("\n".join(ids).encode()).hexdigest()[:16]


def run_to_output(
    ds,
    summary: JobSummary,
    output: str,
    max_failures: Optional[int] = None,
    on_row: Optional[Callable[[Dict[str, Any], int], None]] = None,
) -> JobSummary:
    """Drive `ds` (rows of image_id, source, ok, bytes from a write stage) to the end, counting into
    `summary`. `on_row(result_batch, i)` sees each written row (e.g. to count masks). Raises
    TooManyFailures once more than `max_failures` images failed; what was written stays written.
    """
    start = time.perf_counter()
    for result in ds.iter_batches(batch_size=None, batch_format="numpy"):
        summary.seen.append(id_hashes(str(i) for i in result["image_id"]))
        for i, (source, ok, nbytes) in enumerate(zip(result["source"], result["ok"], result["bytes"])):
            if ok:
                summary.written += 1
                summary.bytes_written += int(nbytes)
                if on_row is not None:
                    on_row(result, i)
            else:
                summary.failed += 1
                summary.failures.append(str(source))
        if max_failures is not None and summary.failed > max_failures:
            summary.seconds = time.perf_counter() - start
            raise TooManyFailures(
                f"{summary.failed} images failed (more than --max-failures {max_failures}); see {output}/{ERRORS_DIR}"
            )
    summary.seconds = time.perf_counter() - start
    return summary


def finish_summary(summary: JobSummary, plan: Plan, output: str, storage_options: Optional[dict] = None) -> None:
    """Complete the counts from one pass over the read shards' manifests (now written): images
    passed over as done, and images the run read but never got back (their batch killed its actor
    IMAGE_ATTEMPTS times), which go to the errors table as failed; a rerun tries them again."""
    from .storage.shards import read_manifest

    seen = DoneIds(np.unique(np.concatenate(summary.seen))) if summary.seen else DoneIds.of([])
    lost = [r for r in plan.files if r.image_id not in seen]
    skipped = plan.skipped
    for shard in plan.shards:
        ids = read_manifest(output, shard, storage_options) or []
        was_done = plan.done.contains(ids) if ids else np.zeros(0, bool)
        skipped += int(was_done.sum())
        if plan.limit is None:  # with --limit the members past the limit were left unread on purpose
            missing = ~was_done & ~seen.contains(ids) if ids else np.zeros(0, bool)
            lost += [ImageRef(i, f"{shard}{TAR_SEP}(member of image {i})") for i, m in zip(ids, missing) if m]
    summary.skipped = skipped
    summary.unsupported = plan.unsupported
    report_lost(summary, lost, output, storage_options)
    summary.images = summary.skipped + summary.written + summary.failed


def report_lost(summary: JobSummary, lost: List[ImageRef], output: str, storage_options: Optional[dict] = None) -> None:
    """`lost` images to the errors table, counted as failed."""
    from .storage.errors import write_errors

    if not lost:
        return
    reason = (
        f"its batch killed the model actor {IMAGE_ATTEMPTS} times (out of memory or a crash); try "
        "--batch-size 1, a higher --max-megapixels cap, or more memory per actor"
    )
    batch = {
        "image_id": np.array([r.image_id for r in lost]),
        "source": np.array([r.source for r in lost]),
        "error": np.array([f"{r.source}: {reason}" for r in lost]),
    }
    write_errors(
        batch, np.zeros(len(lost), bool), output, f"lost-{batch_file_name(batch['image_id'])}", storage_options
    )
    summary.failed += len(lost)
    summary.failures += [r.source for r in lost]
