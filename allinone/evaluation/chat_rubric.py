"""A rubric for the chat role's replies to short personal messages, checkable by a program.

Each check returns a failure kind or nothing. The rubric cannot judge warmth; it catches the
failures a small model actually makes, each of them seen in real replies:

* empty, wrong language, the sentiment tag echoed, a refusal, a list or markdown, far too short
  or long;
* `echo`: the message handed back (whole, or nearly);
* `copy`: a long run of the message's own words inside the reply ("孩子总是不听话,我觉得自己是个
  失败的妈妈。你是不是…");
* `as_user`: the reply tells the user's event in the first person, as if it had happened to the
  assistant ("I'm glad I got the job offer", "我失业了");
* `blame`: blame or lecturing in answer to bad news ("you should have paid the rent", "你应该…");
* `repetition`: one phrase said twice in the reply;
* `tone`: the wrong feeling for the message: cheer for bad news, or dismay ("oh no", condolences)
  for good news.

The thresholds were set so that the human listeners' replies of the chat data sets mostly pass
(docs/chat.md has the rates); a check that flagged people would be judging style, not faults.
"""

from __future__ import annotations

import re
from difflib import SequenceMatcher

from ..roles.language import LATIN_WORD
from ..roles.language import detect_language as reply_language

REFUSALS = [
    "抱歉，我无法",
    "抱歉,我无法",
    "我无法协助",
    "我不能协助",
    "无法完成这个请求",
    "作为一个ai",
    "作为一个人工智能",
    "i can't assist",
    "i cannot assist",
    "i can't help with",
    "i cannot help with",
    "i'm unable to",
    "i am unable to",
    "as an ai",
    "i'm sorry, but i can't",
    "i'm sorry, but i cannot",
]
# Cheer that is wrong after bad news.
CONGRATULATIONS = [
    "恭喜",
    "祝贺",
    "太棒了",
    "真棒",
    "好消息",
    "令人兴奋",
    "为你高兴",
    "为你开心",
    "真开心",
    "congratulations",
    "congrats",
    "well done",
    "that's amazing",
    "that's great",
    "great news",
    "awesome",
    "wonderful news",
    "how exciting",
    "so happy for you",
    "good for you",
    "yay",
    "that is great",
    "that is awesome",
    "太开心",
    "好开心",
    "太好了",
]
# Dismay or condolence that is wrong after good news.
CONDOLENCES = [
    "遗憾",
    "难过",
    "节哀",
    "抱歉听到",
    "很抱歉",
    "心疼",
    "太糟糕",
    "真糟糕",
    "好可惜",
    "太可惜",
    "sorry to hear",
    "so sorry",
    "condolence",
    "that's tough",
    "that must be hard",
    "oh no",
    "that's awful",
    "that's terrible",
    "how awful",
    "how terrible",
    "what a shame",
    "that sucks",
    "that's sad",
    "so sad",
    "how sad",
]
# Blame or lecturing, wrong after bad news (a suggestion after good news is harmless).
BLAME_ZH = [
    "你应该",
    "你应当",
    "你必须",
    "你不应该",
    "你不该",
    "你本该",
    "你早该",
    "都怪你",
    "你的错",
    "怪你自己",
    "谁让你",
    "活该",
    "你为什么不",
    "你怎么不",
    "你要学会",
    "下次注意",
    "早知道",
]
BLAME_EN = re.compile(
    r"\byou (?:should|shouldn't|should not|ought to|need to|have to|had better)\b|\byou'd better\b"
    r"|\b(?:it's|it is|that's|that is) (?:all )?your (?:own )?fault\b|\bwhy didn't you\b|\byou deserved?\b"
    r"|\b(?:a |such a )?(?:big|huge|stupid|silly) mistake\b|\bshame on you\b|\bwhat were you thinking\b",
    re.I,
)
_LIST_LINE = re.compile(r"^\s*(?:\d+[.、)]|[-*•]\s)", re.M)
_MARKDOWN = re.compile(r"\*\*|```|^\s*#{1,6}\s", re.M)

LENGTH = {"zh": (10, 200), "en": (8, 120)}  # zh: characters; en: words
# Longest run of the message a reply may repeat: zh in characters (punctuation and spaces
# ignored), en in words. A short noun phrase ("拿到驾照", "your first job offer") is how people
# show they listened; a whole clause is a copy.
COPY_RUN = {"zh": 9, "en": 6}
# Shortest phrase whose second occurrence counts as repetition: zh characters, en words.
REPEAT_RUN = {"zh": 5, "en": 4}

_PUNCTUATION_OR_SPACE = re.compile(r"[\s\W_]+", re.U)
_CJK_CHAR = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff]")
_SENTENCE_ZH = re.compile(r"[^。!！?？\n]+[。!！?？]*")
_SENTENCE_EN = re.compile(r"[^.!?\n]+[.!?]*")
_CLAUSE_END_ZH = re.compile(r"[,，。!！?？;；:：、~～…\n]+")
_CLAUSE_END_EN = re.compile(r"[,.!?;:\n]+|\s(?:but|because|when|while|although)\s", re.I)

# First person in an English clause, and the words that make "I ..." the listener's own voice
# (sympathy, wishes, questions) rather than the user's story.
_FIRST_PERSON_EN = re.compile(r"\b(?:i|i'm|i've|i'd|i'll|im|ive|me|my|mine|myself|we|we're|we've|our|us)\b", re.I)
_SECOND_PERSON_EN = re.compile(r"\b(?:you|you're|you've|you'd|you'll|your|yours|yourself|u)\b", re.I)
_LISTENER_VERBS_EN = {
    "sorry",
    "glad",
    "happy",
    "hope",
    "hoping",
    "think",
    "thought",
    "know",
    "knew",
    "understand",
    "imagine",
    "bet",
    "wish",
    "feel",
    "felt",
    "love",
    "loved",
    "agree",
    "guess",
    "believe",
    "sure",
    "hear",
    "heard",
    "remember",
    "here",
    "proud",
    "excited",
    "thrilled",
    "wonder",
    "wondering",
    "can't",
    "cannot",
    "sad",
    "can",
    "would",
    "could",
    "am",
    "was",
    "be",
    "so",
    "really",
    "too",
    "also",
    "just",
    "a",
    "the",
}
_STOPWORDS_EN = {
    "the",
    "a",
    "an",
    "and",
    "or",
    "but",
    "to",
    "of",
    "in",
    "on",
    "at",
    "for",
    "with",
    "about",
    "from",
    "by",
    "is",
    "are",
    "was",
    "were",
    "be",
    "been",
    "am",
    "it",
    "its",
    "it's",
    "this",
    "that",
    "these",
    "those",
    "i",
    "i'm",
    "i've",
    "i'd",
    "i'll",
    "im",
    "ive",
    "me",
    "my",
    "mine",
    "we",
    "our",
    "us",
    "so",
    "very",
    "really",
    "just",
    "today",
    "yesterday",
    "finally",
    "got",
    "get",
    "have",
    "has",
    "had",
    "do",
    "did",
    "not",
    "no",
    "all",
    "up",
    "out",
    "some",
    "any",
    "what",
    "when",
    "how",
    "now",
    "then",
    "there",
    "they",
    "them",
    "their",
    "he",
    "she",
    "his",
    "her",
    "him",
    "one",
    "too",
    "also",
    "can",
    "could",
    "would",
    "will",
    "feel",
    "felt",
    "feeling",
    "happy",
    "sad",
    "glad",
    "sorry",
    "time",
    "day",
    "last",
    "first",
    "new",
    "like",
    "make",
    "made",
    "go",
    "went",
    "going",
    "know",
    "think",
    "much",
    "more",
    "because",
    "after",
    "before",
}
# Chinese listener words: a clause with 我 made of these is sympathy, not the user's story.
_LISTENER_WORDS_ZH = [
    "理解",
    "明白",
    "感受",
    "心疼",
    "难过",
    "开心",
    "高兴",
    "替你",
    "为你",
    "陪你",
    "陪着你",
    "希望",
    "相信",
    "觉得你",
    "听到",
    "听你",
    "知道",
    "想象",
    "能感",
    "感同身受",
    "支持",
]


def reply_length(text: str, lang: str) -> int:
    if lang == "zh":
        return len(re.sub(r"\s", "", text))
    return len(LATIN_WORD.findall(text))


def _words(text: str) -> list[str]:
    return [w.lower() for w in LATIN_WORD.findall(text)]


def _compact(text: str) -> str:
    """Lower-cased, without punctuation and spaces: what a character-run comparison should see."""
    return _PUNCTUATION_OR_SPACE.sub("", text.lower())


def longest_common_run(a: list | str, b: list | str) -> int:
    """Length of the longest run (of characters or words) that occurs in both."""
    if not a or not b:
        return 0
    match = SequenceMatcher(None, a, b, autojunk=False).find_longest_match(0, len(a), 0, len(b))
    return match.size


def copied_run(message: str, reply: str, lang: str) -> int:
    """The longest run of the message that the reply repeats (zh: characters, en: words)."""
    if lang == "zh":
        return longest_common_run(_compact(message), _compact(reply))
    return longest_common_run(_words(message), _words(reply))


def repeated_run(reply: str, lang: str) -> int:
    """The longest phrase said twice in the reply, not overlapping itself (zh: characters, en: words)."""
    units: list | str = _compact(reply) if lang == "zh" else _words(reply)
    best = 0
    # Grow the length while some phrase of that length occurs twice without overlap.
    length = 1
    while length <= len(units) // 2:
        seen: dict = {}
        found = False
        for start in range(len(units) - length + 1):
            key = tuple(units[start : start + length]) if not isinstance(units, str) else units[start : start + length]
            first = seen.setdefault(key, start)
            if start - first >= length:
                found = True
                break
        if not found:
            break
        best = length
        length += 1
    return best


def _content_words_en(text: str) -> set[str]:
    return {w for w in _words(text) if w not in _STOPWORDS_EN and len(w) > 2}


def speaks_as_user(message: str, reply: str, lang: str) -> bool:
    """Whether the reply tells the message's own story in the first person.

    English: a clause of the reply in the first person (I, my, we…) that does not address the
    user (no you/your) and carries two or more content words of the message that are not the
    listener's own words of sympathy ("I'm glad I got the job offer" - yes; "I'm so sorry about
    your father" - no: it addresses the user). Chinese: a clause with 我 and without 你 that
    repeats three or more characters of the message in a row and is not a listener's phrase
    ("我失业了,好难过" after "我失业了" - yes; "我能理解你有多难过" - no)."""
    if lang == "zh":
        for clause in _CLAUSE_END_ZH.split(reply.replace("自我", "自")):
            if "我" not in clause or "你" in clause or "您" in clause:
                continue
            if any(w in clause for w in _LISTENER_WORDS_ZH):
                continue
            if longest_common_run(_compact(message), _compact(clause)) >= 3:
                return True
        return False
    content = _content_words_en(message)
    for clause in _CLAUSE_END_EN.split(reply):
        if not clause or not _FIRST_PERSON_EN.search(clause) or _SECOND_PERSON_EN.search(clause):
            continue
        shared = _content_words_en(clause) & content
        if len(shared - _LISTENER_VERBS_EN) >= 2:
            return True
    return False


def blames(reply: str, lang: str) -> bool:
    """Blame or a lecture in a statement; a question ("Do you have to move?") is not one."""
    if lang == "zh":
        return any(
            w in sentence
            for sentence in _SENTENCE_ZH.findall(reply)
            if not sentence.endswith(("?", "？"))
            for w in BLAME_ZH
        )
    return any(
        BLAME_EN.search(sentence)
        for sentence in _SENTENCE_EN.findall(reply.replace("’", "'"))
        if not sentence.endswith("?")
    )


def check_reply(message: str, reply: str, lang: str, sentiment: str) -> list[str]:
    """Failure kinds for one reply (empty list = pass)."""
    text = reply.strip()
    if not text:
        return ["empty"]
    failures = []
    if reply_language(text) != lang:
        failures.append("language")
    lowered = text.lower().replace("’", "'")
    if "情感标签" in text or "[sentiment" in lowered or re.search(r"(?:情绪|mood)\s*[:：]", lowered):
        failures.append("tag_echo")
    similarity = SequenceMatcher(None, message.strip(), text).ratio()
    if message.strip() in text or similarity > 0.7:
        failures.append("echo")
    elif copied_run(message, text, lang) >= COPY_RUN[lang]:
        failures.append("copy")
    if speaks_as_user(message, text, lang):
        failures.append("as_user")
    if sentiment == "negative" and blames(text, lang):
        failures.append("blame")
    if repeated_run(text, lang) >= REPEAT_RUN[lang]:
        failures.append("repetition")
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
