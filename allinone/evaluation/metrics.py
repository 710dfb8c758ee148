"""Accuracy, per-group accuracy, confusion matrix, latency percentiles."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np


def percentile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def macro_f1(gold: Sequence[str], predicted: Sequence[str]) -> float:
    """F1 per gold label, averaged: every label counts alike, however rare."""
    scores = []
    for label in sorted(set(gold)):
        tp = sum(1 for g, p in zip(gold, predicted, strict=True) if g == label and p == label)
        fp = sum(1 for g, p in zip(gold, predicted, strict=True) if g != label and p == label)
        fn = sum(1 for g, p in zip(gold, predicted, strict=True) if g == label and p != label)
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return float(np.mean(scores)) if scores else 0.0


def summarize(items: Sequence[dict], predictions: Sequence[str], latencies_ms: Sequence[float]) -> dict:
    correct = [p == item["label"] for item, p in zip(items, predictions, strict=True)]

    def grouped(key: str) -> dict:
        groups: dict[str, list[int]] = defaultdict(list)
        for i, item in enumerate(items):
            groups[str(item.get(key, "?"))].append(i)
        return {
            name: {
                "n": len(members),
                "accuracy": sum(correct[i] for i in members) / len(members),
                "macro_f1": macro_f1([items[i]["label"] for i in members], [predictions[i] for i in members]),
            }
            for name, members in sorted(groups.items())
        }

    labels = list(dict.fromkeys([item["label"] for item in items] + list(predictions)))
    confusion = {gold: {pred: 0 for pred in labels} for gold in labels}
    for item, p in zip(items, predictions, strict=True):
        confusion[item["label"]][p] += 1
    return {
        "n": len(items),
        "accuracy": sum(correct) / len(correct) if correct else None,
        "macro_f1": macro_f1([item["label"] for item in items], predictions),
        "by_lang": grouped("lang"),
        "by_source": grouped("source"),
        "confusion": confusion,  # confusion[gold][predicted]
        "latency_ms": {
            "p50": percentile(latencies_ms, 50),
            "p95": percentile(latencies_ms, 95),
            "mean": float(np.mean(latencies_ms)) if len(latencies_ms) else None,
        },
    }


def format_report(report: dict) -> str:
    lines = [
        f"n = {report['n']}   accuracy = {report['accuracy']:.3f}   "
        f"latency p50 = {report['latency_ms']['p50']:.0f} ms, p95 = {report['latency_ms']['p95']:.0f} ms"
    ]
    for key in ("by_lang", "by_source"):
        lines.append(f"{key[3:]}:")
        for name, g in report[key].items():
            lines.append(f"  {name:<36} n={g['n']:<4} accuracy={g['accuracy']:.3f}")
    labels = list(report["confusion"])
    if len(labels) > 8:  # a wide matrix helps nobody on a terminal; --json has it
        return "\n".join(lines)
    lines.append("confusion (rows = gold, columns = predicted):")
    lines.append("  " + " " * 10 + "".join(f"{p:>10}" for p in labels))
    for gold in labels:
        lines.append(f"  {gold:<10}" + "".join(f"{report['confusion'][gold][p]:>10}" for p in labels))
    return "\n".join(lines)


def calibration(probabilities: Sequence[float], correct: Sequence[bool], bins: int = 10) -> dict:
    """Expected calibration error over equal-width bins of the reported probability of the chosen
    label (which is >= 0.5, so the lower bins stay empty), and the per-bin table behind it."""
    p = np.asarray(probabilities, dtype=float)
    ok = np.asarray(correct, dtype=float)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        members = index == b
        if members.any():
            confidence, accuracy = float(p[members].mean()), float(ok[members].mean())
            ece += members.mean() * abs(confidence - accuracy)
            table.append(
                {
                    "low": float(edges[b]),
                    "high": float(edges[b + 1]),
                    "n": int(members.sum()),
                    "confidence": confidence,
                    "accuracy": accuracy,
                }
            )
    return {"ece": float(ece), "bins": table}


def draw_latencies(methods: dict, path: str, title: str = "") -> None:
    """One bar per method: median latency, with the p95 as a whisker (log scale: the methods
    span two orders of magnitude)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(methods)
    p50 = [methods[n]["latency_ms"]["p50"] for n in names]
    p95 = [methods[n]["latency_ms"]["p95"] for n in names]
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(names) + 1.5))
    ax.barh(
        names,
        p50,
        xerr=[[0] * len(names), [b - a for a, b in zip(p50, p95, strict=True)]],
        color="C0",
        alpha=0.7,
        error_kw={"ecolor": "grey", "capsize": 3},
    )
    for i, (name, value) in enumerate(zip(names, p50, strict=True)):
        accuracy = methods[name].get("accuracy")
        label = f"{value:.0f} ms ({value / p50[0]:.1f}x)" + (f", acc {accuracy:.2f}" if accuracy is not None else "")
        ax.annotate(label, (value, i), xytext=(4, -10), textcoords="offset points", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlim(min(p50) / 1.5, max(p95) * 3)  # room for the labels
    ax.invert_yaxis()
    ax.set_xlabel("sentiment latency per text, median (whisker: p95), ms")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def draw_reliability(calib: dict, path: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0.5, 1], [0.5, 1], "--", color="grey", label="perfect calibration")
    centres = [b["confidence"] for b in calib["bins"]]
    ax.bar(
        [(b["low"] + b["high"]) / 2 for b in calib["bins"]],
        [b["accuracy"] for b in calib["bins"]],
        width=0.09,
        alpha=0.6,
        label="observed accuracy",
    )
    ax.plot(centres, [b["accuracy"] for b in calib["bins"]], "o-", color="C1", label="bin mean confidence")
    for b in calib["bins"]:
        ax.annotate(str(b["n"]), ((b["low"] + b["high"]) / 2, b["accuracy"]), ha="center", va="bottom", fontsize=8)
    ax.set_xlim(0.45, 1.0)
    ax.set_ylim(0.0, 1.05)
    ax.set_xlabel("reported probability of the label")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title}\nECE {calib['ece']:.3f}", fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
