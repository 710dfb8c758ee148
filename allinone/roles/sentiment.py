"""The sentiment analyst: a prompt, two candidate next tokens, one forward pass.

The prompt's fixed part is tokenized once; per request only the text and the few tokens after it
are new, and the engine's prefix cache evaluates just those. The answer is always one of the two
labels, whatever the text says (a text cannot talk the analyst out of them: we never read
generated text, we compare the two label tokens' probabilities).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np

from ..engine.base import Engine, Sampling
from .head import ReadingPoint
from .prompts import LABELS, SentimentPrompt
from .template import ChatTemplate


class InputError(ValueError):
    """The caller's input is unusable; the message says why (exit code 2 / HTTP 4xx)."""


@dataclass
class Sentiment:
    label: str  # "positive" | "negative"
    probability: float | None  # of `label`; None for the generation-based original method
    latency_ms: float
    truncated: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_positive(cls, positive: float, latency_ms: float, truncated: bool = False) -> Sentiment:
        """The more likely label, given the probability of "positive"."""
        label = "positive" if positive >= 0.5 else "negative"
        return cls(
            label=label,
            probability=float(positive if label == "positive" else 1.0 - positive),
            latency_ms=latency_ms,
            truncated=truncated,
        )


def validate_text(text, max_chars: int) -> str:
    if not isinstance(text, str):
        raise InputError(f"text must be a string, got {type(text).__name__}")
    if not text.strip():
        raise InputError("text is empty")
    if len(text) > max_chars:
        raise InputError(f"text is {len(text)} characters long; the limit is {max_chars}")
    return text


_CONTENT_MARK = "\x00text\x00"


@dataclass
class _Positive:
    value: float
    truncated: bool


class SentimentAnalyst:
    def __init__(
        self,
        engine: Engine,
        prompt: SentimentPrompt,
        *,
        lane: int = 0,
        max_text_chars: int = 20_000,
        max_text_tokens: int = 1024,
    ):
        self.engine = engine
        self.prompt = prompt
        self.lane = lane
        self.max_text_chars = max_text_chars
        if prompt.template.count("{text}") != 1:
            raise ValueError(f"prompt {prompt.name!r} must contain {{text}} exactly once")
        before, after = self._frame()
        self._before = engine.tokenize(before, special=True)
        self._after = engine.tokenize(after, special=True)
        overhead = len(self._before) + len(self._after) + 1
        self.max_text_tokens = max(1, min(max_text_tokens, engine.lane_context_size(lane) - overhead))
        self.candidates = [self._label_token(prompt.label_words[label]) for label in LABELS]
        self.head = None
        if self.candidates[0] == self.candidates[1]:
            raise ValueError(f"prompt {prompt.name!r}: the label words share their first token")

    def _frame(self) -> tuple[str, str]:
        """The prompt text before and after the user's text."""
        head, tail = self.prompt.template.split("{text}")
        if self.prompt.format == "plain":
            return head, tail
        messages = []
        if self.prompt.system:
            messages.append({"role": "system", "content": self.prompt.system})
        messages.append({"role": "user", "content": head + _CONTENT_MARK + tail})
        rendered = ChatTemplate(self.engine).render_text(messages, add_generation_prompt=True)
        before, after = rendered.split(_CONTENT_MARK)
        return before, after

    def _label_token(self, word: str) -> int:
        ids = self.engine.tokenize(word)
        if not ids:
            raise ValueError(f"label word {word!r} tokenizes to nothing")
        # Multi-token label words are scored by their first token, which must then differ.
        return ids[0]

    @property
    def prefix_tokens(self) -> list[int]:
        """The prompt's fixed beginning, the same for every text."""
        return list(self._before)

    @property
    def suffix_tokens(self) -> list[int]:
        """What the prompt puts after the text."""
        return list(self._after)

    def warm_prefix(self, *, use_head: bool = True) -> None:
        """Leave the lane holding just the prompt's fixed beginning: the state a request finds
        when the previous one was a different text (used to time methods fairly). `use_head`:
        for the next request's method (the head's adapter, if any, changes the prefix's cache)."""
        if self._before:
            self._weights_for(use_head)
            self.engine.score(self._before, self.candidates, lane=self.lane)

    def _weights_for(self, use_head: bool) -> None:
        """The head's LoRA adapter on the lane for the head's passes, the model's own weights for
        the prompt's. A switch empties the lane's cache (~1 s to recompute the prefix), so mixing
        methods on one analyst is slow, not wrong."""
        adapter = self.head.adapter if self.head is not None and use_head else None
        if adapter is not None or self.engine.lane_adapter.get(self.lane) is not None:
            self.engine.use_adapter(self.lane, adapter)

    def prompt_tokens(self, text: str) -> tuple[list[int], bool]:
        text_ids = self.engine.tokenize(text, special=False)
        truncated = len(text_ids) > self.max_text_tokens
        if truncated:
            # Keep the head and the tail: reviews tend to open with context and close with the
            # verdict; the middle matters least.
            head = self.max_text_tokens // 2
            text_ids = text_ids[:head] + text_ids[len(text_ids) - (self.max_text_tokens - head) :]
        return self._before + text_ids + self._after, truncated

    def use_head(self, head) -> None:
        """Decide by a learned head (roles/head.py, a SentimentHead) on a pass that stops at the
        head's depth; None = by the two label tokens."""
        self.head = head
        self._weights_for(True)

    def reading_point(self) -> ReadingPoint:
        """Where a head for this analyst reads (for training it): the scoring position."""
        return ReadingPoint(
            key=self.prompt.name,
            engine=self.engine,
            lane=self.lane,
            tokens=lambda text: self.prompt_tokens(text)[0],
            prompt_alone=lambda text: self.positive_probability(text, use_head=False).value,
        )

    def label_logprobs(self, text: str) -> tuple[np.ndarray, bool]:
        self._weights_for(False)
        tokens, truncated = self.prompt_tokens(text)
        return np.array(self.engine.score(tokens, self.candidates, lane=self.lane)), truncated

    def analyze(self, text: str, *, use_head: bool = True) -> Sentiment:
        validate_text(text, self.max_text_chars)
        start = time.perf_counter()
        positive = self.positive_probability(text, use_head=use_head)
        return Sentiment.from_positive(positive.value, (time.perf_counter() - start) * 1000, positive.truncated)

    def positive_probability(self, text: str, *, use_head: bool = True) -> _Positive:
        if self.head is not None and use_head:
            self._weights_for(True)
            tokens, truncated = self.prompt_tokens(text)
            hidden = self.engine.hidden_state(tokens, self.head.layers, lane=self.lane)
            return _Positive(self.head.positive_probability(hidden), truncated)
        logprobs, truncated = self.label_logprobs(text)
        # Softmax over the two candidates only: the probability mass the model puts elsewhere
        # says nothing about which of the two labels it prefers.
        probs = np.exp(logprobs - logprobs.max())
        return _Positive(float(probs[0] / probs.sum()), truncated)

    def analyze_by_generation(self, text: str, max_tokens: int = 10) -> Sentiment:
        """The original recipe: greedy-generate up to 10 tokens, look for "Positive" in them."""
        validate_text(text, self.max_text_chars)
        start = time.perf_counter()
        self._weights_for(False)
        tokens, truncated = self.prompt_tokens(text)
        generation = self.engine.generate(tokens, Sampling(max_tokens=max_tokens), lane=self.lane)
        output = self.engine.detokenize(list(generation))
        label = "positive" if "Positive" in output else "negative"
        return Sentiment(
            label=label, probability=None, latency_ms=(time.perf_counter() - start) * 1000, truncated=truncated
        )
