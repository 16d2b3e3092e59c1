"""glibc allocator settings for large images.

glibc serves allocations below its mmap threshold from its heap and raises that threshold (up to
32 MiB) each time a larger block is freed. On a large image, everything mode's full-resolution
temporaries then pile up in the heap, which glibc does not give back: one 12 Mpx photo held
6.7 GB at its peak for 0.6 GB of live data. With a fixed 1 MiB threshold every large temporary is
mapped and unmapped: 1.4 GB peak, but ~1.7x slower on ordinary photos, whose page faults it
multiplies (docs/benchmarks.md, "Everything mode: peak memory"). So the small threshold applies
only while a large image is processed. Elsewhere than glibc these are no-ops.
"""

import ctypes
import ctypes.util
import functools
from contextlib import contextmanager
from typing import Iterator, Optional

M_MMAP_THRESHOLD = -3  # mallopt's parameter number in glibc's malloc.h
LARGE_IMAGE_PIXELS = 4_000_000
SMALL_THRESHOLD = 1 << 20
DEFAULT_CEILING = 32 << 20  # glibc's own upper bound for its dynamic threshold on 64-bit


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


@contextmanager
def allocation_for(pixels: int) -> Iterator[None]:
    """Within: large temporaries go straight back to the system when the image is large."""
    large = pixels > LARGE_IMAGE_PIXELS and set_mmap_threshold(SMALL_THRESHOLD)
    try:
        yield
    finally:
        if large:
            set_mmap_threshold(DEFAULT_CEILING)
