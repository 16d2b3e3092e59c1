"""Everything mode with glibc's default allocator vs `keep_freed_memory` (what the jobs' actors
run), side by side: fresh child processes, alternating, the same photos after a warm-up call.

    python benchmarks/allocator.py [--rounds 2] [--points-per-side 32] [--threads 2]

Prints seconds per photo, minor page faults, kernel seconds and peak RSS, and the speed ratio.
"""

import json
import statistics
import subprocess
import sys

from _harness import benchmark_parser  # benchmarks/ is on sys.path

CHILD = """
import json, resource, sys, time
import torch
from tinysam import SamHierarchicalMaskGenerator, build_sam
from tinysam_samples import sample_images
from tinysam.utils.malloc import keep_freed_memory
setting, points, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(threads)
if setting == "keep":
    assert keep_freed_memory()
sam = build_sam("vit_t", "mobile_sam")
generator = SamHierarchicalMaskGenerator(sam, points_per_side=points, output_mode="coco_rle")
photos = dict(sample_images())
out = []
for name in ("coffee", "chelsea", "astronaut"):  # the first is the warm-up
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    with torch.inference_mode():
        generator.generate(photos[name])
    after = resource.getrusage(resource.RUSAGE_SELF)
    out.append({"seconds": time.perf_counter() - start, "faults": after.ru_minflt - before.ru_minflt,
                "kernel_seconds": after.ru_stime - before.ru_stime})
print(json.dumps({"photos": out[1:], "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}))
"""


def main() -> None:
    p = benchmark_parser(__doc__)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--points-per-side", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if args.smoke:
        args.rounds, args.points_per_side = 1, 4
    runs = {"default": [], "keep": []}
    for _ in range(args.rounds):
        for setting in runs:
            cmd = [sys.executable, "-c", CHILD, setting, str(args.points_per_side), str(args.threads)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            runs[setting].append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"hierarchical {args.points_per_side}x{args.points_per_side}, {args.threads} threads, {args.rounds} rounds\n")
    print("| allocator | s per photo (median) | minor faults per photo | kernel s per photo | peak RSS MB |")
    print("|---|---|---|---|---|")
    medians = {}
    for setting, results in runs.items():
        photos = [ph for r in results for ph in r["photos"]]
        medians[setting] = statistics.median(ph["seconds"] for ph in photos)
        faults = statistics.median(ph["faults"] for ph in photos)
        kernel = statistics.median(ph["kernel_seconds"] for ph in photos)
        rss = "/".join(str(r["peak_rss_mb"]) for r in results)
        print(f"| {setting} | {medians[setting]:.2f} | {faults:,.0f} | {kernel:.1f} | {rss} |")
    print(f"\nspeed keep / default: {medians['default'] / medians['keep']:.2f}x")


if __name__ == "__main__":
    main()
