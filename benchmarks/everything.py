"""Everything mode, side by side in one run: the official dense generator, ours dense, ours hierarchical
(default skip margin, and margin 0: the paper's rule).

Same real weights (mobile_sam.pt) and images. Per image: seconds and masks for each, and quality:
mIoU against ground truth on the BBBC038 nuclei image (for each ground-truth mask, the best IoU
among the predicted masks, averaged), agreement with the official dense output elsewhere (the same
measure with the official masks as reference). Then the peak memory of one call on a 1024x1024
image, measured in a fresh process.

    python benchmarks/everything.py [--images astronaut coffee chelsea nuclei] [--skip-official]
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
import warnings

import numpy as np
import torch

from tinysam import SamAutomaticMaskGenerator, SamHierarchicalMaskGenerator, build_sam
from tinysam.sample_data import bbbc038, instance_masks, sample_images
from tinysam.utils.metrics import best_match_ious


def best_match_miou(reference, predicted) -> float:
    return float(best_match_ious(reference, predicted).mean()) if len(reference) else float("nan")


def load_images(names):
    out = []
    for name in names:
        if name == "nuclei":
            image, labels = bbbc038()
            out.append((name, image, list(instance_masks(labels))))
        else:
            out.append((name, sample_images((name,))[0][1], None))
    return out


def peak_memory_child(checkpoint: str, mode: str, size: str) -> None:
    """In a fresh process: RSS peak of one generate() on a WxH photo, above the RSS before it."""
    from PIL import Image

    model = build_sam("vit_t", checkpoint)
    w, h = (int(v) for v in size.split("x"))
    image = np.array(Image.fromarray(sample_images(("astronaut",))[0][1]).resize((w, h)))
    cls = SamHierarchicalMaskGenerator if mode == "hierarchical" else SamAutomaticMaskGenerator
    gen = cls(model)
    gen.generate(image[:64, :64])  # warm-up allocations outside the measurement

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key)) * 1024

    before = status("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS counter
    masks = gen.generate(image)
    print(json.dumps({"mode": mode, "masks": len(masks), "rss_before": before, "peak": status("VmHWM:")}))


def measure_peak(checkpoint: str, mode: str, size: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--peak-memory-child", mode, "--checkpoint", checkpoint, "--peak-size", size],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", nargs="+", default=["astronaut", "coffee", "chelsea", "nuclei"])
    parser.add_argument("--checkpoint", default="mobile_sam")
    parser.add_argument("--skip-official", action="store_true")
    parser.add_argument(
        "--peak-sizes",
        nargs="+",
        default=["1024x1024", "4000x3000"],
        help="photo sizes (WxH) whose peak memory is measured",
    )
    parser.add_argument("--peak-only", action="store_true", help="only the peak memory")
    parser.add_argument("--peak-memory-child", choices=["dense", "hierarchical"], help=argparse.SUPPRESS)
    parser.add_argument("--peak-size", default="1024x1024", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak_memory_child:
        return peak_memory_child(args.checkpoint, args.peak_memory_child, args.peak_size)
    if args.peak_only:
        return report_peaks(args.checkpoint, args.peak_sizes)

    model = build_sam("vit_t", args.checkpoint)
    runners = {
        "ours dense": SamAutomaticMaskGenerator(model),
        "ours hierarchical": SamHierarchicalMaskGenerator(model),  # skip margin 1/4 grid spacing
        "ours hierarchical, paper's rule": SamHierarchicalMaskGenerator(model, skip_margin=0),
    }
    if not args.skip_official:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import mobile_sam
        official = mobile_sam.sam_model_registry["vit_t"]()
        official.load_state_dict(model.state_dict())
        runners = {"official dense": mobile_sam.SamAutomaticMaskGenerator(official.eval()), **runners}

    rows = []
    for name, image, gt in load_images(args.images):
        from tinysam.transforms import to_rgb_uint8

        rgb = to_rgb_uint8(image)
        results = {}
        for key, gen in runners.items():
            t0 = time.perf_counter()
            with torch.inference_mode():
                masks = [r["segmentation"] for r in gen.generate(rgb)]
            secs = time.perf_counter() - t0
            stats = getattr(gen, "last_stats", {})
            skipped = (
                f"{stats['skipped_points']} of {stats['round2_grid_points']}" if "skipped_points" in stats else None
            )
            results[key] = (secs, masks, skipped)
        ref_key = "official dense" if "official dense" in results else "ours dense"
        for key, (secs, masks, skipped) in results.items():
            row = {
                "image": name,
                "method": key,
                "seconds": secs,
                "masks": len(masks),
                "skipped": skipped,
                "agreement": best_match_miou(results[ref_key][1], masks),
            }
            if gt is not None:
                row["gt_miou"] = best_match_miou(gt, masks)
            rows.append(row)
            extra = f"  GT mIoU {row['gt_miou']:.4f}" if gt is not None else ""
            extra += f"  skipped {skipped}" if skipped is not None else ""
            print(
                f"{name:10s} {key:32s} {secs:7.1f} s  {len(masks):4d} masks  agreement {row['agreement']:.4f}{extra}",
                flush=True,
            )

    print("\n| image | method | s/image | masks | round-2 points skipped | agreement with official dense | GT mIoU |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        gt = f"{r['gt_miou']:.4f}" if "gt_miou" in r else ""
        print(
            f"| {r['image']} | {r['method']} | {r['seconds']:.1f} | {r['masks']} | {r['skipped'] or ''} | "
            f"{r['agreement']:.4f} | {gt} |"
        )
    if "official dense" in runners:
        for key in [k for k in runners if k.startswith("ours")]:
            ratios = [
                next(x["seconds"] for x in rows if x["image"] == img and x["method"] == "official dense") / r["seconds"]
                for img in args.images
                for r in rows
                if r["image"] == img and r["method"] == key
            ]
            print(
                f"speed-up of {key} over official dense: median {statistics.median(ratios):.2f}x "
                f"(per image {', '.join(f'{x:.2f}' for x in ratios)})"
            )
    report_peaks(args.checkpoint, args.peak_sizes)


def report_peaks(checkpoint: str, sizes) -> None:
    for size in sizes:
        for mode in ("dense", "hierarchical"):
            peak = measure_peak(checkpoint, mode, size)
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
