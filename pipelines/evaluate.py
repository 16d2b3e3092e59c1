"""Evaluation over large sets: images spread over Ray actors, one model loaded once per actor.

The per-image work and the aggregation are the library's (`tinysam.eval`); this module only
distributes `evaluate_image` and gathers its JSON parts. Failures are per image: an unreadable
image is reported and left out, not fatal.
"""

import dataclasses
import json
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np


class ImageEvaluator:
    """Ray actor: builds the model once and evaluates batches of image ids."""

    def __init__(
        self,
        model_type: str,
        checkpoint: Optional[str],
        annotations: str,
        images_dir: str,
        config_json: str,
        cpu_threads: Optional[int] = None,
    ) -> None:
        import torch

        from tinysam import SamPredictor, build_sam
        from tinysam.eval import CocoImages

        from .evaluate import config_from_json

        if cpu_threads:
            torch.set_num_threads(cpu_threads)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.predictor = SamPredictor(build_sam(model_type, checkpoint).to(device).eval())
        self.data = CocoImages(annotations, images_dir)
        self.config = config_from_json(config_json)

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, Any]:
        from tinysam.eval import evaluate_image

        parts, errors = [], []
        for image_id in batch["image_id"]:
            try:
                image, anns, masks = self.data.load(int(image_id))
                parts.append(json.dumps(evaluate_image(self.predictor, int(image_id), image, anns, masks, self.config)))
                errors.append("")
            except Exception as e:  # one bad image must not stop the evaluation
                parts.append("")
                errors.append(f"image {int(image_id)}: {type(e).__name__}: {e}")
        return {"image_id": batch["image_id"], "part": np.array(parts, dtype=object), "error": np.array(errors)}


def config_to_json(config) -> str:
    return json.dumps(
        {
            "protocols": list(config.protocols),
            "detections": config.detections,
            "n_points": list(config.n_points),
            "max_dets": config.max_dets,
            "point_max_objects": config.point_max_objects,
            "everything": [dataclasses.asdict(c) for c in config.everything],
        }
    )


def config_from_json(text: str):
    from tinysam.eval import EvalConfig, EverythingConfig

    d = json.loads(text)
    detections = {int(k): v for k, v in d["detections"].items()} if d["detections"] is not None else None
    return EvalConfig(
        d["protocols"],
        detections,
        d["n_points"],
        [EverythingConfig.from_dict(c) for c in d["everything"]],
        d["max_dets"],
        d["point_max_objects"],
    )


def evaluate_on_ray(
    model_type: str,
    checkpoint: Optional[str],
    annotations: str,
    images_dir: str,
    config,
    image_ids: Sequence[int],
    concurrency: int = 1,
    num_gpus_per_actor: float = 0.0,
    num_cpus_per_actor: int = 1,
    batch_size: int = 1,
) -> Tuple[List[Dict[str, Any]], List[str]]:
    """(per-image parts, error messages) of one model over `image_ids`, on the current Ray cluster."""
    import ray

    from .stages import model_actor_stage

    ds = ray.data.from_items(
        [{"image_id": int(i)} for i in image_ids], override_num_blocks=max(1, min(len(image_ids), 64))
    )
    ds = model_actor_stage(
        ds,
        ImageEvaluator,
        {
            "model_type": model_type,
            "checkpoint": checkpoint,
            "annotations": annotations,
            "images_dir": images_dir,
            "config_json": config_to_json(config),
        },
        batch_size,
        concurrency,
        num_gpus_per_actor,
        num_cpus_per_actor,
    )
    parts, errors = [], []
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for part, error in zip(batch["part"], batch["error"]):
            if error:
                errors.append(str(error))
            else:
                parts.append(json.loads(part))
    return sorted(parts, key=lambda p: p["image_id"]), errors
