"""llama-cpp-python used the plain way, as a user would without this project: `Llama` on the
original Q4_K_M file, `create_completion(max_tokens=10, temperature=0)` on the original prompt and
"Positive" looked for in the text, and `create_chat_completion(stream=True)` for replies. Its own
defaults otherwise (it keeps the previous prompt's tokens and reuses the common prefix). Kept only
as a benchmark baseline."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from .bench import BaselineResult, label_from_generated


@dataclass
class StreamTiming:
    first_token_ms: float
    tokens: int
    decode_tokens_per_s: float  # after the first token


class RawLlamaCpp:
    def __init__(self, model_path: Path, prompt_template: str, *, threads: int, context_size: int = 4096):
        from llama_cpp import Llama

        self.model = Path(model_path)
        self.prompt_template = prompt_template
        self.llm = Llama(
            model_path=str(model_path), n_ctx=context_size, n_threads=threads, n_threads_batch=threads, verbose=False
        )

    def analyze(self, text: str) -> BaselineResult:
        out = self.llm.create_completion(self.prompt_template.replace("{text}", text), max_tokens=10, temperature=0)
        return label_from_generated(out["choices"][0]["text"])

    def chat(self, messages: list[dict], max_tokens: int) -> StreamTiming:
        """A streamed reply of exactly `max_tokens` tokens: the end-of-turn tokens are held off by
        a logit bias, as our flows hold them off in the bench (decode rates over equal lengths)."""
        ends = {self.llm.token_eos(), *self.llm.tokenize(b"<|im_end|>", add_bos=False, special=True)}
        start = time.perf_counter()
        first, count = None, 0
        stream = self.llm.create_chat_completion(
            messages, max_tokens=max_tokens, temperature=0, stream=True, logit_bias={t: -1e9 for t in ends}
        )
        for chunk in stream:
            if chunk["choices"][0]["delta"].get("content"):
                count += 1  # llama-cpp-python streams one chunk per token
                if first is None:
                    first = time.perf_counter()
        return stream_timing(start, first, time.perf_counter(), count)

    def close(self) -> None:
        self.llm.close()


def stream_timing(start: float, first: float | None, end: float, tokens: int) -> StreamTiming:
    first = first if first is not None else end
    rate = (tokens - 1) / (end - first) if tokens > 1 and end > first else 0.0
    return StreamTiming(first_token_ms=(first - start) * 1000, tokens=tokens, decode_tokens_per_s=rate)
