"""A head's second reader: the text's own n-grams (TF-IDF and logistic regression).

The residual stream of a 0.5B model knows what a text is about, but a label set like KUAKE-QIC's
medical query types turns on surface words (`怎么办`, `多少钱`, `是什么`) that character n-grams
catch directly. A choice head may carry such a model beside its weights on the hidden state; it
answers with a weighted geometric mean of the two models' probabilities (head.mix). Nothing here needs
the model: the n-grams come from the text, the weights from numpy.

Grams per text, by its language: Chinese, characters 1-3; English (and other space-separated
scripts), words 1-2 and characters 2-5 within the padded text. Weights: raw counts times smoothed
IDF, each row scaled to unit length.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .language import detect_language

# L2 strength of the n-gram model in fit_softmax's units (1/C of the usual C=10), and in how many
# training texts a gram must occur to be kept: every one (grams seen once still tell apart
# KUAKE-QIC's query types; docs/roles.md has the measurement).
NGRAM_L2 = 0.1
MIN_DOCUMENT_FREQUENCY = 1
# The n-grams' weight in the geometric mean with the hidden-state reading (head.mix). Chosen on the
# dev files over the eight intent and emotion sources; a weight picked per head on its own
# training split did worse (docs/roles.md has both).
NGRAM_SHARE = 0.6


def grams(text: str) -> list[str]:
    text = text.lower()
    if detect_language(text) == "zh":
        return [text[i : i + n] for n in (1, 2, 3) for i in range(len(text) - n + 1)]
    words = text.split()
    padded = f" {' '.join(words)} "
    return (
        words
        + [f"{a} {b}" for a, b in zip(words, words[1:], strict=False)]
        + [f"#{padded[i : i + n]}" for n in (2, 3, 4, 5) for i in range(len(padded) - n + 1)]
    )


@dataclass
class NgramModel:
    vocabulary: dict[str, int]  # gram -> column
    idf: np.ndarray  # [grams]
    weights: np.ndarray  # [labels, grams]
    bias: np.ndarray  # [labels]

    def row(self, counts: Counter) -> tuple[np.ndarray, np.ndarray]:
        """A text's TF-IDF row from its gram counts, sparse: (columns, values), of unit length."""
        known = [g for g in counts if g in self.vocabulary]
        columns = np.array([self.vocabulary[g] for g in known], dtype=np.int64)
        values = np.array([counts[g] for g in known], dtype=np.float64) * self.idf[columns]
        return columns, values / (np.linalg.norm(values) + 1e-12)

    def logits(self, texts: Sequence[str]) -> np.ndarray:
        rows = [self.row(Counter(grams(text))) for text in texts]
        return np.array([self.weights[:, c] @ v + self.bias for c, v in rows]).reshape(-1, len(self.bias))

    @classmethod
    def fit(cls, texts: Sequence[str], y: np.ndarray, n_labels: int) -> NgramModel:
        # Imported here: scipy is for training only (see head.fit_softmax).
        from scipy import sparse

        from .head import fit_softmax

        counts = [Counter(grams(text)) for text in texts]
        frequency = Counter(gram for c in counts for gram in c)
        kept = sorted(gram for gram, n in frequency.items() if n >= MIN_DOCUMENT_FREQUENCY)
        vocabulary = {gram: i for i, gram in enumerate(kept)}
        idf = np.array([math.log((1 + len(texts)) / (1 + frequency[gram])) + 1 for gram in kept])
        model = cls(vocabulary, idf, np.zeros((n_labels, len(kept))), np.zeros(n_labels))
        rows = [model.row(c) for c in counts]
        # Sparse: a dense matrix of the training texts' grams takes hundreds of MB (50k grams).
        x = sparse.csr_matrix(
            (
                np.concatenate([v for _, v in rows]),
                np.concatenate([c for c, _ in rows]),
                np.cumsum([0] + [len(c) for c, _ in rows]),
            ),
            shape=(len(texts), len(kept)),
        )
        w = fit_softmax(x, y, n_labels, NGRAM_L2)
        model.weights, model.bias = w[:-1].T.copy(), w[-1].copy()
        return model

    def to_json(self) -> dict:
        grams_in_order = sorted(self.vocabulary, key=self.vocabulary.get)
        return {
            "grams": grams_in_order,
            "idf": [round(float(x), 5) for x in self.idf],
            "bias": [float(x) for x in self.bias],
            "weights": [[round(float(x), 5) for x in row] for row in self.weights],
        }

    @classmethod
    def from_json(cls, payload: dict, n_labels: int) -> NgramModel:
        grams_in_order = list(payload["grams"])
        model = cls(
            {gram: i for i, gram in enumerate(grams_in_order)},
            np.asarray(payload["idf"], dtype=np.float64),
            np.atleast_2d(np.asarray(payload["weights"], dtype=np.float64)),
            np.asarray(payload["bias"], dtype=np.float64),
        )
        shapes = (len(model.idf), *model.weights.shape, len(model.bias))
        if shapes != (len(grams_in_order), n_labels, len(grams_in_order), n_labels):
            raise ValueError(
                f"n-gram model shapes {shapes} do not match {len(grams_in_order)} grams, {n_labels} labels"
            )
        return model
