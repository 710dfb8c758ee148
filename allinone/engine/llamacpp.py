"""GGUF models through llama.cpp (llama-cpp-python's low-level bindings).

We drive llama_decode directly rather than through `llama_cpp.Llama` because we need several
KV sequences (lanes) in one context, logits for the last position only, and our own control of
what is kept between requests.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ..machine import default_threads
from .base import ContextOverflow, Engine, EngineError

_backend_ready = False
_log_callback = None  # kept referenced: llama.cpp holds the pointer

# Batch invariance. The prefix cache is only honest if a token's KV entries and logits do not
# depend on how the tokens were split into decode calls, nor on where they sit in the KV cache
# (see flash attention below). On this CPU backend they do not once a call evaluates at least 8
# tokens; calls of 1..7 tokens take other matmul and attention kernels whose rounding differs, and
# a small quantised model amplifies that to a visible change in log-probability (docs/architecture.md,
# "Exact prefix cache"). So scoring never evaluates fewer than 8 tokens at once: the cache
# re-evaluates a few already-cached tokens instead, and long prompts are cut so that no chunk is
# that small. Runtime weight repacking (IQ4_NL/Q4_0 -> 8x8 interleaved, AVX2 kernels) keeps this
# property; the exactness tests run on the repacked default model. Generation still decodes one
# token per call: chat replies need no bit-equality with a recompute.
_MIN_EXACT_BATCH = 8


def chunk_sizes(n: int, batch_size: int) -> list[int]:
    """Chunk sizes for evaluating n tokens: at most batch_size each, and (unless n itself is
    smaller) none under _MIN_EXACT_BATCH."""
    sizes = []
    while n > batch_size:
        size = batch_size
        if n - size < _MIN_EXACT_BATCH:
            size -= _MIN_EXACT_BATCH
        sizes.append(size)
        n -= size
    return sizes + [n]


class _LayerTap:
    """Reads one layer's output during llama_decode, and stops the pass there if asked to.

    llama.cpp has no "run the first k blocks" call, but its graph scheduler asks an eval
    callback, node by node, whether the caller wants a node's result (ask=True); it then computes
    up to that node, hands it over (ask=False), and abandons the rest of the graph if the callback
    returns False. Block i's output node is named "l_out-i". So hidden_state(tokens, k) computes
    exactly k blocks: the blocks above and the 152k-row output projection never run, which is why
    the head is faster than scoring. A complete pass (stop=False) reads the node on the way and
    goes on: the respond flow's one pass over a message for both roles.

    Once a context has a callback, every node of every pass goes through it, armed or not (hundreds
    of Python calls per generated token). Measured, they are lost in the noise of a decode step, and
    a C callback was no faster (docs/architecture.md).

    The llama.cpp KV entries of the tokens in a stopped pass exist only for the first k blocks;
    the engine's lane bookkeeping (base.py) keeps full passes away from them.
    """

    def __init__(self, n_embd: int):
        import llama_cpp

        # ggml's tensor accessors live in the ggml library that llama-cpp-python ships beside libllama.
        lib_dir = Path(llama_cpp.__file__).parent / "lib"
        candidates = sorted(lib_dir.glob("libggml-base.*")) or sorted(lib_dir.glob("*ggml-base*"))
        if not candidates:
            raise EngineError(f"libggml-base not found in {lib_dir}")
        ggml = ctypes.CDLL(str(candidates[0]))
        ggml.ggml_get_name.restype = ctypes.c_char_p
        ggml.ggml_get_name.argtypes = [ctypes.c_void_p]
        ggml.ggml_nelements.restype = ctypes.c_int64
        ggml.ggml_nelements.argtypes = [ctypes.c_void_p]
        ggml.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
        self._ggml = ggml
        self.n_embd = n_embd
        self.target: bytes | None = None
        self.row_targets: dict[bytes, int] = {}
        self.value: np.ndarray | None = None
        self.stop = True
        # A list to receive every token's row of each pass ([n_tokens, n_embd] per decode call),
        # not only the last one's (hidden_states_of_new_tokens).
        self.all_rows: list[np.ndarray] | None = None
        self.callback = llama_cpp.ggml_backend_sched_eval_callback(self._on_node)

    @contextlib.contextmanager
    def collecting(self):
        """Every token's row of the passes run inside: depth -> a list of [n_tokens, n_embd], one
        per decode call (the depths armed with `rows_layers`, else the target's)."""
        rows: dict[int, list[np.ndarray]] = {}
        self.all_rows = rows
        try:
            yield rows
        finally:
            self.all_rows = None

    def arm(self, layers: int, stop: bool = True, rows_layers: tuple[int, ...] = ()) -> None:
        """Read the last position after `layers` blocks; while collecting, every position's row
        after each depth of `rows_layers` (default: `layers`) on the way."""
        self.target, self.value, self.stop = f"l_out-{layers - 1}".encode(), None, stop
        self.row_targets = {f"l_out-{depth - 1}".encode(): depth for depth in (rows_layers or (layers,))}

    def disarm(self) -> None:
        self.target = None

    def _on_node(self, tensor, ask, user_data) -> bool:
        if self.target is None:
            return False
        name = self._ggml.ggml_get_name(tensor)
        if ask:
            return name == self.target or (self.all_rows is not None and name in self.row_targets)
        # The node is [n_embd, n_tokens] float32, tokens in batch order.
        n_tokens = self._ggml.ggml_nelements(tensor) // self.n_embd
        if self.all_rows is not None and name in self.row_targets:
            rows = np.empty((n_tokens, self.n_embd), dtype=np.float32)
            self._ggml.ggml_backend_tensor_get(tensor, rows.ctypes.data, 0, rows.nbytes)
            self.all_rows.setdefault(self.row_targets[name], []).append(rows)
            if name != self.target:
                return True  # on to the target block
            self.value = rows[-1]
        else:
            value = np.empty(self.n_embd, dtype=np.float32)
            self._ggml.ggml_backend_tensor_get(
                tensor, value.ctypes.data, (n_tokens - 1) * self.n_embd * 4, self.n_embd * 4
            )
            self.value = value
        return not self.stop  # False abandons the rest of the graph


_GGML_LOG_ERROR, _GGML_LOG_CONT = 4, 5  # ggml.h's enum ggml_log_level
_log_state = {"verbose": False, "printing": False}


def _print_llama_log(level: int, text: bytes, user_data) -> None:
    # llama-cpp-python's own callback maps ggml's levels as they were before WARN moved to 3, so it
    # prints warnings as errors: loading a LoRA adapter alone printed 21 harmless lines (its
    # tensors cannot live in the repacked buffer type and stay in plain CPU memory).
    if level != _GGML_LOG_CONT:
        _log_state["printing"] = _log_state["verbose"] or level == _GGML_LOG_ERROR
    if _log_state["printing"]:
        print(text.decode("utf-8", errors="replace"), end="", file=sys.stderr, flush=True)


def _init_backend(verbose: bool) -> None:
    global _backend_ready, _log_callback
    import llama_cpp

    _log_state["verbose"] = verbose  # llama.cpp logs every tensor at load time otherwise
    if _log_callback is None:
        _log_callback = llama_cpp.llama_log_callback(_print_llama_log)
        llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
    if not _backend_ready:
        llama_cpp.llama_backend_init()
        _backend_ready = True


class _Context:
    """A llama.cpp context over the engine's weights, made when a lane first needs it. The lanes of
    the plain context (raw completions, zero-shot roles, the benchmark's extra analyst) are idle in
    the default chat and analysis flows; its KV cache is zeroed, hence resident, once made, so an
    idle one would hold that memory for nothing."""

    def __init__(self, make: Callable[[], object], n_ctx: int):
        self._make = make
        self._made = None
        self.n_ctx = n_ctx  # as asked for (llama.cpp may round it up): the same before and after it is made

    @property
    def made(self) -> bool:
        return self._made is not None

    def make(self):
        """The llama_cpp context (made now if it was not yet)."""
        if self._made is None:
            self._made = self._make()
        return self._made

    @property
    def live(self):
        return self.make()

    def close(self) -> None:
        if self._made is not None:
            self._made.close()
            self._made = None


class LlamaCppEngine(Engine):
    def __init__(
        self,
        model_path: str | os.PathLike,
        *,
        context_size: int,
        batch_size: int,
        tapped_context_size: int,
        threads: int | None = None,
        n_lanes: int = 4,
        verbose: bool = False,
        repack: bool = True,
        tapped_lanes: int = 1,
    ):
        import llama_cpp

        super().__init__(n_lanes)
        self._lib = llama_cpp
        self.path = Path(model_path)
        if not self.path.is_file():
            raise EngineError(f"model file not found: {self.path}")
        _init_backend(verbose)
        threads = threads or default_threads()
        self._model = self._load_model(repack, verbose)
        self._tap = _LayerTap(self._model.n_embd())
        self._create_contexts(context_size, batch_size, tapped_context_size, tapped_lanes, threads, verbose)
        self._adapters: dict[Path, object] = {}  # loaded LoRA adapters, by file

        self.n_ctx = context_size
        self.n_vocab = self._model.n_vocab()
        self.n_layers = llama_cpp.llama_model_n_layer(self._model.model)
        self.hidden_size = self._model.n_embd()
        self.batch_size = batch_size
        self.threads = threads
        self.description = f"llama.cpp ({self._model.desc()}, {threads} threads, ctx {self.n_ctx})"
        self._batch = llama_cpp.llama_batch_init(batch_size, 0, 1)
        self._eog = frozenset(t for t in range(self.n_vocab) if llama_cpp.llama_vocab_is_eog(self._model.vocab, t))
        template = llama_cpp.llama_model_chat_template(self._model.model, None)
        self._chat_template = template.decode("utf-8") if template else None

    def _load_model(self, repack: bool, verbose: bool):
        from llama_cpp._internals import LlamaModel

        params = self._lib.llama_model_default_params()
        params.n_gpu_layers = 0
        # Repacking copies most weights into llama.cpp's own layout, so the memory-mapped file's
        # pages (all touched while copying) would stay resident too; reading the file into buffers
        # instead keeps one copy (docs/benchmarks.md has the memory figures).
        params.use_extra_bufts = repack
        params.load_mode = self._lib.LLAMA_LOAD_MODE_NONE if repack else self._lib.LLAMA_LOAD_MODE_MMAP
        try:
            return LlamaModel(path_model=str(self.path), params=params, verbose=verbose)
        except ValueError as err:
            raise EngineError(f"llama.cpp could not load {self.path}: {err}") from None

    def _create_contexts(
        self,
        context_size: int,
        batch_size: int,
        tapped_context_size: int,
        tapped_lanes: int,
        threads: int,
        verbose: bool,
    ) -> None:
        """Contexts over the same weights (a context holds only its KV cache and scratch buffers):
        lane 0 in one that carries the layer tap; further tapped lanes (the chat lane, when a head
        reads its pass or it runs an adapter) in a second tapped one; the others in one without
        the tap. A lane alone in its context can run a LoRA adapter that changes no other lane,
        and never competes with another for KV cells."""

        def context(n_ctx: int, tapped: bool) -> _Context:
            params = self._lib.llama_context_default_params()
            params.n_ctx = n_ctx
            params.n_batch = params.n_ubatch = batch_size
            params.n_seq_max = self.n_lanes
            # One KV pool shared by a context's lanes: a lane can then reuse another lane's prefix
            # by reference (llama_memory_seq_cp tags cells, it copies no tensors), and no lane is
            # limited to n_ctx / n_lanes.
            params.kv_unified = True
            # Flash attention off: on this CPU backend its result depends on where a lane's tokens
            # sit in the KV cells, so cached scores would drift from a full recompute. The plain
            # attention path is exact.
            params.flash_attn_type = self._lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
            params.n_threads = params.n_threads_batch = threads
            params.embeddings = False
            if tapped:
                params.cb_eval = self._tap.callback
            return _Context(lambda: self._new_context(params, verbose), n_ctx)

        plain = context(context_size, tapped=False)
        first = chat = None
        if tapped_lanes > 0:
            # Lane 0's context is smaller (tapped_context_size): a sentiment prompt with its
            # longest text needs far less than a chat.
            first = context(min(context_size, tapped_context_size), tapped=True)
        if tapped_lanes > 1:
            chat = context(context_size, tapped=True)
        self._contexts = [c for c in (plain, first, chat) if c is not None]
        self._lane_context = [
            first if lane == 0 and first else chat if lane < tapped_lanes else plain for lane in range(self.n_lanes)
        ]
        # The tapped contexts are made now: a bad size or too little memory fails at load, not at
        # the first message.
        for tapped in (first, chat):
            if tapped is not None:
                tapped.make()
        self.tapped_lanes = tapped_lanes

    def _new_context(self, params, verbose: bool):
        from llama_cpp._internals import LlamaContext

        try:
            return LlamaContext(model=self._model, params=params, verbose=verbose)
        except ValueError as err:
            raise EngineError(f"llama.cpp could not create a context: {err}") from None

    def close(self) -> None:
        if getattr(self, "_batch", None) is not None:
            self._lib.llama_batch_free(self._batch)
            self._batch = None
        for context in getattr(self, "_contexts", []):
            context.close()
        for adapter in getattr(self, "_adapters", {}).values():
            self._lib.llama_adapter_lora_free(adapter)
        self._adapters = {}
        self._contexts, self._lane_context = [], []
        if getattr(self, "_model", None) is not None:
            self._model.close()
            self._model = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # ---- vocabulary -------------------------------------------------------------------------
    def tokenize(self, text: str, *, special: bool = False) -> list[int]:
        return self._model.tokenize(text.encode("utf-8"), add_bos=False, special=special)

    def token_bytes(self, token: int) -> bytes:
        # Not cached: a ctypes call costs microseconds, while a cache filled by one pass over the
        # vocabulary (the reply's script guard) would hold every piece as a Python object.
        buf = ctypes.create_string_buffer(256)
        n = self._lib.llama_token_to_piece(self._model.vocab, token, buf, len(buf), 0, True)
        if n < 0:
            raise EngineError(f"token {token} does not fit in the piece buffer")
        return buf.raw[:n]

    @property
    def eog_tokens(self) -> frozenset[int]:
        return self._eog

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    @property
    def special_token_texts(self) -> dict[str, str]:
        texts = {}
        for name, token in (("bos_token", self._model.token_bos()), ("eos_token", self._model.token_eos())):
            if 0 <= token < self.n_vocab:
                texts[name] = self._model.token_get_text(token)
        return texts

    # ---- adapters ---------------------------------------------------------------------------
    def use_adapter(self, lane: int, path: Path | None) -> None:
        """Apply a LoRA adapter (a llama.cpp adapter GGUF for this model) to every pass on `lane`,
        or none. llama.cpp sets adapters per context, so only a lane alone in its context can take
        one: lane 0 (sentiment) always, lane 1 (chat) when it has a tapped context of its own. The
        lane's cache was computed with the old weights: it is emptied when the adapter changes."""
        path = Path(path) if path is not None else None
        self._check_lane(lane)
        if self.lane_adapter.get(lane) == path:
            return
        context = self._lane_context[lane]
        if not self.lane_alone(lane):
            raise EngineError(
                f"lane {lane} shares its llama.cpp context with other lanes, so it cannot take a "
                "LoRA adapter of its own (the lanes with a context of their own: "
                f"{', '.join(str(i) for i in range(self.n_lanes) if self.lane_alone(i)) or 'none'})"
            )
        if path is not None and path not in self._adapters:
            if not path.is_file():
                raise EngineError(f"LoRA adapter not found: {path}")
            adapter = self._lib.llama_adapter_lora_init(self._model.model, str(path).encode())
            if not adapter:
                raise EngineError(f"llama.cpp could not load the LoRA adapter {path} for {self.path.name}")
            self._adapters[path] = adapter
        if path is None:
            code = self._lib.llama_set_adapters_lora(context.live.ctx, None, 0, None)
        else:
            adapters = (self._lib.llama_adapter_lora_p_ctypes * 1)(self._adapters[path])
            code = self._lib.llama_set_adapters_lora(context.live.ctx, adapters, 1, (ctypes.c_float * 1)(1.0))
        if code != 0:
            raise EngineError(f"llama.cpp refused the LoRA adapter {path} (code {code})")
        if path is None:
            self.lane_adapter.pop(lane, None)
        else:
            self.lane_adapter[lane] = path
        self.forget(lane)

    def hidden_states_of_new_tokens(self, tokens: Sequence[int], layers: int, *, lane: int = 0) -> np.ndarray:
        """Like hidden_state, but the residual stream of every token this call evaluates
        ([n, hidden]; `last_stats.reused` leading tokens came from the cache and have no row). For
        offline tools that train on the residual stream (tools/sentiment_lora, tools/chat_lora)."""
        with self._tap.collecting() as rows:
            self.hidden_state(tokens, layers, lane=lane)
        return np.concatenate(rows[layers])

    def lane_alone(self, lane: int) -> bool:
        """Whether no other lane shares this lane's llama.cpp context (so it can run an adapter)."""
        context = self._lane_context[lane]
        return sum(c is context for c in self._lane_context) == 1

    # ---- KV primitives ----------------------------------------------------------------------
    def _kv_truncate(self, lane: int, keep: int) -> None:
        context = self._lane_context[lane]
        if not context.made:
            return  # nothing cached yet
        if not self._lib.llama_memory_seq_rm(context.live.memory, lane, keep, -1):
            raise EngineError(f"llama.cpp refused to truncate lane {lane} at {keep}")

    def lane_context_size(self, lane: int) -> int:
        return self._lane_context[lane].n_ctx

    def can_share(self, src: int, dst: int) -> bool:
        return self._lane_context[src] is self._lane_context[dst]

    def _kv_share(self, src: int, dst: int, n: int) -> None:
        self._lib.llama_memory_seq_cp(self._lane_context[src].live.memory, src, dst, 0, n)

    def _adjust_reuse(self, reuse: int, total: int) -> int:
        return min(reuse, max(0, total - _MIN_EXACT_BATCH))

    def _decode(self, lane: int, tokens: Sequence[int], start: int) -> np.ndarray:
        self._feed(lane, tokens, start)
        logits = self._lib.llama_get_logits_ith(self._lane_context[lane].live.ctx, -1)
        return np.ctypeslib.as_array(logits, shape=(self.n_vocab,)).copy()

    def _feed(self, lane: int, tokens: Sequence[int], start: int, logits: bool = True) -> None:
        """llama_decode the tokens in chunks, requesting output for the very last one only (for
        none without `logits`)."""
        context = self._lane_context[lane].live
        n_ctx = self._lib.llama_n_ctx(context.ctx)
        if start + len(tokens) > n_ctx:
            raise ContextOverflow(f"{start + len(tokens)} tokens do not fit in the context of {n_ctx}")
        batch = self._batch
        sizes = chunk_sizes(len(tokens), self._lib.llama_n_batch(context.ctx))
        offset = 0
        for index, size in enumerate(sizes):
            chunk = tokens[offset : offset + size]
            last_chunk = index == len(sizes) - 1
            batch.n_tokens = len(chunk)
            for i, token in enumerate(chunk):
                batch.token[i] = token
                batch.pos[i] = start + offset + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = lane
                batch.logits[i] = False
            # Logits only where we read them: the output projection onto 152k vocabulary rows is
            # the single most expensive matmul per token.
            batch.logits[len(chunk) - 1] = last_chunk and logits
            self._decode_batch(lane)
            offset += size

    def _decode_hidden(
        self,
        lane: int,
        tokens: Sequence[int],
        start: int,
        layers: int,
        stop: bool = True,
        rows: tuple[int, ...] | None = None,
    ) -> np.ndarray | tuple[dict[int, np.ndarray], np.ndarray]:
        if lane >= self.tapped_lanes:
            raise EngineError(f"lane {lane} cannot read hidden states: only lanes below {self.tapped_lanes} can")
        if rows is not None:
            with self._tap.collecting() as collected:
                last = self._read_last(lane, tokens, start, layers, stop, rows_layers=rows)
            return {depth: np.concatenate(collected[depth]) for depth in rows}, last
        return self._read_last(lane, tokens, start, layers, stop)

    def _read_last(
        self, lane: int, tokens: Sequence[int], start: int, layers: int, stop: bool, rows_layers: tuple[int, ...] = ()
    ) -> np.ndarray:
        self._tap.arm(layers, stop, rows_layers)
        try:
            # No logits either way: a stopped pass never reaches the output projection, and a
            # complete one runs the blocks for their KV entries; llama.cpp skips the projection
            # when no position asks for output.
            self._feed(lane, tokens, start, logits=False)
            value = self._tap.value
        finally:
            self._tap.disarm()
        if value is None:
            raise EngineError(f"llama.cpp computed no output for block {layers - 1}")
        return value

    def _decode_batch(self, lane: int) -> None:
        context = self._lane_context[lane]
        code = self._lib.llama_decode(context.live.ctx, self._batch)
        if code == 1:
            # No free KV cells: other lanes hold the space. Drop them (their owners recompute
            # on their next request) and try once more.
            for other in range(self.n_lanes):
                if other != lane and self._lane_context[other] is context:
                    self.forget(other)
            code = self._lib.llama_decode(context.live.ctx, self._batch)
        if code != 0:
            raise EngineError(f"llama_decode failed with code {code}")


_TENSOR_PROGRESS = re.compile(rb"\[\s*(\d+)/\s*(\d+)\]")


def quantize_gguf(
    source: Path,
    target: Path,
    ftype: str,
    *,
    keep_type: str = "Q8_0",
    threads: int | None = None,
    progress: Callable[[str], None] = print,
) -> None:
    """Re-quantise a GGUF with llama.cpp's quantizer: every tensor to `ftype`
    (LLAMA_FTYPE_MOSTLY_<ftype>), except the output projection and token embeddings, which
    become `keep_type` (a ggml type name). Reports progress every tenth of the tensors."""
    import llama_cpp

    _init_backend(False)
    params = llama_cpp.llama_model_quantize_default_params()
    try:
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
        keep = getattr(llama_cpp, f"GGML_TYPE_{keep_type}")
    except AttributeError as err:
        raise EngineError(f"unknown quantisation type: {err}") from None
    params.allow_requantize = True
    params.pure = True  # one type throughout: its repacked kernel then covers every layer
    params.output_tensor_type = keep
    params.token_embedding_type = keep
    params.nthread = threads or default_threads()
    shown = [-1]

    # llama.cpp reports each tensor as "[  12/ 290] name ..." on its log; we turn that into progress.
    @llama_cpp.llama_log_callback
    def on_log(level, text, user_data):
        found = _TENSOR_PROGRESS.search(text or b"")
        if found:
            done, total = int(found.group(1)), int(found.group(2))
            tenth = done * 10 // total
            if tenth > shown[0]:
                shown[0] = tenth
                progress(f"  quantising tensor {done}/{total}")

    llama_cpp.llama_log_set(on_log, ctypes.c_void_p(0))
    try:
        code = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    finally:
        llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))  # ours again (see _init_backend)
    if code != 0:
        raise EngineError(f"llama.cpp could not quantise {source} (code {code})")
