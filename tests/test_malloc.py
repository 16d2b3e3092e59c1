"""Allocator settings: a dedicated model process reuses what it frees instead of faulting it in."""

import subprocess
import sys

import pytest

# everything mode on one image, three times in one process: the page faults of each call
PROBE = """
import resource, sys
import numpy as np, torch
from tinysam.utils.malloc import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
torch.manual_seed(0)
from tinysam import SamAutomaticMaskGenerator, build_sam
generator = SamAutomaticMaskGenerator(build_sam("vit_t").eval(), points_per_side=4, pred_iou_thresh=0,
                                      stability_score_thresh=0)
image = np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    with torch.inference_mode():
        generator.generate(image)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(*[faults() for _ in range(3)])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_keep_freed_memory_stops_refaulting_everything_modes_temporaries():
    """With glibc's defaults every everything-mode call faults its temporaries in afresh (~420k
    page faults a call here); after keep_freed_memory (what the jobs' actors run) a later call
    reuses the memory of the ones before."""

    def faults(mode: str) -> list:
        done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
        return [int(v) for v in done.stdout.split()[-3:]]

    default, keep = faults("default"), faults("keep")
    assert default[-1] > 100_000, default
    assert keep[-1] < default[-1] / 20, (keep, default)
