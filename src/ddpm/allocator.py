"""Keep freed memory in the process instead of handing it back to the system after every step.

A CPU training step allocates and frees the same large activations again and again (a 64x96x28x28
float32 tensor is 19 MB). glibc's malloc serves such blocks with a fresh ``mmap`` and returns them
with ``munmap`` (or trims them off the heap's top), so the next step touches brand-new pages: one page
fault per 4 KiB. On a CPU that cost shows inside the element-wise kernels, e.g. a SiLU backward over
19 MB took 4.6 ms instead of 1.5 ms (docs/performance.md). ``keep_freed_memory`` raises glibc's mmap
threshold to its maximum (32 MiB) and its trim threshold to 1 GiB, the effect of the environment
variables ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` set at run time. The price: a
process keeps up to its peak heap, which a training or sampling run reaches anyway.

The `ddpm` command calls it once at start; library users may call it themselves.
"""

from __future__ import annotations

import ctypes
import sys

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # glibc's largest allowed value on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX)
TRIM_THRESHOLD = 2**30


def keep_freed_memory() -> bool:
    """Set glibc's malloc to reuse freed blocks up to 32 MiB and keep up to 1 GiB of freed heap.

    Returns True when the settings were applied, False where the C library is not glibc (macOS,
    Windows, musl), where nothing is changed. Process-wide, and harmless to call more than once.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # present in glibc only: musl's mallopt accepts and ignores these
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success; setting either threshold also turns off glibc's own adjustment
    # of the mmap threshold, which would otherwise follow the sizes freed.
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
