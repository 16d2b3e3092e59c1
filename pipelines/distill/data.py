"""The distillation job's data: a stable train / held-out split, and the labelled rows the workers
consume (a Ray Data stage over the precompute job's Parquet)."""

import hashlib
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..reading import prepare_images, read_sources
from ..stages import ok_rows
from ..storage.embeddings import made_by, read_table, require_made_by


def split_ids(ids: Sequence[str], val_fraction: float) -> Tuple[List[str], List[str]]:
    """Held-out ids by a hash of the id: adding images never moves an image between splits.
    At least one image is held out (and one kept) when there are two or more."""
    ids = sorted(ids)
    score = {i: int(hashlib.sha1(i.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF for i in ids}
    val = [i for i in ids if score[i] < val_fraction]
    if not val and len(ids) > 1 and val_fraction > 0:
        val = [min(ids, key=score.get)]
    if len(val) == len(ids):
        val = val[:-1]
    train = [i for i in ids if i not in set(val)]
    return train, val


def label_rows(batch: Dict[str, np.ndarray], max_masks: int, storage_options: Optional[dict] = None) -> Dict[str, Any]:
    """Ray Data stage: each row's image prepared as in every job and its labelled masks as
    (max_masks, 256, 256) uint8 targets. Unreadable images are dropped (the precompute job
    already reported them)."""
    from tinysam.distill.data import LOW_RES, label_masks

    batch = {k: np.asarray(v) for k, v in batch.items()}
    # tar members by their stored byte range: one ranged read per image, never the shard
    prepared = prepare_images(
        read_sources({k: batch[k] for k in ("image_id", "source", "source_offset", "source_length")}, storage_options)
    )
    ok = ok_rows(prepared)
    gt = np.zeros((len(ok), max_masks, LOW_RES, LOW_RES), np.uint8)
    count = np.zeros(len(ok), np.int32)
    for i in np.flatnonzero(ok):
        annotations = batch["annotations"][i] or prepared["annotations"][i]
        masks = label_masks(
            annotations,
            (prepared["orig_h"][i], prepared["orig_w"][i]),
            (prepared["input_h"][i], prepared["input_w"][i]),
            max_masks,
        )
        gt[i, : len(masks)] = masks
        count[i] = len(masks)
    return {
        "image_id": batch["image_id"][ok],
        "pixels": prepared["pixels"][ok],
        "input_h": prepared["input_h"][ok],
        "input_w": prepared["input_w"][ok],
        "embedding": np.stack(list(batch["embedding"][ok])) if ok.any() else np.zeros((0, 256, 64, 64), np.float16),
        "gt": gt[ok],
        "gt_count": count[ok],
    }


def labelled_split(
    ids: List[str], files: List[str], max_masks: int, filesystem=None, storage_options: Optional[dict] = None
):
    """The rows of `ids` from the embeddings Parquet `files`, through `label_rows` (a lazy Ray
    dataset). Ray Data pushes the columns and the id filter down into the Parquet read (one read
    operator in the optimised plan): each split decodes only its own rows' embeddings."""
    rows = read_rows_of(
        ids, files, ["image_id", "source", "source_offset", "source_length", "embedding", "annotations"], filesystem
    )
    return rows.map_batches(
        label_rows, fn_kwargs={"max_masks": max_masks, "storage_options": storage_options}, batch_size=8
    )


class PreparedOnce:
    """A dataset for Ray Train, which calls a callable each time it starts the worker group: the
    first group gets the rows the driver prepared into the object store (read every epoch, never
    prepared again); a restarted group gets them read and prepared afresh, streamed.

    Why not the prepared rows again: the driver owns their blocks and the workers only borrow them.
    A block on a node that died cannot be rebuilt for a borrower, so the restarted workers would
    depend on the driver's lineage reconstruction winning a race with them (it lost in CI, and
    every restart failed on the same block). Nor preparing again here: this runs in Ray Train's
    controller, where an error (a read task placed on the node that just died) ends the run
    instead of costing a retry; in the workers it costs a retry."""

    def __init__(self, streamed):
        self._prepared = streamed.materialize()  # a copy: `streamed` stays lazy
        self._streamed = streamed

    def __call__(self):
        prepared, self._prepared = self._prepared, None
        return self._streamed if prepared is None else prepared


def read_rows_of(ids: List[str], files: List[str], columns: List[str], filesystem=None):
    """The stored rows of `ids`, these columns only (both pushed down into the Parquet read)."""
    import ray.data
    from ray.data.expressions import col

    return (
        ray.data.read_parquet(files, filesystem=filesystem)
        .select_columns(columns)
        .filter(expr=col("image_id").is_in(ids))
    )


def teacher_of(embeddings: str, storage_options: Optional[dict] = None) -> Dict[str, Any]:
    """Ids, teacher type and checkpoint hash of a precompute job's output (no embeddings read)."""
    teacher, sha = made_by(embeddings, storage_options)
    ids = read_table(embeddings, columns=["image_id"], storage_options=storage_options)["image_id"].to_pylist()
    return {"ids": ids, "teacher": teacher, "sha256": sha}


def check_teacher(
    info: Dict[str, Any], embeddings: str, teacher_checkpoint: Optional[str], storage_options: Optional[dict] = None
) -> None:
    """The teacher's decoder must be the one whose encoder made the embeddings."""
    from tinysam.weights import resolve_checkpoint, sha256_file

    sha = sha256_file(resolve_checkpoint(teacher_checkpoint)) if teacher_checkpoint else "random-init"
    require_made_by(embeddings, info["teacher"], sha, f"teacher checkpoint {teacher_checkpoint!r}", storage_options)
