"""allinone/machine.py: the allocator setting every command starts with."""

from __future__ import annotations

import subprocess
import sys

import pytest

FREED_BLOCKS_STAY = """
import sys
from allinone.machine import rss_mb, settle_malloc
if sys.argv[1] == "settled":
    assert settle_malloc()
block = bytearray(8 << 20)
del block  # glibc's default now serves blocks below 8 MiB from the heap, and keeps them once freed
base = rss_mb()
blocks = [bytearray(4 << 20) for _ in range(3)]
del blocks
print(rss_mb() - base)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator and /proc")
def test_settled_malloc_gives_freed_large_blocks_back():
    def kept(mode: str) -> float:
        out = subprocess.run(
            [sys.executable, "-c", FREED_BLOCKS_STAY, mode], capture_output=True, text=True, check=True
        )
        return float(out.stdout)

    assert kept("default") > 8  # the 12 MiB stay resident: what settle_malloc is for
    assert kept("settled") < 2
