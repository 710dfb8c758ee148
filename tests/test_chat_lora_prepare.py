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


def test_a_conversation_becomes_one_pair_per_turn_with_its_history_in_one_split(tmp_path, monkeypatch):
    turns = [
        {
            "message": "My dog ate a sock this morning.",
            "sentiment": "negative",
            "reply": "Oh no, poor pup! Is he okay?",
        },
        {
            "message": "The vet says he'll be fine.",
            "sentiment": "positive",
            "reply": "What a relief, no more sock adventures for him I hope!",
        },
    ]
    rows = [{"id": f"c{i}", "lang": "en", "turns": turns} for i in range(40)]
    rows.append(pair(1, "en", "positive", "I got the job!", "Congratulations, that is wonderful news!"))
    out = run_prepare(tmp_path, rows, monkeypatch)
    by_id = {r["id"]: r for r in out}
    assert by_id["c0-t1"]["history"] == [] and by_id["c0-t2"]["history"] == [turns[0]]
    assert by_id["c0-t2"]["message"] == turns[1]["message"] and by_id["c0-t2"]["sentiment"] == "positive"
    for i in range(40):
        assert by_id[f"c{i}-t1"]["split"] == by_id[f"c{i}-t2"]["split"]  # a conversation is never split
    assert {r["split"] for r in out if "conversation" in r} == {"train", "heldout"}
    assert "history" not in by_id["p1"]


def test_a_broken_conversation_row_is_named(tmp_path, monkeypatch):
    import pytest

    rows = [{"id": "c0", "lang": "en", "turns": [{"message": "hi", "sentiment": "positive"}]}]
    with pytest.raises(SystemExit, match="line 1: a conversation needs"):
        run_prepare(tmp_path, rows, monkeypatch)


def test_capture_puts_a_later_turns_history_in_its_prompt():
    spec = importlib.util.spec_from_file_location("capture", TOOL.with_name("capture.py"))
    capture = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(capture)
    from allinone.service import Assistant
    from allinone.settings import Settings
    from tests.fake_engine import FakeEngine

    chat = Assistant(engine=FakeEngine(n_ctx=4096), settings=Settings()).chat
    first = {"message": "我家猫吃了袜子", "sentiment": "negative", "reply": "天哪，它还好吗？"}
    row = {"id": "c-t2", "message": "医生说没事了", "tag": "positive", "reply": "太好了，小家伙虚惊一场！"}
    alone, start_alone, target = capture.example_tokens(chat, row)
    later, start_later, same_target = capture.example_tokens(chat, {**row, "history": [first]})
    assert same_target == target and later[start_later:] == alone[start_alone:]
    prompt = chat.engine.detokenize(later[:start_later])
    assert first["message"] in prompt and first["reply"] in prompt and row["message"] in prompt
    assert prompt.index(first["reply"]) < prompt.index(row["message"])
