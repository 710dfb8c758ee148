"""Facts about the machine this process runs on (standard library only: every layer may use it)."""

from __future__ import annotations

import os
import resource


def default_threads() -> int:
    """One thread per core this process may run on: the matrix kernels are compute bound, so more
    threads than cores only adds contention."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def rss_mb() -> float:
    """This process's resident memory now, MiB (NaN where /proc is missing)."""
    value = _status_mb("VmRSS")
    return float("nan") if value is None else value


def peak_rss_mb() -> float:
    """The most resident memory this process has held, MiB (the kernel's high-water mark)."""
    value = _status_mb("VmHWM")
    if value is None:
        value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    return value


# glibc's mallopt parameters (malloc.h).
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def settle_malloc() -> bool:
    """Keep glibc's allocator from holding freed memory: by default it raises its mmap threshold
    each time a large block is freed (up to 32 MiB), after which a pass's temporary arrays come
    from the heap and stay resident once freed, and every thread gets an arena of its own. A fixed
    threshold and two arenas lower a server's peak a little (docs/benchmarks.md). Call before
    threads start; False where the C library is not glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_THRESHOLD, 128 * 1024)) and bool(mallopt(_M_ARENA_MAX, 2))
