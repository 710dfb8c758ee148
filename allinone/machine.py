"""Facts about the machine this process runs on (standard library only: every layer may use it)."""

from __future__ import annotations

import os


def default_threads() -> int:
    """One thread per core this process may run on: the matrix kernels are compute bound, so more
    threads than cores only adds contention."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
