"""Evaluation over large sets: images spread over Ray actors, one model loaded once per actor.

The per-image work and the aggregation are the library's (`tinysam.eval`); this module only
distributes `evaluate_image` and gathers its JSON parts. Failures are per image: an unreadable
image is reported and left out, not fatal.
"""

import dataclasses
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .options import CorpusOptions


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
    data,
    config,
    image_ids: Sequence[int],
    actors: "CorpusOptions",
) -> Tuple[List[Dict[str, Any]], List[str]]:
    """(per-image parts, error messages) of one model over `image_ids` of `data` (a
    `tinysam.eval.CocoImages`), on the current Ray cluster; `actors` gives the actors' count,
    resources and batch size."""
    import os

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
            "annotations": os.path.abspath(data.path),
            "images_dir": os.path.abspath(data.images_dir),
            "config_json": config_to_json(config),
        },
        actors,
    )
    parts, errors = [], []
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for part, error in zip(batch["part"], batch["error"]):
            if error:
                errors.append(str(error))
            else:
                parts.append(json.loads(part))
    return sorted(parts, key=lambda p: p["image_id"]), errors


@dataclass(frozen=True)
class EvaluateOptions:
    """An evaluation run: one ground truth, one or more models, the protocols' settings."""

    annotations: str  # COCO-format ground truth
    images: str  # the folder its file_name entries are relative to
    models: Tuple[Tuple[str, Optional[str], str], ...]  # (model type, checkpoint or None, row label)
    config: Any  # tinysam.eval.EvalConfig
    output: str  # folder for results.md, results.json and each model's <label>_box.json
    limit: Optional[int] = None  # only the first N images
    ray: bool = False  # spread images over Ray actors (joins a cluster if any)
    actors: CorpusOptions = CorpusOptions(output="")  # with `ray`: actors per model, their resources
    num_cpus: Optional[int] = None  # CPUs of a local Ray


def evaluate_models(options: EvaluateOptions) -> Tuple[str, int]:
    """Every model over the dataset, in this process or on Ray actors; writes results.md,
    results.json and each model's box-prompt masks as a COCO results file (to score with any COCO
    tool). Returns the Markdown tables and the number of images that failed."""
    from tinysam.eval import CocoImages, aggregate, evaluate_dataset
    from tinysam.eval.report import report_markdown

    data = CocoImages(options.annotations, options.images)
    image_ids = data.image_ids(options.limit)
    out = Path(options.output)
    out.mkdir(parents=True, exist_ok=True)
    summaries, failed = {}, 0
    for model_type, checkpoint, label in options.models:
        start = time.perf_counter()
        if options.ray:
            from .runtime import init_ray

            init_ray(options.num_cpus)
            parts, errors = evaluate_on_ray(model_type, checkpoint, data, options.config, image_ids, options.actors)
        else:
            from tinysam import SamPredictor, build_sam

            try:
                predictor = SamPredictor(build_sam(model_type, checkpoint))
            except Exception as e:
                raise ValueError(f"{label}: {e}") from e
            parts, errors = evaluate_dataset(predictor, data, options.config, image_ids)
        for e in errors:
            print(f"  failed: {e}")
        failed += len(errors)
        summaries[label] = {**aggregate(parts, options.config, data.coco), "seconds": time.perf_counter() - start}
        if "box" in options.config.protocols:
            results_file = out / f"{re.sub(r'[^A-Za-z0-9._-]+', '_', label)}_box.json"
            results_file.write_text(json.dumps([r for p in parts for r in p["box"]["results"]]))
            summaries[label]["box_results"] = results_file.name
        print(f"{label}: {len(parts)} images evaluated in {summaries[label]['seconds']:.1f} s")
    table = report_markdown(summaries)
    (out / "results.md").write_text(table)
    results = {
        "annotations": options.annotations,
        "models": summaries,
        "everything_configs": [c.as_dict() for c in options.config.everything],
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return table, failed
