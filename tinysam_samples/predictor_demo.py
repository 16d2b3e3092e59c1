"""The predictor demo: real MobileSAM weights, sample photos, point and box prompts.

Writes one overlay PNG per image and `masks.json` (COCO RLE masks with scores) to a folder.
"""

import json
import os
import time
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

from tinysam.build_sam import build_sam
from tinysam.predictor import SamPredictor
from tinysam.utils.rle import mask_bbox_xywh, mask_to_coco_rle
from tinysam.visualize import overlay_masks, save_png

from .data import sample_images

# Prompts as fractions of (width, height): hand-picked for the sample photos, generic otherwise.
_PROMPTS: Dict[str, List[dict]] = {
    "astronaut": [
        {"points": [[0.52, 0.22]], "labels": [1]},  # face
        {"box": [0.27, 0.02, 0.77, 0.99]},  # the astronaut
        {"points": [[0.08, 0.3], [0.5, 0.6]], "labels": [1, 0]},  # the flag, not the suit
    ],
    "coffee": [
        {"points": [[0.5, 0.45]], "labels": [1]},  # coffee
        {"box": [0.08, 0.05, 0.9, 0.9]},  # the cup and saucer
    ],
    "chelsea": [
        {"points": [[0.45, 0.45]], "labels": [1]},  # the cat
        {"box": [0.25, 0.05, 0.75, 0.9]},
    ],
}
_GENERIC = [{"points": [[0.5, 0.5]], "labels": [1]}, {"box": [0.2, 0.2, 0.8, 0.8]}]


def _to_pixels(prompt: dict, w: int, h: int) -> dict:
    out = {}
    if "points" in prompt:
        out["point_coords"] = np.array([[x * w, y * h] for x, y in prompt["points"]])
        out["point_labels"] = np.array(prompt["labels"])
    if "box" in prompt:
        x0, y0, x1, y1 = prompt["box"]
        out["box"] = np.array([x0 * w, y0 * h, x1 * w, y1 * h])
    return out


def run_predictor_demo(
    output_dir: Path,
    checkpoint: str = "mobile_sam",
    model_type: str = "vit_t",
    images: Tuple[str, ...] = ("astronaut", "coffee", "chelsea"),
) -> dict:
    """Segment the sample photos from prompts; returns a summary of what was written."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    predictor = SamPredictor(build_sam(model_type, checkpoint))
    records, written = [], []
    t0 = time.perf_counter()
    for name, image in sample_images(images):
        h, w = image.shape[:2]
        predictor.set_image(image)
        masks, points, labels, boxes, annotations = [], [], [], [], []
        for prompt in _PROMPTS.get(name, _GENERIC):
            kwargs = _to_pixels(prompt, w, h)
            m, iou, _ = predictor.predict(**kwargs, multimask_output=True)
            best = int(np.argmax(iou))
            masks.append(m[best])
            points += kwargs.get("point_coords", np.zeros((0, 2))).tolist()
            labels += kwargs.get("point_labels", np.zeros(0, int)).tolist()
            if "box" in kwargs:
                boxes.append(kwargs["box"].tolist())
            annotations.append(
                {
                    "prompt": {k: v.tolist() for k, v in kwargs.items()},
                    "segmentation": mask_to_coco_rle(m[best]),
                    "area": int(m[best].sum()),
                    "bbox": mask_bbox_xywh(m[best]),
                    "predicted_iou": float(iou[best]),
                }
            )
        png = output_dir / f"{name}_overlay.png"
        save_png(png, overlay_masks(image, masks, points=points, labels=labels, boxes=boxes))
        written.append(png)
        records.append({"image": {"file_name": name, "width": w, "height": h}, "annotations": annotations})
    masks_json = output_dir / "masks.json"
    tmp = masks_json.with_name(".masks.json.part")
    tmp.write_text(json.dumps(records, indent=1))
    os.replace(tmp, masks_json)
    return {
        "images": len(records),
        "masks": sum(len(r["annotations"]) for r in records),
        "seconds": time.perf_counter() - t0,
        "files": [str(p) for p in written + [masks_json]],
    }
