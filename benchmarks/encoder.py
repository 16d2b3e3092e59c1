"""Time our vit_t image encoder against the official MobileSAM encoder, side by side in one run.

Same weights (the real mobile_sam.pt), same preprocessed images, alternating runs so machine noise
hits both alike. Prints per-image times and the ratio ours / official (goal: <= 1.0 on CPU).

    python benchmarks/encoder.py [--repeats 3] [--threads N]
"""

import statistics
import time
import warnings

import torch
from _harness import benchmark_parser  # benchmarks/ is on sys.path

from tinysam import build_sam
from tinysam.transforms import prepare_image
from tinysam_samples import sample_images


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes over the images")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--checkpoint", default="mobile_sam")
    args = parser.parse_args()
    if args.smoke:
        args.repeats = 1
    torch.set_num_threads(args.threads)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import mobile_sam  # the official MobileSAM code (dev extra), our oracle

    ours = build_sam("vit_t", args.checkpoint)
    official = mobile_sam.sam_model_registry["vit_t"]()
    official.load_state_dict(ours.state_dict())
    official.eval()

    images = [(name, prepare_image(img).tensor[None]) for name, img in sample_images()][: 1 if args.smoke else None]
    encoders = {"ours": ours.image_encoder, "official": official.image_encoder}
    times = {k: [] for k in encoders}
    with torch.inference_mode():
        for enc in encoders.values():  # warm-up
            enc(images[0][1])
        for _ in range(args.repeats):
            for _, x in images:
                for key, enc in encoders.items():
                    t0 = time.perf_counter()
                    enc(x)
                    times[key].append(time.perf_counter() - t0)

    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"vit_t image encoder, {len(images)} images x {args.repeats} repeats, {args.threads} threads, "
        f"torch {torch.__version__}"
    )
    for key in encoders:
        print(f"  {key:9s} median {med[key] * 1000:8.1f} ms/image   mean {statistics.mean(times[key]) * 1000:8.1f} ms")
    print(f"ratio ours/official: {med['ours'] / med['official']:.3f}  (goal <= 1.0)")


if __name__ == "__main__":
    main()
