"""analyze / respond: the only place where the roles are combined. The CLI and the server are thin
adapters over `Assistant`."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

from .conversation.history import Conversation, Turn
from .engine import open_engine
from .engine.base import Engine, Sampling
from .engine.text import TextStream
from .model.store import model_sha256, resolve_model_path
from .roles.head import SentimentHead
from .roles.chat import ChatRole
from .roles.prompts import chat_prompt, sentiment_prompt
from .roles.sentiment import InputError, Sentiment, SentimentAnalyst, validate_text
from .settings import Settings

# Lanes of the engine's prefix cache, one per use, so that none evicts another's prefix.
SENTIMENT_LANE = 0  # the llama.cpp engine's one lane that can read hidden states (tapped_lanes=1)
CHAT_LANE = 1
COMPLETION_LANE = 2  # raw chat completions (OpenAI-style messages)


@dataclass
class ReplyStats:
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    dropped_turns: int = 0
    time_to_first_token_ms: float | None = None
    total_ms: float = 0.0
    finish_reason: str | None = None


class Response:
    """The respond flow's result: the sentiment is known on construction; iterating yields the
    reply text as it is generated. When iteration ends (or `close()` is called, e.g. on Ctrl-C)
    the turn, with whatever reply was produced, is added to the conversation."""

    def __init__(self, sentiment: Sentiment, deltas: Iterator[str], finish: Callable[[], None],
                 stats: ReplyStats):
        self.sentiment = sentiment
        self.stats = stats
        self._deltas = deltas
        self._finish = finish
        self._closed = False

    def __iter__(self) -> Iterator[str]:
        try:
            yield from self._deltas
        finally:
            self.close()

    def text(self) -> str:
        return "".join(self)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._deltas.close()
            self._finish()


@dataclass
class Assistant:
    engine: Engine
    settings: Settings = field(default_factory=Settings)
    model_path: Path | None = None
    load_seconds: float = 0.0
    head: SentimentHead | None = None

    def __post_init__(self):
        s = self.settings
        self.analyst = SentimentAnalyst(self.engine, sentiment_prompt(s.sentiment_prompt), lane=SENTIMENT_LANE,
                                        max_text_chars=s.max_text_chars, max_text_tokens=s.max_text_tokens)
        self.chat = ChatRole(self.engine, chat_prompt(s.chat_prompt), lane=CHAT_LANE,
                             reply_max_tokens=s.reply_max_tokens)

    @classmethod
    def load(cls, settings: Settings | None = None) -> "Assistant":
        settings = settings or Settings()
        path = resolve_model_path(settings.model, settings.resolved_home(), settings.default_weights)
        start = time.perf_counter()
        engine = open_engine(path, settings.engine, context_size=settings.context_size,
                             batch_size=settings.batch_size, threads=settings.threads, dtype=settings.dtype,
                             repack=settings.repack)
        assistant = cls(engine=engine, settings=settings, model_path=path)
        if settings.sentiment_head:
            assistant.attach_head()
        assistant.load_seconds = time.perf_counter() - start
        return assistant

    def head_directory(self) -> Path:
        return self.settings.resolved_home() / "heads"

    def model_sha256(self) -> str | None:
        if self.model_path is None or not self.model_path.is_file():
            return None  # a Hugging Face directory: no single file to key a head by
        return model_sha256(self.model_path, self.settings.resolved_home())

    def attach_head(self) -> SentimentHead | None:
        """Use the learned head for this model and sentiment prompt, if there is one."""
        sha = self.model_sha256()
        head = SentimentHead.find(sha, self.analyst.prompt.name, self.head_directory()) if sha else None
        if head is not None:
            head.check_fits(self.engine.n_layers, self.engine.hidden_size)
        self.analyst.use_head(head)
        self.head = head
        return head

    def default_sampling(self) -> Sampling:
        s = self.settings
        return Sampling(max_tokens=s.reply_max_tokens, temperature=s.temperature, top_p=s.top_p,
                        repeat_penalty=s.repeat_penalty)

    def analyze(self, text: str, *, method: str = "score") -> Sentiment:
        if method == "score":
            return self.analyst.analyze(text)
        if method == "prompt":  # the prompt's two label tokens alone, even when a head is attached
            return self.analyst.analyze(text, use_head=False)
        if method == "seed":
            return self.analyst.analyze_by_generation(text)
        raise ValueError(f"unknown method {method!r} (score, prompt or seed)")

    def respond(self, conversation: Conversation, message: str, *, sampling: Sampling | None = None,
                should_stop: Callable[[], bool] | None = None) -> Response:
        """Sentiment first (available on the returned object at once), then the reply as a stream."""
        validate_text(message, self.settings.max_text_chars)
        sentiment = self.analyst.analyze(message)
        sampling = sampling or self.default_sampling()
        if self.settings.reply_in_script:
            sampling = dataclasses.replace(sampling, suppress_tokens=sampling.suppress_tokens
                                           | self.chat.script_guard(message))
        user_content = self.chat.user_content(message, sentiment.label)
        tokens, dropped = self.chat.prompt_tokens(conversation.turns, user_content, sampling.max_tokens)
        if dropped:
            del conversation.turns[:dropped]
        stats = ReplyStats(prompt_tokens=len(tokens), dropped_turns=dropped)
        start = time.perf_counter()
        stream = self.chat.stream(tokens, sampling, should_stop=should_stop)

        def deltas():
            for delta in stream:
                if stats.time_to_first_token_ms is None:
                    stats.time_to_first_token_ms = (time.perf_counter() - start) * 1000
                    stats.cached_tokens = self.engine.last_stats.reused
                yield delta

        def finish():
            stats.total_ms = (time.perf_counter() - start) * 1000
            stats.completion_tokens = len(stream.tokens)
            stats.finish_reason = stream.finish_reason
            conversation.turns.append(Turn(message=message, sentiment=sentiment.label,
                                           user_content=user_content, reply=stream.text))

        return Response(sentiment, deltas(), finish, stats)

    def complete(self, messages: Sequence[dict], *, sampling: Sampling | None = None, stop: Sequence[str] = (),
                 should_stop: Callable[[], bool] | None = None) -> tuple[TextStream, int]:
        """A plain chat completion over caller-given messages (role/content dicts), with the
        model's chat template; returns the text stream and the prompt's token count."""
        if not messages:
            raise InputError("messages must not be empty")
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                    or not isinstance(m.get("content"), str):
                raise InputError("each message needs a role (system, user or assistant) and a string content")
        sampling = sampling or self.default_sampling()
        tokens = self.chat.template.tokens(messages)
        if len(tokens) + 1 > self.engine.n_ctx:
            raise InputError(f"the messages need {len(tokens)} tokens; the context holds {self.engine.n_ctx}")
        generation = self.engine.generate(tokens, sampling, lane=COMPLETION_LANE, should_stop=should_stop)
        return TextStream(self.engine.token_bytes, generation, stop=stop), len(tokens)
