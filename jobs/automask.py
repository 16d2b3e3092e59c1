"""Bulk auto-masking: everything mode (hierarchical by default) over an image corpus, with Ray Data.

    ray job submit --working-dir . -- python jobs/automask.py --input s3://bucket/images \
        --output s3://bucket/masks --model vit_t --checkpoint mobile_sam --num-gpus-per-actor 1 --concurrency 8
    python jobs/automask.py --input photos/ --output masks/ --checkpoint mobile_sam --coco-json masks/coco.json

Output: Parquet under --output, one row per image (id, source, width, height, masks as COCO RLE with
bbox, area, predicted_iou, stability_score, point_coords, crop_box); optionally SA-1B JSON per image
(--sa1b-json), one COCO results file (--coco-json) and overlay PNGs of the first N images (--preview N).
Reruns skip images already written (a tar shard whose images are all written is not read
again); a rerun with another model or settings is refused unless --overwrite. Bad images go to
<output>/_errors and are counted.
"""

import sys
from pathlib import Path
from typing import Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the submitted working dir's code

from pipelines.automask import AutomaskOptions, automask  # noqa: E402
from pipelines.cli import (  # noqa: E402
    add_corpus_arguments,
    add_everything_arguments,
    corpus_options,
    everything_config,
    job_parser,
    run_job,
)
from pipelines.runtime import init_ray  # noqa: E402


def parse(argv=None) -> Tuple[AutomaskOptions, Optional[int]]:
    """The run's `AutomaskOptions` and the CPUs of a local Ray; argparse's refusal (exit 2) else."""
    p = job_parser(__doc__)
    p.add_argument("--input", help="folder, s3:// prefix, .txt list of paths/URLs, or SA-1B .tar shard(s)")
    p.add_argument("--embeddings", help="a precompute job's output: reuse its embeddings instead of the encoder")
    p.add_argument("--model", default="vit_t", help="model type (vit_t, vit_b, vit_l, vit_h)")
    p.add_argument("--sa1b-json", action="store_true", help="also write <output>/sa1b/<id>.json per image")
    p.add_argument("--coco-json", help="also write one COCO results file (and <name>_images.json) here")
    p.add_argument("--preview", type=int, default=0, metavar="N", help="overlay PNGs of the first N images")
    add_corpus_arguments(p, batch_size=1)  # CPU: no gain from batching (benchmarks/automask.py); GPUs: raise it
    add_everything_arguments(p)
    args = p.parse_args(argv)
    if not args.input and not args.embeddings:
        p.error("give --input or --embeddings")
    try:
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
        if options.coco_json:
            print(f"COCO results: {options.coco_json}")
        if options.preview:
            print(f"previews: {options.corpus.output.rstrip('/')}/previews/")

    return run_job(lambda: automask(options), report)


if __name__ == "__main__":
    sys.exit(main())
