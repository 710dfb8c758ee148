"""Accuracy, per-group accuracy, confusion matrix, latency percentiles."""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import numpy as np

from ..roles.prompts import LABELS


def percentile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def summarize(items: Sequence[dict], predictions: Sequence[str], latencies_ms: Sequence[float]) -> dict:
    correct = [p == item["label"] for item, p in zip(items, predictions)]

    def grouped(key: str) -> dict:
        groups: dict[str, list[bool]] = defaultdict(list)
        for item, ok in zip(items, correct):
            groups[str(item.get(key, "?"))].append(ok)
        return {k: {"n": len(v), "accuracy": sum(v) / len(v)} for k, v in sorted(groups.items())}

    confusion = {gold: {pred: 0 for pred in LABELS} for gold in LABELS}
    for item, p in zip(items, predictions):
        confusion[item["label"]][p] += 1
    return {
        "n": len(items),
        "accuracy": sum(correct) / len(correct) if correct else None,
        "by_lang": grouped("lang"),
        "by_source": grouped("source"),
        "confusion": confusion,  # confusion[gold][predicted]
        "latency_ms": {"p50": percentile(latencies_ms, 50), "p95": percentile(latencies_ms, 95),
                       "mean": float(np.mean(latencies_ms)) if len(latencies_ms) else None},
    }


def format_report(report: dict) -> str:
    lines = [f"n = {report['n']}   accuracy = {report['accuracy']:.3f}   "
             f"latency p50 = {report['latency_ms']['p50']:.0f} ms, p95 = {report['latency_ms']['p95']:.0f} ms"]
    for key in ("by_lang", "by_source"):
        lines.append(f"{key[3:]}:")
        for name, g in report[key].items():
            lines.append(f"  {name:<36} n={g['n']:<4} accuracy={g['accuracy']:.3f}")
    lines.append("confusion (rows = gold, columns = predicted):")
    lines.append("  " + " " * 10 + "".join(f"{p:>10}" for p in LABELS))
    for gold in LABELS:
        lines.append(f"  {gold:<10}" + "".join(f"{report['confusion'][gold][p]:>10}" for p in LABELS))
    return "\n".join(lines)
