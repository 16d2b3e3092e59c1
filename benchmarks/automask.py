"""Throughput of the bulk auto-masking job vs the in-process generator loop, side by side in one run.

Both read and decode the same real photos, run the same model (same weights, same threads) and
hierarchical everything mode with the same parameters. The loop keeps the records in memory; the
job pays for Ray, actor start and model load, batching, Parquet writes. Goal: job / loop >= 0.9
images/s with one actor on CPU. Also prints masks per image and where the loop's time goes.

    python benchmarks/automask.py [--images 12] [--points-per-side 32] [--mode hierarchical]
    python benchmarks/automask.py --images 12 --size 2250x1500   (the photos at SA-1B's size)
"""

import shutil
import tempfile
import time
from pathlib import Path

import torch
from _harness import benchmark_parser, coco_rle_generator, steady_images_per_second  # benchmarks/ is on sys.path

from pipelines.automask import AutomaskOptions, automask
from pipelines.options import CorpusOptions
from pipelines.runtime import init_ray
from pipelines.sources import decode_image, list_images, read_bytes
from tinysam import build_sam
from tinysam.everything import EverythingConfig
from tinysam.transforms import prepare_image, to_rgb_uint8
from tinysam.utils.malloc import keep_freed_memory
from tinysam_samples import write_sample_corpus


def in_process_loop(folder: Path, model_type: str, checkpoint: str, everything: EverythingConfig) -> dict:
    """The generator called image by image, with the time split into read/decode, encoder and
    everything mode (decoder + post-processing). The allocator set as in the job's actors."""
    keep_freed_memory()
    generator = coco_rle_generator(build_sam(model_type, checkpoint), everything)
    times = {"read_decode": 0.0, "encoder": 0.0, "everything": 0.0}
    masks = 0
    refs = list_images(str(folder))
    start = time.perf_counter()
    with torch.inference_mode():
        for ref in refs:
            t0 = time.perf_counter()
            image = to_rgb_uint8(decode_image(read_bytes(ref.source)[0], ref.source), ref.source)
            t1 = time.perf_counter()
            prepared = prepare_image(image)
            embedding = generator.model.image_encoder(prepared.tensor[None])
            t2 = time.perf_counter()
            [records] = generator.generate_from_embeddings(embedding, [prepared.input_size], [image.shape[:2]])
            t3 = time.perf_counter()
            times["read_decode"] += t1 - t0
            times["encoder"] += t2 - t1
            times["everything"] += t3 - t2
            masks += len(records)
    seconds = time.perf_counter() - start
    return {"images_per_second": len(refs) / seconds, "masks": masks, "seconds": seconds, **times}


def resize_corpus(folder: Path, size: str) -> None:
    """Resize every photo in `folder` to `size` ("WxH") in place, as JPEG (quality 95)."""
    from PIL import Image

    w, h = (int(v) for v in size.split("x"))
    for path in sorted(folder.glob("*.jpg")):
        Image.open(path).convert("RGB").resize((w, h), Image.BILINEAR).save(path, format="JPEG", quality=95)


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--model", default="vit_t")
    parser.add_argument("--checkpoint", default="mobile_sam")
    parser.add_argument("--mode", default="hierarchical", choices=["hierarchical", "dense"])
    parser.add_argument("--points-per-side", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--num-gpus-per-actor", type=float, default=0.0)
    parser.add_argument(
        "--actors", type=int, default=1, help="job actors sharing --threads (each gets threads / actors); loop: 1"
    )
    parser.add_argument("--size", help="resize every photo to WxH first (SA-1B's photos: 2250x1500)")
    args = parser.parse_args()
    if args.smoke:
        args.images, args.points_per_side, args.threads, args.size = 2, 4, 1, "320x240"
    torch.set_num_threads(args.threads)
    everything = EverythingConfig(args.mode, points_per_side=args.points_per_side)

    work = Path(tempfile.mkdtemp(prefix="tinysam-bench-"))
    try:
        folder = write_sample_corpus(work, args.images)
        if args.size:
            resize_corpus(folder, args.size)
        loop = in_process_loop(folder, args.model, args.checkpoint, everything)
        init_ray(num_cpus=args.threads + 2)  # room for the read and write tasks beside the actor
        summary = automask(
            AutomaskOptions(
                CorpusOptions(
                    input=str(folder),
                    output=str(work / "out"),
                    batch_size=args.batch_size,
                    concurrency=args.actors,
                    num_cpus_per_actor=max(1, args.threads // args.actors),
                    num_gpus_per_actor=args.num_gpus_per_actor,
                ),
                model=args.model,
                checkpoint=args.checkpoint,
                everything=everything,
            )
        )
        n = args.images
        at = f" at {args.size}" if args.size else ""
        print(
            f"{n} images{at}, {args.model}, {args.mode} {args.points_per_side}x{args.points_per_side}, "
            f"job batch {args.batch_size}, {args.threads} threads, {args.actors} job actor(s)"
        )
        print(
            f"  in-process loop: {loop['images_per_second']:.4f} images/s, {loop['masks'] / n:.1f} masks/image; "
            f"per image: read+decode {loop['read_decode'] / n:.3f} s, encoder {loop['encoder'] / n:.2f} s, "
            f"everything mode {loop['everything'] / n:.2f} s"
        )
        print(
            f"  Ray job        : {summary.images_per_second:.4f} images/s, {summary.masks_per_image:.1f} masks/image "
            f"(incl. actor start and model load); actor time per image: encoder "
            f"{summary.encode_seconds / n:.2f} s, everything mode {summary.generate_seconds / n:.2f} s"
        )
        print(f"ratio job / loop: {summary.images_per_second / loop['images_per_second']:.3f}  (goal >= 0.9)")
        busy = args.actors * n / (summary.encode_seconds + summary.generate_seconds)
        print(
            f"the actors' own rate (actors / their seconds per image): {busy:.4f} images/s, ratio to the loop "
            f"{busy / loop['images_per_second']:.3f} (the rest of the gap is the job's fixed cost)"
        )
        steady = steady_images_per_second(summary)
        print(
            f"after the job's start-up ({summary.first_result_seconds:.1f} s to its first {summary.first_result_rows} "
            + (
                f"row(s)): {steady:.4f} images/s, ratio job / loop {steady / loop['images_per_second']:.3f}"
                if steady
                else "row(s)): every row came back at once (one output file), no rate after it"
            )
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
