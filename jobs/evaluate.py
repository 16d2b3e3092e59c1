"""Zero-shot evaluation (box-prompt AP, point-prompt mIoU, everything mode) of one or more models.

    python jobs/evaluate.py --annotations gt.json --images images/ \
        --model vit_t --checkpoint mobile_sam --model vit_t --checkpoint distilled.pth --output eval/
    ray job submit --working-dir . -- python jobs/evaluate.py --ray --concurrency 8 \
        --num-gpus-per-actor 1 --annotations lvis_val.json --images val2017/ --detections vitdet_h.json ...

--checkpoint none means random weights. Writes <output>/results.md and results.json (one row per
model), and prints the tables. Exit status: 0 done, 1 some images failed, 2 bad arguments.
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the submitted working dir's code

from tinysam.eval.evaluate import PROTOCOLS, EvalConfig
from tinysam.eval.report import report_markdown
from tinysam.everything.config import EverythingConfig


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    p.add_argument("--annotations", required=True, help="COCO-format ground truth (COCO, LVIS, ...)")
    p.add_argument("--images", required=True, help="folder the ground truth's file_name entries are relative to")
    p.add_argument("--model", action="append", required=True, help="model type; repeat, one per --checkpoint")
    p.add_argument("--checkpoint", action="append", help="known name, path or URL; 'none' for random weights")
    p.add_argument("--label", action="append", help="row label per model (default: model:checkpoint)")
    p.add_argument("--protocols", default=",".join(PROTOCOLS), help="comma-separated: box,point,everything")
    p.add_argument("--detections", help="COCO results file whose boxes are the prompts (default: ground-truth boxes)")
    p.add_argument("--points", default="1,2,3,5,9", help="point counts to report")
    p.add_argument("--point-max-objects", type=int, help="point protocol: at most N objects per image")
    p.add_argument(
        "--everything",
        action="append",
        help="a preset (quality, balanced, fast), dense[:POINTS] or "
        "hierarchical[:ROUND1[:ROUND2[:TAU[:MARGIN[:SIMILARITY]]]]]; repeat for a grid (default: quality and balanced)",
    )
    p.add_argument("--max-dets", type=int, default=100, help="detections per image for AP (LVIS: 300)")
    p.add_argument("--limit", type=int, help="only the first N images")
    p.add_argument("--output", required=True, help="folder for results.md and results.json")
    p.add_argument("--ray", action="store_true", help="spread images over Ray actors (joins a cluster if any)")
    p.add_argument("--concurrency", type=int, default=1, help="actors per model (--ray)")
    p.add_argument("--num-gpus-per-actor", type=float, default=0.0)
    p.add_argument("--num-cpus-per-actor", type=int, default=1)
    p.add_argument("--num-cpus", type=int, help="CPUs of a local Ray (ignored when joining a cluster)")
    args = p.parse_args(argv)
    checkpoints = args.checkpoint or []
    if len(checkpoints) != len(args.model):
        p.error(f"{len(args.model)} --model but {len(checkpoints)} --checkpoint: give one checkpoint per model")
    if args.label and len(args.label) != len(args.model):
        p.error("give one --label per --model, or none")
    return args


def build_config(args) -> EvalConfig:
    detections = None
    if args.detections:
        with open(args.detections) as f:
            dets = json.load(f)
        if not isinstance(dets, list):
            raise ValueError(f"{args.detections}: expected a COCO results list")
        detections = {}
        for d in dets:
            detections.setdefault(int(d["image_id"]), []).append(d)
    everything = [EverythingConfig.parse(s) for s in (args.everything or ["quality", "balanced"])]
    return EvalConfig(
        tuple(s for s in args.protocols.split(",") if s),
        detections,
        tuple(int(k) for k in args.points.split(",")),
        everything,
        args.max_dets,
        args.point_max_objects,
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    from tinysam.eval import CocoImages, aggregate, evaluate_dataset

    try:
        config = build_config(args)
        data = CocoImages(args.annotations, args.images)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    image_ids = data.image_ids(args.limit)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    summaries, failed = {}, 0
    for k, (model_type, checkpoint) in enumerate(zip(args.model, args.checkpoint)):
        checkpoint = None if checkpoint.lower() == "none" else checkpoint
        label = args.label[k] if args.label else f"{model_type}:{checkpoint or 'random'}"
        start = time.perf_counter()
        if args.ray:
            from pipelines.evaluate import evaluate_on_ray
            from pipelines.runtime import init_ray

            init_ray(args.num_cpus)
            parts, errors = evaluate_on_ray(
                model_type,
                checkpoint,
                str(Path(args.annotations).resolve()),
                str(Path(args.images).resolve()),
                config,
                image_ids,
                args.concurrency,
                args.num_gpus_per_actor,
                args.num_cpus_per_actor,
            )
        else:
            from tinysam import SamPredictor, build_sam

            try:
                predictor = SamPredictor(build_sam(model_type, checkpoint))
            except Exception as e:
                print(f"error: {label}: {e}", file=sys.stderr)
                return 2
            parts, errors = evaluate_dataset(predictor, data, config, image_ids)
        for e in errors:
            print(f"  failed: {e}")
        failed += len(errors)
        summaries[label] = {**aggregate(parts, config, data.coco), "seconds": time.perf_counter() - start}
        print(f"{label}: {len(parts)} images evaluated in {summaries[label]['seconds']:.1f} s")
    table = report_markdown(summaries)
    (out / "results.md").write_text(table)
    (out / "results.json").write_text(
        json.dumps(
            {
                "annotations": args.annotations,
                "models": summaries,
                "everything_configs": [c.as_dict() for c in config.everything],
            },
            indent=2,
        )
    )
    print(table)
    print(f"wrote {out / 'results.md'} and {out / 'results.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
