"""Bulk auto-masking with Ray Data: images -> everything-mode actors -> SA-1B-style masks in Parquet.

Stages, top to bottom:
  plan_inputs (driver)       -> files and shards not yet done (pipelines/reading.py)
  read + prepare (CPU)       -> the precompute job's reading and preprocessing (one pass per shard);
  or load_stored_embeddings  -> rows of a precompute job's output, when the encoder already ran
  AutoMasker (pool)          -> the model loaded once per actor: encoder in batches, then hierarchical
                                (default) or dense everything mode over the batch's images together
  write_batch (CPU)          -> ~128 MiB atomic Parquet files (pipelines/storage/masks.py; + SA-1B JSON
                                per image); errors table
After the run, from the Parquet output: a COCO results file (`coco_json`) and overlay PNGs (`preview`).

Torch and the models are imported inside the actor: the read and write workers import this
module too and should not pay for them (see pipelines/stages.py).
"""

import json
import os
import posixpath
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import numpy as np
import pyarrow as pa

from tinysam.utils.sa1b import sa1b_document

from .reading import DEFAULT_MAX_MEGAPIXELS, Plan, plan_inputs
from .sources import ImageRef, decode_image, filesystem, read_bytes
from .stages import (
    JobSummary,
    SamActor,
    batch_file_name,
    finish_summary,
    image_pipeline,
    model_and_write,
    ok_rows,
    preflight,
    run_to_output,
)
from .storage import embeddings as stored
from .storage.errors import write_errors
from .storage.files import read_table, resume_ids, write_bytes_atomic
from .storage.masks import default_rows_per_file, iter_results, write_masks

MODES = ("hierarchical", "dense")
SA1B_DIR = "sa1b"  # per-image SA-1B JSON files under the output
PREVIEW_DIR = "previews"

def generator_class(mode: str) -> type:
    """The everything-mode generator of `mode`."""
    from tinysam.everything import SamAutomaticMaskGenerator, SamHierarchicalMaskGenerator

    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    return SamHierarchicalMaskGenerator if mode == "hierarchical" else SamAutomaticMaskGenerator


def make_generator(sam, mode: str = "hierarchical", params: Optional[Dict[str, Any]] = None):
    """The everything-mode generator of `mode` with `params` (the generator's keyword arguments),
    producing COCO RLE records."""
    cls = generator_class(mode)
    params = dict(params or {})
    if params.get("output_mode", "coco_rle") != "coco_rle":
        raise ValueError("the bulk job stores COCO RLE: output_mode cannot be changed")
    params["output_mode"] = "coco_rle"
    return cls(sam, **params)


def generator_parameters(mode: Optional[str] = None) -> Dict[str, Any]:
    """{name: default} of the parameters a job may set: those of the generator of `mode` (of
    both modes when None) and its base classes, except the model and the output mode."""
    import inspect

    found: Dict[str, Any] = {}
    for cls in [generator_class(m) for m in ([mode] if mode else MODES)]:
        for klass in cls.__mro__[:-1]:  # not object
            if "__init__" not in vars(klass):
                continue
            for name, param in inspect.signature(klass.__init__).parameters.items():
                if param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY) and name not in _FIXED:
                    found.setdefault(name, param.default)
    return found


_FIXED = {"self", "model", "point_grids", "output_mode"}


def check_params(mode: str, params: Dict[str, Any]) -> None:
    """Refuse an unknown mode or a parameter the generator of `mode` does not take."""
    accepted = generator_parameters(mode)  # an unknown mode raises here
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(f"{mode} mode has no parameter {', '.join(unknown)}; it takes {', '.join(sorted(accepted))}")


class AutoMasker(SamActor):
    """Ray actor: the model and generator loaded once; masks for every image of a batch."""

    def __init__(self, model_type: str, checkpoint: Optional[str], mode: str = "hierarchical",
                 params: Optional[Dict[str, Any]] = None, device: Optional[str] = None,
                 cpu_threads: Optional[int] = None, memory_gb: Optional[float] = None) -> None:
        # fp32 encoder: bf16 embeddings changed the masks (docs/benchmarks.md, "On a GPU")
        super().__init__(model_type, checkpoint, device, cpu_threads, bf16=False, memory_gb=memory_gb)
        self.generator = make_generator(self.sam, mode, params)

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, Any]:
        import torch

        with torch.inference_mode():
            return self._masks(batch)

    def _masks(self, batch: Dict[str, np.ndarray]) -> Dict[str, Any]:
        ok = ok_rows(batch)
        rows = np.flatnonzero(ok)
        masks = [""] * len(ok)
        errors = [str(e) for e in batch["error"]]
        timing = [0.0, 0.0]
        if rows.size:
            try:
                records = self._generate(batch, rows, timing)
            except Exception:  # one image must not fail its batch: each alone, its own error if it fails
                records = []
                for i in rows:
                    try:
                        records += self._generate(batch, np.array([i]), timing)
                    except Exception as e:
                        records.append(None)
                        errors[i] = f"{batch['source'][i]}: everything mode failed ({type(e).__name__}: {e})"[:2000]
            for i, recs in zip(rows, records):
                masks[i] = "" if recs is None else json.dumps(recs)
        out = {k: v for k, v in batch.items()
               if k in ("image_id", "source", "source_offset", "source_length", "orig_h", "orig_w")}
        out["error"] = np.array(errors, dtype=object)
        out["masks"] = np.array(masks, dtype=object)
        share = np.where(ok, 1.0 / max(1, rows.size), 0.0)
        out["encode_seconds"] = share * timing[0]
        out["generate_seconds"] = share * timing[1]
        return out

    def _generate(self, batch: Dict[str, np.ndarray], rows: np.ndarray, timing: List[float]) -> List[list]:
        """Mask records of the prepared rows `rows`; adds encoder and generator seconds to `timing`."""
        import torch

        start = time.perf_counter()
        if self.generator.crop_n_layers:  # crops are encoded from the full-resolution image
            records = self.generator.generate_batch([batch["image"][i] for i in rows])
            timing[1] += time.perf_counter() - start
            return records
        if "embedding" in batch:
            embeddings = torch.as_tensor(np.stack([batch["embedding"][i] for i in rows]))
        else:
            embeddings = self.encode(batch, rows)
        timing[0] += time.perf_counter() - start
        start = time.perf_counter()
        records = self.generator.generate_from_embeddings(
            embeddings, list(zip(batch["input_h"][rows], batch["input_w"][rows])),
            list(zip(batch["orig_h"][rows], batch["orig_w"][rows])))
        timing[1] += time.perf_counter() - start
        return records


def load_stored_embeddings(batch: Dict[str, np.ndarray], storage_options: Optional[dict] = None) -> Dict[str, Any]:
    """Rows of a precompute job's output for the batch's ids (read from the files that hold them)."""
    n = len(batch["image_id"])
    out: Dict[str, Any] = {k: np.zeros(n, np.int64) for k in ("orig_h", "orig_w", "input_h", "input_w")}
    embeddings: List[Optional[np.ndarray]] = [None] * n
    errors = [""] * n
    position = {str(i): k for k, i in enumerate(batch["image_id"])}
    for file in sorted(set(str(f) for f in batch["embedding_file"])):
        try:
            table = stored.read_rows(file, list(position), storage_options)
            values = table["embedding"].combine_chunks().to_numpy_ndarray()
            for j, image_id in enumerate(table["image_id"].to_pylist()):
                k = position[image_id]
                embeddings[k] = values[j]
                for key in ("orig_h", "orig_w", "input_h", "input_w"):
                    out[key][k] = table[key][j].as_py()
        except Exception as e:  # a damaged embeddings file fails its rows, not the run
            for k, f in enumerate(batch["embedding_file"]):
                if str(f) == file:
                    errors[k] = f"{file}: stored embeddings unreadable ({type(e).__name__}: {e})"
    shape = next((e.shape for e in embeddings if e is not None), stored.EMBEDDING_SHAPE)
    for k, e in enumerate(embeddings):
        if e is None and not errors[k]:
            errors[k] = f"{batch['source'][k]}: no stored embedding for id {batch['image_id'][k]}"
    out["embedding"] = np.stack([e if e is not None else np.zeros(shape, np.float16) for e in embeddings])
    keep = {k: batch[k] for k in ("image_id", "source", "source_offset", "source_length")}
    return {**keep, "error": np.array(errors), **out}


def write_batch(batch: Dict[str, np.ndarray], output: str, provenance: Dict[str, Any], sa1b_json: bool = False,
                storage_options: Optional[dict] = None) -> Dict[str, Any]:
    """The batch's images as one Parquet file (one row per image, masks as a list of structs);
    with `sa1b_json` also `<output>/sa1b/<id>.json` per image. Bad rows go to the errors table."""
    ok = ok_rows(batch)
    ids = [str(i) for i in batch["image_id"]]
    name = batch_file_name(ids)
    records = [json.loads(m) if good else [] for m, good in zip(batch["masks"], ok)]
    if sa1b_json:  # before the Parquet row: a rerun redoes an image whose JSON may be missing
        for i in np.flatnonzero(ok):
            doc = sa1b_document(ids[i], str(batch["source"][i]), int(batch["orig_w"][i]), int(batch["orig_h"][i]),
                                records[i])
            write_bytes_atomic(json.dumps(doc).encode(), output, f"{SA1B_DIR}/{ids[i]}.json", storage_options)
    written = write_masks(batch, ok, records, output, name, provenance, storage_options)
    write_errors(batch, ok, output, name, storage_options)
    return {
        "image_id": np.asarray(ids), "source": batch["source"], "ok": ok,
        "bytes": np.where(ok, written // max(1, int(ok.sum())), 0), "num_masks": np.array([len(r) for r in records]),
        "encode_seconds": batch["encode_seconds"], "generate_seconds": batch["generate_seconds"],
    }


@dataclass
class AutomaskSummary(JobSummary):
    masks: int = 0
    encode_seconds: float = 0.0  # summed over actors
    generate_seconds: float = 0.0

    @property
    def masks_per_image(self) -> float:
        return self.masks / self.written if self.written else 0.0

    def as_dict(self) -> Dict[str, Any]:
        return {**super().as_dict(), "masks_per_image": self.masks_per_image}


def automask(
    input: Optional[str],
    output: str,
    model: str = "vit_t",
    checkpoint: Optional[str] = None,
    mode: str = "hierarchical",
    params: Optional[Dict[str, Any]] = None,
    embeddings: Optional[str] = None,
    batch_size: int = 1,
    concurrency: int = 1,
    num_gpus_per_actor: float = 0.0,
    num_cpus_per_actor: int = 1,
    limit: Optional[int] = None,
    max_failures: Optional[int] = None,
    rows_per_file: Optional[int] = None,
    max_megapixels: Optional[float] = DEFAULT_MAX_MEGAPIXELS,
    overwrite: bool = False,
    actor_memory_gb: Optional[float] = None,
    sa1b_json: bool = False,
    coco_json: Optional[str] = None,
    preview: int = 0,
    storage_options: Optional[dict] = None,
    actor_options: Optional[Dict[str, Any]] = None,
) -> AutomaskSummary:
    """Masks for every image of `input` not yet in `output` (or, with `embeddings`, for every image
    of a precompute job's output). Ray must be initialised by the caller. `checkpoint=None` means
    random weights (tests); the jobs require one."""
    params = dict(params or {})
    check_params(mode, params)  # a typo fails here, not in every actor
    checkpoint_sha = preflight(model, checkpoint, output, storage_options)
    provenance = {"model": model, "checkpoint_sha256": checkpoint_sha, "mode": mode,
                  "params": json.dumps(params, sort_keys=True)}
    if embeddings:
        if params.get("crop_n_layers"):
            raise ValueError("crop layers need the images: run without --embeddings")
        plan, files = _pending_stored(embeddings, output, provenance, limit, overwrite, storage_options)
    elif input:
        plan = plan_inputs(input, output, provenance, limit, overwrite, storage_options)
    else:
        raise ValueError("give an input (images) or embeddings (a precompute job's output)")
    summary = AutomaskSummary()
    if plan.files or plan.shards:
        actor_kwargs = {"model_type": model, "checkpoint": checkpoint, "mode": mode, "params": params,
                        "memory_gb": actor_memory_gb}
        write_kwargs = {"output": output, "provenance": provenance, "sa1b_json": sa1b_json}
        args = (AutoMasker, actor_kwargs, write_batch, write_kwargs, batch_size, concurrency, num_gpus_per_actor,
                num_cpus_per_actor, rows_per_file or default_rows_per_file(), storage_options)
        if embeddings:
            ds = _stored_rows(plan, files, batch_size, storage_options)
            ds = model_and_write(ds, *args, actor_options=actor_options)
        else:
            ds = image_pipeline(plan, *args, keep_original=bool(params.get("crop_n_layers")),
                                max_megapixels=max_megapixels, output=output, actor_options=actor_options)

        def count(result: Dict[str, np.ndarray], i: int) -> None:
            summary.masks += int(result["num_masks"][i])
            summary.encode_seconds += float(result["encode_seconds"][i])
            summary.generate_seconds += float(result["generate_seconds"][i])

        run_to_output(ds, summary, output, max_failures, on_row=count)
    finish_summary(summary, plan, output, storage_options)
    if coco_json:
        write_coco_results(output, coco_json, storage_options)
    if preview:
        write_previews(output, preview, storage_options)
    return summary


def _pending_stored(embeddings: str, output: str, provenance: Dict[str, Any], limit: Optional[int],
                    overwrite: bool, storage_options: Optional[dict]):
    """(plan, {id: embeddings file}) for the images of a precompute job's output not yet masked;
    refuses embeddings of another model."""
    stored.require_made_by(embeddings, provenance["model"], provenance["checkpoint_sha256"], "this job's model",
                           storage_options)
    index = stored.read_index(embeddings, storage_options).sort_by("source")
    index = index.slice(0, limit) if limit is not None else index
    done = resume_ids(output, provenance, overwrite, storage_options)
    ids = index["image_id"].to_pylist()
    finished = done.contains(ids) if ids else np.zeros(0, bool)
    todo = index.filter(pa.array(~finished))
    todo_ids = todo["image_id"].to_pylist()
    plan = Plan(files=[ImageRef(i, s) for i, s in zip(todo_ids, todo["source"].to_pylist())], done=done,
                skipped=int(finished.sum()),
                ranges=dict(zip(todo_ids, zip(todo["source_offset"].to_pylist(), todo["source_length"].to_pylist()))))
    return plan, stored.files_by_id(embeddings, storage_options)


def _stored_rows(plan: Plan, files: Dict[str, str], batch_size: int, storage_options: Optional[dict]):
    """The plan's images as rows of stored embeddings (a lazy Dataset)."""
    import ray

    items = [{"image_id": r.image_id, "source": r.source, "source_offset": plan.ranges[r.image_id][0],
              "source_length": plan.ranges[r.image_id][1], "embedding_file": files[r.image_id]} for r in plan.files]
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 64)))
    return ds.map_batches(load_stored_embeddings, batch_size=batch_size, num_cpus=0.5,
                          fn_kwargs={"storage_options": storage_options})


def coco_image_ids(image_ids: List[str]) -> Dict[str, int]:
    """COCO needs integer ids: SA-1B's own numeric ids when every id is one, else 1..N in sorted order."""
    if image_ids and all(i.isdigit() for i in image_ids):
        return {i: int(i) for i in image_ids}
    return {i: k + 1 for k, i in enumerate(sorted(image_ids))}


def write_coco_results(output: str, path: str, storage_options: Optional[dict] = None) -> Dict[str, str]:
    """One COCO results file for the whole output (a list of {image_id, category_id, segmentation,
    score, bbox, area}) at `path`, plus `<path stem>_images.json`, a COCO dataset of the images
    (ids, file names, sizes) to load the results against. Streamed through a local temporary
    file, then put in place in one step."""
    ids = read_table(output, columns=["image_id"], storage_options=storage_options)["image_id"].to_pylist()
    numeric = coco_image_ids(ids)
    images_path = (path[:-5] if path.endswith(".json") else path) + "_images.json"
    images = []
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as tmp:
        tmp.write("[")
        first = True
        for row in iter_results(output, storage_options=storage_options):
            coco_id = numeric[row["image_id"]]
            images.append({"id": coco_id, "file_name": row["source"], "width": row["width"],
                           "height": row["height"], "tinysam_image_id": row["image_id"]})
            for mask in row["masks"]:
                ann = {"image_id": coco_id, "category_id": 1, "segmentation": mask["segmentation"],
                       "score": mask["predicted_iou"], "bbox": mask["bbox"], "area": mask["area"],
                       "stability_score": mask["stability_score"], "point_coords": mask["point_coords"]}
                tmp.write(("" if first else ",\n") + json.dumps(ann))
                first = False
        tmp.write("]\n")
    try:
        images.sort(key=lambda im: im["id"])
        dataset = {"images": images, "annotations": [], "categories": [{"id": 1, "name": "object"}]}
        _put(json.dumps(dataset).encode(), images_path, storage_options)
        _put(tmp.name, path, storage_options)
    finally:
        os.unlink(tmp.name)
    return {"results": path, "images": images_path}


def _put(data_or_file, url: str, storage_options: Optional[dict]) -> None:
    """Bytes or a local file to `url`, visible only once complete."""
    folder, name = posixpath.split(url.rstrip("/"))
    if isinstance(data_or_file, bytes):
        write_bytes_atomic(data_or_file, folder or ".", name, storage_options)
        return
    fs, target = filesystem(url, storage_options)
    fs.makedirs(posixpath.dirname(target) or ".", exist_ok=True)
    if "file" in fs.protocol or "local" in fs.protocol:
        tmp = f"{target}.{uuid.uuid4().hex}.tmp"  # unique: two jobs finishing together do not race
        shutil.copyfile(data_or_file, tmp)
        os.replace(tmp, target)
    else:  # one upload: visible when it completes
        fs.put_file(data_or_file, target)


def write_previews(output: str, n: int, storage_options: Optional[dict] = None) -> List[str]:
    """Overlay PNGs of the first `n` images (by id) to `<output>/previews/<id>.png`."""
    import cv2

    from tinysam.transforms import to_rgb_uint8
    from tinysam.utils.rle import coco_rle_to_mask
    from tinysam.visualize import overlay_masks

    ids = read_table(output, columns=["image_id"], storage_options=storage_options)["image_id"].to_pylist()
    first = set(sorted(ids)[:n])
    written = []
    for row in sorted(iter_results(output, first, storage_options), key=lambda r: r["image_id"]):
        data, _ = read_bytes(row["source"], storage_options, offset=row["source_offset"], length=row["source_length"])
        image = to_rgb_uint8(decode_image(data, row["source"]), row["source"])
        overlay = overlay_masks(image, [coco_rle_to_mask(m["segmentation"]) for m in row["masks"]])
        ok, png = cv2.imencode(".png", cv2.cvtColor(overlay, cv2.COLOR_RGB2BGR))
        if not ok:
            raise OSError(f"{row['source']}: could not encode the preview PNG")
        name = f"{PREVIEW_DIR}/{row['image_id']}.png"
        write_bytes_atomic(png.tobytes(), output, name, storage_options)
        written.append(f"{output.rstrip('/')}/{name}")
    return written
