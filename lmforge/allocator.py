"""How the C library's allocator treats the large blocks an inference pass frees.

glibc hands a freed block of more than 128 KiB back to the operating system, and the next
block of that size arrives as fresh pages, each faulted in on first touch: a 512-token
prefill allocates and frees megabytes of activations in every layer, and those faults cost
about a tenth of its time on a 2-core CPU. Keeping freed memory for reuse removes them; the
process's peak is what it was, it just does not shrink after it.

What a model's loading frees, on the other hand, is given back (`give_back_freed_memory`):
parsing a large tokenizer.json frees most of what it took, and glibc kept it. So are the pages
of a quantized model's weights as its file holds them, once the CPU kernels have their own
copy (`page_out`).
"""

from __future__ import annotations

import bisect
import ctypes
import ctypes.util
import functools
import mmap
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

M_TRIM_THRESHOLD = -1  # mallopt's parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest: blocks above it (full-vocabulary logits) still map
TRIM_THRESHOLD = 1 << 30
MADV_RANDOM, MADV_PAGEOUT = 1, 21  # madvise's advice numbers (MADV_PAGEOUT: Linux 5.4 on)


@functools.cache
def _c_library() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c"))
    except (OSError, TypeError):
        return None


def _glibc() -> ctypes.CDLL | None:
    """The C library, if it is glibc (it has mallopt and malloc_trim): not musl, macOS or
    Windows, whose allocators are left as they are."""
    libc = _c_library()
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


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


def page_out(tensors: Iterable[torch.Tensor]) -> int:
    """Let the system take back the pages of `tensors` that are pages of a file mapped into
    memory (a safetensors file's tensors are): the whole pages each tensor spans, the bytes
    of any tensor that is not a file's left alone. A page taken back is read from the file
    again if it is touched, so nothing is lost; what this saves is holding a file's tensors
    in memory beside a copy made of them: int4 SmolLM2-135M's weights as stored, 90 MB,
    beside the CPU kernels' tiles. Returns the bytes handed back (0 where the system has no
    MADV_PAGEOUT: other than Linux, or before 5.4)."""
    libc = _c_library()
    if not sys.platform.startswith("linux") or not hasattr(libc, "madvise"):
        return 0
    ranges = [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in tensors
              if t.device.type == "cpu" and t.is_contiguous()]
    total = 0
    for first, last in _in_mapped_files(ranges):
        lo, hi = -(-first // mmap.PAGESIZE) * mmap.PAGESIZE, last // mmap.PAGESIZE * mmap.PAGESIZE
        if hi > lo and libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo),
                                    MADV_PAGEOUT) == 0:
            # A page touched again comes alone: the system's read-ahead would map its
            # neighbours too, and a tied embedding's rows, looked up a token at a time,
            # brought back most of the output projection (fault-around, 64 KB a row).
            libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), MADV_RANDOM)
            total += hi - lo
    return total


# The process's mappings of files, (starts, ends) in order, as read after the last file of
# tensors was mapped (None: not read since): reading /proc/self/maps takes milliseconds, and a
# model's layers ask hundreds of times.
_mapped_files: tuple[list[int], list[int]] | None = None


def files_mapped() -> None:
    """Tell `page_out` that files have been mapped since it last looked (`load_safetensors`
    does): tensors of a file mapped by other means are left as they are."""
    global _mapped_files
    _mapped_files = None


def _in_mapped_files(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Those of the address ranges that lie wholly in a mapped file. (A file unmapped since it
    was seen, its addresses taken by new memory, would be taken for the file's: paging that
    memory out loses nothing either, it only stays or goes to swap.)"""
    global _mapped_files
    if _mapped_files is None:
        try:
            _mapped_files = _file_mappings()
        except OSError:  # /proc not mounted (some containers): nothing is known to be a file's
            return []
    return [r for r in ranges if _within(_mapped_files, *r)]


def _within(mappings: tuple[list[int], list[int]], first: int, last: int) -> bool:
    starts, ends = mappings
    i = bisect.bisect_right(starts, first) - 1
    return i >= 0 and last <= ends[i]


def _file_mappings() -> tuple[list[int], list[int]]:
    """The start and end addresses of this process's mappings of regular files, in order
    (/proc/self/maps; a line without a path, or with one in brackets, is not a file's), one
    range where mappings meet: the advice given by `page_out` splits a file's mapping."""
    starts: list[int] = []
    ends: list[int] = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith("/") and fields[4] != "0":
                start, end = (int(address, 16) for address in fields[0].split("-"))
                if ends and ends[-1] == start:
                    ends[-1] = end
                else:
                    starts.append(start)
                    ends.append(end)
    return starts, ends
