"""Throughput of the Ray precompute job vs a bare single-process loop, side by side in one run.

Both decode the same real photos from disk, run the same encoder with the same weights and
threads, and store fp16 embeddings (the loop keeps them in memory: the job's Parquet writing is
part of what it must not pay much for). Goal: job / loop >= 0.9 images/s on CPU with vit_t.

    python benchmarks/precompute.py [--images 24] [--teacher vit_t] [--checkpoint mobile_sam]
"""

import shutil
import tempfile
import time
from pathlib import Path

import torch
from _harness import benchmark_parser  # benchmarks/ is on sys.path

from pipelines.options import CorpusOptions
from pipelines.precompute import PrecomputeOptions, precompute_embeddings
from pipelines.runtime import init_ray
from pipelines.sources import decode_image, list_images, read_bytes
from tinysam import build_sam
from tinysam.transforms import prepare_image
from tinysam_samples import write_sample_corpus


def bare_loop(folder: Path, teacher: str, checkpoint: str, batch_size: int) -> float:
    model = build_sam(teacher, checkpoint)
    refs = list_images(str(folder))
    start = time.perf_counter()
    kept = []
    with torch.inference_mode():
        for i in range(0, len(refs), batch_size):
            batch = [
                prepare_image(decode_image(read_bytes(r.source)[0], r.source)).tensor for r in refs[i : i + batch_size]
            ]
            kept.append(model.image_encoder(torch.stack(batch)).half().numpy())
    return len(refs) / (time.perf_counter() - start)


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--teacher", default="vit_t")
    parser.add_argument("--checkpoint", default="mobile_sam")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--num-gpus-per-actor", type=float, default=0.0)
    args = parser.parse_args()
    if args.smoke:
        args.images, args.batch_size, args.threads = 2, 1, 1
    torch.set_num_threads(args.threads)

    work = Path(tempfile.mkdtemp(prefix="tinysam-bench-"))
    try:
        folder = write_sample_corpus(work, args.images)
        loop_ips = bare_loop(folder, args.teacher, args.checkpoint, args.batch_size)
        init_ray(num_cpus=args.threads + 2)
        # Model loading is paid once per actor; warm the pool's cache of weights first.
        summary = precompute_embeddings(
            PrecomputeOptions(
                CorpusOptions(
                    input=str(folder),
                    output=str(work / "out"),
                    batch_size=args.batch_size,
                    num_cpus_per_actor=args.threads,
                    num_gpus_per_actor=args.num_gpus_per_actor,
                ),
                teacher=args.teacher,
                checkpoint=args.checkpoint,
            )
        )
        job_ips = summary.images_per_second
        print(f"{args.images} images, {args.teacher}, batch {args.batch_size}, {args.threads} threads")
        print(f"  bare loop : {loop_ips:6.3f} images/s")
        print(
            f"  Ray job   : {job_ips:6.3f} images/s (incl. actor start and model load), "
            f"{summary.mib_per_image:.2f} MiB/image written"
        )
        print(f"ratio job / loop: {job_ips / loop_ips:.3f}  (goal >= 0.9)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
