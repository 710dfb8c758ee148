"""Inference engines: token ids in, scores and token ids out (see base.py for the contract)."""

from __future__ import annotations

from pathlib import Path

from .base import ContextOverflow, Engine, EngineError, Generation, Sampling

__all__ = [
    "ContextOverflow",
    "Engine",
    "EngineError",
    "Generation",
    "Sampling",
    "ENGINES",
    "open_engine",
    "pick_engine",
]


ENGINES = ("llamacpp", "transformers")


def pick_engine(model_path: Path, requested: str = "auto") -> str:
    """The engine that runs `model_path`: as requested, or (auto) transformers for a Hugging Face
    directory (one with config.json) and llama.cpp for a GGUF file."""
    if requested != "auto":
        if requested not in ENGINES:
            raise EngineError(f"unknown engine {requested!r} (auto, {', '.join(ENGINES)})")
        return requested
    path = Path(model_path)
    if path.is_dir():
        if (path / "config.json").is_file():
            return "transformers"
        raise EngineError(f"{path} is a directory without config.json: not a Hugging Face model")
    if path.suffix.lower() == ".gguf" or path.is_file():
        return "llamacpp"
    raise EngineError(f"cannot tell which engine runs {model_path}; pass --engine")


def open_engine(model_path: Path, settings, *, hidden_state_lanes: int = 1, n_lanes: int = 4) -> Engine:
    """Load the model with the engine `settings.engine` picks, sized by `settings` (a
    settings.Settings): context and batch sizes, threads; `dtype` applies to the transformers engine
    only (llama.cpp computes in the GGUF's own quantised types), `repack` to llama.cpp only, and so
    does `hidden_state_lanes`: how many lanes, from lane 0, must be able to read hidden states (the
    transformers engine can on every lane)."""
    kind = pick_engine(model_path, settings.engine)
    sizes = {
        "context_size": settings.context_size,
        "batch_size": settings.batch_size,
        "threads": settings.threads,
        "n_lanes": n_lanes,
    }
    if kind == "llamacpp":
        from .llamacpp import LlamaCppEngine

        return LlamaCppEngine(
            model_path,
            repack=settings.repack,
            tapped_lanes=hidden_state_lanes,
            tapped_context_size=settings.sentiment_context_size,
            **sizes,
        )
    if kind == "transformers":
        try:
            from .transformers import TransformersEngine
        except ImportError as err:  # pragma: no cover - depends on the installed extras
            raise EngineError(
                f"the transformers engine needs the optional extra: pip install -e '.[transformers]' ({err})"
            ) from None
        return TransformersEngine(model_path, dtype=settings.dtype, **sizes)
    raise EngineError(f"unknown engine {kind!r}")
