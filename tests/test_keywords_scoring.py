"""The keyword role's scoring (evaluation/keywords.py), as ../shared/data/keywords-README.md defines
it, on handwritten documents: matching, the rank cut-offs, blanks and repeats, absent keywords."""

from __future__ import annotations

import pytest

from allinone.evaluation.keywords import match_key, normalise, occurs_in, score_document, summarize

EN = "Neural networks for image denoising\nWe train convolutional neural networks on noisy images."
ZH = "平方和优化方法研究\n本文提出一种平方和优化方法，用于多项式系统分析。"


def test_normalisation_and_matching():
    assert normalise("  “Neural   Networks.” ") == "neural networks"
    assert match_key("Neural Network", "en") == match_key("neural networks", "en")  # Porter stems
    assert match_key("image-denoising", "en") == match_key("image denoising", "en")  # hyphens split words
    assert match_key("平方和优化", "zh") != match_key("平方和 优化", "zh")  # Chinese matches exactly
    assert occurs_in("Neural Network", EN, "en") and not occurs_in("deep learning", EN, "en")
    assert occurs_in("平方和优化", ZH, "zh") and not occurs_in("平方和 优化", ZH, "zh")
    assert occurs_in("denoising.", EN, "en")  # sentence punctuation is not part of a word


def test_precision_divides_by_k_and_recall_by_the_present_gold():
    gold = ["neural networks", "image denoising", "deep learning"]  # the last is not in the text
    figures = score_document(["Neural Network", "image denoising"], EN, gold, "en")
    assert figures["present_gold"] == 2
    assert figures["p@5"] == pytest.approx(2 / 5) and figures["r@5"] == 1.0
    assert figures["f1@5"] == pytest.approx(2 * 0.4 * 1.0 / 1.4)
    assert figures["f1@M"] == 1.0


def test_blanks_and_repeats_are_dropped_and_an_absent_keyword_is_wrong():
    gold = ["neural networks", "image denoising", "deep learning"]
    answer = ["", "neural network", "Neural Networks", "deep learning", "image denoising"]
    figures = score_document(answer, EN, gold, "en")
    assert figures["returned"] == 3  # blank and repeat gone
    assert figures["p@5"] == pytest.approx(2 / 5)  # deep learning is gold but not in the text: wrong
    assert figures["absent_share"] == pytest.approx(1 / 3)
    assert figures["f1_all_gold"] == 1.0  # against all gold it counts


def test_the_rank_decides_what_counts_at_5():
    gold = ["平方和优化", "多项式系统"]
    filler = ["方法", "研究", "本文", "提出", "用于"]
    late = score_document([*filler, "平方和优化", "多项式系统"], ZH, gold, "zh")
    early = score_document(["平方和优化", "多项式系统", *filler], ZH, gold, "zh")
    assert late["f1@5"] == 0.0 and late["f1@10"] > 0
    assert early["f1@5"] > 0 and early["f1@10"] == late["f1@10"]


def test_summary_by_language_and_missing_answers_score_zero():
    rows = [
        {"id": "e", "text": EN, "keywords": ["neural networks"], "lang": "en"},
        {"id": "z", "text": ZH, "keywords": ["平方和优化"], "present_keywords": ["平方和优化"], "lang": "zh"},
    ]
    report = summarize(rows, {"e": ["neural networks"]})
    assert report["n"] == 2 and report["by_lang"]["zh"]["f1@5"] == 0.0
    assert report["by_lang"]["en"]["f1@5"] == pytest.approx(2 * 0.2 * 1.0 / 1.2, abs=1e-4)


def test_the_stemmer_is_nltks_porter_without_the_rest_of_nltk():
    """The scorer's stemmer must not import all of NLTK (scipy included: ~90 MB in every keywords
    eval's peak memory), must stem as NLTK's PorterStemmer does, and must leave `import nltk` real."""
    import subprocess
    import sys

    code = """
import sys
from allinone.evaluation.keywords import _stemmer
stem = _stemmer().stem
light = sorted(m for m in sys.modules if m == "nltk" or m.startswith(("nltk.", "scipy")))
words = "networks running generously happiness relational conditional agreed feed probabilities dying".split()
ours = [stem(w) for w in words]
from nltk.stem import PorterStemmer
import nltk
print(light, ours == [PorterStemmer().stem(w) for w in words], hasattr(nltk, "word_tokenize"))
"""
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert found.stdout.split() == ["[]", "True", "True"]
