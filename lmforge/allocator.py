"""How the C library's allocator treats the large blocks an inference pass frees.

glibc hands a freed block of more than 128 KiB back to the operating system, and the next
block of that size arrives as fresh pages, each faulted in on first touch: a 512-token
prefill allocates and frees megabytes of activations in every layer, and those faults cost
about a tenth of its time on a 2-core CPU. Keeping freed memory for reuse removes them; the
process's peak is what it was, it just does not shrink after it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD = -1  # mallopt's parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest: blocks above it (full-vocabulary logits) still map
TRIM_THRESHOLD = 1 << 30


@functools.cache
def keep_freed_memory() -> bool:
    """Ask glibc to keep freed blocks of up to 32 MiB for reuse (once a process). False
    where the C library is not glibc (musl, macOS, Windows), which is left as it is."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
