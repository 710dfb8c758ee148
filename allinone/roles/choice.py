"""A choice role at work: a prompt around the text, the role's labels as the candidate
continuations, one forward pass; or a learned head reading part-way up that pass.

The prompt's fixed part is tokenized once; per request only the text and the few tokens after it
are new, and the engine's prefix cache evaluates just those. The answer is always one of the role's
labels, whatever the text says (a text cannot talk the role out of them: we never read generated
text, we compare the labels' probabilities).

A label's probability is that of its whole word under the prompt: all of its tokens, not the first
one alone, so labels that share a first token ("order_status" / "order_cancel") are told apart. When
every label is one token and no two share it, one pass gives them all; otherwise the labels' tokens
are walked as a tree, one short pass per inner node, each reusing the prompt's cache.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ..engine.base import Engine, Sampling
from .definition import ChoicePrompt, RoleDefinition
from .head import ChoiceHead, ReadingPoint, softmax
from .inputs import validate_text
from .template import ChatTemplate


@dataclass
class Choice:
    """One role's answer for one text."""

    label: str
    probability: float | None  # of `label`; None for the generation-based original method
    latency_ms: float
    truncated: bool = False
    probabilities: dict[str, float] = field(default_factory=dict)  # every label's, when known

    def to_dict(self) -> dict:
        return {
            "label": self.label,
            "probability": self.probability,
            "probabilities": self.probabilities,
            "latency_ms": self.latency_ms,
            "truncated": self.truncated,
        }

    def annotation(self) -> dict:
        """What a session keeps of it for a turn."""
        return {"label": self.label, "probability": self.probability}

    @classmethod
    def from_probabilities(
        cls, labels: tuple[str, ...], probs: np.ndarray, latency_ms: float, truncated: bool = False
    ) -> Choice:
        best = int(np.argmax(probs))
        return cls(
            label=labels[best],
            probability=float(probs[best]),
            latency_ms=latency_ms,
            truncated=truncated,
            probabilities={label: float(p) for label, p in zip(labels, probs, strict=True)},
        )


_CONTENT_MARK = "\x00text\x00"


def generated_prompt(role: RoleDefinition, *, with_examples: bool = True, per_label: int = 2) -> ChoicePrompt:
    """The prompt of a role that brings no prompt of its own: its instruction, its labels with
    their descriptions, a few of its examples, then the text. Plain text in the format the
    original sentiment recipe used, which the model follows well: `... 分析结果: <label>`."""
    language = "zh" if "zh" in role.instruction else "en"
    lines = [role.instruction.get(language) or next(iter(role.instruction.values()), "")]
    lines.append("可选标签:" if language == "zh" else "Labels:")
    for label in role.labels:
        lines.append(f"- {label.name}: {label.description}" if label.description else f"- {label.name}")
    lines.append("只输出一个标签。" if language == "zh" else "Answer with one label only.")
    shown: dict[str, int] = {}
    for example in role.examples if with_examples else ():
        if shown.get(example.label, 0) < per_label and "\n" not in example.text:
            shown[example.label] = shown.get(example.label, 0) + 1
            lines.append(f"用户输入:{example.text} 分析结果: {example.label}")
    # The text's place is the one "{text}" of the template: a description may not add another.
    fixed = "\n".join(lines).replace("{text}", "{ text }")
    return ChoicePrompt(
        name="generated",
        description="built from the role's instruction, labels and examples",
        format="plain",
        template=fixed + "\n用户输入:{text} 分析结果:",
        label_words={label.name: f" {label.name}" for label in role.labels},
    )


class ChoiceRole:
    def __init__(
        self,
        engine: Engine,
        role: RoleDefinition,
        prompt: ChoicePrompt | None = None,
        *,
        lane: int = 0,
        max_text_chars: int = 20_000,
        max_text_tokens: int = 1024,
    ):
        self.engine = engine
        self.role = role
        self.labels = role.label_names
        self.prompt = prompt or role.prompt() or generated_prompt(role)
        self.lane = lane
        self.max_text_chars = max_text_chars
        if self.prompt.template.count("{text}") != 1:
            raise ValueError(f"prompt {self.prompt.name!r} must contain {{text}} exactly once")
        before, after = self._frame()
        self._before = engine.tokenize(before, special=True)
        self._after = engine.tokenize(after, special=True)
        overhead = len(self._before) + len(self._after) + 1
        self.max_text_tokens = max(1, min(max_text_tokens, engine.lane_context_size(lane) - overhead))
        self.words = [self._word_tokens(self.prompt.label_words[label]) for label in self.labels]
        if len({tuple(w) for w in self.words}) != len(self.words):
            raise ValueError(f"role {role.name!r}, prompt {self.prompt.name!r}: two labels have the same words")
        firsts = [w[0] for w in self.words]
        # One pass suffices when every label is one token of its own.
        self.one_token = all(len(w) == 1 for w in self.words) and len(set(firsts)) == len(firsts)
        self.head: ChoiceHead | None = None

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

    def _word_tokens(self, word: str) -> list[int]:
        ids = self.engine.tokenize(word)
        if not ids:
            raise ValueError(f"label word {word!r} tokenizes to nothing")
        return ids

    @property
    def candidates(self) -> list[int]:
        """Each label word's first token (the whole word, for a role scored in one pass)."""
        return [w[0] for w in self.words]

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
        methods on one role is slow, not wrong."""
        adapter = self.head.adapter if self.head is not None and use_head else None
        if adapter is not None or self.engine.lane_adapter.get(self.lane) is not None:
            self.engine.use_adapter(self.lane, adapter)

    def prompt_tokens(self, text: str) -> tuple[list[int], bool]:
        text_ids = self.engine.tokenize(text, special=False)
        truncated = len(text_ids) > self.max_text_tokens
        if truncated:
            # Keep the head and the tail: texts tend to open with context and close with the
            # verdict; the middle matters least.
            head = self.max_text_tokens // 2
            text_ids = text_ids[:head] + text_ids[len(text_ids) - (self.max_text_tokens - head) :]
        return self._before + text_ids + self._after, truncated

    def use_head(self, head: ChoiceHead | None) -> None:
        """Decide by a learned head on a pass that stops at the head's depth; None = by the
        prompt's label words."""
        if head is not None and head.labels != self.labels:
            raise ValueError(f"the head's labels {list(head.labels)} are not role {self.role.name!r}'s")
        self.head = head
        self._weights_for(True)

    def reading_point(self) -> ReadingPoint:
        """Where heads read on this role's pass (for training them): the scoring position."""
        return ReadingPoint(
            key=self.prompt.name,
            engine=self.engine,
            lane=self.lane,
            tokens=lambda text: self.prompt_tokens(text)[0],
            prompt_alone=lambda text: self.probabilities(text, use_head=False)[0],
            adapter=self.head.adapter if self.head is not None else None,
            text_span=self.text_span,
        )

    def text_span(self, tokens: list[int]) -> tuple[int, int]:
        """Where the text lies in prompt tokens: what a pooled head averages (not the prompt's
        frame, whose fixed tokens would dilute a short text)."""
        return len(self._before), len(tokens) - len(self._after)

    def label_logprobs(self, text: str) -> tuple[np.ndarray, bool]:
        """Each label word's log-probability after the prompt, over all of its tokens."""
        self._weights_for(False)
        tokens, truncated = self.prompt_tokens(text)
        if self.one_token:
            return np.array(self.engine.score(tokens, self.candidates, lane=self.lane)), truncated
        return self._word_logprobs(tokens), truncated

    def _word_logprobs(self, tokens: list[int]) -> np.ndarray:
        """Walk the label words' token tree depth first, so that each pass extends the one before
        it in the lane's cache: one short pass per inner node, the prompt evaluated once."""
        totals = np.zeros(len(self.words))
        cache: dict[tuple[int, ...], np.ndarray] = {}

        def logprobs_after(path: tuple[int, ...]) -> np.ndarray:
            if path not in cache:
                logits = self.engine.logits(tokens + list(path), lane=self.lane).astype(np.float64)
                cache[path] = logits - np.logaddexp.reduce(logits)
            return cache[path]

        for i, word in sorted(enumerate(self.words), key=lambda item: item[1]):
            totals[i] = sum(logprobs_after(tuple(word[:k]))[token] for k, token in enumerate(word))
        return totals

    def probabilities(self, text: str, *, use_head: bool = True) -> tuple[np.ndarray, bool]:
        """Over the role's labels: by the head when there is one, else by the label words. Softmax
        over the labels only: the probability mass the model puts elsewhere says nothing about which
        of them it prefers."""
        if self.head is not None and use_head:
            hidden, truncated = self.hidden_state(text)
            return self.head.probabilities(hidden, text), truncated
        logprobs, truncated = self.label_logprobs(text)
        return softmax(logprobs), truncated

    def hidden_state(self, text: str, *, pooled: bool = False) -> tuple[np.ndarray, bool]:
        """The residual stream the head reads (its depth, its weights), with `pooled` also its mean
        over the text ([last, mean]): shared by every head that reads this role's pass (see
        Assistant.analyze_roles)."""
        self._weights_for(True)
        tokens, truncated = self.prompt_tokens(text)
        if pooled:
            hidden = self.engine.pooled_hidden_state(tokens, self.head.layers, self.text_span(tokens), lane=self.lane)
        else:
            hidden = self.engine.hidden_state(tokens, self.head.layers, lane=self.lane)
        return hidden, truncated

    def text_tokens(self, text: str) -> tuple[list[int], bool]:
        """The text's tokens as this role's prompt holds them (cut in the middle when too long)."""
        tokens, truncated = self.prompt_tokens(text)
        start, end = self.text_span(tokens)
        return tokens[start:end], truncated

    def text_pass(
        self, text: str, layers: int, rows_layers: tuple[int, ...] = ()
    ) -> tuple[list[int], dict[int, np.ndarray], np.ndarray, bool]:
        """One pass through `layers` blocks on the weights the head runs: the text's tokens; for
        each depth of `rows_layers` (default: `layers`), the residual stream after that many blocks
        from the text's first token to the prompt's end (rows [text tokens..., prompt tail...]);
        the last position's after `layers` (what a head reads); whether the text was cut."""
        self._weights_for(True)
        tokens, truncated = self.prompt_tokens(text)
        start, end = self.text_span(tokens)
        rows, last = self.engine.hidden_rows(tokens, layers, start, lane=self.lane, rows_layers=rows_layers)
        return tokens[start:end], rows, last, truncated

    def analyze(self, text: str, *, use_head: bool = True) -> Choice:
        validate_text(text, self.max_text_chars)
        start = time.perf_counter()
        probs, truncated = self.probabilities(text, use_head=use_head)
        return Choice.from_probabilities(self.labels, probs, (time.perf_counter() - start) * 1000, truncated)

    def analyze_by_generation(self, text: str, max_tokens: int = 10) -> Choice:
        """The original recipe: greedy-generate up to 10 tokens and take the first label whose word
        appears in them (none: the last label, as the recipe's `"Positive" in output` did)."""
        validate_text(text, self.max_text_chars)
        start = time.perf_counter()
        self._weights_for(False)
        tokens, truncated = self.prompt_tokens(text)
        generation = self.engine.generate(tokens, Sampling(max_tokens=max_tokens), lane=self.lane)
        output = self.engine.detokenize(list(generation))
        found = [(output.find(self.prompt.label_words[label].strip()), label) for label in self.labels]
        found = sorted((at, label) for at, label in found if at >= 0)
        label = found[0][1] if found else self.labels[-1]
        return Choice(
            label=label, probability=None, latency_ms=(time.perf_counter() - start) * 1000, truncated=truncated
        )
