"""How the C library's allocator treats the large blocks an inference pass frees.

glibc hands a freed block of more than 128 KiB back to the operating system, and the next
block of that size arrives as fresh pages, each faulted in on first touch: a 512-token
prefill allocates and frees megabytes of activations in every layer, and those faults cost
about a tenth of its time on a 2-core CPU. Keeping freed memory for reuse removes them; the
process's peak is what it was, it just does not shrink after it.

What a model's loading frees, on the other hand, is given back (`give_back_freed_memory`):
parsing a large tokenizer.json frees most of what it took, and glibc kept it.
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
def _glibc() -> ctypes.CDLL | None:
    """The C library, if it is glibc (it has mallopt and malloc_trim): not musl, macOS or
    Windows, whose allocators are left as they are."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except (OSError, TypeError):
        return None


@functools.cache
def keep_freed_memory() -> bool:
    """Ask glibc to keep freed blocks of up to 32 MiB for reuse (once a process); False
    where the C library is not glibc."""
    libc = _glibc()
    return libc is not None and bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def give_back_freed_memory() -> bool:
    """Return the freed memory glibc holds to the system (`malloc_trim`): reading Gemma 3's
    tokenizer.json (262,144 tokens) leaves 300 MB freed but held, of the 626 MB the process
    then has. False where the C library is not glibc."""
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True
