"""What leaves the auto-masking actors: the Parquet rows (+ SA-1B JSON per image) written by a CPU
task per batch, and after the run a COCO results file and overlay PNGs read back from the Parquet."""

import json
import os
import posixpath
import tempfile
from typing import Any, Dict, List, Optional

import numpy as np

from tinysam.utils.sa1b import sa1b_document

from ..sources import decode_image, read_bytes
from ..stages import ok_rows
from ..storage.audit import write_audit
from ..storage.errors import write_errors
from ..storage.files import batch_file_name, read_table, write_bytes_atomic, write_file_atomic
from ..storage.masks import iter_results, write_masks

SA1B_DIR = "sa1b"  # per-image SA-1B JSON files under the output
PREVIEW_DIR = "previews"


def write_batch(
    batch: Dict[str, np.ndarray],
    output: str,
    provenance: Dict[str, Any],
    sa1b_json: bool = False,
    storage_options: Optional[dict] = None,
) -> Dict[str, Any]:
    """The batch's images as one Parquet file (one row per image, masks as a list of structs);
    with `sa1b_json` also `<output>/sa1b/<id>.json` per image. Audited rows go to the audit
    table, bad rows to the errors table."""
    ok = ok_rows(batch)
    ids = [str(i) for i in batch["image_id"]]
    name = batch_file_name(ids)
    records = [json.loads(m) if good else [] for m, good in zip(batch["masks"], ok)]
    if sa1b_json:  # before the Parquet row: a rerun redoes an image whose JSON may be missing
        for i in np.flatnonzero(ok):
            doc = sa1b_document(
                ids[i], str(batch["source"][i]), int(batch["orig_w"][i]), int(batch["orig_h"][i]), records[i]
            )
            write_bytes_atomic(json.dumps(doc).encode(), output, f"{SA1B_DIR}/{ids[i]}.json", storage_options)
    if "audit" in batch:  # before the masks: a rerun redoes an image whose audit row may be missing
        write_audit(batch, ok, output, name, provenance, storage_options)
    written = write_masks(batch, ok, records, output, name, provenance, storage_options)
    write_errors(batch, ok, output, name, storage_options)
    return {
        "image_id": np.asarray(ids),
        "source": batch["source"],
        "ok": ok,
        "bytes": np.where(ok, written // max(1, int(ok.sum())), 0),
        "num_masks": np.array([len(r) for r in records]),
        "encode_seconds": batch["encode_seconds"],
        "generate_seconds": batch["generate_seconds"],
    }


CATEGORIES = [{"id": 1, "name": "object"}]


def coco_image_ids(image_ids: List[str]) -> Dict[str, int]:
    """COCO needs integer ids: SA-1B's own numeric ids when every id is one, else 1..N in sorted order."""
    if image_ids and all(i.isdigit() for i in image_ids):
        return {i: int(i) for i in image_ids}
    return {i: k + 1 for k, i in enumerate(sorted(image_ids))}


def write_coco_results(output: str, path: str, storage_options: Optional[dict] = None) -> Dict[str, str]:
    """One COCO results file for the whole output (a list of {image_id, category_id, segmentation
    as RLE, score, bbox, area}) at `path`, plus `<path stem>_images.json`, a COCO dataset of the
    images (ids, file names, sizes) to load the results against; and where the masks have polygons
    (--polygons), `<path stem>_polygons.json`: a whole COCO dataset (images, annotations with
    polygon segmentations, iscrowd 0), the form annotation tools import. Streamed through local
    temporary files, then each put in place in one step."""
    ids = read_table(output, columns=["image_id"], storage_options=storage_options)["image_id"].to_pylist()
    numeric = coco_image_ids(ids)
    stem = path[:-5] if path.endswith(".json") else path
    images, result_anns, polygon_anns = [], 0, 0
    results = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
    polygons = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
    try:
        with results, polygons:
            results.write("[")
            polygons.write('{"categories": %s, "annotations": [' % json.dumps(CATEGORIES))
            for row in iter_results(output, storage_options=storage_options):
                coco_id = numeric[row["image_id"]]
                images.append(
                    {
                        "id": coco_id,
                        "file_name": row["source"],
                        "width": row["width"],
                        "height": row["height"],
                        "tinysam_image_id": row["image_id"],
                    }
                )
                for mask in row["masks"]:
                    ann = {
                        "image_id": coco_id,
                        "category_id": 1,
                        "segmentation": mask["segmentation"],
                        "score": mask["predicted_iou"],
                        "bbox": mask["bbox"],
                        "area": mask["area"],
                        "stability_score": mask["stability_score"],
                        "point_coords": mask["point_coords"],
                    }
                    result_anns += 1
                    results.write(("" if result_anns == 1 else ",\n") + json.dumps(ann))
                    if mask.get("polygons"):  # none left (every piece under the minimum area): left out
                        polygon_anns += 1
                        ann = {**ann, "id": polygon_anns, "segmentation": mask["polygons"], "iscrowd": 0}
                        polygons.write(("" if polygon_anns == 1 else ",\n") + json.dumps(ann))
            results.write("]\n")
            images.sort(key=lambda im: im["id"])
            polygons.write('], "images": %s}\n' % json.dumps(images))
        written = {"results": path, "images": stem + "_images.json"}
        dataset = {"images": images, "annotations": [], "categories": CATEGORIES}
        folder, name = posixpath.split(written["images"].rstrip("/"))
        write_bytes_atomic(json.dumps(dataset).encode(), folder or ".", name, storage_options)
        if polygon_anns:
            written["polygons"] = stem + "_polygons.json"
            write_file_atomic(polygons.name, written["polygons"], storage_options)
        write_file_atomic(results.name, path, storage_options)
    finally:
        os.unlink(results.name)
        os.unlink(polygons.name)
    return written


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
