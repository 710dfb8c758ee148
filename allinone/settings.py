"""Typed settings: one definition, read from ALLINONE_* environment variables and CLI flags."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from .machine import default_threads


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ALLINONE_", extra="ignore", protected_namespaces=())

    home: Path = Field(
        Path("~/.cache/allinone").expanduser(),
        description="Data directory: the default model, trained heads, session store.",
    )
    model: str | None = Field(None, description="Path to a Qwen chat GGUF; default: the installed default model.")
    default_weights: Literal["iq4_nl", "q4_k_m"] = Field(
        "iq4_nl",
        description="Form of the default model when no --model is given: iq4_nl, derived locally from "
        "the verified Q4_K_M by `allinone install-model` (faster on CPU: repacked kernels), "
        "or the original q4_k_m. Falls back to q4_k_m when iq4_nl has not been made.",
    )
    repack: bool = Field(
        True,
        description="Let llama.cpp repack weights at load for its faster AVX2/NEON matrix "
        "kernels (Q4_0, IQ4_NL, Q4_K tensors).",
    )
    sentiment_head: bool = Field(
        True,
        description="Decide sentiment with a learned head when one exists for this "
        "model and prompt (packaged, or made by `allinone train-head`); "
        "off = the prompt's two label tokens alone (and no shared prefill).",
    )
    shared_prefill: bool = Field(
        True,
        description="Respond flow: evaluate the user's message once for both roles. "
        "The chat lane's pass over the message also yields the sentiment, "
        "read by a head trained at the end of the message in the chat "
        "prompt (packaged, or `allinone train-head --role chat`); without "
        "one, the analyst scores the message on a pass of its own.",
    )
    second_opinion_below: float = Field(
        0.6,
        ge=0.5,
        le=1.0,
        description="Respond flow with a chat head: when the head's probability for its label is "
        "below this, the analyst also reads the message on its own pass and its answer is the one "
        "shown and told to the chat role (the chat head misreads more real messages than the "
        "analyst; how many messages take the extra pass: docs/chat.md). 0.5 = never.",
    )
    chat_adapter: bool = Field(
        True,
        description="Run the chat role with the LoRA adapter trained for this model and "
        "chat prompt when one exists (packaged, or in <home>/adapters); off = "
        "the model's own weights. Only the chat lane runs it.",
    )
    engine: Literal["auto", "llamacpp", "transformers"] = Field(
        "auto",
        description="Inference engine; 'auto' picks llama.cpp for .gguf files and transformers "
        "(PyTorch, the optional extra) for a Hugging Face directory with config.json.",
    )
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32",
        description="Weights and compute type of the transformers engine (a GGUF is dequantised "
        "to it); llama.cpp ignores it.",
    )
    threads: int = Field(
        default_factory=default_threads, ge=1, description="CPU threads for inference (default: one per core)."
    )
    context_size: int = Field(4096, ge=256, description="Context window (tokens) of the chat and completion lanes.")
    sentiment_context_size: int = Field(
        2048,
        ge=256,
        description="Context window of the sentiment lane (llama.cpp; "
        "at most context_size): a sentiment prompt with the "
        "longest text fits in far less than a chat, and "
        "this lane's cache stays resident.",
    )
    batch_size: int = Field(
        128,
        ge=8,
        description="Tokens evaluated per forward pass during prompt prefill. The attention scratch "
        "grows with it times the context in use; larger batches prefill no faster on a CPU "
        "(docs/benchmarks.md).",
    )
    sentiment_prompt: str = Field(
        "fewshot",
        description="Name of the sentiment prompt (see `allinone roles`); 'original' is the first recipe's, verbatim.",
    )
    chat_prompt: str = Field(
        "warm", description="Name of the chat prompt (see `allinone roles`); 'original' is the first recipe."
    )
    role_paths: str | None = Field(
        None,
        description="Role files (or directories of them) to add to the built-in roles and <home>/roles, "
        "separated by the path separator (':'); a role of the same name replaces the built-in one.",
    )
    max_text_chars: int = Field(20_000, ge=1, description="Texts longer than this are rejected outright.")
    max_text_tokens: int = Field(
        1024,
        ge=16,
        description="Sentiment texts longer than this many tokens (or than the "
        "sentiment lane's context leaves room for) keep their head and "
        "tail (with a warning); the middle is dropped.",
    )
    reply_max_tokens: int = Field(256, ge=1, description="Longest chat reply, in tokens.")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="Chat sampling temperature; 0 = greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Chat nucleus sampling threshold.")
    reply_in_script: bool = Field(
        True,
        description="A reply to an English message never uses Chinese, Japanese "
        "or Korean characters (the small model sometimes answers "
        "in Chinese otherwise).",
    )
    repeat_penalty: float = Field(
        1.1,
        ge=1.0,
        le=2.0,
        description="Chat repetition penalty on the tokens generated "
        "so far (1 = off): the small model otherwise falls into loops.",
    )
    reply_no_repeat_ngram: int = Field(
        4, ge=0, description="A chat reply never says the same run of this many tokens twice (0 = off)."
    )
    reply_min_tokens: int = Field(
        10,
        ge=0,
        le=64,
        description="A chat reply does not end before this many tokens (0 = no minimum): "
        "the adapted model otherwise often stops at a bare 'Oh no!'.",
    )
    reply_max_copy: int = Field(
        4,
        ge=0,
        description="Longest run of the user's message, in tokens, that a chat reply "
        "may repeat (0 = no limit): a reply should answer the message, "
        "not hand it back.",
    )
    reply_copy_earlier: bool = Field(
        True,
        description="The copy limit also covers the assistant's own earlier replies in the "
        "conversation: a second or third reply does not say the first again.",
    )

    chat_roles: str = Field(
        "emotion,intent",
        description="Choice roles shown with each chat message (`😢 悲伤 · 倾诉`) and kept in its session turn, "
        "comma-separated; only roles with a learned head (one shared pass, after the first reply token); "
        "empty: none.",
    )

    # ---- the HTTP service (`allinone serve`) ----
    host: str = Field(
        "127.0.0.1",
        description="Address the server binds to. Anything other than a loopback address requires an API key.",
    )
    port: int = Field(8000, ge=0, le=65535, description="TCP port of the server.")
    api_key: SecretStr | None = Field(
        None,
        description="If set, every /v1 and /metrics request must send "
        "`Authorization: Bearer <key>`; required off loopback.",
    )
    queue_size: int = Field(
        16, ge=1, description="Requests that may wait for the model; more get 503 with Retry-After."
    )
    request_timeout: float = Field(
        120.0, gt=0, description="Seconds a request may take, waiting included; generation stops when it runs out."
    )
    max_body_bytes: int = Field(1_000_000, ge=1024, description="Largest accepted request body (413 beyond).")
    max_message_chars: int = Field(
        8_000, ge=1, description="Longest chat message (respond, chat completions) in characters (422 beyond)."
    )
    max_batch_texts: int = Field(64, ge=1, description="Most texts in one /v1/sentiment request.")
    session_db: str | None = Field(
        None,
        description="Where chat sessions live: a SQLite file path or sqlite:///FILE, or postgresql://USER@HOST/DB "
        "(shared by replicas; needs the scale extra); default: <home>/sessions.sqlite3.",
    )
    session_max_turns: int = Field(
        100,
        ge=1,
        description="Turns kept per session; older ones are dropped (history is also trimmed to fit the context).",
    )
    session_idle_hours: float = Field(24.0 * 7, gt=0, description="Sessions untouched this long are deleted.")
    cors_origins: str = Field("", description="Comma-separated origins allowed by CORS; empty = CORS off.")

    def resolved_home(self) -> Path:
        return Path(self.home).expanduser()

    def resolved_session_db(self) -> str:
        return self.session_db or str(self.resolved_home() / "sessions.sqlite3")
