"""Side-by-side timing in one process, on the same texts and the same loaded model.

Timings on a shared 2-core machine drift; comparing two methods in the same run, alternating
them text by text, makes their ratio trustworthy even when absolute numbers move.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .metrics import percentile


@dataclass
class BaselineResult:
    """What a baseline gives per text: a label, no probability (it reads generated text)."""

    label: str
    probability: None = None


def label_from_generated(text: str) -> BaselineResult:
    """The original recipe's rule: positive when "Positive" appears in the generated text."""
    return BaselineResult(label="positive" if "Positive" in text else "negative")


def compare_methods(
    items: Sequence[dict],
    methods: dict[str, Callable[[str], object]],
    progress: Callable[[], None] | None = None,
    reset: Callable[[], None] | dict[str, Callable[[], None]] | None = None,
) -> dict:
    """Run every method on every text, alternating per text; latency and accuracy per method.

    `reset` runs (untimed) before each call: without it the second method would find the text
    already in the prefix cache, left there by the first, and look faster than it is. A dict
    gives each method its own reset (e.g. a peer server with its own cache)."""
    resets = reset if isinstance(reset, dict) else {name: reset for name in methods}
    latencies = {name: [] for name in methods}
    correct = {name: 0 for name in methods}
    for item in items:
        for name, method in methods.items():
            if resets.get(name):
                resets[name]()
            start = time.perf_counter()
            result = method(item["text"])
            latencies[name].append((time.perf_counter() - start) * 1000)
            correct[name] += result.label == item.get("label")
        if progress:
            progress()
    return {
        name: {
            "n": len(items),
            "accuracy": correct[name] / len(items) if items else None,
            "latency_ms": {"p50": percentile(latencies[name], 50), "p95": percentile(latencies[name], 95)},
        }
        for name in methods
    }
