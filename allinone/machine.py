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
