"""Which language a text is in: enough to answer in the user's language (zh or en)."""

from __future__ import annotations

import re

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
LATIN_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")  # an English word, apostrophes included


def detect_language(text: str) -> str:
    """ "zh" when Chinese characters carry the text, "en" for Latin script, "none" for neither."""
    cjk = len(_CJK.findall(text))
    latin = sum(len(w) for w in LATIN_WORD.findall(text))
    if cjk == 0 and latin == 0:
        return "none"
    # A Chinese character carries about as much as a short English word.
    return "zh" if cjk >= latin / 3 else "en"
