"""PyTorch eager vs ONNX Runtime, fp32, side by side in one run: the encoder plus a one-box decoder
call (the paper's latency) and a 64-box decoder call (everything mode's batch).

    python benchmarks/onnx_runtime.py [--model vit_t] [--checkpoint mobile_sam] [--threads 2] [--repeats 5]
        [--quantized q_tinysam_w8a8.pt]   # adds ONNX Runtime W8A8 (the file exported as QDQ)

Prints a Markdown table; every variant's median over --repeats, runs interleaved.
"""

import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _harness import benchmark_parser  # benchmarks/ is on sys.path

from tinysam import SamPredictor, build_sam  # noqa: E402
from tinysam.export import OnnxSamPredictor, export_decoder, export_encoder  # noqa: E402
from tinysam_samples import sample_images  # noqa: E402


def boxes(n: int, h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 1, (n, 2)) * [w * 0.7, h * 0.7]
    return np.concatenate([xy, xy + rng.uniform(0.1, 0.3, (n, 2)) * [w, h]], 1)


def main() -> None:
    p = benchmark_parser(__doc__)
    p.add_argument("--model", default="vit_t")
    p.add_argument("--checkpoint", default="mobile_sam")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--quantized", help="a jobs/quantize.py file: also time its W8A8 QDQ export")
    args = p.parse_args()
    if args.smoke:
        args.repeats, args.prompts = 1, 4
    torch.set_num_threads(args.threads)
    sam = build_sam(args.model, args.checkpoint).eval()
    image = dict(sample_images())["astronaut"]
    one, many = boxes(1, *image.shape[:2]), boxes(args.prompts, *image.shape[:2])
    with tempfile.TemporaryDirectory() as folder:
        enc, dec = export_encoder(sam, f"{folder}/enc.onnx"), export_decoder(sam, f"{folder}/dec.onnx")
        variants = {
            "PyTorch eager fp32": SamPredictor(sam, fast_decoder=False),
            "PyTorch eager fp32, folded decoder": SamPredictor(sam),
            "ONNX Runtime fp32": OnnxSamPredictor(enc, dec, threads=args.threads),
        }
        if args.quantized:
            from tinysam.quant import load_quantized

            q = load_quantized(args.quantized, mode="sim")
            q_enc, q_dec = export_encoder(q, f"{folder}/q_enc.onnx"), export_decoder(q, f"{folder}/q_dec.onnx")
            variants["ONNX Runtime W8A8 (QDQ)"] = OnnxSamPredictor(q_enc, q_dec, threads=args.threads)
        times = {name: {"encoder": [], "1 box": [], f"{args.prompts} boxes": []} for name in variants}
        for _ in range(args.repeats):
            for name, predictor in variants.items():
                with torch.inference_mode():
                    for part, run in (
                        ("encoder", lambda: predictor.set_image(image)),
                        ("1 box", lambda: predictor.predict(box=one)),
                        (f"{args.prompts} boxes", lambda: predictor.predict(box=many)),
                    ):
                        start = time.perf_counter()
                        run()
                        times[name][part].append(time.perf_counter() - start)
    base = None
    print(f"{args.model}, {args.threads} threads, median of {args.repeats} (ms)\n")
    head = f"| variant | encoder | decoder, 1 box | encoder + 1 box | vs eager | decoder, {args.prompts} boxes |"
    print(head + " vs eager |")
    print("|---|---|---|---|---|---|---|")
    for name, parts in times.items():
        m = {k: 1000 * statistics.median(v) for k, v in parts.items()}
        total, batch = m["encoder"] + m["1 box"], m[f"{args.prompts} boxes"]
        base = base or (total, batch)
        print(
            f"| {name} | {m['encoder']:.0f} | {m['1 box']:.1f} | {total:.0f} | {base[0] / total:.2f}x "
            f"| {batch:.0f} | {base[1] / batch:.2f}x |"
        )


if __name__ == "__main__":
    main()
