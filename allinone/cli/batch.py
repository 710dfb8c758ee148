"""`allinone batch`: label every text of a JSONL file, resumably.

Output lines are written in input order and flushed one by one. On a re-run, the complete lines
already in the output are checked against the input (same id and text, in order), a line cut
short by an interruption is dropped, and work resumes after the last complete line: nothing is
duplicated, nothing lost.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from ..evaluation.data import DataError, read_jsonl
from ..roles.inputs import InputError


def _same_item(done: dict, item: dict) -> bool:
    if "id" in item and done.get("id") != item["id"]:
        return False
    return done.get("text") == item["text"]


def completed_lines(out_path: Path, items: list[dict]) -> int:
    """Number of input items already answered in out_path; trims a torn last line."""
    if not out_path.exists():
        return 0
    data = out_path.read_bytes()
    end = data.rfind(b"\n") + 1  # everything after the last newline is a torn write
    if end < len(data):
        with open(out_path, "r+b") as f:
            f.truncate(end)
    lines = [line for line in data[:end].split(b"\n") if line.strip()]
    if len(lines) > len(items):
        raise DataError(
            f"{out_path} has {len(lines)} lines but the input only {len(items)}; "
            "it belongs to another input (delete it or choose another -o)"
        )
    for number, raw in enumerate(lines, start=1):
        try:
            done = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise DataError(
                f"{out_path} line {number}: not a line this command wrote; delete the file to start over"
            ) from None
        if not isinstance(done, dict) or not _same_item(done, items[number - 1]):
            raise DataError(
                f"{out_path} line {number} does not match input line {number}; "
                "it belongs to another input (delete it or choose another -o)"
            )
    return len(lines)


def read_batch_input(in_path: Path) -> list[dict]:
    """The whole input, validated before any work (a bad line fails fast, naming the line)."""
    return [obj for _, obj in read_jsonl(in_path)]


def sentiment_fields(result) -> dict:
    """What a line gets from the sentiment alone: its label and probability."""
    fields = {"label": result.label, "probability": round(result.probability, 6)}
    if result.truncated:
        fields["truncated"] = True
    return fields


def roles_fields(results: dict) -> dict:
    """What a line gets from several roles, under `roles`: a choice role's label and probability,
    an extract role's phrases."""

    def shown(answer) -> dict:
        if hasattr(answer, "phrases"):
            return {"phrases": answer.phrases}
        return {"label": answer.label, "probability": round(answer.probability, 6)}

    fields = {"roles": {name: shown(answer) for name, answer in results.items()}}
    if any(c.truncated for c in results.values()):
        fields["truncated"] = True
    return fields


def labelled_row(item: dict, analyze: Callable[[str], object], fields: Callable[[object], dict]) -> dict:
    """An input line with its answer: the input's fields kept, the answer's added."""
    row = dict(item)
    if "label" in row:
        # Keep a label the input already had (often the gold one) instead of overwriting it.
        row["input_label"] = row.pop("label")
    try:
        result = analyze(item["text"])
    except InputError as err:
        # One unusable text (e.g. over the length cap) must not sink a long job.
        row["error"] = str(err)
    else:
        row.update(fields(result))
    return row


def run_batch(
    items: list[dict],
    out_path: Path,
    label_all: Callable[[list[dict]], Iterator[dict]],
    *,
    progress_factory=None,
) -> dict:
    """Answer the items not yet in out_path, writing each line as soon as it and every line before
    it are known. `label_all(todo)` yields the answered lines in input order: here, one by one, by
    an AssistantLabeller's function; on Ray, from its actors."""
    skip = completed_lines(out_path, items)
    todo = items[skip:]
    bar = progress_factory(total=len(items), initial=skip) if progress_factory else None
    written = 0
    rows = label_all(todo)
    with open(out_path, "a", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
            out.flush()
            written += 1
            if bar:
                bar.update(1)
        os.fsync(out.fileno())
    if bar:
        bar.close()
    return {"total": len(items), "skipped": skip, "written": written}


class AssistantLabeller:
    """How a line is answered, as a recipe that travels to Ray actors (settings and roles only:
    each actor loads its own model with `threads` threads)."""

    def __init__(self, settings, roles: list | None):
        self.settings, self.roles = settings, roles

    def __call__(self, threads: int | None = None, *, load=None) -> Callable[[dict], dict]:
        """item -> answered line, on a model loaded here by `load(settings)` (default
        Assistant.load)."""
        if load is None:
            from ..service import Assistant

            load = Assistant.load
        assistant = load(self.settings if threads is None else self.settings.model_copy(update={"threads": threads}))
        if self.roles:
            roles = self.roles
            return lambda item: labelled_row(item, lambda text: assistant.analyze_roles(text, roles), roles_fields)
        return lambda item: labelled_row(item, assistant.analyze, sentiment_fields)
