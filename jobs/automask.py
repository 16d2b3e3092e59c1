"""Bulk auto-masking: everything mode (hierarchical by default) over an image corpus, with Ray Data.

    ray job submit --working-dir . -- python jobs/automask.py --input s3://bucket/images \
        --output s3://bucket/masks --model vit_t --checkpoint mobile_sam --num-gpus-per-actor 1 --concurrency 8
    python jobs/automask.py --input photos/ --output masks/ --checkpoint mobile_sam --coco-json masks/coco.json

Output: Parquet under --output, one row per image (id, source, width, height, masks as COCO RLE with
bbox, area, predicted_iou, stability_score, point_coords, crop_box); optionally SA-1B JSON per image
(--sa1b-json), one COCO results file (--coco-json) and overlay PNGs of the first N images (--preview N).
With --audit-fraction F and --audit-checkpoint CKPT, a deterministic sample of the images (a
fraction F, chosen by id) is masked again by that teacher in the same everything mode, and each
one's agreement with the model's masks goes to <output>/_audit; the summary prints the corpus's
mean agreement and the least agreeing images.
Reruns skip images already written (a tar shard whose images are all written is not read again);
a rerun with another model or settings (the audit's too) is refused unless --overwrite. Bad images
go to <output>/_errors and are counted.
"""

import sys
from pathlib import Path
from typing import Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the submitted working dir's code

from pipelines.automask import AuditOptions, AutomaskOptions, automask  # noqa: E402
from pipelines.cli import (  # noqa: E402
    INPUT_HELP,
    add_corpus_arguments,
    add_everything_arguments,
    corpus_options,
    everything_config,
    job_parser,
    run_job,
)
from pipelines.runtime import init_ray  # noqa: E402
from tinysam.utils.polygons import PolygonRules  # noqa: E402


def parse(argv=None) -> Tuple[AutomaskOptions, Optional[int]]:
    """The run's `AutomaskOptions` and the CPUs of a local Ray; argparse's refusal (exit 2) else."""
    p = job_parser(__doc__)
    p.add_argument("--input", help=INPUT_HELP)
    p.add_argument("--embeddings", help="a precompute job's output: reuse its embeddings instead of the encoder")
    p.add_argument("--model", default="vit_t", help="model type (vit_t, vit_b, vit_l, vit_h)")
    p.add_argument("--sa1b-json", action="store_true", help="also write <output>/sa1b/<id>.json per image")
    p.add_argument("--coco-json", help="also write one COCO results file (and <name>_images.json) here")
    p.add_argument("--preview", type=int, default=0, metavar="N", help="overlay PNGs of the first N images")
    g = p.add_argument_group("polygons (COCO polygons beside each mask's RLE; rules: tinysam/utils/polygons.py)")
    g.add_argument("--polygons", action="store_true", help="also store polygons, and use them in --coco-json")
    g.add_argument("--polygon-tolerance", type=float, default=PolygonRules.tolerance, help="px, Douglas-Peucker")
    g.add_argument("--polygon-min-area", type=float, default=PolygonRules.min_area, help="px^2: smaller pieces dropped")
    g = p.add_argument_group("teacher audit")
    g.add_argument("--audit-fraction", type=float, default=0.0, help="share of the images masked again by a teacher")
    g.add_argument("--audit-checkpoint", help="the teacher's weights (a name or path); required with --audit-fraction")
    g.add_argument("--audit-model", default="vit_h", help="the teacher's model type")
    add_corpus_arguments(p, batch_size=1)  # CPU: no gain from batching (benchmarks/automask.py); GPUs: raise it
    add_everything_arguments(p)
    args = p.parse_args(argv)
    if not args.input and not args.embeddings:
        p.error("give --input or --embeddings")
    if bool(args.audit_fraction) != bool(args.audit_checkpoint):
        p.error("--audit-fraction and --audit-checkpoint go together")
    try:
        audit = (
            AuditOptions(args.audit_fraction, args.audit_checkpoint, args.audit_model) if args.audit_fraction else None
        )
        # a bad setting fails here, not in every actor; GPU actors get the GPU execution settings
        options = AutomaskOptions(
            corpus_options(args),
            model=args.model,
            checkpoint=args.checkpoint,
            everything=everything_config(args, gpu=args.num_gpus_per_actor > 0),
            embeddings=args.embeddings,
            sa1b_json=args.sa1b_json,
            coco_json=args.coco_json,
            preview=args.preview,
            audit=audit,
            polygons=PolygonRules(args.polygon_tolerance, args.polygon_min_area) if args.polygons else None,
        )
    except ValueError as e:
        p.error(str(e))
    return options, args.num_cpus


def main(argv=None) -> int:
    options, num_cpus = parse(argv)
    init_ray(num_cpus)

    def report(s) -> None:
        print(
            f"masks {s.masks} ({s.masks_per_image:.1f} per image), {s.images_per_second:.3f} images/s; "
            f"actor time: encoder {s.encode_seconds:.1f} s, everything mode {s.generate_seconds:.1f} s"
        )
        if options.audit is not None and s.audited:
            print(f"teacher audit: {s.audited} images, mean agreement {s.audit_agreement:.4f}; least agreeing:")
            for row in s.audit_worst:
                found = f"teacher masks found {row['found']}, missed {row['missed']}"
                print(f"  {row['agreement']:.4f}  {row['source']} ({found})")
        if options.coco_json:
            print(f"COCO results: {options.coco_json}")
        if options.preview:
            print(f"previews: {options.corpus.output.rstrip('/')}/previews/")

    return run_job(lambda: automask(options), report)


if __name__ == "__main__":
    sys.exit(main())
