"""eval-chat: reply to messages (each a new conversation) or to scripted conversations, and check
every reply against the chat rubric. The CLI prints what these functions return."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from difflib import SequenceMatcher
from pathlib import Path

from ..conversation.history import Conversation
from .chat_rubric import check_reply
from .data import DataError, read_jsonl
from .metrics import percentile

LANGS = ("zh", "en")
SENTIMENTS = ("positive", "negative")
# The scripted three-turn conversations that ship with the package (written for it; none comes
# from a data set).
DEFAULT_CONVERSATIONS = Path(__file__).with_name("chat-turns.jsonl")
# A reply this similar to an earlier reply of the same conversation says the same thing again.
SAME_REPLY = 0.6


def load_messages(path: str | Path) -> list[dict]:
    items = [obj for _, obj in read_jsonl(path, field="message")]
    for number, item in enumerate(items, start=1):
        if item.get("lang") not in LANGS or item.get("sentiment") not in SENTIMENTS:
            raise DataError(f"{path} item {number}: needs lang zh|en and sentiment positive|negative")
    return items


def load_conversations(path: str | Path) -> list[dict]:
    """Lines {"id", "lang", "turns": [{"message", "sentiment", "expect_any"?: [words]}, ...]}."""
    conversations = []
    for number, obj in read_jsonl(path, field="id"):
        turns = obj.get("turns")
        if obj.get("lang") not in LANGS or not isinstance(turns, list) or len(turns) < 2:
            raise DataError(f"{path} line {number}: needs lang zh|en and a list of at least two turns")
        for turn in turns:
            if (
                not isinstance(turn, dict)
                or not isinstance(turn.get("message"), str)
                or turn.get("sentiment") not in SENTIMENTS
                or not isinstance(turn.get("expect_any", []), list)
            ):
                raise DataError(
                    f"{path} line {number}: each turn needs a message, a sentiment positive|negative "
                    "and optionally expect_any, a list of words"
                )
        conversations.append(obj)
    return conversations


def _timed_reply(assistant, conversation: Conversation, message: str) -> dict:
    """Reply to `message` in `conversation`; both times from the message's arrival (with a shared
    prefill the first token comes sooner but the sentiment later than with two passes, so neither
    alone compares)."""
    start = time.perf_counter()
    response = assistant.respond(conversation, message)
    sentiment_ms = (time.perf_counter() - start) * 1000
    deltas = iter(response)
    first = next(deltas, "")
    first_token_ms = (time.perf_counter() - start) * 1000
    reply = first + "".join(deltas)
    return {
        "reply": reply,
        "detected": response.sentiment.label,
        "sentiment_ms": round(sentiment_ms, 1),
        "time_to_first_token_ms": round(first_token_ms, 1),
    }


def _rates(rows: list[dict]) -> dict:
    """Pass rate, overall and per language, and the share of replies with each failure kind."""
    n = len(rows)
    by_lang = {
        lang: sum(not r["failures"] for r in rows if r["lang"] == lang) / max(1, sum(r["lang"] == lang for r in rows))
        for lang in LANGS
    }
    counts = Counter(kind for r in rows for kind in r["failures"])
    return {
        "n": n,
        "pass_rate": sum(not r["failures"] for r in rows) / max(1, n),
        "pass_rate_by_lang": by_lang,
        "failures": dict(counts.most_common()),
        "failure_share": {kind: round(count / max(1, n), 4) for kind, count in counts.most_common()},
        "failures_by_lang": {
            lang: dict(Counter(k for r in rows if r["lang"] == lang for k in r["failures"])) for lang in LANGS
        },
    }


def evaluate_messages(
    assistant, items: list[dict], progress: Callable[[int], None] = lambda n: None
) -> tuple[dict, list[dict]]:
    rows = []
    for item in items:
        result = _timed_reply(assistant, Conversation(), item["message"])
        failures = check_reply(item["message"], result["reply"], item["lang"], item["sentiment"])
        rows.append({**item, **result, "failures": failures})
        progress(1)
    report = {
        **_rates(rows),
        "chat_prompt": assistant.settings.chat_prompt,
        "chat_adapter": assistant.chat.adapter.path.name if assistant.chat.adapter else None,
        "sentiment_accuracy": sum(r["detected"] == r["sentiment"] for r in rows) / max(1, len(rows)),
        "shared_prefill": assistant.chat_head is not None,
        "sentiment_ms": {
            "p50": percentile([r["sentiment_ms"] for r in rows], 50),
            "p95": percentile([r["sentiment_ms"] for r in rows], 95),
        },
        "time_to_first_token_ms": {
            "p50": percentile([r["time_to_first_token_ms"] for r in rows], 50),
            "p95": percentile([r["time_to_first_token_ms"] for r in rows], 95),
        },
    }
    return report, rows


def follows_conversation(reply: str, earlier_replies: list[str], expect_any: list[str]) -> list[str]:
    """Failure kinds of a reply later in a conversation: it says an earlier reply again
    (`repeats_earlier`), or it shows no sign of what the conversation is about (`lost_thread`:
    none of the turn's expected words, chosen so that the message alone does not contain them)."""
    failures = []
    if any(SequenceMatcher(None, earlier, reply).ratio() > SAME_REPLY for earlier in earlier_replies):
        failures.append("repeats_earlier")
    lowered = reply.lower()
    if expect_any and not any(word.lower() in lowered for word in expect_any):
        failures.append("lost_thread")
    return failures


def evaluate_conversations(
    assistant, conversations: list[dict], progress: Callable[[int], None] = lambda n: None
) -> tuple[dict, list[dict]]:
    """Each scripted conversation in one session, turn after turn: every reply is checked by the
    rubric, and the later ones also for following the conversation."""
    rows = []
    for script in conversations:
        conversation = Conversation()
        earlier: list[str] = []
        for number, turn in enumerate(script["turns"], start=1):
            result = _timed_reply(assistant, conversation, turn["message"])
            failures = check_reply(turn["message"], result["reply"], script["lang"], turn["sentiment"])
            if number > 1:
                failures += follows_conversation(result["reply"], earlier, turn.get("expect_any", []))
            earlier.append(result["reply"])
            rows.append(
                {
                    "id": script["id"],
                    "turn": number,
                    "lang": script["lang"],
                    "message": turn["message"],
                    "sentiment": turn["sentiment"],
                    **result,
                    "failures": failures,
                }
            )
            progress(1)
    by_turn = {
        str(n): sum(not r["failures"] for r in rows if r["turn"] == n) / max(1, sum(r["turn"] == n for r in rows))
        for n in sorted({r["turn"] for r in rows})
    }
    whole = [all(not r["failures"] for r in rows if r["id"] == s["id"]) for s in conversations]
    report = {
        **_rates(rows),
        "conversations": len(conversations),
        "pass_rate_by_turn": by_turn,
        "conversations_passing": sum(whole) / max(1, len(whole)),
        "chat_prompt": assistant.settings.chat_prompt,
        "chat_adapter": assistant.chat.adapter.path.name if assistant.chat.adapter else None,
    }
    return report, rows
