"""tools/chat_lora/prepare.py: which training pairs the chat adapter learns from (no model needed)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parents[1] / "tools" / "chat_lora" / "prepare.py"


def run_prepare(tmp_path, rows, monkeypatch) -> list[dict]:
    data, out = tmp_path / "pairs.jsonl", tmp_path / "examples.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    spec = importlib.util.spec_from_file_location("prepare", TOOL)
    prepare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare)
    monkeypatch.setattr(sys, "argv", ["prepare.py", str(data), "-o", str(out)])
    prepare.main()
    return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]


def pair(i, lang, sentiment, message, reply):
    return {"id": f"p{i}", "lang": lang, "sentiment": sentiment, "message": message, "reply": reply}


def test_faulty_and_formulaic_replies_are_left_out_and_a_share_is_held_out(tmp_path, monkeypatch):
    rows = [
        pair(0, "en", "negative", "I lost my job today.", "I lost my job today and I am so sad about it."),  # as_user
        pair(
            1, "en", "negative", "My dog ran away.", "I'm so sorry. My dog ran away once too, it was awful."
        ),  # own story
        pair(2, "en", "negative", "I failed my exam.", "You should have studied harder for it, honestly."),  # blame
    ]
    rows += [
        pair(10 + i, "zh", "negative", f"我最近压力很大{i}。", f"我理解你的感受,压力大的时候真的很累{i}。")
        for i in range(12)
    ]  # one stock opening, twelve times
    rows += [
        pair(
            100 + i, "en", "positive", f"I passed test number {i}!", "That's wonderful news, well done on all the work!"
        )
        for i in range(40)
    ]
    out = run_prepare(tmp_path, rows, monkeypatch)
    ids = {r["id"] for r in out}
    assert not ids & {"p0", "p1", "p2"}
    assert sum(r["reply"].startswith("我理解你") for r in out) == 8
    assert {r["split"] for r in out} == {"train", "heldout"}
    assert sum(r["split"] == "heldout" for r in out) == round(40 * 0.05) + round(8 * 0.05)
    assert all(r["tag"] == r["sentiment"] for r in out if r["split"] == "heldout")
    assert all(r["tag"] in ("positive", "negative") for r in out)
