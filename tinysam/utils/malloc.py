"""glibc allocator settings: for large images, and for processes that run model after model.

glibc serves allocations below its mmap threshold from its heap and raises that threshold (up to
32 MiB) each time a larger block is freed. On a large image, everything mode's full-resolution
temporaries then pile up in the heap, which glibc does not give back: the peak grows to many
times the live data. With a fixed small threshold every large temporary is mapped and unmapped:
a low peak, but ordinary photos slow down, since their page faults multiply. So the small
threshold applies only while a large image is processed (figures: docs/benchmarks.md, "Everything
mode: peak memory"). Elsewhere than glibc these are no-ops.

The other way round, a process that runs everything mode image after image (a job's model actor)
gains from keeping what it frees: with glibc's defaults each photo's temporaries are mapped,
faulted in page by page and handed back, a large share of its time. `keep_freed_memory` serves
them from the heap and keeps it (docs/design.md, "Page faults in everything mode").
"""

import ctypes
import ctypes.util
import functools
from contextlib import contextmanager
from typing import Iterator, Optional

M_TRIM_THRESHOLD = -1  # mallopt's parameter numbers in glibc's malloc.h
M_MMAP_THRESHOLD = -3
LARGE_IMAGE_PIXELS = 4_000_000
SMALL_THRESHOLD = 1 << 20
DEFAULT_CEILING = 32 << 20  # glibc's own upper bound for its dynamic threshold on 64-bit
KEEP_MMAP_THRESHOLD = 256 << 20  # blocks below this come from the heap...
KEEP_TRIM_THRESHOLD = 1 << 30  # ...and up to this much free memory stays at its top
DEFAULT_TRIM_THRESHOLD = 128 << 10  # glibc's own
_normal_threshold = DEFAULT_CEILING  # what allocation_for restores after a large image


@functools.lru_cache(maxsize=None)
def _libc() -> Optional[ctypes.CDLL]:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return libc if libc is not None and hasattr(libc, "mallopt") else None
    except OSError:
        return None


def set_mmap_threshold(nbytes: int) -> bool:
    """Fix glibc's mmap threshold; False where that is not possible."""
    libc = _libc()
    return bool(libc is not None and libc.mallopt(M_MMAP_THRESHOLD, int(nbytes)))


def keep_freed_memory() -> bool:
    """For the rest of the process: serve large temporaries from glibc's heap and keep up to 1 GiB
    of freed memory there, so that image after image reuses memory instead of faulting it in
    afresh (measured: `benchmarks/allocator.py`, docs/benchmarks.md). For dedicated
    model processes (the jobs' actors); False where glibc is not there."""
    global _normal_threshold
    libc = _libc()
    if libc is None or not libc.mallopt(M_TRIM_THRESHOLD, KEEP_TRIM_THRESHOLD):
        return False
    if not libc.mallopt(M_MMAP_THRESHOLD, KEEP_MMAP_THRESHOLD):
        return False
    _normal_threshold = KEEP_MMAP_THRESHOLD
    return True


def release_freed_memory() -> bool:
    """Undo `keep_freed_memory`: glibc's thresholds back and the heap's free pages returned to the
    system. For a process that goes on to other work after a run of model calls: over many
    different workloads the kept heap fragments and grows. False where glibc is not there."""
    global _normal_threshold
    libc = _libc()
    if libc is None or not libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD):
        return False
    _normal_threshold = DEFAULT_CEILING
    if not set_mmap_threshold(DEFAULT_CEILING):
        return False
    libc.malloc_trim(0)
    return True


@contextmanager
def allocation_for(pixels: int) -> Iterator[None]:
    """Within: large temporaries go straight back to the system when the image is large."""
    large = pixels > LARGE_IMAGE_PIXELS and set_mmap_threshold(SMALL_THRESHOLD)
    try:
        yield
    finally:
        if large:
            set_mmap_threshold(_normal_threshold)
