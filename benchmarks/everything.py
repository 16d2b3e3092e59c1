"""Everything mode, side by side in one run: the official dense generator and ours in each preset
(quality = dense, balanced = the default, fast = the paper's rule), the previous default, the
default's masks computed the previous way (decoder chunk 4, whole masks upsampled instead of each
mask's window, every decision at full resolution), the default with its decisions at full
resolution instead of on the low-res logits (`low_res_decisions`), and the default with a bfloat16
decoder where the CPU multiplies bfloat16 natively.

Same real weights (mobile_sam.pt), images and allocator setting (`keep_freed_memory`, as the
jobs' actors run); the official generator is also timed as shipped, with glibc's default
allocator, in a fresh process beforehand ("x official as shipped"). Per image and method:
seconds, of which the decoder and the rest (the encoder and the host-side post-processing:
upsampling, filters, NMS, RLE), points decoded, masks, and quality: agreement
with the official dense output (for each official mask the best IoU among ours, averaged) and, on
the BBBC038 nuclei image, the same against the ground truth (GT mIoU). Then the peak memory of
one call per size, measured in a fresh process.

    python benchmarks/everything.py [--images astronaut coffee chelsea nuclei] [--skip-official]
    python benchmarks/everything.py --skip-official --peak-sizes --images rocket camera coins immunohistochemistry
        (held-out photos, against ours dense: the official masks, tested)
    python benchmarks/everything.py --size 2250x1500 --skip-official --peak-sizes
        (the photos at SA-1B's size)
    python benchmarks/everything.py --size 2250x1500 --skip-as-shipped --methods "ours balanced" --peak-sizes
        (the default against the official generator at that size, without the as-shipped rerun)
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import replace

import numpy as np
import torch
from _harness import benchmark_parser  # benchmarks/ is on sys.path

from tinysam import build_sam
from tinysam.everything import EverythingConfig
from tinysam.everything import generator as generator_module
from tinysam.everything.generator import bfloat16_is_native
from tinysam.transforms import to_rgb_uint8
from tinysam.utils.malloc import keep_freed_memory
from tinysam.utils.metrics import best_match_ious
from tinysam.utils.rss import peak_rss_bytes, reset_peak_rss, rss_bytes
from tinysam_samples import bbbc038, instance_masks, sample_images

# The default before the embedding-similarity check (tau 8.5, margin 0.25), for the side-by-side.
PREVIOUS_DEFAULT = dict(high_confidence_thresh=8.5, skip_margin=0.25, skip_similarity=0.0)
FULL_RES = " full-resolution decisions"
PEAK_MODES = ("dense", "hierarchical", "hierarchical" + FULL_RES)


def best_match_miou(reference, predicted) -> float:
    return float(best_match_ious(reference, predicted).mean()) if len(reference) else float("nan")


def load_images(names, size=None):
    """(name, image, ground-truth masks or None); `size` "WxH" resizes images and masks to it."""
    from PIL import Image

    out = []
    for name in names:
        if name == "nuclei":
            image, labels = bbbc038()
            gt = list(instance_masks(labels))
        else:
            image, gt = sample_images((name,))[0][1], None
        if size:
            w, h = (int(v) for v in size.split("x"))
            image = np.array(Image.fromarray(to_rgb_uint8(image)).resize((w, h), Image.BILINEAR))
            gt = None if gt is None else [np.array(Image.fromarray(m).resize((w, h), Image.NEAREST)) for m in gt]
        out.append((name, image, gt))
    return out


def peak_memory_child(checkpoint: str, mode: str, size: str, points_per_side: int = 32) -> None:
    """In a fresh process: RSS peak of one generate() on a WxH photo, above the RSS before it."""
    from PIL import Image

    keep_freed_memory()
    model = build_sam("vit_t", checkpoint)
    w, h = (int(v) for v in size.split("x"))
    image = np.array(Image.fromarray(sample_images(("astronaut",))[0][1]).resize((w, h)))
    if mode == "dense":  # the official masks
        config = EverythingConfig.from_preset("quality")
    else:
        config = EverythingConfig(low_res_decisions=not mode.endswith(FULL_RES))
    gen = replace(config, points_per_side=points_per_side).generator(model)
    gen.generate(image[:64, :64])  # warm-up allocations outside the measurement
    before = rss_bytes()
    reset_peak_rss()
    masks = gen.generate(image)
    print(json.dumps({"mode": mode, "masks": len(masks), "rss_before": before, "peak": peak_rss_bytes()}))


def official_child(checkpoint: str, names, size=None, points_per_side: int = 32) -> None:
    """In a fresh process with glibc's default allocator: seconds of the official dense generator
    per image."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import mobile_sam
    official = mobile_sam.sam_model_registry["vit_t"]()
    official.load_state_dict(build_sam("vit_t", checkpoint).state_dict())
    gen = mobile_sam.SamAutomaticMaskGenerator(official.eval(), points_per_side=points_per_side)
    seconds = {}
    for name, image, _ in load_images(names, size):
        rgb = to_rgb_uint8(image)
        t0 = time.perf_counter()
        with torch.inference_mode():
            gen.generate(rgb)
        seconds[name] = time.perf_counter() - t0
    print(json.dumps(seconds))


def official_as_shipped(checkpoint: str, names, size=None, points_per_side: int = 32) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--official-child", "--checkpoint", checkpoint, "--images", *names]
        + ["--points-per-side", str(points_per_side)]
        + (["--size", size] if size else []),
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_peak(checkpoint: str, mode: str, size: str, points_per_side: int = 32) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--peak-memory-child", mode, "--checkpoint", checkpoint, "--peak-size", size]
        + ["--points-per-side", str(points_per_side)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--images", nargs="+", default=["astronaut", "coffee", "chelsea", "nuclei"])
    parser.add_argument("--checkpoint", default="mobile_sam")
    parser.add_argument("--skip-official", action="store_true")
    parser.add_argument(
        "--skip-as-shipped",
        action="store_true",
        help="no second official run with glibc's default allocator (it doubles the official's minutes)",
    )
    parser.add_argument("--size", help="resize every image to WxH first (SA-1B's photos: 2250x1500)")
    parser.add_argument(
        "--peak-sizes",
        nargs="*",
        default=["1024x1024", "4000x3000"],
        help="photo sizes (WxH) whose peak memory is measured (none: no peak measurement)",
    )
    parser.add_argument("--peak-only", action="store_true", help="only the peak memory")
    parser.add_argument("--peak-memory-child", choices=PEAK_MODES, help=argparse.SUPPRESS)
    parser.add_argument("--peak-size", default="1024x1024", help=argparse.SUPPRESS)
    parser.add_argument("--official-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--points-per-side", type=int, default=32, help="every method's grid (hierarchical: round 2's)")
    parser.add_argument(
        "--methods",
        nargs="+",
        help="only these methods (their names as printed), besides the reference they are compared with",
    )
    args = parser.parse_args()
    if args.smoke:
        args.images, args.size, args.peak_sizes, args.points_per_side = ["astronaut"], "320x240", ["320x240"], 8
    if args.official_child:
        return official_child(args.checkpoint, args.images, args.size, args.points_per_side)
    if args.peak_memory_child:
        return peak_memory_child(args.checkpoint, args.peak_memory_child, args.peak_size, args.points_per_side)
    if args.peak_only:
        return report_peaks(args.checkpoint, args.peak_sizes, args.points_per_side)

    points = args.points_per_side
    skip_shipped = args.skip_official or args.skip_as_shipped
    shipped = {} if skip_shipped else official_as_shipped(args.checkpoint, args.images, args.size, points)
    keep_freed_memory()  # for every method alike, as in the jobs' actors
    model = build_sam("vit_t", args.checkpoint)

    def generator(config: EverythingConfig, **settings):
        return replace(config, points_per_side=points, **settings).generator(model)

    runners = {
        f"ours {name}": generator(EverythingConfig.from_preset(name)) for name in ("quality", "balanced", "fast")
    }
    runners["ours previous default"] = generator(EverythingConfig(**PREVIOUS_DEFAULT))
    # the default's masks, computed as before the mask windows: decoder chunk 4, whole-mask filters
    runners["ours balanced, previous execution"] = generator(
        EverythingConfig(), decoder_chunk=4, low_res_decisions=False
    )
    runners["ours balanced, full-resolution decisions"] = generator(EverythingConfig(), low_res_decisions=False)
    if bfloat16_is_native(torch.device("cpu")):
        runners["ours balanced, bfloat16 decoder"] = generator(EverythingConfig(), decoder_dtype="bfloat16")
    if args.methods:
        unknown = set(args.methods) - set(runners)
        if unknown:
            parser.error(f"no method {', '.join(sorted(unknown))}; methods: {', '.join(runners)}")
        reference = [] if not args.skip_official else ["ours quality"]
        runners = {k: v for k, v in runners.items() if k in args.methods or k in reference}
    if args.smoke:  # every code path once: the comparison, the previous execution, the tables
        keys = ("ours balanced", "ours balanced, previous execution", "ours balanced, full-resolution decisions")
        runners = {k: runners[k] for k in keys}
    for gen in runners.values():
        time_decoder(gen)
    if not args.skip_official:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import mobile_sam
        official = mobile_sam.sam_model_registry["vit_t"]()
        official.load_state_dict(model.state_dict())
        official_dense = mobile_sam.SamAutomaticMaskGenerator(official.eval(), points_per_side=points)
        runners = {"official dense": official_dense, **runners}

    per_window, whole_masks = generator_module.filters_per_window, lambda device: False
    rows = []
    for name, image, gt in load_images(args.images, args.size):
        rgb = to_rgb_uint8(image)
        results = {}
        for key, gen in runners.items():
            if hasattr(gen, "decoder_seconds"):
                gen.decoder_seconds = 0.0
            # the previous execution filtered whole masks, as an accelerator still does
            generator_module.filters_per_window = whole_masks if "previous execution" in key else per_window
            t0 = time.perf_counter()
            with torch.inference_mode():
                masks = [r["segmentation"] for r in gen.generate(rgb)]
            secs = time.perf_counter() - t0
            generator_module.filters_per_window = per_window
            stats = getattr(gen, "last_stats", {})
            results[key] = (
                secs,
                masks,
                stats.get("decoded_points", points * points),
                getattr(gen, "decoder_seconds", None),
            )
        ref_key = "official dense" if "official dense" in results else "ours quality"
        for key, (secs, masks, decoded, decoder_secs) in results.items():
            row = {
                "image": name,
                "method": key,
                "seconds": secs,
                "decoder": decoder_secs,
                "masks": len(masks),
                "points": decoded,
                "agreement": best_match_miou(results[ref_key][1], masks),
                "speedup": results[ref_key][0] / secs,
                "shipped_speedup": shipped[name] / secs if name in shipped else None,
            }
            if gt is not None:
                row["gt_miou"] = best_match_miou(gt, masks)
            rows.append(row)
            extra = f"  GT mIoU {row['gt_miou']:.4f}" if gt is not None else ""
            if decoder_secs is not None:
                extra += f"  decoder {decoder_secs:.1f} s, rest {secs - decoder_secs:.1f} s"
            if row["shipped_speedup"] is not None:
                extra += f"  {row['shipped_speedup']:.2f}x official as shipped ({shipped[name]:.1f} s)"
            print(
                f"{name:10s} {key:32s} {secs:7.1f} s ({row['speedup']:.2f}x)  {decoded:4d} points"
                f"  {len(masks):4d} masks  agreement {row['agreement']:.4f}{extra}",
                flush=True,
            )

    print(
        f"\n| image | method | s/image | x {ref_key} | x official as shipped | decoder s | rest s | points | masks "
        "| agreement | GT mIoU |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        gt = f"{r['gt_miou']:.4f}" if "gt_miou" in r else ""
        dec, rest = ("", "") if r["decoder"] is None else (f"{r['decoder']:.1f}", f"{r['seconds'] - r['decoder']:.1f}")
        as_shipped = "" if r["shipped_speedup"] is None else f"{r['shipped_speedup']:.2f}"
        print(
            f"| {r['image']} | {r['method']} | {r['seconds']:.1f} | {r['speedup']:.2f} | {as_shipped} | {dec} | "
            f"{rest} | {r['points']} | {r['masks']} | {r['agreement']:.4f} | {gt} |"
        )
    print(
        f"\n| method | median x {ref_key} | median x official as shipped | min agreement (photos) | GT mIoU | points |"
    )
    print("|---|---|---|---|---|---|")
    for key in runners:
        mine = [r for r in rows if r["method"] == key]
        photos = [r["agreement"] for r in mine if "gt_miou" not in r]
        gts = [f"{r['gt_miou']:.4f}" for r in mine if "gt_miou" in r]
        as_shipped = [r["shipped_speedup"] for r in mine if r["shipped_speedup"] is not None]
        print(
            f"| {key} | {statistics.median(r['speedup'] for r in mine):.2f} | "
            f"{f'{statistics.median(as_shipped):.2f}' if as_shipped else ''} | "
            f"{min(photos) if photos else float('nan'):.4f} | {', '.join(gts)} | "
            f"{statistics.mean(r['points'] for r in mine):.0f} |"
        )
    report_peaks(args.checkpoint, args.peak_sizes, args.points_per_side, ("hierarchical",) if args.smoke else None)


def time_decoder(gen) -> None:
    """Accumulate the seconds `gen` spends in its decoder calls into `gen.decoder_seconds`."""
    decode = gen._decode

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        out = decode(*args, **kwargs)
        gen.decoder_seconds += time.perf_counter() - t0
        return out

    gen._decode = timed
    gen.decoder_seconds = 0.0


def report_peaks(checkpoint: str, sizes, points_per_side: int = 32, modes=None) -> None:
    for size in sizes:
        for mode in modes or PEAK_MODES:
            peak = measure_peak(checkpoint, mode, size, points_per_side)
            extra = (peak["peak"] - peak["rss_before"]) / 2**20
            w, h = (int(v) for v in size.split("x"))
            print(
                f"peak memory of one {mode} call on {size}: {extra:.0f} MiB above the "
                f"{peak['rss_before'] / 2**20:.0f} MiB process ({extra / (w * h / 1e6):.0f} MiB per Mpx; peak RSS "
                f"{peak['peak'] / 2**20:.0f} MiB), {peak['masks']} masks",
                flush=True,
            )


if __name__ == "__main__":
    main()
