"""A rubric for the chat role's replies to short personal messages, checkable by a program.

Each check returns a failure kind or nothing. The rubric cannot judge warmth; it catches the
failures a small model actually makes: empty replies, the wrong language, echoing the message
or the sentiment tag, refusals, lecture-style lists and markdown, replies far too short or long,
and a tone at odds with the news (congratulations on bad news, condolences on good news).
"""

from __future__ import annotations

import re
from difflib import SequenceMatcher

from ..roles.language import LATIN_WORD
from ..roles.language import detect_language as reply_language

REFUSALS = [
    "抱歉，我无法", "抱歉,我无法", "我无法协助", "我不能协助", "无法完成这个请求", "作为一个ai", "作为一个人工智能",
    "i can't assist", "i cannot assist", "i can't help with", "i cannot help with", "i'm unable to",
    "i am unable to", "as an ai", "i'm sorry, but i can't", "i'm sorry, but i cannot",
]
CONGRATULATIONS = ["恭喜", "祝贺", "太棒了", "真棒", "好消息", "令人兴奋", "congratulations", "congrats", "well done",
                   "that's amazing", "that's great", "great news", "awesome", "wonderful news"]
CONDOLENCES = ["遗憾", "难过", "节哀", "抱歉听到", "很抱歉", "心疼", "sorry to hear", "so sorry", "condolence",
               "that's tough", "that must be hard"]
_LIST_LINE = re.compile(r"^\s*(?:\d+[.、)]|[-*•]\s)", re.M)
_MARKDOWN = re.compile(r"\*\*|```|^\s*#{1,6}\s", re.M)

LENGTH = {"zh": (10, 200), "en": (8, 120)}  # zh: characters; en: words


def reply_length(text: str, lang: str) -> int:
    if lang == "zh":
        return len(re.sub(r"\s", "", text))
    return len(LATIN_WORD.findall(text))


def check_reply(message: str, reply: str, lang: str, sentiment: str) -> list[str]:
    """Failure kinds for one reply (empty list = pass)."""
    text = reply.strip()
    if not text:
        return ["empty"]
    failures = []
    if reply_language(text) != lang:
        failures.append("language")
    lowered = text.lower()
    if "情感标签" in text or "[sentiment" in lowered:
        failures.append("tag_echo")
    similarity = SequenceMatcher(None, message.strip(), text).ratio()
    if message.strip() in text or similarity > 0.7:
        failures.append("echo")
    if any(r in lowered for r in REFUSALS):
        failures.append("refusal")
    if len(_LIST_LINE.findall(text)) >= 2 or _MARKDOWN.search(text):
        failures.append("list_or_markdown")
    low, high = LENGTH[lang]
    if not low <= reply_length(text, lang) <= high:
        failures.append("length")
    if sentiment == "negative" and any(w in lowered for w in CONGRATULATIONS):
        failures.append("tone")
    elif sentiment == "positive" and any(w in lowered for w in CONDOLENCES):
        failures.append("tone")
    return failures
