"""Keep freed host memory mapped, so XLA:CPU does not page-fault its buffers every step.

XLA:CPU allocates a step's temp buffer (hundreds of MB for a small LM) with malloc on
one of its runtime threads and frees it at the end. glibc serves such a request from a
per-thread arena by mmap and returns it with munmap, so the next step touches fresh pages:
on this project's 2-core CPU machine the Mamba LM step spent about a third of its CPU
time in minor page faults (365 MB re-faulted per step, `getrusage().ru_minflt`).

`keep_freed_memory()` sets glibc's malloc to one arena, no mmap for large blocks and no
trimming, so freed buffers are reused as they are. The process then keeps its peak heap
for its lifetime, the usual trade for a training process (the same as running with
`MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...`). It must run before
JAX starts its threads (before the first computation); train.py and the benchmarks call
it first thing. A no-op on non-glibc systems and when JAXMIX_KEEP_FREED_MEMORY=0.
"""
import ctypes
import ctypes.util
import os

# mallopt parameter numbers from glibc's malloc.h
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8


def keep_freed_memory():
    """Returns True when glibc's malloc was reconfigured."""
    if os.environ.get("JAXMIX_KEEP_FREED_MEMORY", "1") == "0":
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # not glibc (macOS, musl without it)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(M_ARENA_MAX, 1) and mallopt(M_MMAP_MAX, 0)
    # The largest int: freed memory at the top of the heap is never given back.
    ok = ok and mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1)
    return bool(ok)
