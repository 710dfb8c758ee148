"""Typed settings: one definition, read from ALLINONE_* environment variables and CLI flags."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_threads() -> int:
    # llama.cpp's matrix kernels are compute bound: one thread per core, no more.
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ALLINONE_", extra="ignore", protected_namespaces=())

    home: Path = Field(Path("~/.cache/allinone").expanduser(),
                       description="Data directory: the default model, trained heads, session store.")
    model: str | None = Field(None, description="Path to a Qwen chat GGUF; default: the installed default model.")
    engine: Literal["auto", "llamacpp"] = Field(
        "auto", description="Inference engine; 'auto' picks llama.cpp for .gguf files.")
    threads: int = Field(default_factory=_default_threads, ge=1, description="CPU threads for inference.")
    context_size: int = Field(4096, ge=256, description="Context window (tokens) shared by all cached prompts.")
    batch_size: int = Field(512, ge=8, description="Tokens evaluated per forward pass during prompt prefill.")
    sentiment_prompt: str = Field("original", description="Name of the sentiment prompt (see `allinone roles`).")
    chat_prompt: str = Field("original", description="Name of the chat prompt (see `allinone roles`).")
    max_text_chars: int = Field(20_000, ge=1, description="Texts longer than this are rejected outright.")
    max_text_tokens: int = Field(1024, ge=16,
                                 description="Sentiment texts longer than this many tokens keep their head and "
                                             "tail (with a warning); the middle is dropped.")
    reply_max_tokens: int = Field(256, ge=1, description="Longest chat reply, in tokens.")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="Chat sampling temperature; 0 = greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Chat nucleus sampling threshold.")

    def resolved_home(self) -> Path:
        return Path(self.home).expanduser()
