"""Zero-shot evaluation (box-prompt AP, point-prompt mIoU, everything mode) of one or more models.

    python jobs/evaluate.py --annotations gt.json --images images/ \
        --model vit_t --checkpoint mobile_sam --model vit_t --checkpoint distilled.pth --output eval/
    ray job submit --working-dir . -- python jobs/evaluate.py --ray --concurrency 8 \
        --num-gpus-per-actor 1 --annotations lvis_val.json --images val2017/ --detections vitdet_h.json ...

--checkpoint none means random weights. Writes <output>/results.md and results.json (one row per
model), each model's box-prompt masks as a COCO results file (<output>/<label>_box.json, to score
with any COCO tool), and prints the tables. Exit status: 0 done, 1 some images failed, 2 bad arguments.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the submitted working dir's code

from pipelines.cli import add_checkpoint_argument, job_parser  # noqa: E402
from pipelines.evaluate import EvaluateOptions, evaluate_models  # noqa: E402
from pipelines.options import CorpusOptions  # noqa: E402
from tinysam.eval.evaluate import PROTOCOLS, EvalConfig  # noqa: E402
from tinysam.everything.config import EverythingConfig  # noqa: E402
from tinysam.weights import CheckpointError  # noqa: E402


def parse_args(argv=None):
    p = job_parser(__doc__.splitlines()[0], exit_codes=__doc__)
    p.add_argument("--annotations", required=True, help="COCO-format ground truth (COCO, LVIS, ...)")
    p.add_argument("--images", required=True, help="folder the ground truth's file_name entries are relative to")
    p.add_argument("--model", action="append", required=True, help="model type; repeat, one per --checkpoint")
    add_checkpoint_argument(p, "; repeat, one per --model", action="append", required=False)
    p.add_argument("--label", action="append", help="row label per model (default: model:checkpoint)")
    p.add_argument("--protocols", default=",".join(PROTOCOLS), help="comma-separated: box,point,everything")
    p.add_argument("--detections", help="COCO results file whose boxes are the prompts (default: ground-truth boxes)")
    p.add_argument("--points", default="1,2,3,5,9", help="point counts to report")
    p.add_argument("--point-max-objects", type=int, help="point protocol: at most N objects per image")
    p.add_argument(
        "--everything",
        action="append",
        help="a preset (quality, balanced, fast), dense[:POINTS] or "
        "hierarchical[:ROUND1[:ROUND2[:TAU[:MARGIN[:SIMILARITY]]]]], then any other setting as ,name=value "
        "(e.g. balanced,low_res_decisions=false); repeat for a grid (default: quality and balanced)",
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
    names = [c.name for c in everything]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"--everything names the same settings twice: {'; '.join(twice)}")
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
    try:
        options = EvaluateOptions(
            annotations=args.annotations,
            images=args.images,
            models=tuple(
                (model, checkpoint, args.label[k] if args.label else f"{model}:{checkpoint or 'random'}")
                for k, (model, checkpoint) in enumerate(zip(args.model, args.checkpoint))
            ),
            config=build_config(args),
            output=args.output,
            limit=args.limit,
            ray=args.ray,
            actors=CorpusOptions(
                output=args.output,
                concurrency=args.concurrency,
                num_gpus_per_actor=args.num_gpus_per_actor,
                num_cpus_per_actor=args.num_cpus_per_actor,
            ),
            num_cpus=args.num_cpus,
        )
        table, failed = evaluate_models(options)
    except (CheckpointError, ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table)
    print(f"wrote {Path(args.output) / 'results.md'} and {Path(args.output) / 'results.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
