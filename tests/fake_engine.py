"""A tiny deterministic engine for fast tests: byte-level vocabulary, a fake 'model' whose logits
depend on every token in the lane's KV memory, so any mistake in prefix-cache bookkeeping
shows up as different scores. Each KV entry remembers how many blocks computed it, so a full pass
that reads entries an early-stopping hidden_state() pass left shallow fails loudly. It scripts a
reply so generation and stop handling can be checked exactly."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from allinone.engine.base import Engine
from allinone.roles.choice import ChoiceRole
from allinone.roles.definition import RoleRegistry

SPECIALS = {"<|im_end|>": 256, "<|im_start|>": 257, "<|endoftext|>": 258}
# Whole-word tokens, as in a real BPE vocabulary, so label words are single tokens.
WORDS = {" Positive": 259, " Negative": 260, "Positive": 261, "Negative": 262}
VOCAB = 263
ASSISTANT_MARK = list(b"assistant\n")
HIDDEN = 16
LAYERS = 4
OUTPUT_WEIGHT = np.random.default_rng(1234).normal(size=(VOCAB, HIDDEN)) / np.sqrt(HIDDEN)
# The chat role's decoding guards count tokens, which are bytes here: tests that want them say so.
GUARDS_OFF = {"reply_max_copy": 0, "reply_no_repeat_ngram": 0, "reply_min_tokens": 0}


BUILTIN_ROLES = RoleRegistry.discover(None)


def sentiment_role():
    return BUILTIN_ROLES.get("sentiment")


def make_analyst(engine, prompt: str = "original", lane: int = 0) -> ChoiceRole:
    """The sentiment role on an engine, under one of its prompts (the analyst of the service)."""
    return ChoiceRole(engine, sentiment_role(), sentiment_role().prompt(prompt), lane=lane)


def chat_prompt(name: str = "warm"):
    return BUILTIN_ROLES.get("chat").prompt(name)


def runs(tokens: Sequence[int], n: int) -> list[tuple[int, ...]]:
    """Every run of n consecutive tokens, in order (what the n-gram and copy guards look at)."""
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


class FakeEngine(Engine):
    def __init__(self, reply: str = "Hello there.", n_ctx: int = 512, n_lanes: int = 5):
        super().__init__(n_lanes)
        self.n_ctx = n_ctx
        self.n_vocab = VOCAB
        self.description = "fake"
        self.reply = list(reply.encode("utf-8"))
        self.n_layers = LAYERS
        self.hidden_size = HIDDEN
        # lane -> {position: (token, blocks that computed its KV entry)}
        self.kv: list[dict[int, tuple[int, int]]] = [dict() for _ in range(n_lanes)]
        self.decoded_tokens = 0  # total tokens evaluated: what the cache saves

    def tokenize(self, text: str, *, special: bool = False) -> list[int]:
        table = {**WORDS, **(SPECIALS if special else {})}
        ids, i = [], 0
        while i < len(text):
            for marker, token in table.items():
                if text.startswith(marker, i):
                    ids.append(token)
                    i += len(marker)
                    break
            else:
                ids.extend(text[i].encode("utf-8"))
                i += 1
        return ids

    def token_bytes(self, token: int) -> bytes:
        for marker, t in {**SPECIALS, **WORDS}.items():
            if t == token:
                return marker.encode()
        return bytes([token])

    @property
    def eog_tokens(self) -> frozenset[int]:
        return frozenset({SPECIALS["<|im_end|>"], SPECIALS["<|endoftext|>"]})

    @property
    def chat_template(self):
        return None  # exercise the ChatML fallback

    def _kv_truncate(self, lane: int, keep: int) -> None:
        self.kv[lane] = {p: t for p, t in self.kv[lane].items() if p < keep}

    def _kv_share(self, src: int, dst: int, n: int) -> None:
        self.kv[dst].update({p: t for p, t in self.kv[src].items() if p < n})

    def _run(self, lane: int, tokens: Sequence[int], start: int, layers: int) -> list[int]:
        for i, token in enumerate(tokens):
            self.kv[lane][start + i] = (token, layers)
        self.decoded_tokens += len(tokens)
        end = start + len(tokens)
        entries = [self.kv[lane][p] for p in range(end)]  # KeyError = a hole in the cache: a bug
        too_shallow = [p for p, (_, depth) in enumerate(entries) if depth < layers]
        assert not too_shallow, f"a {layers}-block pass read KV entries computed by fewer blocks at {too_shallow}"
        return [token for token, _ in entries]

    def _decode(self, lane: int, tokens: Sequence[int], start: int) -> np.ndarray:
        return self._logits(self._run(lane, tokens, start, LAYERS))

    def _decode_hidden(
        self,
        lane: int,
        tokens: Sequence[int],
        start: int,
        layers: int,
        stop: bool = True,
        rows: tuple[int, ...] | None = None,
    ) -> np.ndarray | tuple[dict[int, np.ndarray], np.ndarray]:
        history = self._run(lane, tokens, start, layers if stop else LAYERS)
        last = self.model_hidden_state(history, layers)
        if rows is not None:
            found = {
                depth: np.stack([self.model_hidden_state(history[: start + i + 1], depth) for i in range(len(tokens))])
                for depth in rows
            }
            return found, last
        return last

    def model_hidden_state(self, history: Sequence[int], layers: int = LAYERS) -> np.ndarray:
        """What the fake model's residual stream holds after `layers` blocks at the last position."""
        digest = hashlib.sha256(np.array([*history, -layers], dtype=np.int32).tobytes()).digest()
        return np.random.default_rng(int.from_bytes(digest[:8], "little")).normal(size=HIDDEN)

    def _logits(self, history: list[int]) -> np.ndarray:
        # Like a real model: a hidden state projected by a fixed output matrix (which a learned
        # head relies on), then the script's nudge.
        logits = (OUTPUT_WEIGHT @ self.model_hidden_state(history)).astype(np.float32)
        # Scripted continuation: after "<|im_start|>assistant\n", spell the reply, then end the turn.
        mark = [SPECIALS["<|im_start|>"], *ASSISTANT_MARK]
        for start in range(len(history) - len(mark), -1, -1):
            if history[start : start + len(mark)] == mark:
                k = len(history) - (start + len(mark))
                target = self.reply[k] if k < len(self.reply) else SPECIALS["<|im_end|>"]
                logits[target] += 50.0
                break
        return logits

    def full_recompute_logits(self, tokens: Sequence[int]) -> np.ndarray:
        return self._logits(list(tokens))
