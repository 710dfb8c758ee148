"""Inference engines: token ids in, scores and token ids out (see base.py for the contract)."""

from __future__ import annotations

from pathlib import Path

from .base import ContextOverflow, Engine, EngineError, Generation, Sampling

__all__ = ["ContextOverflow", "Engine", "EngineError", "Generation", "Sampling", "open_engine", "pick_engine"]


def pick_engine(model_path: Path, requested: str = "auto") -> str:
    if requested != "auto":
        return requested
    if Path(model_path).suffix.lower() == ".gguf" or Path(model_path).is_file():
        return "llamacpp"
    raise EngineError(f"cannot tell which engine runs {model_path}; pass --engine")


def open_engine(model_path: Path, requested: str = "auto", **options) -> Engine:
    kind = pick_engine(model_path, requested)
    if kind == "llamacpp":
        from .llamacpp import LlamaCppEngine

        return LlamaCppEngine(model_path, **options)
    raise EngineError(f"unknown engine {kind!r}")
