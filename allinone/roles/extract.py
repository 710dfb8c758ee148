"""An extract role at work: key phrases taken literally from the text, best first.

Candidates are the text's own token spans that can stand as a phrase (no punctuation inside,
English spans on word boundaries and not opening or closing on a function word), so whatever
the role returns occurs in the text: a text cannot make it say anything else.

A candidate is ranked by a linear phrase head on the analysis pass, the very pass the choice
heads read (Assistant.analyze_roles runs it once for all of them): the residual stream of every
text token at the heads' depth, averaged over the span and taken at its last token, plus a few
counts (how often the phrase occurs, where first, whether in the first line, its length). The
head is trained on texts with their key phrases (`allinone train-head keywords-train.jsonl --role
keywords`); without one, the counts alone rank (no pass at all).
"""

from __future__ import annotations

import json
import math
import re
import time
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .definition import RoleDefinition
from .head import PACKAGED_HEADS, HeadError, normalise, rms, train_parameters
from .language import detect_language

PHRASE_HEAD_FORMAT = 1
# Where a phrase head reads by default, for a model of 24 blocks (scaled for others): lower than the
# choice heads, because which span is a key phrase is already plain there (docs/roles.md has the
# comparison) and a keywords request on its own then stops the pass early.
PHRASE_DEPTH_SHARE = 9 / 24


def default_phrase_layers(n_layers: int) -> int:
    return max(1, round(n_layers * PHRASE_DEPTH_SHARE))


# What a phrase head's columns mean; a head made for other features is refused.
FEATURES = "mean+last+counts-1"
MAX_SPAN_TOKENS = {"zh": 8, "en": 6}
MAX_WORDS = 5
_BREAKS = set('，。、；：！？,.;:!?()（）[]【】《》<>{}"“”‘’\n\t—/·…|=+*&#@~`^$')
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
# Chinese particles and function characters no key phrase opens or closes with (none of the 1,766
# Chinese gold phrases of keywords-train does): `驾照了`, `开心到` are pieces of a sentence.
_ZH_NO_START = set("的了与或及在是把被从")
_ZH_NO_END = set("了的吗呢吧啊呀哦嘛得着过到")
_EDGE_WORDS = frozenset(
    """a an the of for and or nor but in on at to with by from as is are was were be been being this that
    these those it its we our us they their them he she his her i my me you your which who whom whose what
    when where while how why than then so such also can could may might must shall should will would
    do does did not no into onto over under about above below between through during before after via
    per each every some any all both either neither more most less least very here there using based
    new one two three paper study show shows shown propose proposed present presented""".split()
)


@dataclass
class Phrases:
    """An extract role's answer for one text."""

    phrases: list[str]
    scores: list[float]
    latency_ms: float
    truncated: bool = False

    def to_dict(self) -> dict:
        return {
            "phrases": self.phrases,
            "scores": self.scores,
            "latency_ms": self.latency_ms,
            "truncated": self.truncated,
        }

    def annotation(self) -> dict:
        return {"phrases": self.phrases}


@dataclass(frozen=True)
class Span:
    start: int  # first token, counted from the text's first token
    end: int  # one past the last token
    phrase: str


def phrase_key(phrase: str, lang: str) -> str:
    """When two phrases are the same answer: case, width and spacing aside; English plurals too."""
    text = re.sub(r"\s+", " ", unicodedata.normalize("NFKC", phrase).lower()).strip()
    if lang == "zh":
        return text
    return " ".join(w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w for w in text.split())


def candidate_spans(pieces: Sequence[bytes], lang: str) -> list[Span]:
    """Token spans of the text (`pieces`: each token's bytes) that can be a key phrase."""
    offsets, at = [], 0
    for piece in pieces:
        offsets.append(at)
        at += len(piece)
    offsets.append(at)
    raw = b"".join(pieces)
    spans = []
    longest = MAX_SPAN_TOKENS["zh" if lang == "zh" else "en"]
    for i in range(len(pieces)):
        for j in range(i + 1, min(len(pieces), i + longest) + 1):
            try:
                chunk = raw[offsets[i] : offsets[j]].decode("utf-8")
            except UnicodeDecodeError:
                continue  # a character split between tokens: a longer span may complete it
            if any(ch in _BREAKS for ch in chunk):
                break  # every longer span from i holds the break too
            phrase = chunk.strip()
            if not phrase or not (phrase[0].isalnum() and phrase[-1].isalnum()):
                continue
            if lang == "zh" and _CJK.search(phrase):
                if not 2 <= len(phrase) <= 12 or phrase[0] in _ZH_NO_START or phrase[-1] in _ZH_NO_END:
                    continue
            else:
                before = raw[offsets[i] - 1 : offsets[i]] if i else b" "
                after = raw[offsets[j] : offsets[j] + 1] or b" "
                if before.isalnum() and not chunk.startswith(" "):
                    continue  # starts inside a word
                if after.isalnum() or (after == b"'" and raw[offsets[j] + 1 : offsets[j] + 2].isalpha()):
                    continue  # ends inside a word (`aren` of `aren't`)
                words = phrase.lower().split()
                if len(words) > MAX_WORDS or words[0] in _EDGE_WORDS or words[-1] in _EDGE_WORDS:
                    continue
                if len(phrase) < 2 or phrase.isdigit():
                    continue
            spans.append(Span(i, j, phrase))
    return spans


def count_features(text: str, spans: Sequence[Span], lang: str) -> np.ndarray:
    """Per span: log count in the text, first position (share of the text), in the first line,
    tokens, characters, Chinese or not."""
    lower = unicodedata.normalize("NFKC", text).lower()
    first_line = lower.find("\n")
    first_line = len(lower) if first_line < 0 else first_line
    size = max(1, len(lower))
    rows = []
    for span in spans:
        phrase = unicodedata.normalize("NFKC", span.phrase).lower()
        first = lower.find(phrase)
        rows.append(
            [
                math.log1p(lower.count(phrase)),
                first / size if first >= 0 else 1.0,
                1.0 if 0 <= first < first_line else 0.0,
                (span.end - span.start) / MAX_SPAN_TOKENS["zh"],
                min(len(phrase), 40) / 20,
                1.0 if lang == "zh" else 0.0,
            ]
        )
    return np.asarray(rows, dtype=np.float64).reshape(len(spans), 6)


def span_features(rows: np.ndarray, spans: Sequence[Span], counts: np.ndarray) -> np.ndarray:
    """A phrase head's input per span: [normalised mean over the span, normalised last row, counts]."""
    states = np.asarray(rows, dtype=np.float64)
    means = np.stack([states[s.start : s.end].mean(axis=0) for s in spans])
    lasts = np.stack([states[s.end - 1] for s in spans])
    return np.concatenate([normalise(means), normalise(lasts), counts], axis=1)


# Without a head: the phrase that recurs, comes early, sits in the title and has some length.
_COUNT_WEIGHTS = np.array([2.0, -1.0, 1.0, 0.3, 0.5, 0.0])


@dataclass
class PhraseHead:
    """Logistic regression: is this span one of the text's key phrases? Read on the analysis pass."""

    model_sha256: str
    point: str
    role: str
    layers: int
    weights: np.ndarray  # [width]
    bias: float
    features: str = FEATURES
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        self.weights = np.asarray(self.weights, dtype=np.float64).reshape(-1)

    @staticmethod
    def filename(model_sha256: str, point: str, role: str) -> str:
        return f"{model_sha256}.{point}.{role}.json"

    def save(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / self.filename(self.model_sha256, self.point, self.role)
        payload = {
            "format": PHRASE_HEAD_FORMAT,
            "kind": "extract",
            "model_sha256": self.model_sha256,
            "point": self.point,
            "role": self.role,
            "layers": self.layers,
            "features": self.features,
            "info": self.info,
            "bias": float(self.bias),
            "weights": [float(x) for x in self.weights],
        }
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload, ensure_ascii=False, indent=1))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: Path) -> PhraseHead:
        try:
            payload = json.loads(Path(path).read_text())
            if payload.get("kind") != "extract" or payload.get("format") != PHRASE_HEAD_FORMAT:
                raise HeadError(f"{path}: not a phrase head of format {PHRASE_HEAD_FORMAT}; train it again")
            if payload["features"] != FEATURES:
                raise HeadError(f"{path}: made for features {payload['features']!r}, not {FEATURES!r}; train it again")
            return cls(
                model_sha256=payload["model_sha256"],
                point=payload["point"],
                role=payload["role"],
                layers=int(payload["layers"]),
                weights=np.asarray(payload["weights"], dtype=np.float64),
                bias=float(payload["bias"]),
                info=payload.get("info", {}),
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            if isinstance(err, HeadError):
                raise
            raise HeadError(f"{path}: not a phrase head file ({err})") from None

    @classmethod
    def find(cls, model_sha256: str, point: str, user_dir: Path, role: str) -> PhraseHead | None:
        name = cls.filename(model_sha256, point, role)
        for directory in (user_dir, PACKAGED_HEADS):
            if (directory / name).is_file():
                return cls.load(directory / name)
        return None

    def check_fits(self, n_embd: int, pass_layers: int) -> None:
        """It must read a model of this width, no deeper than the analysis pass goes."""
        width = 2 * n_embd + len(_COUNT_WEIGHTS)
        if self.weights.shape[0] != width:
            raise HeadError(f"the phrase head has {self.weights.shape[0]} weights; this model needs {width}")
        if not 0 < self.layers <= pass_layers:
            raise HeadError(
                f"the phrase head reads after block {self.layers}, deeper than the analysis pass goes "
                f"(block {pass_layers}): train it again"
            )

    def scores(self, features: np.ndarray) -> np.ndarray:
        """For span_features' rows (training, tests)."""
        return features @ self.weights + self.bias

    def span_scores(self, rows: np.ndarray, spans: Sequence[Span], counts: np.ndarray) -> np.ndarray:
        """The same as scores(span_features(rows, spans, counts)) without building that matrix (a
        long English text has a few thousand spans: a few hundred MB of float64 at once). A
        normalised vector's product is the raw product over its RMS; a span's mean comes from
        running sums, a few hundred spans at a time."""
        states = np.asarray(rows, dtype=np.float64)
        width = states.shape[1]
        w_mean, w_last, w_counts = self.weights[:width], self.weights[width : 2 * width], self.weights[2 * width :]
        starts = np.array([s.start for s in spans])
        ends = np.array([s.end for s in spans])
        scores = counts @ w_counts + self.bias
        scores += ((states @ w_last) / rms(states))[ends - 1]
        running = np.vstack([np.zeros((1, width)), np.cumsum(states, axis=0)])
        for at in range(0, len(spans), 512):
            part = slice(at, at + 512)
            means = (running[ends[part]] - running[starts[part]]) / (ends[part] - starts[part])[:, None]
            scores[part] += (means @ w_mean) / rms(means)
        return scores


def rank(text: str, spans: Sequence[Span], scores: np.ndarray, lang: str, limit: int) -> tuple[list[str], list[float]]:
    """The best `limit` distinct phrases, each once (the first spelling seen), checked to occur in
    the text (a truncated text's two halves meet inside the token list, not in the text). A
    phrase inside one already chosen is left out: `脑梗` after `脑梗死`, `knowledge` after
    `knowledge sharing` add nothing a reader needs (and cost a place in the first five)."""
    chosen, kept, seen = [], [], set()
    lower = text.lower()
    for index in np.argsort(-scores, kind="stable"):
        phrase = spans[index].phrase
        key = phrase_key(phrase, lang)
        if key in seen or phrase.lower() not in lower:
            continue
        if any(phrase.lower() in earlier.lower() for earlier in chosen):
            continue
        seen.add(key)
        chosen.append(phrase)
        kept.append(float(scores[index]))
        if len(chosen) == limit:
            break
    return chosen, kept


class ExtractRole:
    """An extract role on the analysis pass. `text_tokens(text)`: the text's tokens as the pass
    holds them and whether the text was cut; `text_pass(text, layers)`: those and the residual
    stream after `layers` blocks from the text's first token on (ChoiceRole.text_pass of the
    analyst, whose pass also serves the choice heads); `token_bytes`: a token's bytes."""

    def __init__(
        self,
        role: RoleDefinition,
        text_tokens: Callable[[str], tuple[list[int], bool]],
        text_pass: Callable[..., tuple[list[int], dict[int, np.ndarray], np.ndarray, bool]],
        token_bytes: Callable[[int], bytes],
        head: PhraseHead | None = None,
    ):
        if role.kind != "extract":
            raise ValueError(f"role {role.name!r} is a {role.kind} role, not an extract role")
        self.role = role
        self.text_tokens = text_tokens
        self.text_pass = text_pass
        self.token_bytes = token_bytes
        self.head = head

    def extract(self, text: str, *, limit: int | None = None) -> Phrases:
        start = time.perf_counter()
        if self.head is None:
            tokens, truncated = self.text_tokens(text)
            rows = None
        else:
            tokens, found, _, truncated = self.text_pass(text, self.head.layers)
            rows = found[self.head.layers]
        return self.from_pass(text, tokens, rows, truncated, start, limit=limit)

    def from_pass(
        self,
        text: str,
        tokens: Sequence[int],
        rows: np.ndarray | None,
        truncated: bool,
        started: float,
        *,
        limit: int | None = None,
    ) -> Phrases:
        """The answer from a pass already made (`rows`: the residual stream at the head's depth from
        the text's first token on, None without a head); `started`: perf_counter() when the
        request began."""
        lang = detect_language(text)
        lang = "zh" if lang == "zh" else "en"
        spans = candidate_spans([self.token_bytes(t) for t in tokens], lang)
        limit = limit or self.role.max_phrases or 10
        if not spans:
            return Phrases([], [], (time.perf_counter() - started) * 1000, truncated)
        counts = count_features(text, spans, lang)
        if self.head is None:
            scores = counts @ _COUNT_WEIGHTS
        else:
            scores = self.head.span_scores(rows[: len(tokens)], spans, counts)
        phrases, kept = rank(text, spans, scores, lang, limit)
        return Phrases(phrases, [round(s, 4) for s in kept], (time.perf_counter() - started) * 1000, truncated)


# ---- training ---------------------------------------------------------------------------------
@dataclass
class PhraseExample:
    text: str
    phrases: tuple[str, ...]


NEGATIVES_PER_TEXT = 40
MIN_TEXTS = 20


def span_labels(spans: Sequence[Span], phrases: Sequence[str], lang: str) -> np.ndarray:
    gold = {phrase_key(p, lang) for p in phrases}
    return np.array([phrase_key(s.phrase, lang) in gold for s in spans], dtype=bool)


def train_phrase_head(
    examples: Sequence[PhraseExample],
    text_pass: Callable[..., tuple[list[int], dict[int, np.ndarray], np.ndarray, bool]],
    token_bytes: Callable[[int], bytes],
    *,
    role: RoleDefinition,
    model_sha256: str,
    point: str,
    layers: int,
    holdout: float = 0.2,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
    source: str = "",
) -> tuple[PhraseHead, dict]:
    """Fit a phrase head: every candidate span of a text that is one of its phrases is a positive,
    a sample of the others negatives. A share of the texts is kept aside and ranked by the head
    trained without them (which also picks the L2 strength); the report gives their F1@5 (phrase
    keys as the role dedupes) against the counts alone. `progress` is called once per text read."""
    if len(examples) < MIN_TEXTS:
        raise HeadError(f"{len(examples)} texts are too few to train a phrase head; at least {MIN_TEXTS} are needed")
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    per_text = []  # (features, labels, spans, lang) per text
    for example in examples:
        lang = "zh" if detect_language(example.text) == "zh" else "en"
        tokens, found, _, _ = text_pass(example.text, layers)
        rows = found[layers][: len(tokens)]
        spans = candidate_spans([token_bytes(t) for t in tokens], lang)
        counts = count_features(example.text, spans, lang)
        features = span_features(rows, spans, counts) if spans else np.zeros((0, rows.shape[1] * 2 + counts.shape[1]))
        per_text.append((features, span_labels(spans, example.phrases, lang), spans, lang))
        if progress:
            progress(1)
    order = rng.permutation(len(examples))
    held = np.zeros(len(examples), dtype=bool)
    held[order[: max(1, int(round(len(examples) * holdout)))]] = True

    def sample(indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for i in indices:
            features, labels, _, _ = per_text[i]
            positives = np.flatnonzero(labels)
            negatives = np.flatnonzero(~labels)
            if len(negatives) > NEGATIVES_PER_TEXT:
                negatives = rng.choice(negatives, NEGATIVES_PER_TEXT, replace=False)
            keep = np.concatenate([positives, negatives]).astype(int)
            xs.append(features[keep])
            ys.append(labels[keep].astype(int))
        return np.concatenate(xs), np.concatenate(ys)

    def f1_at_5(indices: np.ndarray, score: Callable[[np.ndarray], np.ndarray]) -> float:
        total = 0.0
        for i in indices:
            features, labels, spans, lang = per_text[i]
            gold = {phrase_key(p, lang) for p in examples[i].phrases if p.lower() in examples[i].text.lower()}
            if not gold:
                continue
            answer, _ = rank(examples[i].text, spans, score(features), lang, 5) if spans else ([], [])
            right = sum(phrase_key(p, lang) in gold for p in answer)
            precision, recall = right / 5, right / len(gold)
            total += 0.0 if right == 0 else 2 * precision * recall / (precision + recall)
        return total / max(1, len(indices))

    # The L2 strength is the one whose head ranks the held-out texts best (F1@5, the measure the
    # role is judged by, rather than the log loss of a sample of spans).
    x, y = sample(np.flatnonzero(~held))
    by_strength = {}
    for l2 in PHRASE_L2_GRID:
        weights, bias = _fit(x, y, l2)
        by_strength[l2] = f1_at_5(np.flatnonzero(held), lambda f, w=weights, b=bias: f @ w + b)
    best = max(by_strength, key=by_strength.get)
    counts_only = len(_COUNT_WEIGHTS)
    report = {
        "texts": len(examples),
        "heldout": int(held.sum()),
        "layers": layers,
        "heldout_f1@5_head": round(by_strength[best], 4),
        "heldout_f1@5_counts": round(f1_at_5(np.flatnonzero(held), lambda f: f[:, -counts_only:] @ _COUNT_WEIGHTS), 4),
        "l2": best,
        "heldout_f1@5_by_l2": {str(k): round(v, 4) for k, v in by_strength.items()},
    }
    x, y = sample(np.arange(len(examples)))
    weights, bias = _fit(x, y, best)
    report["seconds"] = round(time.perf_counter() - started, 1)
    info = {**report, "source": source, "trained": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    head = PhraseHead(
        model_sha256=model_sha256, point=point, role=role.name, layers=layers, weights=weights, bias=bias, info=info
    )
    return head, report


PHRASE_L2_GRID = (30.0, 100.0, 300.0, 1000.0)


def _fit(x: np.ndarray, y: np.ndarray, l2: float) -> tuple[np.ndarray, float]:
    """Two-way logistic regression (the choice heads' fit), as one weight vector: key minus not."""
    if y.min() == y.max():
        raise HeadError("the training texts' phrases match none of their candidate spans (or all of them)")
    fitted = train_parameters(x, y, 2, l2=l2)
    return fitted.weights[1] - fitted.weights[0], float(fitted.bias[1] - fitted.bias[0])
