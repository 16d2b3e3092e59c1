"""Precompute teacher (SAM) image embeddings to Parquet with Ray Data.

    ray job submit --working-dir . -- python jobs/precompute_embeddings.py --input s3://bucket/images \
        --output s3://bucket/embeddings --teacher vit_h --checkpoint sam_vit_h --num-gpus-per-actor 1
    python jobs/precompute_embeddings.py --input photos/ --output out/ --teacher vit_t --checkpoint mobile_sam

Reruns skip images already written (a tar shard whose images are all written is not read
again); a rerun with another model or settings is refused unless --overwrite. Bad images go to
<output>/_errors and are counted.
"""

import sys
from pathlib import Path
from typing import Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the submitted working dir's code

from pipelines.cli import INPUT_HELP, add_corpus_arguments, corpus_options, job_parser, run_job
from pipelines.precompute import PrecomputeOptions, precompute_embeddings
from pipelines.runtime import init_ray


def parse(argv=None) -> Tuple[PrecomputeOptions, Optional[int]]:
    """The run's `PrecomputeOptions` and the CPUs of a local Ray; argparse's refusal (exit 2) else."""
    p = job_parser(__doc__)
    p.add_argument("--input", required=True, help=INPUT_HELP)
    p.add_argument("--teacher", default="vit_h", help="model type of the teacher encoder (vit_h, vit_l, vit_b, vit_t)")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="stored embedding type")
    p.add_argument(
        "--compile", action="store_true", help="compile the teacher with Inductor in each actor (GPU runs; slow start)"
    )
    add_corpus_arguments(p, batch_size=4)
    args = p.parse_args(argv)
    options = PrecomputeOptions(
        corpus_options(args), teacher=args.teacher, checkpoint=args.checkpoint, dtype=args.dtype, compile=args.compile
    )
    return options, args.num_cpus


def main(argv=None) -> int:
    options, num_cpus = parse(argv)
    init_ray(num_cpus)

    def report(s) -> None:
        print(
            f"{s.images_per_second:.2f} images/s, {s.bytes_written / 2**20:.1f} MiB written, "
            f"{s.mib_per_image:.2f} MiB/image"
        )

    return run_job(lambda: precompute_embeddings(options), report)


if __name__ == "__main__":
    sys.exit(main())
