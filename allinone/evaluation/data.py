"""Reading JSONL files of texts, with errors that name the line."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path


class DataError(ValueError):
    pass


def read_jsonl(
    path: str | Path,
    *,
    labels: Sequence[str] | None = None,
    field: str = "text",
    alias: str | None = None,
    label_map: Mapping[str, str | None] | None = None,
) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for every non-blank line; raise DataError naming a bad line.
    With `labels`, every line needs a 'label' among them. A line without `field` may carry it as
    `alias` (and its label as 'sentiment', the chat files' name for it); the object then gets both
    under the usual names. With `labels`, `label_map` renames a label that is not among them before
    that check (see parse_label_map); a line whose label maps to None is skipped."""
    path = Path(path)
    try:
        handle = open(path, "rb")
    except OSError as err:
        raise DataError(f"{path}: {err.strerror}") from None
    with handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{path} line {number}: not valid UTF-8 (byte {err.start})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path} line {number}: invalid JSON: {err.msg} at column {err.colno}") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path} line {number}: expected a JSON object, got {type(obj).__name__}")
            if alias and field not in obj and alias in obj:
                obj[field] = obj[alias]
                if "label" not in obj and "sentiment" in obj:
                    obj["label"] = obj["sentiment"]
            text = obj.get(field)
            if not isinstance(text, str) or not text.strip():
                also = f" (or '{alias}')" if alias else ""
                raise DataError(f"{path} line {number}: needs a non-empty string field '{field}'{also}")
            if labels is not None:
                label = obj.get("label")
                if isinstance(label, str) and label not in labels:
                    # Labels are matched as written; a capitalised or padded one is forgiven.
                    label = next((name for name in labels if name.lower() == label.strip().lower()), label)
                if label_map and isinstance(label, str) and label not in labels:
                    label = label_map.get(label, label_map.get("*", label))
                    if label is None:
                        continue
                if label not in labels:
                    shown = ", ".join(labels[:12]) + (", ..." if len(labels) > 12 else "")
                    raise DataError(f"{path} line {number}: 'label' must be one of {shown}, got {obj.get('label')!r}")
                obj["label"] = label
            yield number, obj


def load_labelled(
    *paths: str | Path, labels: Sequence[str], label_map: Mapping[str, str | None] | None = None
) -> list[dict]:
    """Labelled texts from one or more files, each label one of `labels` (after `label_map`):
    `text` and `label`, or a chat file's `message` and `sentiment` (chat-real-*.jsonl), so that a
    head can learn from messages written to a listener."""
    return [obj for path in paths for _, obj in read_jsonl(path, labels=labels, alias="message", label_map=label_map)]


def parse_label_map(spec: str, labels: Sequence[str]) -> dict[str, str | None]:
    """`joy=positive,sadness=negative,*=-`: a data file's label -> one of the role's `labels`, or
    `-` to leave its lines out; `*` stands for every other label that is not the role's. Lets a
    head learn from a file labelled for another task (emotion-train.jsonl for the mood)."""
    mapping: dict[str, str | None] = {}
    for entry in spec.split(","):
        if not entry.strip():
            continue
        source, sep, target = (part.strip() for part in entry.partition("="))
        if not sep or not source or not target:
            raise DataError(f"label map entry {entry.strip()!r}: expected FROM=TO (TO a label, or - to leave out)")
        if target != "-" and target not in labels:
            raise DataError(f"label map entry {entry.strip()!r}: {target!r} is not one of {', '.join(labels)}")
        if source in mapping:
            raise DataError(f"label map: {source!r} is mapped twice")
        mapping[source] = None if target == "-" else target
    if not mapping:
        raise DataError("label map is empty")
    return mapping


def load_phrased(*paths: str | Path) -> list[dict]:
    """Texts with their key phrases (an extract role's data, keywords-*.jsonl): `text` and
    `keywords` (a list of strings; `present_keywords`, the ones in the text, when the file gives
    them), optional `id` (else file:line) and `lang` (else detected)."""
    from ..roles.language import detect_language

    rows = []
    for path in paths:
        for number, obj in read_jsonl(path):
            keywords = obj.get("keywords", obj.get("phrases"))
            if not isinstance(keywords, list) or not all(isinstance(k, str) for k in keywords):
                raise DataError(f"{path} line {number}: needs 'keywords', a list of strings")
            present = obj.get("present_keywords")
            if present is not None and (not isinstance(present, list) or not all(isinstance(k, str) for k in present)):
                raise DataError(f"{path} line {number}: 'present_keywords' must be a list of strings")
            lang = obj.get("lang") or ("zh" if detect_language(obj["text"]) == "zh" else "en")
            if lang not in ("zh", "en"):
                raise DataError(f"{path} line {number}: 'lang' must be zh or en, got {lang!r}")
            rows.append(
                {
                    "id": str(obj.get("id", f"{Path(path).name}:{number}")),
                    "text": obj["text"],
                    "keywords": keywords,
                    "present_keywords": present,
                    "lang": lang,
                }
            )
    return rows
