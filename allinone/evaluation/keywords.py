"""Scoring a keyword (extract) role: the "present keyphrase" protocol of
../shared/data/keywords-README.md.

- gold = the document's gold keyphrases that occur in its text;
- the answer is the ranked list as returned: blanks and repeats (after normalisation) dropped; a
  keyword that is not in the text counts as wrong (it is not removed);
- P@k = correct among the first k / k (k even if fewer were returned), R@k = correct / present
  gold, F1@k per document, averaged over documents, for k = 5 and 10; also F1 over the whole
  list (`F1@M`), F1 against all gold, and the share of returned keywords not found in the text;
- matching: NFKC, lower-case, whitespace collapsed, quotes and sentence punctuation at either end
  removed; English then word by word after Porter stemming (hyphens split words); Chinese exactly.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence
from functools import lru_cache

_EDGE = "\"'`“”‘’«»「」『』《》()[]{}（）【】.,;:!?。，；：！？、…·-—–"
_SPACES = re.compile(r"\s+")
_WORD_BREAK = re.compile(r"[^\w]+")


@lru_cache(maxsize=1)
def _stemmer():
    """NLTK's Porter stemmer (pure Python, no NLTK data), without running `nltk/__init__`: that
    imports most of NLTK, scipy included, and its ~90 MB would count in the peak memory of every
    keywords eval (docs/benchmarks.md). The stemmer's own modules are loaded under a stand-in
    package, and sys.modules is left as it was, so a later `import nltk` is the real one."""
    import importlib
    import importlib.util
    import sys
    import types

    if "nltk" in sys.modules:
        from nltk.stem.porter import PorterStemmer

        return PorterStemmer()
    spec = importlib.util.find_spec("nltk")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the keywords scorer needs nltk (pip install nltk)")
    before = set(sys.modules)
    package = types.ModuleType("nltk")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["nltk"] = package
    try:
        stem = types.ModuleType("nltk.stem")
        stem.__path__ = [f"{package.__path__[0]}/stem"]
        sys.modules["nltk.stem"] = stem
        porter = importlib.import_module("nltk.stem.porter")
        return porter.PorterStemmer()
    finally:
        for name in set(sys.modules) - before:
            if name == "nltk" or name.startswith("nltk."):
                del sys.modules[name]


def normalise(phrase: str) -> str:
    text = _SPACES.sub(" ", unicodedata.normalize("NFKC", phrase).lower()).strip()
    return text.strip(_EDGE + " ").strip()


def match_key(phrase: str, lang: str) -> tuple[str, ...] | str:
    """What two phrases must share to match: Chinese the normalised string, English its stemmed words."""
    text = normalise(phrase)
    if lang == "zh":
        return text
    words = [w for w in _WORD_BREAK.split(text) if w]  # hyphens split words; punctuation is no word
    stem = _stemmer().stem
    return tuple(stem(w) for w in words)


def occurs_in(phrase: str, text: str, lang: str) -> bool:
    """Whether the phrase occurs in the text, as the gold's `present_keywords` were chosen: Chinese
    as an exact substring (after normalisation), English as a run of stemmed words."""
    key = match_key(phrase, lang)
    if not key:
        return False
    if lang == "zh":
        return key in normalise(text)
    words = match_key(text, "en")
    n = len(key)
    return any(words[i : i + n] == key for i in range(len(words) - n + 1))


def _cleaned(answer: Iterable[str], lang: str) -> list[tuple[str, tuple[str, ...] | str]]:
    kept, seen = [], set()
    for phrase in answer:
        if not isinstance(phrase, str):
            continue
        key = match_key(phrase, lang)
        if not key or key in seen:
            continue
        seen.add(key)
        kept.append((phrase, key))
    return kept


def _f1(p: float, r: float) -> float:
    return 0.0 if p + r == 0 else 2 * p * r / (p + r)


def score_document(
    answer: Sequence[str], text: str, keywords: Sequence[str], lang: str, present_keywords: Sequence[str] | None = None
) -> dict:
    """One document's figures. `present_keywords`: the gold that occurs in the text as the data
    file decided it (English with a plural-only stemmer, a little stricter than Porter's); found
    here when the file does not say."""
    if present_keywords is None:
        present_keywords = [k for k in keywords if occurs_in(k, text, lang)]
    present = {match_key(k, lang) for k in present_keywords}
    present.discard("")
    everything = {match_key(k, lang) for k in keywords} - {""}
    kept = _cleaned(answer, lang)
    # a keyword not in the text is wrong even if the gold lists it (it cannot be extracted)
    hits = [key in present and occurs_in(phrase, text, lang) for phrase, key in kept]
    figures = {}
    for k in (5, 10):
        correct = sum(hits[:k])
        p, r = correct / k, (correct / len(present) if present else 0.0)
        figures[f"f1@{k}"] = _f1(p, r)
        figures[f"p@{k}"], figures[f"r@{k}"] = p, r
    correct = sum(hits)
    p_all = correct / len(kept) if kept else 0.0
    figures["f1@M"] = _f1(p_all, correct / len(present) if present else 0.0)
    all_correct = sum(key in everything for _, key in kept)
    figures["f1_all_gold"] = _f1(
        all_correct / len(kept) if kept else 0.0, all_correct / len(everything) if everything else 0.0
    )
    figures["absent_share"] = sum(not occurs_in(phrase, text, lang) for phrase, _ in kept) / len(kept) if kept else 0.0
    figures["present_gold"] = len(present)
    figures["returned"] = len(kept)
    return figures


def summarize(rows: Sequence[dict], answers: dict[str, Sequence[str]]) -> dict:
    """Averages over documents, overall and per language. `rows`: the data file's lines (id, text,
    keywords, lang); `answers`: id -> the ranked keywords returned."""
    per_doc = []
    for row in rows:
        figures = score_document(
            answers.get(row["id"], []), row["text"], row["keywords"], row["lang"], row.get("present_keywords")
        )
        per_doc.append((row["lang"], figures))
    names = ("f1@5", "f1@10", "p@5", "r@5", "p@10", "r@10", "f1@M", "f1_all_gold", "absent_share")

    def mean(group: list[dict]) -> dict:
        return {name: round(sum(f[name] for f in group) / len(group), 4) for name in names} | {"n": len(group)}

    report = mean([f for _, f in per_doc]) if per_doc else {"n": 0}
    report["by_lang"] = {
        lang: mean([f for lang_, f in per_doc if lang_ == lang]) for lang in sorted({lang for lang, _ in per_doc})
    }
    return report
