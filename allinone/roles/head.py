"""A learned sentiment head: logistic regression on the model's residual stream, part-way up the
network, at the analyst's scoring position.

Why part-way: sentiment is linearly readable long before the last block. On the dev set, a head on
the output of block 15 of the default model's 24 is as accurate as one on the final hidden state
(docs/accuracy.md has the layer sweep), and the engine stops the forward pass
there (Engine.hidden_state): the 9 blocks above and the 152k-row output projection are never
computed, so a request costs well under a full scoring pass. The prompt still matters: it is what the
model reads before the scoring position, and what the head was trained under.

The residual stream's scale grows with depth and varies by text, so the head reads it RMS-
normalised (as the next block's norm would).

A head may come with a LoRA adapter (a llama.cpp adapter GGUF next to its JSON) for the blocks
below its reading point, trained jointly with it (tools/sentiment_lora/): the analyst's passes for
the head then run those blocks adapted, on a lane that no other role shares. The packaged head for
the default model has one (docs/accuracy.md has what it gains). Prompt-only scoring
and the other roles keep the model's own weights.

A head belongs to one model (keyed by the model file's sha256), one reading point and one depth.
The reading point is where in which prompt it reads: the analyst's scoring position under a
sentiment prompt (key: the prompt's name), or the end of the user's message inside a chat prompt
(key "chat-<name>"), where the respond flow reads it on the pass that also prepares the reply.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HEAD_FORMAT = 3  # 3 added the optional LoRA adapter; format 2 files load as heads without one
# The heads that ship with the package (trained by `allinone train-head` on
# ../shared/data/sentiment-train.jsonl); a head the user trains lives in <home>/heads and wins.
PACKAGED_HEADS = Path(__file__).with_name("heads")
# Blocks the head reads after, for a model with 24 (Qwen2.5-0.5B): see the docstring. For other
# depths, the same share of the network.
DEFAULT_DEPTH_SHARE = 15 / 24


def default_layers(n_layers: int) -> int:
    return max(1, min(n_layers - 1, round(n_layers * DEFAULT_DEPTH_SHARE)))


class HeadError(ValueError):
    """Unusable head or training data; the message says why."""


def normalise(hidden: np.ndarray) -> np.ndarray:
    hidden = np.asarray(hidden, dtype=np.float64)
    return hidden / np.sqrt(np.mean(hidden**2, axis=-1, keepdims=True) + 1e-6)


@dataclass
class ReadingPoint:
    """Where a head reads, for training it: the tokens whose last position it reads for a text,
    on which engine lane, under which key; and the prompt's own P(positive) for a text, if the
    prompt has label words to compare the head against."""

    key: str
    engine: object  # an engine.base.Engine
    lane: int
    tokens: Callable[[str], list[int]]
    prompt_alone: Callable[[str], float] | None = None
    # The LoRA adapter the lane runs while the head reads (None: the model's own weights); a head
    # fits only the weights it was trained on.
    adapter: Path | None = None


@dataclass
class SentimentHead:
    model_sha256: str
    prompt: str  # the reading point's key (see the module docstring)
    layers: int  # reads the residual stream after this many blocks
    weights: np.ndarray  # on the RMS-normalised residual stream
    bias: float
    info: dict = field(default_factory=dict)  # how it was trained: data, sizes, held-out accuracy
    adapter: Path | None = None  # LoRA adapter GGUF trained with the head, applied to its passes

    # ---- files ------------------------------------------------------------------------------
    @staticmethod
    def filename(model_sha256: str, prompt: str) -> str:
        return f"{model_sha256}.{prompt}.json"

    @staticmethod
    def adapter_filename(model_sha256: str, prompt: str) -> str:
        return f"{model_sha256}.{prompt}.lora.gguf"

    def save(self, directory: Path) -> Path:
        """Write the head (and copy its adapter) into `directory`; a head saved without an adapter
        removes a stale one of the same name there."""
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / self.filename(self.model_sha256, self.prompt)
        adapter = directory / self.adapter_filename(self.model_sha256, self.prompt)
        if self.adapter is not None and Path(self.adapter).resolve() != adapter.resolve():
            tmp = adapter.with_suffix(".tmp")
            tmp.write_bytes(Path(self.adapter).read_bytes())
            tmp.replace(adapter)
        elif self.adapter is None and adapter.exists():
            adapter.unlink()
        payload = {
            "format": HEAD_FORMAT,
            "model_sha256": self.model_sha256,
            "prompt": self.prompt,
            "layers": self.layers,
            "bias": self.bias,
            "info": self.info,
            "adapter": adapter.name if self.adapter is not None else None,
            "weights": [float(x) for x in self.weights],
        }
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload, ensure_ascii=False, indent=1))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: Path) -> SentimentHead:
        try:
            payload = json.loads(Path(path).read_text())
            if payload.get("format") not in (2, HEAD_FORMAT):
                raise HeadError(
                    f"{path}: head format {payload.get('format')!r} is not {HEAD_FORMAT}; "
                    "train it again with `allinone train-head`"
                )
            adapter = None
            if payload.get("adapter"):
                adapter = Path(path).parent / Path(payload["adapter"]).name
                if not adapter.is_file():
                    raise HeadError(f"{path}: its LoRA adapter {adapter.name} is missing")
            return cls(
                model_sha256=payload["model_sha256"],
                prompt=payload["prompt"],
                layers=int(payload["layers"]),
                weights=np.asarray(payload["weights"], dtype=np.float64),
                bias=float(payload["bias"]),
                info=payload.get("info", {}),
                adapter=adapter,
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            if isinstance(err, HeadError):
                raise
            raise HeadError(f"{path}: not a sentiment head ({err})") from None

    @classmethod
    def find(cls, model_sha256: str, prompt: str, user_dir: Path) -> SentimentHead | None:
        """The user's own head for this model and prompt if there is one, else a packaged one."""
        name = cls.filename(model_sha256, prompt)
        for directory in (user_dir, PACKAGED_HEADS):
            if (directory / name).is_file():
                return cls.load(directory / name)
        return None

    # ---- use --------------------------------------------------------------------------------
    def check_fits(self, n_layers: int, n_embd: int) -> None:
        if not 0 < self.layers < n_layers or self.weights.shape != (n_embd,):
            raise HeadError(
                f"the head (after block {self.layers}, width {self.weights.shape[0]}) does not fit "
                f"a model with {n_layers} blocks of width {n_embd}"
            )

    def positive_probability(self, hidden: np.ndarray) -> float:
        return _sigmoid(float(normalise(hidden) @ self.weights) + self.bias)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


# ---- training -------------------------------------------------------------------------------
def fit_logistic(features: np.ndarray, labels: np.ndarray, l2: float, iterations: int = 100) -> np.ndarray:
    """L2-regularised logistic regression by Newton's method; returns weights with the intercept
    last (the intercept is not penalised)."""
    x = np.hstack([features, np.ones((features.shape[0], 1))])
    penalty = np.append(np.full(features.shape[1], l2), 0.0)
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
    weights: np.ndarray  # on normalised hidden states
    bias: float
    l2: float


def train_parameters(features: np.ndarray, labels: np.ndarray, *, folds: int = 5, seed: int = 0) -> TrainedParameters:
    """Standardise, pick the L2 strength by cross-validated log loss, fit, and fold the
    standardisation back so the result applies to the features as given."""
    mean, std = features.mean(axis=0), features.std(axis=0) + 1e-6
    x = (features - mean) / std
    order = np.random.default_rng(seed).permutation(len(labels))
    fold_of = np.empty(len(labels), dtype=int)
    fold_of[order] = np.arange(len(labels)) % folds
    best_l2, best_loss = L2_GRID[0], math.inf
    for l2 in L2_GRID:
        loss = 0.0
        for k in range(folds):
            train, held = fold_of != k, fold_of == k
            w = fit_logistic(x[train], labels[train], l2)
            loss += _log_loss(x[held], labels[held], w) * held.sum()
        if loss < best_loss:
            best_l2, best_loss = l2, loss
    w = fit_logistic(x, labels, best_l2)
    a = w[:-1] / std
    return TrainedParameters(weights=a, bias=float(w[-1] - a @ mean), l2=best_l2)


MIN_EXAMPLES = 20
MIN_PER_LABEL = 5


def collect_features(
    point: ReadingPoint, texts: Sequence[str], layers: int, progress: Callable[[int], None] | None = None
) -> np.ndarray:
    """Normalised residual streams after `layers` blocks at the reading point."""
    running = point.engine.lane_adapter.get(point.lane)
    if running != point.adapter:
        raise HeadError(
            f"the lane runs with {running.name if running else 'the model’s own weights'}, not with "
            f"{point.adapter.name if point.adapter else 'the model’s own weights'}: the head would read "
            "other weights than the ones it is meant for"
        )
    rows = []
    for text in texts:
        rows.append(normalise(point.engine.hidden_state(point.tokens(text), layers, lane=point.lane)))
        if progress:
            progress(1)
    return np.vstack(rows)


def check_training_labels(labels: Sequence[str]) -> None:
    if len(labels) < MIN_EXAMPLES:
        raise HeadError(f"{len(labels)} labelled texts are too few to train a head; at least {MIN_EXAMPLES} are needed")
    for label in ("positive", "negative"):
        count = sum(1 for x in labels if x == label)
        if count < MIN_PER_LABEL:
            raise HeadError(f"only {count} '{label}' texts: a head needs at least {MIN_PER_LABEL} of each label")


def heldout_count(labels: Sequence[str], share: float) -> int:
    """How many texts train_head keeps aside (and scores a second time with the prompt alone,
    where the reading point has a prompt_alone)."""
    return sum(max(1, int(round(sum(1 for x in labels if x == label) * share))) for label in ("positive", "negative"))


def stratified_holdout(y: np.ndarray, share: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    held = np.zeros(len(y), dtype=bool)
    for value in (0.0, 1.0):
        members = rng.permutation(np.flatnonzero(y == value))
        held[members[: max(1, int(round(len(members) * share)))]] = True
    return held


def train_head(
    point: ReadingPoint,
    texts: Sequence[str],
    labels: Sequence[str],
    *,
    model_sha256: str,
    layers: int | None = None,
    holdout: float = 0.2,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
    source: str = "",
) -> tuple[SentimentHead, dict]:
    """Fit a head on texts/labels. A stratified `holdout` share is kept aside first to report
    honest accuracy (head vs the prompt alone, when the point has one: one full scoring pass per
    held-out text); the head returned is then refitted on everything. `progress` is called once
    per text read, then once per held-out text scored: len(texts) + heldout_count(labels) calls
    (len(texts) without a prompt_alone)."""
    check_training_labels(labels)
    started = time.perf_counter()
    n_layers = point.engine.n_layers
    layers = default_layers(n_layers) if layers is None else layers
    if not 0 < layers < n_layers:
        raise HeadError(f"layers must be in 1..{n_layers - 1}, got {layers}")
    features = collect_features(point, texts, layers, progress)
    y = np.array([1.0 if x == "positive" else 0.0 for x in labels])
    held = stratified_holdout(y, holdout, seed)
    split = train_parameters(features[~held], y[~held], seed=seed)
    head_right = ((features[held] @ split.weights + split.bias) > 0) == (y[held] == 1)
    prompt_right = []
    for i in np.flatnonzero(held) if point.prompt_alone else ():
        prompt_right.append((point.prompt_alone(texts[i]) >= 0.5) == (y[i] == 1))
        if progress:
            progress(1)
    report = {
        "examples": int(len(y)),
        "heldout": int(held.sum()),
        "layers": layers,
        "heldout_accuracy_head": float(np.mean(head_right)),
        "heldout_accuracy_prompt": float(np.mean(prompt_right)) if prompt_right else None,
    }
    final = train_parameters(features, y, seed=seed)
    report["l2"] = final.l2
    report["seconds"] = round(time.perf_counter() - started, 1)
    info = {**report, "source": source, "trained": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    head = SentimentHead(
        model_sha256=model_sha256, prompt=point.key, layers=layers, weights=final.weights, bias=final.bias, info=info
    )
    return head, report
