"""Precompute teacher (SAM) image embeddings to Parquet with Ray Data.

    ray job submit --working-dir . -- python jobs/precompute_embeddings.py --input s3://bucket/images \
        --output s3://bucket/embeddings --teacher vit_h --checkpoint sam_vit_h --num-gpus-per-actor 1
    python jobs/precompute_embeddings.py --input photos/ --output out/ --teacher vit_t --checkpoint mobile_sam

Reruns skip images already written; bad images go to <output>/_errors and are counted.
Exit status: 0 all written, 1 some images failed, 2 stopped early (--max-failures) or bad arguments.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the submitted working dir's code

from pipelines.embeddings import TooManyFailures, precompute_embeddings
from pipelines.runtime import init_ray
from tinysam.weights import CheckpointError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", required=True, help="folder, s3:// prefix, .txt list of paths/URLs, or SA-1B .tar shard(s)")
    p.add_argument("--output", required=True, help="folder or s3:// prefix for the Parquet files")
    p.add_argument("--teacher", default="vit_h", help="model type of the teacher encoder (vit_h, vit_l, vit_b, vit_t)")
    p.add_argument("--checkpoint", help="known name, path, http(s):// or s3:// (default: random weights, for tests)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--concurrency", type=int, default=1, help="encoder actors")
    p.add_argument("--num-gpus-per-actor", type=float, default=0.0)
    p.add_argument("--num-cpus-per-actor", type=int, default=1, help="CPUs (and torch threads on CPU) per actor")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="stored embedding type")
    p.add_argument("--limit", type=int, help="only the first N images (in sorted order)")
    p.add_argument("--max-failures", type=int, help="stop once more than N images failed")
    p.add_argument("--rows-per-file", type=int, help="rows per Parquet file (default: --batch-size)")
    p.add_argument("--num-cpus", type=int, help="CPUs of a local Ray (ignored when joining a cluster)")
    args = p.parse_args(argv)

    init_ray(args.num_cpus)
    try:
        summary = precompute_embeddings(
            args.input, args.output, teacher=args.teacher, checkpoint=args.checkpoint,
            batch_size=args.batch_size, concurrency=args.concurrency,
            num_gpus_per_actor=args.num_gpus_per_actor, num_cpus_per_actor=args.num_cpus_per_actor,
            dtype=args.dtype, limit=args.limit,
            max_failures=args.max_failures, rows_per_file=args.rows_per_file,
        )
    except (CheckpointError, FileNotFoundError, PermissionError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TooManyFailures as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    s = summary
    print(f"images {s.images}: written {s.written}, already present {s.skipped}, failed {s.failed}")
    print(f"{s.images_per_second:.2f} images/s, {s.bytes_written / 2**20:.1f} MiB written, "
          f"{s.mib_per_image:.2f} MiB/image")
    for source in s.failures:
        print(f"  failed: {source}")
    print("SUMMARY " + json.dumps(s.as_dict()))
    return 1 if s.failed else 0


if __name__ == "__main__":
    sys.exit(main())
