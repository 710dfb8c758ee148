"""Label sets from a manifest: each source of a data file has its own labels (the format of
../shared/data/intent-labels.json: source -> ordered [{"label", "description"}, ...]). Every source
becomes a choice role made from its labels and their descriptions; a row is scored against its own
source's role, zero-shot by the role's prompt or by a head trained on a file of the same sources.

Heads trained here are cached by content (model, reading point, role, training rows), so a second
run over the same files trains nothing.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ..roles.definition import RoleDefinition, RoleError, parse_role
from ..roles.head import HEAD_FORMAT, ChoiceHead, train_head
from .data import DataError, read_jsonl
from .metrics import summarize

INSTRUCTION = {
    "zh": "这段文字属于下面哪一类?根据每类的说明,选最贴切的一个。",
    "en": "Which of the labels below fits the text best? Read each label's description and choose one.",
}


def load_manifest(path: str | Path) -> dict[str, RoleDefinition]:
    """source -> its choice role; errors name the file and the source."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: {err}") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: invalid JSON: {err.msg} at line {err.lineno} column {err.colno}") from None
    if not isinstance(data, dict) or not data:
        raise DataError(f"{path}: expected an object of source -> label list")
    roles = {}
    for source, entries in data.items():
        if not isinstance(entries, list):
            raise DataError(f"{path}: {source}: expected a list of labels")
        labels = []
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or not isinstance(entry.get("label"), str):
                raise DataError(f"{path}: {source}[{i}]: expected {{'label': ..., 'description': ...}}")
            labels.append({"name": entry["label"], "description": str(entry.get("description", ""))})
        slug = re.sub(r"[^a-z0-9_-]+", "-", source.lower()).strip("-_")
        name = (slug if slug[:1].isalpha() else f"s-{slug}")[:40] or "source"
        definition = {
            "name": name,
            "kind": "choice",
            "description": f"labels of {source} from {path.name}",
            "instruction": INSTRUCTION,
            "labels": labels,
        }
        try:
            roles[source] = parse_role(definition, source=f"{path} ({source})")
        except RoleError as err:
            raise DataError(str(err)) from None
    return roles


def load_rows(path: str | Path, roles: dict[str, RoleDefinition]) -> list[dict]:
    """Rows with text, label and a source the manifest knows; the label must be one of its labels."""
    rows = []
    for number, obj in read_jsonl(path):
        source = obj.get("source")
        if source not in roles:
            raise DataError(f"{path} line {number}: source {source!r} is not in the label manifest")
        if obj.get("label") not in roles[source].label_names:
            raise DataError(f"{path} line {number}: label {obj.get('label')!r} is not one of {source}'s labels")
        rows.append(obj)
    return rows


POOLING = "last+mean"


def cache_key(model_sha: str, point: str, layers: int, role: RoleDefinition, rows: Sequence[dict]) -> str:
    digest = hashlib.sha256()
    parts = (model_sha, point, str(layers), POOLING, "with n-grams", role.fingerprint(), f"head format {HEAD_FORMAT}")
    for part in parts:
        digest.update(part.encode() + b"\0")
    for row in rows:
        digest.update(row["text"].encode() + b"\0" + row["label"].encode() + b"\0")
    return digest.hexdigest()[:24]


def heads_for_sources(
    assistant,
    roles: dict[str, RoleDefinition],
    train_rows: Sequence[dict],
    progress: Callable[[int], None] | None = None,
    announce: Callable[[str], None] | None = None,
) -> dict[str, ChoiceHead]:
    """A head per source on the analysis pass, trained on that source's rows (or found in the
    cache, <home>/heads/cache/<key>/)."""
    if assistant.head is None:
        raise DataError("heads read the analysis pass, which needs the sentiment head (--sentiment-head true)")
    sha = assistant.model_sha256()
    if sha is None:
        raise DataError("a head is keyed by the model file's sha256: train it on a GGUF model")
    point = assistant.analysis_point()
    layers = assistant.head.layers
    by_source: dict[str, list[dict]] = defaultdict(list)
    for row in train_rows:
        by_source[row["source"]].append(row)
    heads = {}
    for source, rows in by_source.items():
        role = roles[source]
        directory = assistant.head_directory() / "cache" / cache_key(sha, point.key, layers, role, rows)
        head = ChoiceHead.find(sha, point.key, directory, role.name, role.label_names)
        if head is None or head.info.get("source") != source:
            if announce:
                announce(f"training a head for {source} ({len(rows)} texts, {len(role.labels)} labels)")
            head, _ = train_head(
                point,
                [row["text"] for row in rows],
                [row["label"] for row in rows],
                role.label_names,
                role=role.name,
                model_sha256=sha,
                layers=layers,
                holdout=0.1,
                progress=progress,
                source=source,
                pooling=POOLING,
                ngrams=True,
            )
            head.save(directory)
        elif progress:
            progress(len(rows))
        heads[source] = head
    return heads


def report(rows: Sequence[dict], predicted: Sequence[str], latencies: Sequence[float]) -> dict:
    """evaluation.metrics.summarize, with the label sets' own overall macro F1 (labels of different
    sources are different classes: per source, then averaged) and no confusion matrix (it would mix
    the sources' labels)."""
    result = summarize(rows, predicted, latencies)
    del result["confusion"]
    result["macro_f1"] = float(np.mean([g["macro_f1"] for g in result["by_source"].values()]))
    return result
