"""A learned sentiment head: logistic regression on the model's final hidden state at the analyst's
scoring position, at no cost per request.

Why it is free: the scoring pass already computes the logits l = W h (W the output projection,
h the final hidden state). A linear head a.h + c on the hidden state is also linear in the logits,
because h = G^-1 W^T l with G = W^T W (W has full column rank; Qwen's output projection has no
bias). So the head folds into one vocabulary-sized vector u = W G^-1 a, computed once at load,
and a request pays one dot product u.l (~0.1 ms) on logits it had anyway. llama.cpp would hand
out h directly only with embeddings on, which computes outputs for every prompt token: far slower.

The head also keeps the prompt's own signal as a separate, unpenalised feature: the margin
l[Positive] - l[Negative] that the prompt-only analyst uses. L2 then pulls the hidden-state weights
towards zero, i.e. towards plain prompt scoring, which is what generalises to unseen domains.

A head belongs to one model (keyed by the model file's sha256) and one sentiment prompt.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from ..engine.base import Engine

HEAD_FORMAT = 1
# The heads that ship with the package (trained by `allinone train-head` on
# ../shared/data/sentiment-train.jsonl); a head the user trains lives in <home>/heads and wins.
PACKAGED_HEADS = Path(__file__).with_name("heads")


class HeadError(ValueError):
    """Unusable head or training data; the message says why."""


@dataclass
class SentimentHead:
    model_sha256: str
    prompt: str
    direction: np.ndarray  # G^-1 a: the head's hidden-state weights, moved to logit space by W
    margin_weight: float  # on l[Positive] - l[Negative]
    bias: float
    info: dict = field(default_factory=dict)  # how it was trained: data, sizes, held-out accuracy

    # ---- files ------------------------------------------------------------------------------
    @staticmethod
    def filename(model_sha256: str, prompt: str) -> str:
        return f"{model_sha256}.{prompt}.json"

    def save(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / self.filename(self.model_sha256, self.prompt)
        payload = {"format": HEAD_FORMAT, "model_sha256": self.model_sha256, "prompt": self.prompt,
                   "margin_weight": self.margin_weight, "bias": self.bias, "info": self.info,
                   "direction": [float(x) for x in self.direction]}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload, ensure_ascii=False, indent=1))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: Path) -> "SentimentHead":
        try:
            payload = json.loads(Path(path).read_text())
            if payload.get("format") != HEAD_FORMAT:
                raise HeadError(f"{path}: unknown head format {payload.get('format')!r}")
            return cls(model_sha256=payload["model_sha256"], prompt=payload["prompt"],
                       direction=np.asarray(payload["direction"], dtype=np.float64),
                       margin_weight=float(payload["margin_weight"]), bias=float(payload["bias"]),
                       info=payload.get("info", {}))
        except (OSError, ValueError, KeyError, TypeError) as err:
            if isinstance(err, HeadError):
                raise
            raise HeadError(f"{path}: not a sentiment head ({err})") from None

    @classmethod
    def find(cls, model_sha256: str, prompt: str, user_dir: Path) -> "SentimentHead | None":
        """The user's own head for this model and prompt if there is one, else a packaged one."""
        name = cls.filename(model_sha256, prompt)
        for directory in (user_dir, PACKAGED_HEADS):
            if (directory / name).is_file():
                return cls.load(directory / name)
        return None

    # ---- use --------------------------------------------------------------------------------
    def fingerprint(self) -> str:
        payload = np.append(self.direction, [self.margin_weight, self.bias]).astype(np.float64).tobytes()
        return hashlib.sha256(self.model_sha256.encode() + self.prompt.encode() + payload).hexdigest()[:16]

    def folded_weights(self, weight_chunks: Callable[[], Iterator[np.ndarray]],
                       cache_dir: Path | None = None) -> np.ndarray:
        """W G^-1 a: the head as a vector over the logits. Computing it takes one pass over the
        output projection (~2 s for the default model), so it is kept in `cache_dir`, keyed by
        the head's contents; `install-model` and `train-head` fill that cache ahead of time."""
        cached = cache_dir / f"{self.fingerprint()}.npy" if cache_dir else None
        if cached and cached.is_file():
            try:
                return np.load(cached)
            except (OSError, ValueError):
                pass  # unreadable: compute it again
        weights = np.concatenate([chunk.astype(np.float64) @ self.direction for chunk in weight_chunks()])
        weights = weights.astype(np.float32)
        if cached:
            try:
                cached.parent.mkdir(parents=True, exist_ok=True)
                tmp = cached.with_suffix(".tmp.npy")
                np.save(tmp, weights)
                tmp.replace(cached)
            except OSError:
                pass  # a read-only home only costs the fold next time
        return weights

    def logit_scorer(self, engine: Engine, candidates: Sequence[int], cache_dir: Path | None = None) -> "LogitScorer":
        weights = np.array(self.folded_weights(engine.output_weight_chunks, cache_dir), dtype=np.float32)
        if weights.shape != (engine.n_vocab,):
            raise HeadError("the head does not fit this model's vocabulary")
        positive, negative = candidates
        weights[positive] += self.margin_weight
        weights[negative] -= self.margin_weight
        return LogitScorer(weights.astype(np.float64), self.bias)


@dataclass
class LogitScorer:
    weights: np.ndarray  # vocabulary-sized, float64 once here rather than per request
    bias: float

    def positive_probability(self, logits: np.ndarray) -> float:
        score = float(np.dot(self.weights, logits.astype(np.float64))) + self.bias
        return _sigmoid(score)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


# ---- training -------------------------------------------------------------------------------
class HiddenStates:
    """Recovers final hidden states from logits: h = G^-1 W^T l. Holds W in float64 (~1 GB for a
    152k x 896 projection) while alive, so it is meant for training runs, not for serving:
    G^-1 amplifies rounding, and float32 sums over 152k rows would not do."""

    def __init__(self, engine: Engine):
        self.weight = np.concatenate([chunk.astype(np.float64) for chunk in engine.output_weight_chunks()])
        self.gram_inverse = np.linalg.inv(self.weight.T @ self.weight)

    def from_logits(self, logits: np.ndarray) -> np.ndarray:
        """Rows of logits -> rows of hidden states."""
        return (np.atleast_2d(logits).astype(np.float64) @ self.weight) @ self.gram_inverse


def fit_logistic(features: np.ndarray, labels: np.ndarray, l2: float, penalised: np.ndarray,
                 iterations: int = 100) -> np.ndarray:
    """L2-regularised logistic regression by Newton's method; returns weights with the intercept
    last. `penalised` marks which feature weights the L2 term applies to (never the intercept)."""
    x = np.hstack([features, np.ones((features.shape[0], 1))])
    penalty = np.append(np.where(penalised, l2, 0.0), 0.0)
    weights = np.zeros(x.shape[1])
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-np.clip(x @ weights, -30, 30)))
        gradient = x.T @ (p - labels) + penalty * weights
        hessian = (x * (p * (1 - p))[:, None]).T @ x + np.diag(penalty + 1e-9)
        step = np.linalg.solve(hessian, gradient)
        weights -= step
        if np.max(np.abs(step)) < 1e-7:
            break
    return weights


def _log_loss(features: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> float:
    z = features @ weights[:-1] + weights[-1]
    return float(np.mean(np.logaddexp(0, z) - labels * z))


L2_GRID = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)


@dataclass
class TrainedParameters:
    direction_hidden: np.ndarray  # a: weights on the raw hidden state
    margin_weight: float
    bias: float
    l2: float


def train_parameters(hidden: np.ndarray, margins: np.ndarray, labels: np.ndarray, *,
                     folds: int = 5, seed: int = 0) -> TrainedParameters:
    """Standardise, pick the L2 strength by cross-validated log loss, fit, and fold the
    standardisation back so the result applies to raw hidden states."""
    mean, std = hidden.mean(axis=0), hidden.std(axis=0) + 1e-6
    margin_scale = float(margins.std() + 1e-6)
    x = np.hstack([(hidden - mean) / std, (margins / margin_scale)[:, None]])
    penalised = np.append(np.ones(hidden.shape[1], dtype=bool), False)
    order = np.random.default_rng(seed).permutation(len(labels))
    fold_of = np.empty(len(labels), dtype=int)
    fold_of[order] = np.arange(len(labels)) % folds
    best_l2, best_loss = L2_GRID[0], math.inf
    for l2 in L2_GRID:
        loss = 0.0
        for k in range(folds):
            train, held = fold_of != k, fold_of == k
            w = fit_logistic(x[train], labels[train], l2, penalised)
            xb = x[held]
            loss += _log_loss(xb, labels[held], w) * held.sum()
        if loss < best_loss:
            best_l2, best_loss = l2, loss
    w = fit_logistic(x, labels, best_l2, penalised)
    a = w[:-2] / std
    return TrainedParameters(direction_hidden=a, margin_weight=float(w[-2] / margin_scale),
                             bias=float(w[-1] - a @ mean), l2=best_l2)


MIN_EXAMPLES = 20
MIN_PER_LABEL = 5


def collect_features(analyst, texts: Sequence[str], states: HiddenStates,
                     progress: Callable[[int], None] | None = None, batch: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Hidden states and prompt margins of texts at the analyst's scoring position."""
    positive, negative = analyst.candidates
    hidden, margins, pending = [], [], []
    for text in texts:
        tokens, _ = analyst.prompt_tokens(text)
        logits = analyst.engine.logits(tokens, lane=analyst.lane)
        margins.append(float(logits[positive]) - float(logits[negative]))
        pending.append(logits)
        if len(pending) == batch:  # one pass over W per batch, not per text
            hidden.append(states.from_logits(np.stack(pending)))
            pending = []
        if progress:
            progress(1)
    if pending:
        hidden.append(states.from_logits(np.stack(pending)))
    return np.vstack(hidden), np.asarray(margins)


def check_training_labels(labels: Sequence[str]) -> None:
    if len(labels) < MIN_EXAMPLES:
        raise HeadError(f"{len(labels)} labelled texts are too few to train a head; at least {MIN_EXAMPLES} are needed")
    for label in ("positive", "negative"):
        count = sum(1 for x in labels if x == label)
        if count < MIN_PER_LABEL:
            raise HeadError(f"only {count} '{label}' texts: a head needs at least {MIN_PER_LABEL} of each label")


def train_head(analyst, texts: Sequence[str], labels: Sequence[str], *, model_sha256: str,
               holdout: float = 0.2, seed: int = 0, progress: Callable[[int], None] | None = None,
               source: str = "", fold_cache: Path | None = None) -> tuple[SentimentHead, dict]:
    """Fit a head on texts/labels (reads the hidden states, then `fit_head`)."""
    check_training_labels(labels)
    started = time.perf_counter()
    states = HiddenStates(analyst.engine)
    hidden, margins = collect_features(analyst, texts, states, progress)
    y = np.array([1.0 if x == "positive" else 0.0 for x in labels])
    head, report = fit_head(hidden, margins, y, states.gram_inverse, model_sha256=model_sha256,
                            prompt=analyst.prompt.name, holdout=holdout, seed=seed, source=source)
    report["seconds"] = head.info["seconds"] = round(time.perf_counter() - started, 1)
    if fold_cache:  # W is in memory now: fold here, so the next start need not
        head.folded_weights(lambda: iter([states.weight]), fold_cache)
    return head, report


def fit_head(hidden: np.ndarray, margins: np.ndarray, y: np.ndarray, gram_inverse: np.ndarray, *,
             model_sha256: str, prompt: str, holdout: float = 0.2, seed: int = 0,
             source: str = "") -> tuple[SentimentHead, dict]:
    """A stratified `holdout` share is kept aside first to report honest accuracy (head vs the
    prompt alone); the head returned is then refitted on everything."""
    rng = np.random.default_rng(seed)
    held = np.zeros(len(y), dtype=bool)
    for value in (0.0, 1.0):
        members = rng.permutation(np.flatnonzero(y == value))
        held[members[: max(1, int(round(len(members) * holdout)))]] = True
    split = train_parameters(hidden[~held], margins[~held], y[~held], seed=seed)
    score = hidden[held] @ split.direction_hidden + split.margin_weight * margins[held] + split.bias
    report = {
        "examples": int(len(y)), "heldout": int(held.sum()),
        "heldout_accuracy_head": float(np.mean((score > 0) == (y[held] == 1))),
        "heldout_accuracy_prompt": float(np.mean((margins[held] > 0) == (y[held] == 1))),
    }
    final = train_parameters(hidden, margins, y, seed=seed)
    report["l2"] = final.l2
    info = {**report, "source": source, "trained": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    head = SentimentHead(model_sha256=model_sha256, prompt=prompt, direction=gram_inverse @ final.direction_hidden,
                         margin_weight=final.margin_weight, bias=final.bias, info=info)
    return head, report
