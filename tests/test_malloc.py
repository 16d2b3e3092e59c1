"""Allocator settings: a dedicated model process reuses what it frees instead of faulting it in."""

import subprocess
import sys

import pytest

# everything mode on one image, twice in one process: the page faults of each call (the second
# call shows whether the first one's freed memory is reused)
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
print(*[faults() for _ in range(2)])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_keep_freed_memory_stops_refaulting_everything_modes_temporaries():
    """With glibc's defaults every everything-mode call faults its temporaries in afresh (~420k
    page faults a call here); after keep_freed_memory (what the jobs' actors run) a later call
    reuses the memory of the ones before."""

    def faults(mode: str) -> list:
        done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
        return [int(v) for v in done.stdout.split()[-2:]]

    default, keep = faults("default"), faults("keep")
    assert default[-1] > 100_000, default
    # The cut is 16-50x on the CPUs seen so far (least on an AVX2-only EPYC, whose kernels' own
    # scratch buffers refault either way): a quarter of that still tells kept from not kept.
    assert keep[-1] < default[-1] / 4, (keep, default)


RELEASE_PROBE = """
import os
from tinysam.utils.malloc import keep_freed_memory, release_freed_memory
def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") >> 20
assert keep_freed_memory()
blocks = [bytearray(8 << 20) for _ in range(40)]  # 320 MiB from the heap, written
del blocks
kept = rss_mib()
assert release_freed_memory()
print(kept, rss_mib())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_release_freed_memory_gives_the_kept_heap_back():
    """What keep_freed_memory keeps stays in the process until release_freed_memory returns it."""
    done = subprocess.run([sys.executable, "-c", RELEASE_PROBE], capture_output=True, text=True, check=True)
    kept, released = (int(v) for v in done.stdout.split()[-2:])
    assert kept - released >= 250, (kept, released)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_a_model_actor_reuses_everything_modes_temporaries_in_its_batch_thread(ray_local):
    """Ray Data runs a model actor's batches on a pool thread, whose own glibc arena cannot hold
    blocks over 64 MiB: everything mode's larger temporaries (16 prompts per decoder call) were
    mapped and faulted in afresh at every call (~530k page faults a call here, whatever
    keep_freed_memory sets). Model actors get one arena (`model_actor_env`): a later call reuses
    the memory of the ones before, as in a main thread."""
    import ray

    from pipelines.options import CorpusOptions
    from pipelines.stages import ModelStage, model_and_write

    class Probe:
        def __init__(self, cpu_threads=None):
            import torch

            from tinysam import SamAutomaticMaskGenerator, build_sam
            from tinysam.utils.malloc import keep_freed_memory

            keep_freed_memory()
            torch.manual_seed(0)
            model = build_sam("vit_t").eval()
            self.generator = SamAutomaticMaskGenerator(
                model, points_per_side=4, pred_iou_thresh=0, stability_score_thresh=0, decoder_chunk=16
            )

        def __call__(self, batch):
            import os
            import resource
            import threading

            import numpy as np
            import torch

            image = np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)
            faults = []
            for _ in range(2):
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                with torch.inference_mode():
                    self.generator.generate(image)
                faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
            batch["faults"] = [faults[-1]] * len(batch["id"])
            batch["main_thread"] = [threading.current_thread() is threading.main_thread()] * len(batch["id"])
            batch["arenas"] = [os.environ.get("MALLOC_ARENA_MAX", "")] * len(batch["id"])
            return batch

    def write(batch, storage_options=None):
        return batch

    [row] = model_and_write(ray.data.range(1), ModelStage(Probe, {}, write, {}), CorpusOptions(output="")).take_all()
    assert not row["main_thread"] and row["arenas"] == "1"  # a pool thread: the case this is about
    assert row["faults"] < 100_000, row
