"""The engine contract: token ids in, scores and token ids out.

An engine knows nothing of prompts, roles or conversations. It offers:

* the model's vocabulary (tokenize, token bytes, end-of-generation ids, chat template text);
* `score(tokens, candidates)`: one forward pass, log-probabilities of candidate next tokens;
* `generate(tokens, sampling)`: next tokens one by one, stoppable at any point;
* `logits(tokens)`: the whole last-position logits;
* `hidden_state(tokens, layer)`: the residual stream after the first `layer` transformer blocks at
  the last position, computing no block above it (what a learned head reads, roles/head.py); or,
  with `complete=True`, computing every block, so that a generation can continue from the lane.

Both compute calls go through a prefix KV cache organised in *lanes* (sequences in the KV
memory). A lane remembers which tokens its KV entries hold; a request on a lane evaluates only
the tokens after the longest common prefix with what the lane already holds. If another lane
holds a longer common prefix, its entries are shared into the requested lane first (a cheap
metadata copy in llama.cpp's unified KV cache), so e.g. a chat turn can start from a prefix
that a different role already paid for.

Engines are not thread-safe: one caller at a time (the server runs inference on one worker).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class EngineError(RuntimeError):
    pass


class ContextOverflow(EngineError):
    """The request does not fit in the context window."""


@dataclass(frozen=True)
class Sampling:
    max_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repeat_penalty: float = 1.0  # 1 = off; applied to the tokens generated so far
    suppress_tokens: frozenset[int] = frozenset()  # never sampled (e.g. another script's characters)
    seed: int | None = None
    no_repeat_ngram: int = 0  # 0 = off; else no run of this many tokens occurs twice in the output
    # Token sequences the output may not copy long runs of (the user's message, earlier replies).
    copy_sources: tuple[tuple[int, ...], ...] = ()
    max_copy: int = 0  # longest run of any copy source the output may contain; 0 = no limit
    min_tokens: int = 0  # the output does not end before this many tokens


class NgramGuard:
    """Which tokens would complete a forbidden run: a run of `no_repeat_ngram` tokens that the
    output already holds, or a run of more than `max_copy` tokens of one of `copy_sources`. Runs are
    looked up by the tokens before their last, so a step costs two dictionary lookups."""

    def __init__(self, sampling: Sampling):
        self.repeat = sampling.no_repeat_ngram
        self.copy = sampling.max_copy if sampling.copy_sources else 0
        self._seen: dict[tuple[int, ...], set[int]] = {}
        self._source: dict[tuple[int, ...], set[int]] = {}
        for source in sampling.copy_sources if self.copy else ():
            for i in range(len(source) - self.copy):
                self._source.setdefault(tuple(source[i : i + self.copy]), set()).add(source[i + self.copy])

    def banned(self, generated: Sequence[int]) -> list[int]:
        out: set[int] = set()
        if self.repeat > 1 and len(generated) >= self.repeat - 1:
            if len(generated) >= self.repeat:  # the run that ended with the previous token
                run = tuple(generated[-self.repeat :])
                self._seen.setdefault(run[:-1], set()).add(run[-1])
            out |= self._seen.get(tuple(generated[len(generated) - self.repeat + 1 :]), set())
        if self.copy and len(generated) >= self.copy:
            out |= self._source.get(tuple(generated[-self.copy :]), set())
        return list(out)


@dataclass
class CacheStats:
    """What the last compute call cost: tokens taken from the cache vs evaluated."""

    reused: int = 0
    evaluated: int = 0


@dataclass
class _Lane:
    tokens: list[int] = field(default_factory=list)
    last_used: int = 0
    # A hidden_state() call stops the forward pass early, so its tokens' KV entries exist only for
    # the first `shallow_layers` blocks: tokens[shallow_from:] may serve later requests that stop
    # at or below that depth, never a full pass. None = every entry is complete.
    shallow_from: int | None = None
    shallow_layers: int = 0

    def usable(self, layers: int | None) -> int:
        """How many leading tokens hold KV entries deep enough for a pass through `layers`
        blocks (None = the whole model)."""
        if self.shallow_from is None or (layers is not None and layers <= self.shallow_layers):
            return len(self.tokens)
        return self.shallow_from


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64, copy=False)
    shifted = logits - logits.max()
    return shifted - np.log(np.exp(shifted).sum())


def sample_token(
    logits: np.ndarray,
    sampling: Sampling,
    rng: np.random.Generator,
    generated: Sequence[int],
    suppressed: np.ndarray | None = None,
    banned: Sequence[int] = (),
) -> int:
    """`suppressed`: sampling.suppress_tokens as an index array (built once per generation);
    `banned`: tokens forbidden at this step only (NgramGuard)."""
    logits = logits.astype(np.float64, copy=True)
    if suppressed is not None and suppressed.size:
        logits[suppressed] = -np.inf
    if banned:
        logits[list(banned)] = -np.inf
    if sampling.repeat_penalty != 1.0 and generated:
        # CTRL-style penalty, as llama.cpp applies it: shrink positive logits, grow negative ones.
        seen = np.fromiter(set(generated), dtype=np.int64)
        vals = logits[seen]
        logits[seen] = np.where(vals > 0, vals / sampling.repeat_penalty, vals * sampling.repeat_penalty)
    if sampling.temperature <= 0.0:
        return int(np.argmax(logits))
    logits /= sampling.temperature
    if sampling.top_k > 0 and sampling.top_k < logits.size:
        kth = np.partition(logits, -sampling.top_k)[-sampling.top_k]
        logits[logits < kth] = -np.inf
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    if sampling.top_p < 1.0:
        order = np.argsort(-probs)
        cumulative = np.cumsum(probs[order])
        keep = order[: int(np.searchsorted(cumulative, sampling.top_p)) + 1]
        mask = np.zeros_like(probs)
        mask[keep] = probs[keep]
        probs = mask / mask.sum()
    return int(rng.choice(probs.size, p=probs))


class Generation:
    """An iterator of generated token ids. `finish_reason` is set once it ends:
    "stop" (end-of-generation token), "length" (max_tokens or context full), "cancelled"."""

    def __init__(self, steps: Iterator[int]):
        self._steps = steps
        self.finish_reason: str | None = None

    def __iter__(self):
        return self

    def __next__(self) -> int:
        try:
            token = next(self._steps)
        except StopIteration as stop:
            self.finish_reason = stop.value or "stop"
            raise
        return token

    def close(self) -> None:
        if self.finish_reason is None:
            self.finish_reason = "cancelled"
        self._steps.close()


class Engine(ABC):
    """Shared logic: lane bookkeeping, scoring and the generation loop. Backends implement the
    four `_kv_*`/`_decode` primitives and the vocabulary."""

    n_ctx: int
    n_vocab: int
    n_layers: int  # transformer blocks
    hidden_size: int  # width of the residual stream
    n_lanes: int
    description: str

    def __init__(self, n_lanes: int):
        self.n_lanes = n_lanes
        self._lanes = [_Lane() for _ in range(n_lanes)]
        self._clock = 0
        self.last_stats = CacheStats()
        self._last_suppressed: tuple[frozenset[int], np.ndarray] = (frozenset(), np.empty(0, dtype=np.int64))
        self.lane_adapter: dict[int, Path] = {}  # the LoRA adapter each lane runs with (use_adapter)

    # ---- vocabulary -------------------------------------------------------------------------
    @abstractmethod
    def tokenize(self, text: str, *, special: bool = False) -> list[int]:
        """Token ids of `text`; with special=True, markers like <|im_end|> become their ids."""

    @abstractmethod
    def token_bytes(self, token: int) -> bytes:
        """The raw bytes of one token (may be part of a UTF-8 character)."""

    @property
    @abstractmethod
    def eog_tokens(self) -> frozenset[int]:
        """Tokens that end a generation (end of turn, end of text)."""

    @property
    @abstractmethod
    def chat_template(self) -> str | None:
        """The model's own Jinja chat template, if it ships one."""

    @property
    def special_token_texts(self) -> dict[str, str]:
        """bos_token / eos_token strings that chat templates may refer to."""
        return {}

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self.token_bytes(t) for t in tokens).decode("utf-8", errors="replace")

    # ---- backend primitives -----------------------------------------------------------------
    @abstractmethod
    def _kv_truncate(self, lane: int, keep: int) -> None:
        """Drop the lane's KV entries at positions >= keep."""

    @abstractmethod
    def _kv_share(self, src: int, dst: int, n: int) -> None:
        """Make lane dst hold the first n positions of lane src (dst is empty)."""

    @abstractmethod
    def _decode(self, lane: int, tokens: Sequence[int], start: int) -> np.ndarray:
        """Evaluate tokens at positions start.. on the lane; return last-position logits."""

    def can_share(self, src: int, dst: int) -> bool:
        """Whether lane dst can take over KV entries of lane src (backends may keep lanes apart)."""
        return True

    def _decode_hidden(
        self,
        lane: int,
        tokens: Sequence[int],
        start: int,
        layers: int,
        stop: bool = True,
        rows: tuple[int, ...] | None = None,
    ) -> np.ndarray | tuple[dict[int, np.ndarray], np.ndarray]:
        """Evaluate tokens through the first `layers` blocks (all blocks unless `stop`); return
        the last position's residual stream after block `layers`. With `rows` (depths, each at most
        `layers`): ({depth: every evaluated position's residual stream after that many blocks,
        [n, hidden]}, that last position's after `layers`), all from the same pass."""
        raise EngineError(f"{self.description} cannot read hidden states")

    def _decode_candidates(self, lane: int, tokens: Sequence[int], start: int, candidates: Sequence[int]) -> np.ndarray:
        """Like _decode, but only the candidates' logits are needed; a backend that can project
        the last hidden state onto those rows alone (not the whole vocabulary) overrides this."""
        return self._decode(lane, tokens, start)[list(candidates)]

    def _adjust_reuse(self, reuse: int, total: int) -> int:
        """How many cached tokens to actually keep when `reuse` could be kept; backends whose
        results depend on how tokens are batched re-evaluate a few more (see llamacpp.py)."""
        return reuse

    # ---- prefix cache -----------------------------------------------------------------------
    def _check_lane(self, lane: int) -> None:
        if not 0 <= lane < self.n_lanes:
            raise EngineError(f"lane {lane} out of range 0..{self.n_lanes - 1}")

    def _evaluate(
        self,
        tokens: Sequence[int],
        lane: int,
        candidates: Sequence[int] | None = None,
        layers: int | None = None,
        complete: bool = False,
        rows_from: int | None = None,
        rows_layers: tuple[int, ...] = (),
    ) -> np.ndarray | tuple[dict[int, np.ndarray], np.ndarray]:
        """Bring `lane` to hold exactly `tokens` and return the logits after the last one (only
        the candidates' logits, in their order, when candidates are given), or, with `layers`,
        the last position's residual stream after that many blocks; the pass stops there unless
        `complete`. With `rows_from` (and `layers`), positions from there on are evaluated even if
        cached, and the result is ({depth: their rows after that many blocks, [len(tokens) -
        rows_from, hidden]} for each of `rows_layers` (default: `layers`), the last position's
        residual stream after `layers`)."""
        self._check_lane(lane)
        if not tokens:
            raise EngineError("cannot evaluate an empty token sequence")
        if len(tokens) > self.lane_context_size(lane):
            raise ContextOverflow(f"{len(tokens)} tokens do not fit in the context of {self.lane_context_size(lane)}")
        if layers is not None and not 0 < layers < self.n_layers:
            raise EngineError(f"layers must be in 1..{self.n_layers - 1}, got {layers}")
        tokens = list(tokens)
        state = self._lanes[lane]
        depth = None if complete else layers  # blocks this pass computes (None: all)

        last_reusable = len(tokens) - 1 if rows_from is None else min(rows_from, len(tokens) - 1)

        def reusable(other: _Lane) -> int:
            # At least the last token must be evaluated: its output is the answer.
            return min(common_prefix_length(other.tokens[: other.usable(depth)], tokens), last_reusable)

        reuse = reusable(state)
        donor, donor_reuse = None, reuse
        for other, other_state in enumerate(self._lanes):
            if other != lane and self.can_share(other, lane):
                n = reusable(other_state)
                if n > donor_reuse:
                    donor, donor_reuse = other, n
        reuse = self._adjust_reuse(reuse, len(tokens))
        donor_reuse = self._adjust_reuse(donor_reuse, len(tokens))
        if donor is not None and donor_reuse > reuse:
            self._kv_truncate(lane, 0)
            self._kv_share(donor, lane, donor_reuse)
            reuse = donor_reuse
            source = self._lanes[donor]
            shallow = source.shallow_from is not None and source.shallow_from < reuse
            state.shallow_from = source.shallow_from if shallow else None
            state.shallow_layers = source.shallow_layers
        else:
            self._kv_truncate(lane, reuse)
            if state.shallow_from is not None and state.shallow_from >= reuse:
                state.shallow_from = None
        state.tokens = tokens[:reuse]
        self._clock += 1
        state.last_used = self._clock
        if depth is not None:
            # Marked before decoding: an interrupted decode leaves shallow entries too.
            if state.shallow_from is None:
                state.shallow_from, state.shallow_layers = reuse, depth
            else:
                state.shallow_layers = min(state.shallow_layers, depth)
        if layers is not None and rows_from is not None:
            depths = tuple(sorted(set(rows_layers or (layers,))))
            if not all(0 < depth <= layers for depth in depths):
                raise EngineError(f"rows can be read after 1..{layers} blocks on this pass, not {depths}")
            rows, last = self._decode_hidden(lane, tokens[reuse:], reuse, layers, stop=not complete, rows=depths)
            result = ({depth: found[rows_from - reuse :] for depth, found in rows.items()}, last)
        elif layers is not None:
            result = self._decode_hidden(lane, tokens[reuse:], reuse, layers, stop=not complete)
        elif candidates is None:
            result = self._decode(lane, tokens[reuse:], reuse)
        else:
            result = self._decode_candidates(lane, tokens[reuse:], reuse, candidates)
        state.tokens = tokens
        self.last_stats = CacheStats(reused=reuse, evaluated=len(tokens) - reuse)
        return result

    def forget(self, lane: int | None = None) -> None:
        """Empty one lane (or all): the next request recomputes from scratch."""
        for i in range(self.n_lanes) if lane is None else [lane]:
            self._kv_truncate(i, 0)
            self._lanes[i].tokens = []
            self._lanes[i].shallow_from = None

    def use_adapter(self, lane: int, path: Path | None) -> None:
        """Apply a LoRA adapter to every pass on `lane` (None: no adapter). Backends that can
        override this; the others take no adapter."""
        if path is not None:
            raise EngineError(f"{type(self).__name__} cannot apply LoRA adapters ({Path(path).name})")

    def lane_context_size(self, lane: int) -> int:
        """How many tokens this lane can hold (n_ctx unless the backend gives a lane less)."""
        return self.n_ctx

    def lane_tokens(self, lane: int) -> list[int]:
        return list(self._lanes[lane].tokens)

    # ---- compute ----------------------------------------------------------------------------
    def score(self, tokens: Sequence[int], candidates: Sequence[int], *, lane: int = 0) -> list[float]:
        """Log-probabilities of each candidate as the next token, normalised over the candidates
        (the rest of the vocabulary says nothing about which candidate the model prefers, and
        leaving it out lets a backend skip most of the output projection)."""
        return [float(x) for x in log_softmax(self._evaluate(tokens, lane, candidates))]

    def logits(self, tokens: Sequence[int], *, lane: int = 0) -> np.ndarray:
        """All next-token logits after `tokens` (float32, vocabulary-sized), same cache as score()."""
        return np.asarray(self._evaluate(tokens, lane), dtype=np.float32)

    def hidden_state(self, tokens: Sequence[int], layers: int, *, lane: int = 0, complete: bool = False) -> np.ndarray:
        """The residual stream after the first `layers` transformer blocks (1..n_layers-1) at the
        last position (float32, hidden-sized), same cache as score(). The pass stops there: the
        blocks above and the output projection are never computed, so this costs about
        layers/n_layers of a scoring call. With `complete`, every block still runs (no output
        projection): the lane then holds full KV entries, and a generate() that extends these
        tokens only evaluates its new ones. That is how one pass over a chat message serves both
        the sentiment and the reply."""
        return np.asarray(self._evaluate(tokens, lane, layers=layers, complete=complete), dtype=np.float32)

    def pooled_hidden_state(
        self, tokens: Sequence[int], layers: int, pool: tuple[int, int], *, lane: int = 0
    ) -> np.ndarray:
        """Like hidden_state, with the mean of the residual stream over positions pool[0]..pool[1]-1
        as a second row: [last, mean]. Heads that read a whole text (its topic, not only its
        verdict) need the mean; those positions are evaluated on this pass even if the lane held
        them."""
        start, end = pool
        if not 0 <= start < end <= len(tokens):
            raise EngineError(f"pool {pool} is not a non-empty range of the {len(tokens)} tokens")
        rows, last = self._evaluate(tokens, lane, layers=layers, rows_from=start)
        return np.stack([np.asarray(last, dtype=np.float32), np.asarray(rows[layers][: end - start]).mean(axis=0)])

    def hidden_rows(
        self, tokens: Sequence[int], layers: int, start: int, *, lane: int = 0, rows_layers: tuple[int, ...] = ()
    ) -> tuple[dict[int, np.ndarray], np.ndarray]:
        """One pass through `layers` blocks that reads, for each depth of `rows_layers` (default:
        `layers`), the residual stream after that many blocks at every position from `start` on
        ([n - start, hidden] each), and the last position's after `layers` (hidden_state's
        answer). Those positions are evaluated on this pass even if the lane held them. An extract
        role ranks spans of the text by rows read lower down (as good there, and a shorter pass
        when it is asked alone); pooled choice heads average the rows at their own depth and read
        the last position: one pass for all of them."""
        if not 0 <= start < len(tokens):
            raise EngineError(f"start {start} is not a position of the {len(tokens)} tokens")
        rows, last = self._evaluate(tokens, lane, layers=layers, rows_from=start, rows_layers=tuple(rows_layers))
        return {depth: np.asarray(found, dtype=np.float32) for depth, found in rows.items()}, np.asarray(
            last, dtype=np.float32
        )

    def generate(
        self,
        tokens: Sequence[int],
        sampling: Sampling = Sampling(),
        *,
        lane: int = 0,
        should_stop: Callable[[], bool] | None = None,
    ) -> Generation:
        return Generation(self._generate_steps(list(tokens), sampling, lane, should_stop))

    def _suppressed_array(self, tokens: frozenset[int]) -> np.ndarray:
        # The same set comes back request after request (a role's script guard: ~33k ids);
        # converting it costs about a millisecond per reply, so the last conversion is kept.
        if self._last_suppressed[0] is not tokens:
            self._last_suppressed = (tokens, np.fromiter(tokens, dtype=np.int64, count=len(tokens)))
        return self._last_suppressed[1]

    def _generate_steps(self, tokens: list[int], sampling: Sampling, lane: int, should_stop: Callable[[], bool] | None):
        logits = self._evaluate(tokens, lane)
        rng = np.random.default_rng(sampling.seed)
        suppressed = self._suppressed_array(sampling.suppress_tokens)
        guard = NgramGuard(sampling)
        generated: list[int] = []
        eog = self.eog_tokens
        state = self._lanes[lane]
        while True:
            if should_stop is not None and should_stop():
                return "cancelled"
            banned = guard.banned(generated)
            if len(generated) < sampling.min_tokens:
                banned = [*banned, *eog]
            token = sample_token(logits, sampling, rng, generated, suppressed, banned)
            if token in eog:
                return "stop"
            generated.append(token)
            yield token
            if len(generated) >= sampling.max_tokens or len(state.tokens) >= self.lane_context_size(lane):
                return "length"
            # The lane's bookkeeping only grows after a successful decode; a failed or interrupted
            # one leaves stray KV entries past len(tokens), which the next request truncates.
            logits = self._decode(lane, [token], len(state.tokens))
            state.tokens.append(token)
