"""Hugging Face checkpoints (and GGUF files, dequantised) through PyTorch + Transformers.

The same contract as the llama.cpp engine (see base.py). Each lane owns one `DynamicCache`; the
prefix cache works on it directly:

* truncate = keep the first `keep` positions of every layer's keys/values (a copy of those
  positions; the old tensors are released at once, so nothing grows over many requests);
* share = a new cache holding a copy of the donor lane's first `n` positions (about 24 KB per
  position for a 0.5B Qwen in float32: a few milliseconds for a long prompt);
* scoring runs the decoder stack, takes the last position's hidden state only and projects it
  onto the candidates' rows of the output matrix (2 rows instead of ~152k).

Loading is offline only: HF_HUB_OFFLINE is set before transformers is imported and every
`from_pretrained` passes `local_files_only=True`; no hub access is ever attempted.

Numerics: unlike llama.cpp's quantised kernels (see "Batch invariance" in llamacpp.py), float32
torch matmuls give the same results, to well under 1e-3 in log-probability, whichever way the
tokens are split into forward passes (tests/test_engine_contract.py), so no minimum batch is
needed and a cached prefix is reused whole. bfloat16 halves the memory; its coarser rounding makes
cached and recomputed scores differ more.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..machine import default_threads
from .base import ContextOverflow, Engine, EngineError

DTYPES = ("float32", "bfloat16")

# Names of end-of-turn markers that chat models use; whichever exist in the vocabulary end a
# generation (with the tokenizer's / generation config's eos ids).
_END_MARKERS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")


def _offline_imports():
    # Before the first import of huggingface_hub / transformers: both read these at import time.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    import torch
    import transformers

    return torch, transformers


@functools.lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's byte-level BPE alphabet (bytes_to_unicode)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


@contextlib.contextmanager
def _gguf_read_once(gguf_path: Path | None):
    """transformers parses a GGUF file's metadata (151k vocabulary strings and merges, ~15 s in
    pure Python) once for the tokenizer's config, once for the tokenizer, once for the model config
    and once for the weights. The reader is read-only (a memory map), so while we load, every
    `gguf.GGUFReader(path)` of this file returns the first one."""
    if gguf_path is None:
        yield
        return
    import gguf

    original = gguf.GGUFReader
    readers: dict = {}
    target = Path(gguf_path).resolve()

    def reader(path, *args, **kwargs):
        if Path(path).resolve() != target or args or kwargs:
            return original(path, *args, **kwargs)
        if target not in readers:
            readers[target] = original(path)
        return readers[target]

    gguf.GGUFReader = reader
    try:
        yield
    finally:
        gguf.GGUFReader = original
        readers.clear()


def model_location(model_path: Path) -> tuple[Path, str | None]:
    """(directory for from_pretrained, gguf file name or None)."""
    path = Path(model_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise EngineError(f"{path} is not a Hugging Face model directory (no config.json)")
        return path, None
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise EngineError(f"{path}: the transformers engine loads a model directory or a .gguf file")
        return path.parent, path.name
    raise EngineError(f"model not found: {path}")


class TransformersEngine(Engine):
    def __init__(
        self,
        model_path: str | os.PathLike,
        *,
        context_size: int,
        batch_size: int,
        threads: int | None = None,
        n_lanes: int = 4,
        dtype: str = "float32",
        verbose: bool = False,
    ):
        super().__init__(n_lanes)
        if dtype not in DTYPES:
            raise EngineError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
        directory, gguf_file = model_location(Path(model_path))
        torch, transformers = _offline_imports()
        self._torch = torch
        threads = threads or default_threads()
        torch.set_num_threads(threads)
        if not verbose:
            transformers.logging.set_verbosity_error()
            transformers.logging.disable_progress_bar()
        options = {"local_files_only": True, "trust_remote_code": False}
        if gguf_file:
            options["gguf_file"] = gguf_file
        try:
            with _gguf_read_once(directory / gguf_file if gguf_file else None):
                self._tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory), **options)
                model = transformers.AutoModelForCausalLM.from_pretrained(
                    str(directory), dtype=getattr(torch, dtype), **options
                )
        except (OSError, ValueError, KeyError, ImportError) as err:
            raise EngineError(f"transformers could not load {model_path}: {err}") from None
        model.eval()
        model.requires_grad_(False)
        self._model = model
        self._decoder = model.get_decoder()
        self._lm_head = model.get_output_embeddings()
        if self._decoder is None or self._lm_head is None:
            raise EngineError(f"{model_path}: not a decoder-only causal language model")
        config = model.config.get_text_config(decoder=True)
        if any(t != "full_attention" for t in (getattr(config, "layer_types", None) or ["full_attention"])):
            raise EngineError(
                f"{model_path}: sliding-window / linear attention layers are not supported by the prefix cache"
            )
        self._config = config
        backend = getattr(self._tokenizer, "backend_tokenizer", None) or getattr(self._tokenizer, "_tokenizer", None)
        if backend is None or not hasattr(backend, "encode_special_tokens"):
            raise EngineError(f"{model_path}: needs a fast (tokenizers) tokenizer")
        self._backend = backend
        self._added = {i: t.content for i, t in backend.get_added_tokens_decoder().items()}

        self.n_vocab = int(self._lm_head.weight.shape[0])
        self.n_layers = int(config.num_hidden_layers)
        self.hidden_size = int(config.hidden_size)
        max_positions = getattr(config, "max_position_embeddings", None) or context_size
        self.n_ctx = min(context_size, int(max_positions))
        self.batch_size = batch_size
        self.threads = threads
        self.dtype = dtype
        arch = (getattr(config, "architectures", None) or [type(model).__name__])[0]
        source = f"{Path(model_path).name}, GGUF dequantised" if gguf_file else Path(model_path).name
        self.description = (
            f"transformers {transformers.__version__} / torch {torch.__version__} "
            f"({arch}, {source}, {dtype}, {threads} threads, ctx {self.n_ctx})"
        )
        self._eog = self._find_eog(model)
        template = getattr(self._tokenizer, "chat_template", None)
        if isinstance(template, dict):  # several named templates: the default one
            template = template.get("default") or next(iter(template.values()), None)
        self._chat_template = template or None
        self._caches: list = [None] * n_lanes  # one DynamicCache (or None = empty) per lane
        self._pieces: dict[int, bytes] = {}  # token_bytes, by token
        # LoRA adapters (llama.cpp adapter GGUFs) by file, and the lane whose pass is running: the
        # projections' forward hooks add the running lane's adapter, if it has one.
        self._adapters: dict[Path, dict] = {}
        self._running_lane = 0
        self._hooks: list = []

    def _find_eog(self, model) -> frozenset[int]:
        ids: set[int] = set()
        for source in (
            self._tokenizer.eos_token_id,
            getattr(model.generation_config, "eos_token_id", None),
            getattr(self._config, "eos_token_id", None),
        ):
            if isinstance(source, int):
                ids.add(source)
            elif isinstance(source, (list, tuple)):
                ids.update(int(x) for x in source)
        by_text = {text: i for i, text in self._added.items()}
        ids.update(by_text[m] for m in _END_MARKERS if m in by_text)
        return frozenset(i for i in ids if 0 <= i < self.n_vocab)

    def close(self) -> None:
        for hook in getattr(self, "_hooks", []):
            hook.remove()
        self._hooks, self._adapters = [], {}
        self._caches = [None] * self.n_lanes
        self._model = self._decoder = self._lm_head = None

    # ---- vocabulary -------------------------------------------------------------------------
    def tokenize(self, text: str, *, special: bool = False) -> list[int]:
        # encode_special_tokens=True makes the backend treat "<|im_end|>" in user text as plain
        # characters (what llama.cpp does with parse_special=False).
        self._backend.encode_special_tokens = not special
        return list(self._backend.encode(text, add_special_tokens=False).ids)

    def token_bytes(self, token: int) -> bytes:
        # Kept per engine (a cache on the method would keep every engine alive).
        piece = self._pieces.get(token)
        if piece is None:
            piece = self._pieces[token] = self._piece_bytes(token)
        return piece

    def _piece_bytes(self, token: int) -> bytes:
        if token in self._added:
            return self._added[token].encode("utf-8")
        piece = self._backend.id_to_token(token)
        if piece is None:
            return b""  # padding rows of the output matrix beyond the tokenizer's vocabulary
        table = _unicode_to_byte()
        try:
            return bytes(table[ch] for ch in piece)
        except KeyError:
            pass
        # Not byte-level BPE (e.g. SentencePiece): "▁" is a space, <0xNN> a raw byte.
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            return bytes([int(piece[3:5], 16)])
        return piece.replace("▁", " ").encode("utf-8")

    @property
    def eog_tokens(self) -> frozenset[int]:
        return self._eog

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    @property
    def special_token_texts(self) -> dict[str, str]:
        texts = {}
        for name in ("bos_token", "eos_token"):
            value = getattr(self._tokenizer, name, None)
            if isinstance(value, str) and value:
                texts[name] = value
        return texts

    # ---- adapters ---------------------------------------------------------------------------
    # llama.cpp's tensor names of the projections an adapter may change, and the module of a
    # Hugging Face decoder layer each one is.
    _PROJECTIONS = {
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }

    def use_adapter(self, lane: int, path: Path | None) -> None:
        """Apply a LoRA adapter (the llama.cpp adapter GGUF the llama.cpp engine takes) to every
        pass on `lane`, or none: y = W x + (alpha / rank) B A x on each adapted projection, as
        llama.cpp computes it, by forward hooks that look at which lane is running. The lane's
        cache was computed with the old weights: it is emptied when the adapter changes."""
        path = Path(path) if path is not None else None
        self._check_lane(lane)
        if self.lane_adapter.get(lane) == path:
            return
        if path is not None and path not in self._adapters:
            self._adapters[path] = self._load_adapter(path)
        if path is None:
            self.lane_adapter.pop(lane, None)
        else:
            self.lane_adapter[lane] = path
        self.forget(lane)

    def _load_adapter(self, path: Path) -> dict:
        import gguf

        torch = self._torch
        if not path.is_file():
            raise EngineError(f"LoRA adapter not found: {path}")
        try:
            reader = gguf.GGUFReader(str(path))
            field = reader.fields["adapter.lora.alpha"]
            alpha = float(field.parts[field.data[0]][0])
            tensors = {
                t.name: torch.tensor(
                    np.asarray(t.data, dtype=np.float32).reshape([int(n) for n in reversed(t.shape)]),
                    dtype=self._model.dtype,
                )
                for t in reader.tensors
            }
        except (OSError, ValueError, KeyError, IndexError) as err:
            raise EngineError(f"{path}: not a LoRA adapter GGUF ({err})") from None
        layers = self._decoder.layers
        pairs = {}
        for name, a in tensors.items():
            if not name.endswith(".weight.lora_a"):
                continue
            block, index, projection = name.split(".")[:3]
            b = tensors.get(name[:-1] + "b")
            if block != "blk" or projection not in self._PROJECTIONS or b is None or int(index) >= len(layers):
                raise EngineError(f"{path}: adapter tensor {name} does not fit {self.description}")
            module = layers[int(index)].get_submodule(self._PROJECTIONS[projection])
            if a.shape[1] != module.in_features or b.shape[0] != module.out_features:
                raise EngineError(f"{path}: adapter tensor {name} does not fit {self.description}")
            pairs[module] = (a, b, alpha / a.shape[0])
        if not self._hooks:  # every projection gets a hook once; it does nothing without an adapter
            for layer in layers:
                for module_name in self._PROJECTIONS.values():
                    self._hooks.append(layer.get_submodule(module_name).register_forward_hook(self._add_lora))
        return pairs

    def _add_lora(self, module, inputs, output):
        path = self.lane_adapter.get(self._running_lane)
        if path is None or module not in self._adapters[path]:
            return output
        a, b, scale = self._adapters[path][module]
        return output + (inputs[0] @ a.t()) @ b.t() * scale

    # ---- KV primitives ----------------------------------------------------------------------
    def _cache_length(self, lane: int) -> int:
        cache = self._caches[lane]
        return 0 if cache is None else cache.get_seq_length()

    def _cache_from(self, layers, keep: int):
        """A new lane cache holding a copy of positions < keep of (keys, values) per layer."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self._config)
        for layer, (keys, values) in zip(cache.layers, layers, strict=True):
            layer.update(keys[..., :keep, :], values[..., :keep, :])  # cat onto empty: a copy
        return cache

    @staticmethod
    def _layers(cache):
        return [(layer.keys, layer.values) for layer in cache.layers]

    def _kv_truncate(self, lane: int, keep: int) -> None:
        length = self._cache_length(lane)
        if keep >= length:
            return
        self._caches[lane] = None if keep <= 0 else self._cache_from(self._layers(self._caches[lane]), keep)

    def _kv_share(self, src: int, dst: int, n: int) -> None:
        if n > self._cache_length(src):
            raise EngineError(f"lane {src} holds {self._cache_length(src)} positions, not {n}")
        self._caches[dst] = None if n <= 0 else self._cache_from(self._layers(self._caches[src]), n)

    def _hidden_last(self, lane: int, tokens: Sequence[int], start: int, layers: int | None = None):
        """Run tokens at positions start.. through the decoder on the lane's cache; return the
        final-norm hidden state of the last position, or with `layers` the residual stream after
        that many blocks (all blocks still run here: simpler, and this engine is the reference,
        not the fast path)."""
        torch = self._torch
        if not tokens:
            raise EngineError("nothing to decode")
        if start + len(tokens) > self.n_ctx:
            raise ContextOverflow(f"{start + len(tokens)} tokens do not fit in the context of {self.n_ctx}")
        length = self._cache_length(lane)
        if length > start:  # stray entries of an interrupted decode
            self._kv_truncate(lane, start)
        elif length < start:
            raise EngineError(f"lane {lane} holds {length} positions; cannot continue at {start}")
        if self._caches[lane] is None:
            from transformers import DynamicCache

            self._caches[lane] = DynamicCache(config=self._config)
        cache = self._caches[lane]
        hidden = None
        self._running_lane = lane
        with torch.inference_mode():
            for offset in range(0, len(tokens), self.batch_size):
                chunk = list(tokens[offset : offset + self.batch_size])
                ids = torch.tensor([chunk], dtype=torch.long)
                positions = torch.arange(start + offset, start + offset + len(chunk), dtype=torch.long).unsqueeze(0)
                out = self._decoder(
                    input_ids=ids,
                    position_ids=positions,
                    cache=cache,
                    use_cache=True,
                    output_hidden_states=layers is not None,
                )
                # hidden_states[0] is the embedding output, [k] the output of block k.
                hidden = out.last_hidden_state[0, -1] if layers is None else out.hidden_states[layers][0, -1]
        return hidden

    def _decode(self, lane: int, tokens: Sequence[int], start: int) -> np.ndarray:
        hidden = self._hidden_last(lane, tokens, start)
        with self._torch.inference_mode():
            logits = self._lm_head(hidden)
        return logits.float().numpy().copy()

    def _decode_hidden(
        self,
        lane: int,
        tokens: Sequence[int],
        start: int,
        layers: int,
        stop: bool = True,
        rows: tuple[int, ...] | None = None,
    ) -> np.ndarray:
        if rows is not None:
            raise EngineError("the transformers engine reads the last position only (no pooled heads)")
        # Every block runs here anyway (see _hidden_last), so the lane is complete either way.
        return self._hidden_last(lane, tokens, start, layers).float().numpy().copy()

    def _decode_candidates(self, lane: int, tokens: Sequence[int], start: int, candidates: Sequence[int]) -> np.ndarray:
        torch = self._torch
        hidden = self._hidden_last(lane, tokens, start)
        with torch.inference_mode():
            rows = torch.tensor(list(candidates), dtype=torch.long)
            logits = torch.nn.functional.linear(
                hidden,
                self._lm_head.weight.index_select(0, rows),
                None if self._lm_head.bias is None else self._lm_head.bias.index_select(0, rows),
            )
        return logits.float().numpy().copy()

    # ---- for tests and the original recipe --------------------------------------------------
    def lane_cache(self, lane: int):
        """The lane's DynamicCache, or None when it is empty."""
        return self._caches[lane]

    @property
    def hf_model(self):
        return self._model

    @property
    def hf_tokenizer(self):
        return self._tokenizer
