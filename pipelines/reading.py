"""The input side of every batch job: plan what to read, read it once, decode it.

  plan_inputs     (driver) list files and shards, read the output's ids and provenance, skip
                  finished files and shards; memory: the skip set's 8 bytes a written row (a
                  Parquet manifest is not listed: Ray Data reads it, `manifest_rows` skips)
  manifest_rows   (task) a manifest's rows as image ids and sources, those already done left out
  read_sources    (task) the bytes of image files, or of tar members by their byte range
  read_shards     (task) one sequential pass over each shard, finished images passed over; the
                  shard's manifest written once it was read to its end
  prepare_images  (task) decode (EXIF applied, pixel limit), RGB, resize + pad: the library's one
                  preprocessing path; a bad image becomes a row with `error` set

Module level imports stay light (numpy, PIL, pyarrow): Ray's read and decode workers import this
module, and on a small machine torch's import would compete with the model for the cores.
"""

from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np

from tinysam.transforms import IMAGE_SIZE, resize_longest_side, to_rgb_uint8

from .sources import ImageRef, decode_image, iter_manifest, iter_shard, list_inputs, manifest_refs, read_bytes
from .storage.files import DoneIds
from .storage.provenance import resume_ids
from .storage.shards import shard_progress, write_manifest

MIN_SIDE = 16  # px: smaller images are reported, not masked (SAM's grid needs some pixels)
DEFAULT_MAX_MEGAPIXELS = 40.0  # see docs/design.md, "Memory per image"
SHARD_ROWS_PER_BATCH = 64  # members per block out of a shard's read task (~27 MB of JPEG)


@dataclass
class Plan:
    """What a run reads: files not yet done, shards not yet complete, a manifest's rows not yet
    done (read and filtered by Ray Data), and the skip set."""

    files: List[ImageRef] = field(default_factory=list)
    shards: List[str] = field(default_factory=list)
    manifest: Optional[str] = None
    done: DoneIds = field(default_factory=lambda: DoneIds(np.zeros(0, np.uint64)))
    skipped: int = 0  # images known to be in the output already (files, complete shards)
    unsupported: List[str] = field(default_factory=list)
    limit: Optional[int] = None  # images to read from the shards (None: all)
    ranges: Dict[str, Tuple[int, int]] = field(default_factory=dict)  # {image_id: (offset, length)} of stored rows


def plan_inputs(
    input: str,
    output: str,
    provenance: Dict[str, Any],
    limit: Optional[int] = None,
    overwrite: bool = False,
    storage_options: Optional[dict] = None,
) -> Plan:
    """List `input` (leaving out anything under `output`), refuse an output of other provenance
    unless `overwrite`, and skip what is done. Raises FileNotFoundError when there is no image."""
    inputs = list_inputs(input, storage_options, exclude=output)
    if inputs.manifest and limit is not None:  # the manifest's first `limit` rows, listed here
        inputs.files = []
        for refs in iter_manifest(inputs.manifest, storage_options):
            inputs.files += refs[: limit - len(inputs.files)]
            if len(inputs.files) >= limit:
                break
        inputs.manifest = None
    if inputs.manifest:
        if not inputs.manifest_rows:
            raise FileNotFoundError(f"no images found under {input} (the manifest has no rows)")
        done = resume_ids(output, provenance, overwrite, storage_options)
        return Plan(manifest=inputs.manifest, done=done)
    if not inputs.files and not inputs.shards:
        unsupported = (
            f" ({len(inputs.unsupported)} unsupported files, e.g. {inputs.unsupported[0]})"
            if inputs.unsupported
            else ""
        )
        raise FileNotFoundError(f"no images found under {input}{unsupported}")
    done = resume_ids(output, provenance, overwrite, storage_options)
    files = inputs.files[:limit] if limit is not None else inputs.files
    finished = done.contains([r.image_id for r in files]) if files else np.zeros(0, bool)
    shards, complete_images = shard_progress(output, inputs.shards, done, storage_options)
    remaining = None if limit is None else max(0, limit - len(files))
    return Plan(
        files=[r for r, f in zip(files, finished) if not f],
        shards=shards if remaining != 0 else [],
        done=done,
        skipped=int(finished.sum()) + complete_images,
        unsupported=inputs.unsupported,
        limit=remaining,
    )


def manifest_rows(batch: Dict[str, np.ndarray], done: DoneIds) -> Dict[str, np.ndarray]:
    """Ray Data stage: a manifest's rows (`source`, optional `image_id`) as the file rows the read
    stage takes, those already in the output left out."""
    refs = manifest_refs(batch["source"], batch.get("image_id"))
    todo = ~done.contains([r.image_id for r in refs]) if refs else np.zeros(0, bool)
    return {
        "image_id": np.array([r.image_id for r, t in zip(refs, todo) if t], dtype=object),
        "source": np.array([r.source for r, t in zip(refs, todo) if t], dtype=object),
    }


def _row(
    image_id: str,
    source: str,
    data: bytes = b"",
    annotations: Optional[str] = None,
    offset: int = -1,
    length: int = -1,
    error: str = "",
) -> Dict[str, Any]:
    return {
        "image_id": image_id,
        "source": source,
        "source_offset": offset,
        "source_length": length,
        "data": data,
        "annotations": annotations or "",
        "error": error,
    }


def _batch(rows: List[Dict[str, Any]]) -> Dict[str, np.ndarray]:
    keys = ("image_id", "source", "source_offset", "source_length", "data", "annotations", "error")
    out = {k: np.array([r[k] for r in rows], dtype=object) for k in keys}
    out["source_offset"] = out["source_offset"].astype(np.int64)
    out["source_length"] = out["source_length"].astype(np.int64)
    return out


def read_sources(batch: Dict[str, np.ndarray], storage_options: Optional[dict] = None) -> Dict[str, np.ndarray]:
    """Ray Data stage: the bytes of each row's source (a file, or a tar member by its byte range)."""
    rows = []
    n = len(batch["image_id"])
    offsets = batch.get("source_offset", np.full(n, -1))
    lengths = batch.get("source_length", np.full(n, -1))
    for image_id, source, offset, length in zip(batch["image_id"], batch["source"], offsets, lengths):
        source = str(source)
        try:
            ranged = {"offset": int(offset), "length": int(length)} if int(offset) >= 0 else {}
            data, _ = read_bytes(source, storage_options, **ranged)
            rows.append(_row(str(image_id), source, data, None, int(offset), int(length)))
        except Exception as e:  # one unreadable file must not stop the corpus
            rows.append(_row(str(image_id), source, error=f"{source}: unreadable ({type(e).__name__}: {e})"))
    return _batch(rows)


def read_shards(
    batch: Dict[str, np.ndarray], output: str, done: DoneIds, storage_options: Optional[dict] = None
) -> Iterator[Dict[str, np.ndarray]]:
    """Ray Data stage (a generator): each shard of the batch in one pass, `SHARD_ROWS_PER_BATCH`
    images a block; images in `done` are passed over unread. A shard read to its end gets its
    manifest, so that a rerun can skip it whole once its images are written."""
    for shard in batch["shard"]:
        shard = str(shard)
        seen: List[str] = []
        rows: List[Dict[str, Any]] = []
        damaged = False

        def skip(image_id: str) -> bool:
            seen.append(image_id)  # noqa: B023 (called within this iteration)
            return image_id in done

        for m in iter_shard(shard, storage_options, skip=skip):
            damaged = damaged or bool(m.error)
            rows.append(_row(m.image_id, m.source, m.data, m.annotations, m.offset, m.length, m.error))
            if len(rows) == SHARD_ROWS_PER_BATCH:
                yield _batch(rows)
                rows = []
        if rows:
            yield _batch(rows)
        if not damaged:
            write_manifest(output, shard, seen, storage_options)


def prepare_images(
    batch: Dict[str, np.ndarray], max_megapixels: Optional[float] = DEFAULT_MAX_MEGAPIXELS, keep_original: bool = False
) -> Dict[str, Any]:
    """Decode, convert and resize each row's bytes; a bad image becomes a row with `error` set.

    Pixels travel as padded 1024x1024x3 uint8 (a quarter of float32); normalisation happens on the
    model's device. `keep_original` adds the full-resolution RGB image (for crop layers).
    """
    n = len(batch["image_id"])
    max_pixels = None if max_megapixels is None else int(max_megapixels * 1e6)
    pixels = np.zeros((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    out = {k: [] for k in ("orig_h", "orig_w", "input_h", "input_w", "error")}
    originals = []
    for i, (source, data, error) in enumerate(zip(batch["source"], batch["data"], batch["error"])):
        source = str(source)
        rgb = np.zeros((1, 1, 3), np.uint8)
        try:
            if error:
                raise ValueError(str(error))
            rgb = to_rgb_uint8(decode_image(bytes(data), source, max_pixels), source)
            if min(rgb.shape[:2]) < MIN_SIDE:
                raise ValueError(f"{source}: {rgb.shape[1]}x{rgb.shape[0]} px is below the {MIN_SIDE} px minimum")
            resized = resize_longest_side(rgb)
            pixels[i, : resized.shape[0], : resized.shape[1]] = resized
            values = (rgb.shape[0], rgb.shape[1], resized.shape[0], resized.shape[1], "")
        except Exception as e:  # one bad image must not stop the corpus
            reason = str(e) if source in str(e) else f"{source}: {type(e).__name__}: {e}"
            values = (0, 0, 0, 0, reason)
            rgb = np.zeros((1, 1, 3), np.uint8)
        originals.append(rgb)
        for key, value in zip(out, values):
            out[key].append(value)
    result = {k: batch[k] for k in ("image_id", "source", "source_offset", "source_length", "annotations")}
    result.update(pixels=pixels, **{k: np.array(v) for k, v in out.items()})
    if keep_original:
        result["image"] = originals
    return result
