"""The engines side by side in one run, on the encoder plus a one-box decoder call (the paper's
latency) and a 64-box decoder call (everything mode's batch): PyTorch eager, ONNX Runtime fp32 and
int8 (`jobs/export_onnx.py --int8` files, `tinysam.export.int8`: the encoder alone, then the encoder
and the decoder), and with the optional `openvino` extra OpenVINO on the fp32 files (and in bf16
where the CPU has it natively).

    python benchmarks/onnx_runtime.py [--model vit_t] [--checkpoint mobile_sam] [--threads 2] [--repeats 5]
        [--quantized q_tinysam_w8a8.pt]   # adds ONNX Runtime W8A8 (the file exported as QDQ)

Prints a Markdown table, every variant's median over --repeats, runs interleaved; then each
file-based variant's box-prompt mIoU against BBBC038's nuclei (one box per nucleus) and its
box-mask agreement with ONNX Runtime fp32 on photos (16 boxes each).
"""

import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _harness import benchmark_parser  # benchmarks/ is on sys.path

from tinysam import SamPredictor, build_sam  # noqa: E402
from tinysam.everything.generator import bfloat16_is_native  # noqa: E402
from tinysam.export import OnnxSamPredictor, export_decoder, export_encoder  # noqa: E402
from tinysam.export.int8 import quantize_onnx_int8  # noqa: E402
from tinysam.utils.rle import mask_bbox_xywh  # noqa: E402
from tinysam_samples import bbbc038, instance_masks, sample_images  # noqa: E402

# Photos for the agreement with fp32: the held-out photos of the distillation experiments and more.
AGREEMENT_PHOTOS = ("astronaut", "camera", "coins", "rocket", "coffee", "chelsea", "hubble_deep_field", "retina")


def boxes(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
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
        q_enc, q_dec = quantize_onnx_int8(enc, f"{folder}/enc8.onnx"), quantize_onnx_int8(dec, f"{folder}/dec8.onnx")
        variants["ONNX Runtime int8 encoder"] = OnnxSamPredictor(q_enc, dec, threads=args.threads)
        variants["ONNX Runtime int8 encoder + decoder"] = OnnxSamPredictor(q_enc, q_dec, threads=args.threads)
        if importlib.util.find_spec("openvino"):  # the optional extra
            variants["OpenVINO fp32"] = OnnxSamPredictor(enc, dec, threads=args.threads, engine="openvino")
            if bfloat16_is_native(torch.device("cpu")):
                variants["OpenVINO bf16"] = OnnxSamPredictor(
                    enc, dec, threads=args.threads, engine="openvino", precision="bf16"
                )
        if args.quantized:
            from tinysam.quant import load_quantized

            q = load_quantized(args.quantized, mode="sim")
            variants["ONNX Runtime W8A8 (QDQ)"] = OnnxSamPredictor(
                *(export_encoder(q, f"{folder}/q_enc.onnx"), export_decoder(q, f"{folder}/q_dec.onnx")),
                threads=args.threads,
            )
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
        # smoke: one photo, 4 boxes and 8 nuclei (the full sets are ~10 s per variant)
        photos, prompts = (AGREEMENT_PHOTOS[:1], 4) if args.smoke else (AGREEMENT_PHOTOS, None)
        # The files only: their decoder returns the official export's single mask, PyTorch's three.
        onnx_variants = {name: p for name, p in variants.items() if not name.startswith("PyTorch")}
        fp32, nuclei = variants["ONNX Runtime fp32"], bbbc038()
        accuracy = {name: accuracy_of(p, fp32, nuclei, photos, prompts) for name, p in onnx_variants.items()}
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
    print(f"\n| variant | BBBC038 box mIoU | agreement with ONNX Runtime fp32, {len(photos)} photos: median | worst |")
    print("|---|---|---|---|")
    for name, (miou, agreement) in accuracy.items():
        print(f"| {name} | {miou:.4f} | {statistics.median(agreement):.4f} | {min(agreement):.4f} |")


def accuracy_of(predictor, reference, nuclei, photos, limit: Optional[int] = None) -> tuple:
    """Box mIoU against the (image, labels) `nuclei`, and per photo the mean IoU of 16 box masks
    with `reference`'s (with `limit`: that many boxes a photo, twice that many nuclei)."""
    image, labels = nuclei
    truth = np.stack([np.asarray(m, bool) for m in instance_masks(labels)])[: 2 * limit if limit else None]
    xywh = np.array([mask_bbox_xywh(m) for m in truth], float)
    with torch.inference_mode():
        predictor.set_image(image)
        masks = predictor.predict(box=np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1))[0][:, 0]
        miou = float(np.mean(iou(np.asarray(masks), truth)))
        agreement = []
        for k, (_, photo) in enumerate(sample_images(photos)):
            prompts = boxes(limit or 16, *photo.shape[:2], seed=k)
            outs = []
            for p in (predictor, reference):
                p.set_image(photo)
                outs.append(np.asarray(p.predict(box=prompts)[0])[:, 0])
            agreement.append(float(np.mean(iou(*outs))))
    return miou, agreement


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a & b).sum((1, 2)) / np.maximum((a | b).sum((1, 2)), 1)


if __name__ == "__main__":
    main()
