"""What a job's run adds up to: the summary it prints, the loop that drives a dataset to its output
counting rows, and the images a run never got back (reported to the errors table)."""

import time
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from .reading import Plan
from .sources import TAR_SEP, ImageRef, iter_manifest
from .storage.errors import ERRORS_DIR
from .storage.files import DoneIds, batch_file_name, id_hashes

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
    first_result_seconds: float = 0.0  # start-up: actors started, models built, first batch through
    first_result_rows: int = 0
    failures: List[str] = field(default_factory=list)
    unsupported: List[str] = field(default_factory=list)  # input files that are not images or shards
    seen: List[np.ndarray] = field(default_factory=list, repr=False)  # hashes of the ids the run got back

    def as_dict(self) -> Dict[str, Any]:
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "seen"}
        return {**values, "images_per_second": self.images_per_second}

    @property
    def images_per_second(self) -> float:
        return (self.written + self.failed) / self.seconds if self.seconds else 0.0


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
        if not summary.first_result_seconds:
            summary.first_result_seconds = time.perf_counter() - start
            summary.first_result_rows = len(result["image_id"])
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
    """Complete the counts from one pass over the read shards' manifests (now written) and the
    input manifest, a batch at a time: images passed over as done, and images the run read but
    never got back (their batch killed its actor IMAGE_ATTEMPTS times), which go to the errors
    table as failed; a rerun tries them again."""
    from .storage.shards import read_manifest

    seen = DoneIds(np.unique(np.concatenate(summary.seen))) if summary.seen else DoneIds.of([])
    lost = [r for r in plan.files if r.image_id not in seen]
    skipped = plan.skipped
    for refs in iter_manifest(plan.manifest, storage_options) if plan.manifest else []:  # a batch at a time
        ids = [r.image_id for r in refs]
        was_done = plan.done.contains(ids)
        skipped += int(was_done.sum())
        lost += [r for r, d, s in zip(refs, was_done, seen.contains(ids)) if not d and not s]
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
        f"its batch killed the model actor {IMAGE_ATTEMPTS} times (out of memory or a crash), or was on a "
        "node that was lost: rerun the job, and if it fails again try --batch-size 1, a higher "
        "--max-megapixels cap, or more memory per actor"
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
