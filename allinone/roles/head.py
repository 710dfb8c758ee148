"""A learned choice head: multinomial logistic regression on the model's residual stream, part-way
up the network, at the end of a role's pass over the text.

Why part-way: the sentiment is linearly readable long before the last block. On the dev set, a head
on the output of block 15 of the default model's 24 is as accurate as one on the final hidden state
(docs/accuracy.md has the layer sweep), and the engine stops the forward pass there
(Engine.hidden_state): the 9 blocks above and the 152k-row output projection are never computed, so
a request costs well under a full scoring pass. The prompt still matters: it is what the model reads
before the reading position, and what the head was trained under.

Why one pass can serve several roles: a head only reads a vector. Heads of roles that name another
role's pass in their definition (`reads`) read the very state that role's head reads, so emotion and
intent cost a matrix product each on top of the sentiment's pass.

The residual stream's scale grows with depth and varies by text, so heads read it RMS-normalised (as
the next block's norm would).

A head may come with a LoRA adapter (a llama.cpp adapter GGUF next to its JSON) for the blocks below
its reading point, trained jointly with it (tools/sentiment_lora/): the passes for the head then run
those blocks adapted, on a lane that no other role shares.

A head belongs to one model (keyed by the model file's sha256), one reading point, one depth and one
role's labels. The reading point is where in which prompt it reads: a choice role's scoring position
under one of its prompts (key: the prompt's name), or the end of the user's message inside a chat
prompt (key "chat-<name>"). Files are `<model sha>.<point>.<role>.json`; files of formats 2 and 3
(`<model sha>.<point>.json`, one weight row) are two-label heads and load for any two-label role,
whose first label their sigmoid scores.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .ngrams import NGRAM_SHARE, NgramModel

HEAD_FORMAT = 4  # 4: a row per label and the label list; 3 added the adapter; 2 and 3 are two-label
# The heads that ship with the package; a head the user trains lives in <home>/heads and wins.
PACKAGED_HEADS = Path(__file__).with_name("heads")
# Blocks the head reads after, for a model with 24 (Qwen2.5-0.5B): see the docstring. For other
# depths, the same share of the network.
DEFAULT_DEPTH_SHARE = 15 / 24


def default_layers(n_layers: int) -> int:
    return max(1, min(n_layers - 1, round(n_layers * DEFAULT_DEPTH_SHARE)))


class HeadError(ValueError):
    """Unusable head or training data; the message says why."""


def rms(hidden: np.ndarray) -> np.ndarray:
    """Root mean square over the last axis (what `normalise` divides by)."""
    return np.sqrt(np.mean(np.asarray(hidden, dtype=np.float64) ** 2, axis=-1) + 1e-6)


def normalise(hidden: np.ndarray) -> np.ndarray:
    hidden = np.asarray(hidden, dtype=np.float64)
    return hidden / rms(hidden)[..., None]


def softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@dataclass
class ReadingPoint:
    """Where a head reads, for training it: the tokens whose last position it reads for a text,
    on which engine lane, under which key; and the prompt's own probabilities over the labels for
    a text, if the prompt has label words to compare the head against."""

    key: str
    engine: object  # an engine.base.Engine
    lane: int
    tokens: Callable[[str], list[int]]
    prompt_alone: Callable[[str], np.ndarray] | None = None
    # The LoRA adapter the lane runs while the head reads (None: the model's own weights); a head
    # fits only the weights it was trained on.
    adapter: Path | None = None
    # Where the text lies in `tokens(text)`, (start, end): a pooled head averages those positions.
    text_span: Callable[[list[int]], tuple[int, int]] | None = None


# What a head reads: the last position alone (the scoring position: enough for a verdict), or that
# and the mean over the text's positions (what the text is about: intent and emotion read better).
POOLINGS = ("last", "last+mean")


def head_features(hidden: np.ndarray, pooling: str) -> np.ndarray:
    """The head's input from a pass's hidden state ([hidden], or [last, mean] rows)."""
    hidden = np.asarray(hidden)
    if pooling == "last":
        return normalise(hidden if hidden.ndim == 1 else hidden[0])
    if hidden.ndim != 2:
        raise HeadError("a pooled head needs the pass's mean over the text as well")
    return np.concatenate([normalise(hidden[0]), normalise(hidden[1])])


@dataclass
class ChoiceHead:
    model_sha256: str
    point: str  # the reading point's key (see the module docstring)
    layers: int  # reads the residual stream after this many blocks
    weights: np.ndarray  # [labels, width], on the RMS-normalised residual stream
    bias: np.ndarray  # [labels]
    # The role's labels in row order; empty for a format 2/3 file until `for_labels` names them.
    labels: tuple[str, ...] = ()
    role: str | None = None  # None: a format 2/3 file (named by its point alone)
    pooling: str = "last"  # one of POOLINGS
    info: dict = field(default_factory=dict)  # how it was trained: data, sizes, held-out accuracy
    adapter: Path | None = None  # LoRA adapter GGUF trained with the head, applied to its passes
    # A second reader on the text's own n-grams (roles/ngrams.py); None: the hidden state alone.
    ngrams: NgramModel | None = None

    def __post_init__(self):
        self.weights = np.atleast_2d(np.asarray(self.weights, dtype=np.float64))
        self.bias = np.atleast_1d(np.asarray(self.bias, dtype=np.float64))
        if self.weights.shape[0] == 1:  # one row: the first label's logit against the second's 0
            self.weights = np.vstack([self.weights, np.zeros_like(self.weights)])
            self.bias = np.append(self.bias, 0.0)
        if self.weights.shape[0] != self.bias.shape[0] or (self.labels and len(self.labels) != self.bias.shape[0]):
            raise HeadError(f"head {self.point}: {self.weights.shape[0]} weight rows, {self.bias.shape[0]} biases")

    # ---- files ------------------------------------------------------------------------------
    @staticmethod
    def filename(model_sha256: str, point: str, role: str | None = None) -> str:
        return f"{model_sha256}.{point}.json" if role is None else f"{model_sha256}.{point}.{role}.json"

    @staticmethod
    def adapter_filename(model_sha256: str, point: str) -> str:
        return f"{model_sha256}.{point}.lora.gguf"

    def save(self, directory: Path) -> Path:
        """Write the head (and copy its adapter) into `directory`; a head saved without an adapter
        removes a stale one of the same name there."""
        if not self.labels or self.role is None:
            raise HeadError(f"head {self.point}: name its role and labels (for_labels) before saving it")
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / self.filename(self.model_sha256, self.point, self.role)
        adapter = directory / self.adapter_filename(self.model_sha256, self.point)
        if self.adapter is not None and Path(self.adapter).resolve() != adapter.resolve():
            tmp = adapter.with_suffix(".tmp")
            tmp.write_bytes(Path(self.adapter).read_bytes())
            tmp.replace(adapter)
        elif self.adapter is None and adapter.exists():
            adapter.unlink()
        payload = {
            "format": HEAD_FORMAT,
            "model_sha256": self.model_sha256,
            "point": self.point,
            "role": self.role,
            "labels": list(self.labels),
            "layers": self.layers,
            "pooling": self.pooling,
            "info": self.info,
            "adapter": adapter.name if self.adapter is not None else None,
            "bias": [float(x) for x in self.bias],
            "weights": [[float(x) for x in row] for row in self.weights],
        }
        if self.ngrams is not None:
            payload["ngrams"] = self.ngrams.to_json()
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload, ensure_ascii=False, indent=1))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: Path) -> ChoiceHead:
        try:
            payload = json.loads(Path(path).read_text())
            version = payload.get("format")
            if version not in (2, 3, HEAD_FORMAT):
                raise HeadError(
                    f"{path}: head format {version!r} is not {HEAD_FORMAT}; train it again with `allinone train-head`"
                )
            adapter = None
            if payload.get("adapter"):
                adapter = Path(path).parent / Path(payload["adapter"]).name
                if not adapter.is_file():
                    raise HeadError(f"{path}: its LoRA adapter {adapter.name} is missing")
            if version == HEAD_FORMAT:
                labels, role, point = tuple(payload["labels"]), payload["role"], payload["point"]
                pooling = payload.get("pooling", "last")
                if len(set(labels)) != len(labels) or len(labels) < 2:
                    raise HeadError(f"{path}: the head's label list {labels} is not 2 or more distinct labels")
                if pooling not in POOLINGS:
                    raise HeadError(f"{path}: pooling {pooling!r} is not one of {', '.join(POOLINGS)}")
            else:
                labels, role, point, pooling = (), None, payload["prompt"], "last"
            ngrams = None
            if payload.get("ngrams") is not None:
                try:
                    ngrams = NgramModel.from_json(payload["ngrams"], len(labels))
                except (ValueError, KeyError, TypeError) as err:
                    raise HeadError(f"{path}: its n-gram model is broken ({err})") from None
            return cls(
                model_sha256=payload["model_sha256"],
                point=point,
                layers=int(payload["layers"]),
                weights=np.asarray(payload["weights"], dtype=np.float64),
                bias=np.asarray(payload["bias"], dtype=np.float64),
                labels=labels,
                role=role,
                pooling=pooling,
                info=payload.get("info", {}),
                adapter=adapter,
                ngrams=ngrams,
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            if isinstance(err, HeadError):
                raise
            raise HeadError(f"{path}: not a head file ({err})") from None

    @classmethod
    def find(cls, model_sha256: str, point: str, user_dir: Path, role: str, labels: Sequence[str]) -> ChoiceHead | None:
        """The user's own head for this model, reading point and role if there is one, else a
        packaged one; checked against the role's labels (HeadError: made for other labels)."""
        names = [cls.filename(model_sha256, point, role)]
        if len(labels) == 2:
            names.append(cls.filename(model_sha256, point))
        for directory in (user_dir, PACKAGED_HEADS):
            for name in names:
                if (directory / name).is_file():
                    return cls.load(directory / name).for_labels(labels, role)
        return None

    def for_labels(self, labels: Sequence[str], role: str) -> ChoiceHead:
        """This head, its rows named by the role's labels; refused if it was made for others."""
        labels = tuple(labels)
        if not self.labels:
            if len(labels) != self.weights.shape[0]:
                raise HeadError(
                    f"head {self.point}: a {self.weights.shape[0]}-label head cannot serve role {role!r} "
                    f"({len(labels)} labels)"
                )
            self.labels = labels
        elif self.labels != labels:
            raise HeadError(
                f"head {self.point}.{self.role} was trained for the labels {list(self.labels)}, but role "
                f"{role!r} has {list(labels)}: train it again with `allinone train-head --role {role}`"
            )
        self.role = self.role or role
        return self

    # ---- use --------------------------------------------------------------------------------
    @property
    def pooled(self) -> bool:
        return self.pooling != "last"

    def check_fits(self, n_layers: int, n_embd: int) -> None:
        width = n_embd * (2 if self.pooled else 1)
        if not 0 < self.layers < n_layers or self.weights.shape[1] != width:
            raise HeadError(
                f"the head (after block {self.layers}, width {self.weights.shape[1]}) does not fit "
                f"a model with {n_layers} blocks of width {n_embd}"
            )

    def probabilities(self, hidden: np.ndarray, text: str | None = None) -> np.ndarray:
        """Over the head's labels, in their order; `hidden`: a pass's [hidden] or [last, mean].
        A head with an n-gram model mixes in its reading of `text` (required then)."""
        probs = softmax(self.weights @ head_features(hidden, self.pooling) + self.bias)
        if self.ngrams is None:
            return probs
        if text is None:
            raise HeadError(f"head {self.point}.{self.role} also reads the text's n-grams: pass the text")
        return mix(probs, self.ngrams.logits([text])[0])


def mix(head_probabilities: np.ndarray, ngram_logits: np.ndarray) -> np.ndarray:
    """The normalised weighted geometric mean of the hidden-state head's and the n-gram model's
    probabilities, NGRAM_SHARE to the n-grams (softmax ignores the n-gram normaliser, the same for
    every label)."""
    hidden = np.log(np.asarray(head_probabilities) + 1e-12)
    return softmax((1 - NGRAM_SHARE) * hidden + NGRAM_SHARE * np.asarray(ngram_logits))


# ---- training -------------------------------------------------------------------------------
def fit_softmax(x: np.ndarray, y: np.ndarray, n_labels: int, l2: float, start: np.ndarray | None = None) -> np.ndarray:
    """L2-regularised multinomial logistic regression on standardised features (scipy's L-BFGS: it
    converges in a few hundred cheap steps whatever the features' conditioning). Returns weights
    [width + 1, labels], the intercept last (not penalised). `x` may be a scipy sparse matrix."""
    # Imported here, not at the top: scipy adds ~50 MB to a process that only answers (serve,
    # analyze), and only training fits anything.
    from scipy import sparse
    from scipy.optimize import minimize

    n, width = x.shape
    if sparse.issparse(x):
        xb = sparse.hstack([x, np.ones((n, 1))]).tocsr()
    else:
        xb = np.hstack([x, np.ones((n, 1))])
    target = np.eye(n_labels)[y]
    penalty = np.append(np.full(width, l2 / n), 0.0)[:, None]

    def loss_and_gradient(flat: np.ndarray) -> tuple[float, np.ndarray]:
        w = flat.reshape(width + 1, n_labels)
        z = xb @ w
        log_p = z - np.logaddexp.reduce(z, axis=1, keepdims=True)
        loss = -np.sum(target * log_p) / n + 0.5 * np.sum(penalty * w * w)
        gradient = xb.T @ (np.exp(log_p) - target) / n + penalty * w
        return loss, gradient.ravel()

    w0 = np.zeros((width + 1) * n_labels) if start is None else start.ravel()
    result = minimize(loss_and_gradient, w0, jac=True, method="L-BFGS-B", options={"maxiter": 500})
    return result.x.reshape(width + 1, n_labels)


def _log_loss(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
    p = softmax(x @ w[:-1] + w[-1])
    return float(-np.mean(np.log(p[np.arange(len(y)), y] + 1e-12)))


L2_GRID = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)


@dataclass
class TrainedParameters:
    weights: np.ndarray  # [labels, width], on normalised hidden states
    bias: np.ndarray  # [labels]
    l2: float


def train_parameters(
    features: np.ndarray, y: np.ndarray, n_labels: int, *, folds: int = 5, seed: int = 0, l2: float | None = None
) -> TrainedParameters:
    """Standardise, pick the L2 strength by cross-validated log loss (unless `l2` is given), fit,
    and fold the standardisation back so the result applies to the features as given."""
    mean, std = features.mean(axis=0), features.std(axis=0) + 1e-6
    x = (features - mean) / std
    order = np.random.default_rng(seed).permutation(len(y))
    fold_of = np.empty(len(y), dtype=int)
    fold_of[order] = np.arange(len(y)) % folds
    best_l2, best_loss = L2_GRID[0], math.inf
    starts: dict[int, np.ndarray] = {}
    grid = sorted(L2_GRID, reverse=True) if l2 is None else []  # strong to weak: each fit starts from the last
    for strength in grid:
        loss = 0.0
        for k in range(folds):
            train, held = fold_of != k, fold_of == k
            starts[k] = fit_softmax(x[train], y[train], n_labels, strength, starts.get(k))
            loss += _log_loss(x[held], y[held], starts[k]) * held.sum()
        if loss < best_loss:
            best_l2, best_loss = strength, loss
    if l2 is not None:
        best_l2 = l2
    w = fit_softmax(x, y, n_labels, best_l2)
    a = (w[:-1] / std[:, None]).T
    return TrainedParameters(weights=a, bias=w[-1] - a @ mean, l2=best_l2)


MIN_EXAMPLES = 20
MIN_PER_LABEL = 3


def collect_features(
    point: ReadingPoint,
    texts: Sequence[str],
    layers: int,
    progress: Callable[[int], None] | None = None,
    pooling: str = "last",
) -> np.ndarray:
    """The head's features (normalised residual streams after `layers` blocks) at the reading point."""
    if pooling != "last" and point.text_span is None:
        raise HeadError(f"reading point {point.key} does not say where the text starts: no pooled head there")
    running = point.engine.lane_adapter.get(point.lane)
    if running != point.adapter:
        raise HeadError(
            f"the lane runs with {running.name if running else 'the model’s own weights'}, not with "
            f"{point.adapter.name if point.adapter else 'the model’s own weights'}: the head would read "
            "other weights than the ones it is meant for"
        )
    rows = []
    for text in texts:
        tokens = point.tokens(text)
        if pooling == "last":
            hidden = point.engine.hidden_state(tokens, layers, lane=point.lane)
        else:
            hidden = point.engine.pooled_hidden_state(tokens, layers, point.text_span(tokens), lane=point.lane)
        rows.append(head_features(hidden, pooling))
        if progress:
            progress(1)
    return np.vstack(rows)


def check_training_labels(labels: Sequence[str], label_names: Sequence[str]) -> None:
    """Enough texts, and every label of the role seen a few times (a head cannot learn a label it
    never saw); labels outside the role are the data reader's to refuse, with the line."""
    if len(labels) < MIN_EXAMPLES:
        raise HeadError(f"{len(labels)} labelled texts are too few to train a head; at least {MIN_EXAMPLES} are needed")
    for label in label_names:
        count = sum(1 for x in labels if x == label)
        if count < MIN_PER_LABEL:
            raise HeadError(f"only {count} '{label}' texts: a head needs at least {MIN_PER_LABEL} of each label")


def stratified_holdout(y: np.ndarray, share: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    held = np.zeros(len(y), dtype=bool)
    for value in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == value))
        held[members[: max(1, int(round(len(members) * share)))]] = True
    return held


def heldout_count(labels: Sequence[str], share: float) -> int:
    """How many texts train_head keeps aside (and scores a second time with the prompt alone,
    where the reading point has a prompt_alone)."""
    return int(stratified_holdout(np.unique(np.asarray(labels), return_inverse=True)[1], share, 0).sum())


def train_head(
    point: ReadingPoint,
    texts: Sequence[str],
    labels: Sequence[str],
    label_names: Sequence[str],
    *,
    role: str,
    model_sha256: str,
    layers: int | None = None,
    holdout: float = 0.2,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
    source: str = "",
    pooling: str = "last",
    ngrams: bool = False,
) -> tuple[ChoiceHead, dict]:
    """Fit a head for the role's `label_names` on texts/labels. A stratified `holdout` share is kept
    aside first to report honest accuracy (head vs the prompt alone, when the point has one: one
    scoring pass per held-out text); the head returned is then refitted on everything. `progress`
    is called once per text read, then once per held-out text scored. `ngrams`: the head also
    carries a model of the texts' n-grams (roles/ngrams.py), mixed with its reading of the hidden
    state; the report gives the held-out accuracy of the hidden state alone beside it."""
    check_training_labels(labels, label_names)
    started = time.perf_counter()
    n_layers = point.engine.n_layers
    layers = default_layers(n_layers) if layers is None else layers
    if not 0 < layers < n_layers:
        raise HeadError(f"layers must be in 1..{n_layers - 1}, got {layers}")
    features = collect_features(point, texts, layers, progress, pooling)
    index = {name: i for i, name in enumerate(label_names)}
    y = np.array([index[x] for x in labels])
    held = stratified_holdout(y, holdout, seed)
    split = train_parameters(features[~held], y[~held], len(label_names), seed=seed)
    held_logits = features[held] @ split.weights.T + split.bias
    hidden_right = np.argmax(held_logits, axis=1) == y[held]
    head_right = hidden_right
    if ngrams:
        texts_of = np.asarray(texts, dtype=object)
        split_ngrams = NgramModel.fit(list(texts_of[~held]), y[~held], len(label_names))
        mixed = mix(softmax(held_logits), split_ngrams.logits(list(texts_of[held])))
        head_right = np.argmax(mixed, axis=1) == y[held]
    prompt_right = []
    for i in np.flatnonzero(held) if point.prompt_alone else ():
        prompt_right.append(int(np.argmax(point.prompt_alone(texts[i]))) == y[i])
        if progress:
            progress(1)
    report = {
        "examples": int(len(y)),
        "heldout": int(held.sum()),
        "layers": layers,
        "heldout_accuracy_head": float(np.mean(head_right)),
        "heldout_accuracy_prompt": float(np.mean(prompt_right)) if prompt_right else None,
    }
    if ngrams:
        report["heldout_accuracy_hidden_alone"] = float(np.mean(hidden_right))
    # The strength the split chose: a second search over all the texts would cost as much again.
    final = train_parameters(features, y, len(label_names), seed=seed, l2=split.l2)
    report["l2"] = final.l2
    report["seconds"] = round(time.perf_counter() - started, 1)
    info = {**report, "source": source, "trained": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    head = ChoiceHead(
        model_sha256=model_sha256,
        point=point.key,
        layers=layers,
        weights=final.weights,
        bias=final.bias,
        labels=tuple(label_names),
        role=role,
        pooling=pooling,
        info=info,
        ngrams=NgramModel.fit(texts, y, len(label_names)) if ngrams else None,
    )
    return head, report
