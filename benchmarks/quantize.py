"""Q-TinySAM on CPU: int8 vs fp32 latency of the encoder and the decoder, and the mIoU of both, in one run.

Quantizes the real vit_t (MobileSAM weights) with the job's recipe (W8A8, n=100, rounds=3, 8 real
calibration photos), then times fp32, simulated W8A8 and the int8 kernels on the same inputs,
alternating runs so machine noise hits all alike, eager and compiled (Inductor with frozen
weights, see tinysam.quant.compile_frozen; fp32 compiled is the fair baseline of int8 compiled).
Latency as the paper counts it: the encoder plus the decoder with one box prompt; also a decoder
call with a batch of 64 boxes (everything mode's batch). Quality: box-prompt mIoU on the real
BBBC038 nuclei image (its 125 ground-truth boxes), also for W6A6 and for plain max-scaling.

    python benchmarks/quantize.py [--repeats 5] [--threads N] [--candidates 100 --rounds 3]
    python benchmarks/quantize.py --kernels-only   # just the int8 vs fp32 matrix products

It first times the int8 kernels alone against fp32 on vit_t's layer shapes (input quantization
included, as the int8 path runs them), which separates the kernels' speed from the model's.
"""

import copy
import statistics
import time
from dataclasses import replace
from functools import partial

import torch
from _harness import benchmark_parser  # benchmarks/ is on sys.path

from tinysam import SamPredictor, build_sam
from tinysam.eval import box_prompt_miou
from tinysam.quant import QuantConfig, compile_frozen, int8_available, int8_unavailable_reason, quantize_sam, set_mode
from tinysam.quant.calibrate import calibration_prompts, search_scales
from tinysam.transforms import prepare_image
from tinysam_samples import bbbc038, instance_masks, sample_images

CALIBRATION = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "camera",
    "immunohistochemistry",
    "hubble_deep_field",
    "coins",
)


def decoder_call(sam, embedding, boxes, decoder=None):
    """One decoder call on a batch of box prompts; channels-last upscaling, as everything mode runs it."""
    sparse, dense = sam.prompt_encoder(points=None, boxes=boxes, masks=None)
    return (decoder or sam.mask_decoder)(
        embedding, sam.prompt_encoder.get_dense_pe(), sparse, dense, multimask_output=True, fast_upscaling=True
    )


# (rows, in, out) of vit_t linear layers: stage-2 qkv / fc1 / fc2, the neck's 1x1 conv, decoder projections
KERNEL_SHAPES = ((4096, 160, 480), (4096, 160, 640), (4096, 640, 160), (4096, 320, 256), (65536, 256, 128))


def kernel_ratios(repeats: int) -> None:
    """fp32 F.linear vs QLinear's int8 kernel (quantizing its input each call), side by side."""
    from torch import nn

    from tinysam.quant import convert

    print("| rows x in -> out | fp32 ms | int8 ms (incl. input quantization) | ratio |")
    print("|---|---|---|---|")
    for rows, k, n in KERNEL_SHAPES:
        model = nn.Sequential(nn.Linear(k, n))
        layer = convert(model, 8, [""])["0"]
        x = torch.randn(rows, k)
        layer.a_scale = x.abs().max().view(1) / 128
        layer.b_scale = layer.channel_amax() / 128
        times = {"float": [], "int8": []}
        with torch.inference_mode():
            for _ in range(repeats + 1):
                for mode in times:
                    layer.mode = mode  # not set_mode: that drops the packed int8 weight each time
                    t = time.perf_counter()
                    layer(x)
                    times[mode].append(time.perf_counter() - t)
        f, i = (statistics.median(v[1:]) * 1000 for v in times.values())
        print(f"| {rows} x {k} -> {n} | {f:.2f} | {i:.2f} | {f / i:.2f}x |")


def main() -> None:
    p = benchmark_parser(__doc__)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--checkpoint", default="mobile_sam")
    p.add_argument("--candidates", type=int, default=QuantConfig.candidates)
    p.add_argument("--rounds", type=int, default=QuantConfig.rounds)
    p.add_argument(
        "--prompts", type=int, default=64, help="box prompts in the batched decoder call (everything mode batches 64)"
    )
    p.add_argument("--kernels-only", action="store_true", help="only the int8 vs fp32 kernel table")
    p.add_argument("--no-compile", action="store_true", help="eager models only (compiling takes minutes)")
    args = p.parse_args()
    calibration = CALIBRATION[:1] if args.smoke else CALIBRATION
    if args.smoke:
        args.repeats, args.candidates, args.rounds, args.prompts, args.no_compile = 1, 2, 1, 4, True
    torch.set_num_threads(args.threads)
    if int8_available():
        kernel_ratios(1 if args.smoke else max(args.repeats, 5))
    else:
        print(f"no int8 rows: {int8_unavailable_reason()}")
    if args.kernels_only:
        return

    fp32 = build_sam("vit_t", args.checkpoint)
    sam = build_sam("vit_t", args.checkpoint)
    config = QuantConfig(
        candidates=args.candidates,
        rounds=args.rounds,
        calibration_images=len(calibration),
        points_per_side=2 if args.smoke else QuantConfig.points_per_side,
    )
    t0 = time.time()
    report = quantize_sam(
        sam, [img for _, img in sample_images(calibration)], config, progress=lambda m: print(f"  {m}", flush=True)
    )
    print(
        f"quantized {report.quantized} layers in {time.time() - t0:.0f} s "
        f"(n={config.candidates}, rounds={config.rounds}, {len(calibration)} images)"
    )

    image, labels = bbbc038()
    gts = list(instance_masks(labels))[: 8 if args.smoke else None]
    miou = {"fp32": box_prompt_miou(SamPredictor(fp32), image, gts)}
    modes = ["sim"] + (["int8"] if int8_available() else [])
    for mode in modes:
        set_mode(sam, mode)
        miou[f"W8A8 {mode}"] = box_prompt_miou(SamPredictor(sam), image, gts)

    # latency: one image through the encoder, a decoder call with one box (the paper's latency:
    # its 42G MACs are the encoder plus one prompt's decoder) and one with a batch of boxes
    x = prepare_image(sample_images(("chelsea",))[0][1]).tensor[None]
    grid = calibration_prompts(8, 1024)[: args.prompts, 0]
    batch = torch.cat([grid - 48, grid + 48], dim=1).clamp(0, 1024)
    one = batch[:1]
    eager = {"fp32": fp32} | {f"W8A8 {m}": sam for m in modes}
    variants = {
        key: (model, key.split()[-1] if key != "fp32" else None, model.image_encoder, model.mask_decoder)
        for key, model in eager.items()
    }
    if not args.no_compile:  # Inductor with frozen weights, fp32 as the fair baseline (see compile_frozen)
        set_mode(sam, "sim")  # drops the packed int8 weights (oneDNN tensors do not deep-copy)
        int8_model = copy.deepcopy(sam)  # its own copy: a compiled model's mode must not change
        quantized_mode = modes[-1]
        set_mode(int8_model, quantized_mode)
        for key, model in (("fp32 compiled", fp32), (f"W8A8 {quantized_mode} compiled", int8_model)):
            variants[key] = (model, None, compile_frozen(model.image_encoder), compile_frozen(model.mask_decoder))
    times = {k: {"enc": [], "one": [], "batch": []} for k in variants}
    with torch.inference_mode():
        embedding = fp32.image_encoder(x)
        for key, (model, _, encoder, decoder) in variants.items():
            if "compiled" in key:  # each input shape compiles once
                t = time.perf_counter()
                encoder(x)
                decoder_call(model, embedding, one, decoder)
                decoder_call(model, embedding, batch, decoder)
                print(f"  compiled {key}: {time.perf_counter() - t:.0f} s", flush=True)
        for _ in range(args.repeats + 1):  # the first pass warms up (set_mode packs the int8 weights)
            for key, (model, mode, encoder, decoder) in variants.items():
                if mode:
                    set_mode(model, mode)
                calls = {
                    "enc": partial(encoder, x),
                    "one": partial(decoder_call, model, embedding, one, decoder),
                    "batch": partial(decoder_call, model, embedding, batch, decoder),
                }
                for part, call in calls.items():
                    t = time.perf_counter()
                    call()
                    times[key][part].append(time.perf_counter() - t)

    if "W8A8 int8 compiled" in variants:  # the compiled model's masks (new prompt counts compile again)
        model, _, encoder, decoder = variants["W8A8 int8 compiled"]
        model.image_encoder, model.mask_decoder = encoder, decoder
        miou["W8A8 int8 compiled"] = box_prompt_miou(SamPredictor(model), image, gts)

    # the same recording, re-searched: W6A6, and plain max-scaling as the baseline
    search_scales(sam, report.recorder, replace(config, bits=6))
    set_mode(sam, "sim")
    miou["W6A6 sim"] = box_prompt_miou(SamPredictor(sam), image, gts)
    search_scales(sam, report.recorder, replace(config, search=False))
    set_mode(sam, "sim")
    miou["W8A8 max-scaling sim"] = box_prompt_miou(SamPredictor(sam), image, gts)

    med = {k: {part: statistics.median(v[1:]) * 1000 for part, v in parts.items()} for k, parts in times.items()}
    print(f"\nvit_t, {args.threads} threads, torch {torch.__version__}, median of {args.repeats}")
    print(
        f"| variant | encoder ms | decoder ms (1 box) | encoder + decoder ms | speed-up vs fp32 "
        f"| decoder ms ({args.prompts} boxes) | speed-up vs fp32 |"
    )
    print("|---|---|---|---|---|---|---|")
    total = {k: m["enc"] + m["one"] for k, m in med.items()}
    for key, m in med.items():
        print(
            f"| {key} | {m['enc']:.0f} | {m['one']:.1f} | {total[key]:.0f} | {total['fp32'] / total[key]:.2f}x "
            f"| {m['batch']:.0f} | {med['fp32']['batch'] / m['batch']:.2f}x |"
        )
    print("\nBBBC038 box-prompt mIoU (125 ground-truth boxes):")
    for key, value in miou.items():
        print(f"  {key:22s} {value:.4f}   ({value - miou['fp32']:+.4f} vs fp32)")
    if "W8A8 int8" in med:
        print(
            f"int8 vs fp32 (eager), encoder + 1-box decoder: {total['fp32'] / total['W8A8 int8']:.2f}x (goal >= 1.5x)"
        )
    if "W8A8 int8 compiled" in med:
        c, f = med["W8A8 int8 compiled"], med["fp32 compiled"]
        print(
            "int8 vs fp32, both compiled: encoder + 1-box decoder "
            f"{total['fp32 compiled'] / total['W8A8 int8 compiled']:.2f}x (goal >= 1.5x; "
            f"encoder {f['enc'] / c['enc']:.2f}x), {args.prompts}-box decoder {f['batch'] / c['batch']:.2f}x"
        )


if __name__ == "__main__":
    main()
