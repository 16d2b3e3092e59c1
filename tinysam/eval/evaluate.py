"""Per-image evaluation of the three protocols, and the aggregation over a dataset.

`evaluate_image` is what a worker runs (in a loop here, in Ray actors in `pipelines/evaluate.py`);
`aggregate` turns the per-image parts of one model into its table row.
"""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from ..predictor import SamPredictor
from .box_prompt import box_prompt_image, coco_segm_stats
from .everything import EverythingConfig, everything_image
from .point_prompt import DEFAULT_POINTS, point_prompt_image

PROTOCOLS = ("box", "point", "everything")


@dataclass
class EvalConfig:
    protocols: Sequence[str] = PROTOCOLS
    detections: Optional[Dict[int, List[Dict[str, Any]]]] = None  # image id -> detections; None: GT boxes
    n_points: Sequence[int] = DEFAULT_POINTS
    everything: Sequence[EverythingConfig] = field(
        default_factory=lambda: [EverythingConfig.from_preset("quality"), EverythingConfig()]
    )
    max_dets: int = 100
    # The point protocol costs (points x objects) decoder calls with a per-object mask input (about
    # 0.1 s each on a CPU core): cap the objects per image (the first ones, by annotation id).
    point_max_objects: Optional[int] = None

    def __post_init__(self) -> None:
        unknown = set(self.protocols) - set(PROTOCOLS)
        if unknown:
            raise ValueError(f"unknown protocol(s) {sorted(unknown)}; choose from {', '.join(PROTOCOLS)}")


def evaluate_image(
    predictor: SamPredictor,
    image_id: int,
    image: np.ndarray,
    anns: List[Dict[str, Any]],
    gt_masks: List[np.ndarray],
    config: EvalConfig,
) -> Dict[str, Any]:
    """The protocols' raw per-image results (JSON-serialisable)."""
    out: Dict[str, Any] = {"image_id": int(image_id), "objects": len(gt_masks)}
    predictor.set_image(image)
    if "box" in config.protocols:
        if config.detections is None:
            out["box"] = box_prompt_image(
                predictor,
                image_id,
                [a["bbox"] for a in anns],
                category_ids=[a["category_id"] for a in anns],
                gt_masks=gt_masks,
            )
        else:
            dets = config.detections.get(int(image_id), [])
            out["box"] = box_prompt_image(
                predictor,
                image_id,
                [d["bbox"] for d in dets],
                scores=[d.get("score", 1.0) for d in dets],
                category_ids=[d["category_id"] for d in dets],
            )
    if "point" in config.protocols:
        objects = gt_masks[: config.point_max_objects] if config.point_max_objects else gt_masks
        out["point"] = {str(k): v for k, v in point_prompt_image(predictor, objects, config.n_points).items()}
    if "everything" in config.protocols:
        out["everything"] = everything_image(predictor.model, image, gt_masks, config.everything)
    return out


def aggregate(parts: Sequence[Dict[str, Any]], config: EvalConfig, coco_gt=None) -> Dict[str, Any]:
    """One model's summary: box AP (+ mIoU with GT boxes), point mIoU per k, everything mIoU and s/image."""
    summary: Dict[str, Any] = {"images": len(parts), "objects": sum(p["objects"] for p in parts)}
    if "box" in config.protocols:
        results = [r for p in parts for r in p["box"]["results"]]
        ious = [i for p in parts for i in p["box"]["ious"]]
        box = coco_segm_stats(coco_gt, results, config.max_dets, [p["image_id"] for p in parts]) if coco_gt else {}
        if ious:
            box["mIoU"] = float(np.mean(ious))
        summary["box"] = box
    if "point" in config.protocols:
        summary["point"] = {
            k: float(np.mean([i for p in parts for i in p["point"][str(k)]] or [0.0])) for k in config.n_points
        }
    if "everything" in config.protocols:
        summary["everything"] = {
            c.name: {
                "mIoU": float(np.mean([i for p in parts for i in p["everything"][c.name]["ious"]] or [0.0])),
                "seconds_per_image": float(np.mean([p["everything"][c.name]["seconds"] for p in parts])),
                "masks_per_image": float(np.mean([p["everything"][c.name]["masks"] for p in parts])),
            }
            for c in config.everything
        }
    return summary


def evaluate_dataset(predictor: SamPredictor, data, config: EvalConfig, image_ids: Optional[Sequence[int]] = None):
    """(per-image parts, error messages) over a `CocoImages` dataset, in this process."""
    parts, errors = [], []
    for image_id in image_ids if image_ids is not None else data.image_ids():
        try:
            image, anns, masks = data.load(image_id)
        except ValueError as e:  # an unreadable image is reported and left out
            errors.append(str(e))
            continue
        parts.append(evaluate_image(predictor, image_id, image, anns, masks, config))
    return parts, errors
