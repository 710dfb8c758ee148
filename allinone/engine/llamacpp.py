"""GGUF models through llama.cpp (llama-cpp-python's low-level bindings).

We drive llama_decode directly rather than through `llama_cpp.Llama` because we need several
KV sequences (lanes) in one context, logits for the last position only, and our own control of
what is kept between requests.
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .base import ContextOverflow, Engine, EngineError

_backend_ready = False

# Batch invariance. The prefix cache is only honest if a token's KV entries and logits do not
# depend on how the tokens were split into decode calls, nor on where they sit in the KV cache
# (see flash attention below). On this CPU backend they do not once a
# call evaluates at least 8 tokens; calls of 1..7 tokens take other matmul and attention kernels
# whose rounding differs, and a 0.5B quantised model amplifies that to ~0.03-0.05 in
# log-probability (measured on the default model, tests/test_real_model.py). So scoring never
# evaluates fewer than 8 tokens at once: the cache re-evaluates a few already-cached tokens
# instead (~10 ms each), and long prompts are cut so that no chunk is that small. Runtime weight
# repacking (IQ4_NL/Q4_0 -> 8x8 interleaved, AVX2 kernels) keeps this property: measured on the
# derived IQ4_NL default model, 0.0 difference between cached and recomputed scores (80 dev
# texts); the exactness tests run on it. Generation still decodes one token per call: chat
# replies need no bit-equality with a recompute.
_MIN_EXACT_BATCH = 8


def _init_backend(verbose: bool) -> None:
    global _backend_ready
    import llama_cpp
    from llama_cpp._logger import set_verbose

    set_verbose(verbose)  # llama.cpp logs every tensor at load time otherwise
    if not _backend_ready:
        llama_cpp.llama_backend_init()
        _backend_ready = True


class LlamaCppEngine(Engine):
    def __init__(self, model_path: str | os.PathLike, *, context_size: int = 4096, batch_size: int = 512,
                 threads: int | None = None, n_lanes: int = 4, verbose: bool = False,
                 repack: bool = True):
        import llama_cpp
        from llama_cpp._internals import LlamaContext, LlamaModel

        super().__init__(n_lanes)
        self._lib = llama_cpp
        path = self.path = Path(model_path)
        if not path.is_file():
            raise EngineError(f"model file not found: {path}")
        _init_backend(verbose)
        threads = threads or os.cpu_count() or 1

        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = 0
        # Repacking copies most weights into llama.cpp's own layout, so the memory-mapped file
        # pages (all touched while copying) would stay resident too: +190 MB for the default
        # model. Reading the file into buffers instead keeps one copy (measured: RSS 622 vs 812 MB).
        model_params.use_extra_bufts = repack
        model_params.load_mode = llama_cpp.LLAMA_LOAD_MODE_NONE if repack else llama_cpp.LLAMA_LOAD_MODE_MMAP
        try:
            self._model = LlamaModel(path_model=str(path), params=model_params, verbose=verbose)
        except ValueError as err:
            raise EngineError(f"llama.cpp could not load {path}: {err}") from None

        ctx_params = llama_cpp.llama_context_default_params()
        ctx_params.n_ctx = context_size
        ctx_params.n_batch = batch_size
        ctx_params.n_ubatch = batch_size
        ctx_params.n_seq_max = n_lanes
        # One KV pool shared by all lanes: a lane can then reuse another lane's prefix by
        # reference (llama_memory_seq_cp tags cells, it copies no tensors), and no lane is
        # limited to n_ctx / n_lanes.
        ctx_params.kv_unified = True
        # Flash attention off: on this CPU backend its result depends on where a lane's tokens sit
        # in the KV cells (up to 0.05 in log-probability after the cache has been reused), so
        # cached scores would drift from a full recompute. The plain attention path is exact.
        ctx_params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        ctx_params.n_threads = threads
        ctx_params.n_threads_batch = threads
        ctx_params.embeddings = False
        try:
            self._ctx = LlamaContext(model=self._model, params=ctx_params, verbose=verbose)
        except ValueError as err:
            raise EngineError(f"llama.cpp could not create a context: {err}") from None

        self.n_ctx = llama_cpp.llama_n_ctx(self._ctx.ctx)
        self.n_vocab = self._model.n_vocab()
        self.batch_size = batch_size
        self.threads = threads
        self.description = f"llama.cpp ({self._model.desc()}, {threads} threads, ctx {self.n_ctx})"
        self._batch = llama_cpp.llama_batch_init(batch_size, 0, 1)
        self._eog = frozenset(t for t in range(self.n_vocab) if llama_cpp.llama_vocab_is_eog(self._model.vocab, t))
        template = llama_cpp.llama_model_chat_template(self._model.model, None)
        self._chat_template = template.decode("utf-8") if template else None

    def close(self) -> None:
        if getattr(self, "_batch", None) is not None:
            self._lib.llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "_ctx", None) is not None:
            self._ctx.close()
            self._ctx = None
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

    @functools.lru_cache(maxsize=65536)
    def token_bytes(self, token: int) -> bytes:
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

    def output_weight_chunks(self, rows: int = 8192):
        return gguf_output_weight_chunks(self.path, rows)

    # ---- KV primitives ----------------------------------------------------------------------
    def _kv_truncate(self, lane: int, keep: int) -> None:
        if not self._lib.llama_memory_seq_rm(self._ctx.memory, lane, keep, -1):
            raise EngineError(f"llama.cpp refused to truncate lane {lane} at {keep}")

    def _kv_share(self, src: int, dst: int, n: int) -> None:
        self._lib.llama_memory_seq_cp(self._ctx.memory, src, dst, 0, n)

    def _adjust_reuse(self, reuse: int, total: int) -> int:
        return min(reuse, max(0, total - _MIN_EXACT_BATCH))

    def _chunks(self, n: int) -> list[int]:
        """Chunk sizes for evaluating n tokens: at most batch_size each, and (unless n itself is
        smaller) none under _MIN_EXACT_BATCH."""
        sizes = []
        while n > self.batch_size:
            size = self.batch_size
            if n - size < _MIN_EXACT_BATCH:
                size -= _MIN_EXACT_BATCH
            sizes.append(size)
            n -= size
        return sizes + [n]

    def _decode(self, lane: int, tokens: Sequence[int], start: int) -> np.ndarray:
        if start + len(tokens) > self.n_ctx:
            raise ContextOverflow(f"{start + len(tokens)} tokens do not fit in the context of {self.n_ctx}")
        batch = self._batch
        sizes = self._chunks(len(tokens))
        offset = 0
        for index, size in enumerate(sizes):
            chunk = tokens[offset: offset + size]
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
            batch.logits[len(chunk) - 1] = last_chunk
            self._decode_batch(lane)
            offset += size
        logits = self._lib.llama_get_logits_ith(self._ctx.ctx, -1)
        return np.ctypeslib.as_array(logits, shape=(self.n_vocab,)).copy()

    def _decode_batch(self, lane: int) -> None:
        code = self._lib.llama_decode(self._ctx.ctx, self._batch)
        if code == 1:
            # No free KV cells: other lanes hold the space. Drop them (their owners recompute
            # on their next request) and try once more.
            for other in range(self.n_lanes):
                if other != lane:
                    self.forget(other)
            code = self._lib.llama_decode(self._ctx.ctx, self._batch)
        if code != 0:
            raise EngineError(f"llama_decode failed with code {code}")


_TENSOR_PROGRESS = re.compile(rb"\[\s*(\d+)/\s*(\d+)\]")


def quantize_gguf(source: Path, target: Path, ftype: str, *, keep_type: str = "Q8_0",
                  threads: int | None = None, progress: Callable[[str], None] = print) -> None:
    """Re-quantise a GGUF with llama.cpp's quantizer: every tensor to `ftype`
    (LLAMA_FTYPE_MOSTLY_<ftype>), except the output projection and token embeddings, which
    become `keep_type` (a ggml type name). Reports progress every tenth of the tensors."""
    import llama_cpp
    from llama_cpp._logger import llama_log_callback

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
    params.nthread = threads or os.cpu_count() or 1
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
        llama_cpp.llama_log_set(llama_log_callback, ctypes.c_void_p(0))
    if code != 0:
        raise EngineError(f"llama.cpp could not quantise {source} (code {code})")


def gguf_output_weight_chunks(path: Path, rows: int = 8192):
    """The output projection of a GGUF file as float32 row blocks, read from the file itself
    (memory-mapped; llama.cpp exposes no tensor data). Models with tied embeddings carry no
    separate output matrix: their token embeddings are it."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    from ..model.gguf_info import GGUFError, read_tensor_infos

    try:
        tensors = read_tensor_infos(path)
    except (GGUFError, OSError) as err:
        raise EngineError(f"cannot read the tensors of {path}: {err}") from None
    info = tensors.get("output.weight") or tensors.get("token_embd.weight")
    if info is None:
        raise EngineError(f"{path} has neither output.weight nor token_embd.weight")
    qtype = GGMLQuantizationType(info.ggml_type)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    n_cols, n_rows = info.shape[0], int(np.prod(info.shape[1:]))
    row_bytes = n_cols // block_size * type_size
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=info.offset, shape=(n_rows, row_bytes))
    for start in range(0, n_rows, rows):
        block = np.asarray(data[start:start + rows])
        if qtype == GGMLQuantizationType.Q8_0:
            # gguf's generic dequantiser is several times slower; Q8_0 is simple: per 32 weights,
            # one float16 scale then 32 int8 values.
            blocks = block.reshape(block.shape[0], -1, type_size)
            scales = blocks[:, :, :2].copy().view(np.float16).astype(np.float32)
            values = blocks[:, :, 2:].view(np.int8).astype(np.float32)
            yield (values * scales).reshape(block.shape[0], -1)
        else:
            yield dequantize(block, qtype).astype(np.float32, copy=False).reshape(block.shape[0], n_cols)
    del data
