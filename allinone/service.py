"""analyze / respond: the only place where the roles are combined. The CLI and the server are thin
adapters over `Assistant`."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path

import numpy as np

from .conversation.history import Conversation, Turn
from .engine import open_engine
from .engine.base import Engine, EngineError, Sampling
from .engine.text import TextStream
from .model.store import model_sha256, resolve_model_path
from .roles.adapter import ChatAdapter, file_sha256
from .roles.chat import ChatRole
from .roles.choice import Choice, ChoiceRole
from .roles.definition import ChatPromptSpec, RoleDefinition, RoleError, RoleRegistry
from .roles.extract import ExtractRole, PhraseHead, Phrases
from .roles.head import ChoiceHead, HeadError, ReadingPoint
from .roles.inputs import InputError, validate_text
from .settings import Settings


class Lane(IntEnum):
    """Lanes of the engine's prefix cache, one per use, so that none evicts another's prefix. On
    llama.cpp the first `hidden_state_lanes` lanes can read hidden states, each in a context of its
    own (so each can run an adapter): the analysis lane always, the chat lane when a chat head reads
    its pass or it runs the chat adapter."""

    ANALYSIS = 0  # the mood role's prompt: its head and every other choice role's head read this pass
    CHAT = 1
    COMPLETION = 2  # raw chat completions (OpenAI-style messages)
    SPARE = 3  # unused by the service: the benchmark's second analyst
    ZERO_SHOT = 4  # choice roles without a head, each scored by its own prompt (they take turns)


log = logging.getLogger("allinone.service")

# The chat role's name; the choice role it is told the result of is its definition's `mood_from`.
CHAT_ROLE = "chat"


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

    def __init__(self, sentiment: Choice, deltas: Iterator[str], finish: Callable[[], None], stats: ReplyStats):
        self.sentiment = sentiment
        # the message's other roles (settings.chat_roles): known once the first reply token is out
        self.annotations: dict[str, Choice] | None = None
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


def heads_directory(settings: Settings) -> Path:
    """Where the user's own heads live (they win over the packaged ones)."""
    return settings.resolved_home() / "heads"


def adapters_directory(settings: Settings) -> Path:
    """Where the user's own chat adapters live (they win over the packaged ones)."""
    return settings.resolved_home() / "adapters"


def discover_roles(settings: Settings) -> RoleRegistry:
    """The built-in roles, then <home>/roles/, then the files named by settings.role_paths."""
    extra = [Path(p) for p in (settings.role_paths or "").split(os.pathsep) if p]
    return RoleRegistry.discover(settings.resolved_home(), extra)


def mood_role(roles: RoleRegistry) -> RoleDefinition:
    """The choice role whose result the chat role is told (sentiment, by default): the analyst's."""
    return roles.get(roles.get(CHAT_ROLE).mood_from)


def find_chat_adapter(settings: Settings, model_sha: str | None, chat: ChatPromptSpec) -> ChatAdapter | None:
    """The chat role's LoRA adapter for this model and chat prompt, if any (settings.chat_adapter off: none)."""
    if not (settings.chat_adapter and model_sha):
        return None
    return ChatAdapter.find(model_sha, chat.key, adapters_directory(settings))


def find_heads(
    settings: Settings,
    model_sha: str | None,
    mood: RoleDefinition,
    chat: ChatPromptSpec,
    chat_adapter: ChatAdapter | None = None,
) -> tuple[ChoiceHead | None, ChoiceHead | None]:
    """The mood role's learned heads for this model, if any (settings.sentiment_head off: none): the
    analyst's, for its prompt, and, with shared_prefill, the chat prompt's, for the weights the chat
    lane runs (the model's own or `chat_adapter`)."""
    if not (settings.sentiment_head and model_sha):
        return None, None
    directory = heads_directory(settings)
    head = ChoiceHead.find(
        model_sha, mood.prompt(settings.sentiment_prompt).name, directory, mood.name, mood.label_names
    )
    chat_head = None
    if settings.shared_prefill and chat.mood_follows_message:
        key = chat.head_key(chat_adapter.sha256 if chat_adapter is not None else None)
        chat_head = ChoiceHead.find(model_sha, key, directory, mood.name, mood.label_names)
    return head, chat_head


@dataclass
class Assistant:
    engine: Engine
    settings: Settings = field(default_factory=Settings)
    model_path: Path | None = None
    load_seconds: float = 0.0
    roles: RoleRegistry | None = None  # None: discovered from the settings
    head: ChoiceHead | None = None
    # Reads the mood at the end of the user's message on the chat lane's own pass (see respond);
    # None = the respond flow asks the analyst, on a pass of its own.
    chat_head: ChoiceHead | None = None

    def __post_init__(self):
        s = self.settings
        self.roles = self.roles or discover_roles(s)
        chat = self.roles.get(CHAT_ROLE)
        self.mood = self.roles.get(chat.mood_from)
        self.analyst = ChoiceRole(
            self.engine,
            self.mood,
            self.mood.prompt(s.sentiment_prompt),
            lane=Lane.ANALYSIS,
            max_text_chars=s.max_text_chars,
            max_text_tokens=s.max_text_tokens,
        )
        self.chat = ChatRole(
            self.engine, chat.prompt(s.chat_prompt), lane=Lane.CHAT, reply_max_tokens=s.reply_max_tokens
        )
        # Per other choice role: its head on the analysis pass (None: none was found, so its own
        # prompt scores it), and the prompt-scoring roles made so far.
        self._role_heads: dict[str, ChoiceHead | None] = {}
        self._zero_shot: dict[str, ChoiceRole] = {}
        self._extractors: dict[str, ExtractRole] = {}

    @classmethod
    def load(cls, settings: Settings | None = None, *, chat_lane_reads_hidden_states: bool = False) -> Assistant:
        """`chat_lane_reads_hidden_states`: even without a chat head (to train one)."""
        settings = settings or Settings()
        roles = discover_roles(settings)
        chat = roles.get(CHAT_ROLE)
        path = resolve_model_path(settings.model, settings.resolved_home(), settings.default_weights)
        start = time.perf_counter()
        sha = model_sha256(path, settings.resolved_home()) if path.is_file() else None
        chat_prompt = chat.prompt(settings.chat_prompt)
        adapter = find_chat_adapter(settings, sha, chat_prompt)
        head, chat_head = find_heads(settings, sha, roles.get(chat.mood_from), chat_prompt, adapter)
        # The chat lane gets a llama.cpp context of its own (full-size: a second KV cache) when a
        # chat head reads hidden states on it or it runs an adapter (llama.cpp sets adapters per context).
        own_chat_context = chat_head or adapter or chat_lane_reads_hidden_states
        engine = open_engine(
            path,
            settings,
            n_lanes=len(Lane),
            hidden_state_lanes=Lane.CHAT + 1 if own_chat_context else Lane.ANALYSIS + 1,
        )
        assistant = cls(engine=engine, settings=settings, model_path=path, roles=roles)
        assistant.chat.use_adapter(adapter)
        assistant.use_heads(head, chat_head)
        assistant.chat_roles()  # an unknown role in settings.chat_roles fails here, not at the first message
        assistant.load_seconds = time.perf_counter() - start
        return assistant

    def head_directory(self) -> Path:
        return heads_directory(self.settings)

    def model_sha256(self) -> str | None:
        if self.model_path is None or not self.model_path.is_file():
            return None  # a Hugging Face directory: no single file to key a head by
        return model_sha256(self.model_path, self.settings.resolved_home())

    def use_heads(self, head: ChoiceHead | None, chat_head: ChoiceHead | None) -> None:
        for h in (head, chat_head):
            if h is not None:
                h.check_fits(self.engine.n_layers, self.engine.hidden_size)
        self.head, self.chat_head = head, chat_head
        self.analyst.use_head(head)
        self._role_heads.clear()  # they read the analysis pass, which the head's adapter shapes
        self._extractors.clear()

    def use_chat_adapter(self, adapter: ChatAdapter | None) -> None:
        """Run the chat lane with this adapter (None: the model's own weights), and read the
        respond flow's mood with the chat head made for those weights, if there is one."""
        self.chat.use_adapter(adapter)
        self.use_heads(
            self.head, find_heads(self.settings, self.model_sha256(), self.mood, self.chat.prompt, adapter)[1]
        )

    def attach_head(self) -> ChoiceHead | None:
        """Look the heads up again (after training one) and use them; returns the analyst's."""
        self.use_heads(*find_heads(self.settings, self.model_sha256(), self.mood, self.chat.prompt, self.chat.adapter))
        return self.head

    # ---- other choice roles: heads on the analysis pass, or their own prompt -------------------
    def analysis_point(self) -> ReadingPoint:
        """Where the heads of choice roles other than the mood read: the analyst's scoring position,
        on the weights its own head runs (its adapter changes what they read, so it is in the key)."""
        point = self.analyst.reading_point()
        point.prompt_alone = None  # its label words are the mood's, not the role's
        if point.adapter is not None:
            point.key = f"{point.key}@{file_sha256(point.adapter)[:12]}"
        return point

    def role_head(self, role: RoleDefinition) -> ChoiceHead | None:
        """The role's learned head on the analysis pass, if one exists for this model (and the pass
        has a head of its own to stop at the same depth). A role sent with a request has none."""
        if role.name == self.mood.name and role is self.roles.roles.get(role.name):
            return self.head
        if role.source == "request":
            return None
        if role.name not in self._role_heads:
            self._role_heads[role.name] = self._find_role_head(role)
        return self._role_heads[role.name]

    def _find_role_head(self, role: RoleDefinition) -> ChoiceHead | None:
        sha = self.model_sha256()
        if not (self.settings.sentiment_head and sha and self.head is not None):
            return None
        head = ChoiceHead.find(sha, self.analysis_point().key, self.head_directory(), role.name, role.label_names)
        if head is not None:
            head.check_fits(self.engine.n_layers, self.engine.hidden_size)
            if head.layers != self.head.layers:
                raise HeadError(
                    f"the head of role {role.name!r} reads after block {head.layers}, but the analysis pass "
                    f"stops after block {self.head.layers}: train it again"
                )
        return head

    def zero_shot(self, role: RoleDefinition) -> ChoiceRole:
        """The role scored by its own prompt's label words, on the lane such roles share."""
        made = self._zero_shot.get(role.name)
        if made is None or made.role is not role:
            made = ChoiceRole(
                self.engine,
                role,
                lane=Lane.ZERO_SHOT,
                max_text_chars=self.settings.max_text_chars,
                max_text_tokens=self.settings.max_text_tokens,
            )
            if role.source != "request":
                self._zero_shot[role.name] = made
        return made

    def extract_role(self, role: RoleDefinition) -> ExtractRole:
        """The extract role on the analysis pass, with its phrase head for this model if there is
        one (without: ranked by counts alone, no pass)."""
        made = self._extractors.get(role.name)
        if made is None or made.role is not role:
            made = ExtractRole(
                role,
                self.analyst.text_tokens,
                self.analyst.text_pass,
                self.engine.token_bytes,
                head=self._find_phrase_head(role),
            )
            self._extractors[role.name] = made
        return made

    def _find_phrase_head(self, role: RoleDefinition) -> PhraseHead | None:
        sha = self.model_sha256()
        if not (self.settings.sentiment_head and sha and self.head is not None) or role.source == "request":
            return None
        head = PhraseHead.find(sha, self.analysis_point().key, self.head_directory(), role.name)
        if head is not None:
            head.check_fits(self.engine.hidden_size, self.head.layers)
        return head

    def analyze_roles(
        self,
        text: str,
        roles: Sequence[str | RoleDefinition],
        *,
        heads: dict[str, ChoiceHead] | None = None,
    ) -> dict[str, Choice | Phrases]:
        """Every role's answer for one text. The choice roles with a head and the extract roles
        share one pass: the analysis pass is evaluated once, each choice head reads its last
        position, each extract role ranks spans of the text by its rows. Choice roles without a
        head are scored by their own prompts, one after another. `heads`: role name -> a head to
        use instead of the one found for the role (label-set evaluation)."""
        validate_text(text, self.settings.max_text_chars)
        definitions = [self.roles.get(r) if isinstance(r, str) else r for r in roles]
        for role in definitions:
            if role.kind not in ("choice", "extract"):
                raise InputError(f"role {role.name!r} is a {role.kind} role: analyze takes choice and extract roles")
        results: dict[str, Choice | Phrases] = {}
        chosen = {
            role.name: (heads or {}).get(role.name) or self.role_head(role)
            for role in definitions
            if role.kind == "choice"
        }
        extractors = {role.name: self.extract_role(role) for role in definitions if role.kind == "extract"}
        phrase_depths = tuple(sorted({e.head.layers for e in extractors.values() if e.head is not None}))
        pooled = any(head is not None and head.pooled for head in chosen.values())
        heads_wanted = any(head is not None for head in chosen.values())
        shared = None  # (hidden state, truncated, ms, text tokens, {depth: rows}) of the analysis pass

        def analysis_pass() -> tuple:
            """One pass for every head asked: as deep as the choice heads read (or, for phrase
            heads alone, as deep as they read), with the text's rows at each depth needed."""
            start = time.perf_counter()
            if phrase_depths:
                layers = self.head.layers if heads_wanted else max(phrase_depths)
                depths = phrase_depths + ((layers,) if pooled else ())
                tokens, rows, last, truncated = self.analyst.text_pass(text, layers, depths)
                hidden = np.stack([last, rows[layers][: len(tokens)].mean(axis=0)]) if pooled else last
                return hidden, truncated, (time.perf_counter() - start) * 1000, tokens, rows
            hidden, truncated = self.analyst.hidden_state(text, pooled=pooled)
            return hidden, truncated, (time.perf_counter() - start) * 1000, None, None

        for role in definitions:
            start = time.perf_counter()
            if role.kind == "extract":
                extractor = extractors[role.name]
                if extractor.head is None:
                    results[role.name] = extractor.extract(text)
                    continue
                if shared is None:
                    shared = analysis_pass()
                rows = shared[4][extractor.head.layers]
                answer = extractor.from_pass(text, shared[3], rows, shared[1], time.perf_counter())
                answer.latency_ms += shared[2]
                results[role.name] = answer
                continue
            head = chosen[role.name]
            if head is None:
                is_mood = role is self.mood
                results[role.name] = (self.analyst if is_mood else self.zero_shot(role)).analyze(text)
                continue
            if shared is None:
                shared = analysis_pass()
                start = time.perf_counter()
            probs = head.probabilities(shared[0], text)
            ms = shared[2] + (time.perf_counter() - start) * 1000
            results[role.name] = Choice.from_probabilities(role.label_names, probs, ms, shared[1])
        return results

    def default_sampling(self) -> Sampling:
        s = self.settings
        return Sampling(
            max_tokens=s.reply_max_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            repeat_penalty=s.repeat_penalty,
            no_repeat_ngram=s.reply_no_repeat_ngram,
            max_copy=s.reply_max_copy,
            min_tokens=min(s.reply_min_tokens, s.reply_max_tokens),
        )

    def completion_sampling(self) -> Sampling:
        """The configured length, temperature and top_p, but none of the chat role's reply guards:
        a plain completion is the caller's own conversation (a one-word answer may be right)."""
        s = self.settings
        return Sampling(max_tokens=s.reply_max_tokens, temperature=s.temperature, top_p=s.top_p)

    def analyze(self, text: str, *, method: str = "score") -> Choice:
        """The mood role's answer (sentiment, by default) by one of its methods."""
        if method == "score":
            return self.analyst.analyze(text)
        if method == "prompt":  # the prompt's two label tokens alone, even when a head is attached
            return self.analyst.analyze(text, use_head=False)
        if method == "seed":
            return self.analyst.analyze_by_generation(text)
        if method == "chat":  # what the respond flow detects for this text as a first message
            if self.chat_head is None:
                raise ValueError("no chat head: the respond flow asks the analyst")
            validate_text(text, self.settings.max_text_chars)
            tokens, _, message_end = self.chat.prompt_tokens([], text, None, 1)
            return self._second_opinion_if_unsure(text, self._mood_on_the_chat_pass(tokens[:message_end]))
        raise ValueError(f"unknown method {method!r} (score, prompt, seed or chat)")

    def respond(
        self,
        conversation: Conversation,
        message: str,
        *,
        sampling: Sampling | None = None,
        should_stop: Callable[[], bool] | None = None,
        shared_prefill: bool = True,
    ) -> Response:
        """Sentiment first (available on the returned object at once), then the reply as a stream.

        With a chat head (settings.shared_prefill), the message is evaluated once: the chat lane's
        pass over the conversation up to the message's end runs every block (its KV entries are
        what the reply continues from) and the head reads part-way up on the way; the reply then
        costs only the tag and the turn markers after the message. Otherwise the analyst scores
        the message on its own lane first and the chat lane evaluates it a second time.
        `shared_prefill=False` forces the latter (the bench compares the two)."""
        validate_text(message, self.settings.max_text_chars)
        sampling = sampling or self.default_sampling()
        if self.settings.reply_in_script:
            sampling = dataclasses.replace(
                sampling, suppress_tokens=sampling.suppress_tokens | self.chat.script_guard(message)
            )
        turns = conversation.turns
        if sampling.max_copy:
            sources = [message] + ([turn.reply for turn in turns] if self.settings.reply_copy_earlier else [])
            sampling = dataclasses.replace(
                sampling, copy_sources=tuple(tuple(self.engine.tokenize(text)) for text in sources)
            )
        cached = None  # prompt tokens this respond did not evaluate: known after its first pass
        if self.chat_head is not None and shared_prefill:
            probe, dropped, message_end = self.chat.prompt_tokens(turns, message, None, sampling.max_tokens)
            sentiment = self._mood_on_the_chat_pass(probe[:message_end])
            cached = self.engine.last_stats.reused
            sentiment = self._second_opinion_if_unsure(message, sentiment)
            tokens, _, _ = self.chat.prompt_tokens(turns[dropped:], message, sentiment.label, sampling.max_tokens)
        else:
            sentiment = self.analyst.analyze(message)
            tokens, dropped, _ = self.chat.prompt_tokens(turns, message, sentiment.label, sampling.max_tokens)
        user_content = self.chat.user_content(message, sentiment.label)
        if dropped:
            del conversation.turns[:dropped]
        stats = ReplyStats(prompt_tokens=len(tokens), dropped_turns=dropped)
        start = time.perf_counter()
        stream = self.chat.stream(tokens, sampling, should_stop=should_stop)

        def deltas():
            for delta in stream:
                first = stats.time_to_first_token_ms is None
                if first:
                    stats.time_to_first_token_ms = (time.perf_counter() - start) * 1000
                    stats.cached_tokens = self.engine.last_stats.reused if cached is None else cached
                yield delta
                if first:
                    # The other roles read the analysis lane (a context of its own): done once the
                    # person sees the reply begin, so they cost the first token nothing.
                    response.annotations = self.annotate(message)

        def finish():
            stats.total_ms = (time.perf_counter() - start) * 1000
            stats.completion_tokens = len(stream.tokens)
            stats.finish_reason = stream.finish_reason
            notes = {self.mood.name: sentiment.annotation()}
            notes.update({name: choice.annotation() for name, choice in (response.annotations or {}).items()})
            conversation.turns.append(
                Turn(
                    message=message,
                    sentiment=sentiment.label,
                    user_content=user_content,
                    reply=stream.text,
                    annotations=notes,
                )
            )

        response = Response(sentiment, deltas(), finish, stats)
        return response

    def chat_roles(self) -> list[RoleDefinition]:
        """The choice roles shown with each chat message (settings.chat_roles) that have a learned
        head: a role without one would need a pass of its own prompt per message. An unknown name
        is a RoleError (Assistant.load asks once, so a typo fails at start)."""
        names = [n.strip() for n in (self.settings.chat_roles or "").split(",") if n.strip()]
        roles = [self.roles.get(name) for name in names]
        for role in roles:
            if role.kind != "choice":
                raise RoleError(f"chat_roles: {role.name!r} is a {role.kind} role, not a choice role")
        return [role for role in roles if self.role_head(role) is not None]

    def annotate(self, message: str) -> dict[str, Choice]:
        """The chat roles' answers for a message, from one pass on the analysis lane; none if that
        pass fails (the reply goes on: these are extras)."""
        try:
            roles = self.chat_roles()
            return self.analyze_roles(message, roles) if roles else {}
        except (InputError, HeadError, EngineError) as err:
            log.warning("chat roles skipped for one message: %s", err)
            return {}

    def annotation_line(self, labels: dict[str, str], lang: str = "zh") -> str:
        """`😢 悲伤 · 倾诉`: each role's label (role name -> label name) as a person sees it, the
        first with its emoji; a role or label no longer known (a stored turn) is left out."""
        parts = []
        for name, label_name in labels.items():
            role = self.roles.roles.get(name)
            if role is None or label_name not in role.label_names:
                continue
            label = role.label(label_name)
            parts.append(f"{label.emoji} {label.shown(lang)}".strip() if not parts else label.shown(lang))
        return " · ".join(parts)

    def _second_opinion_if_unsure(self, message: str, read: Choice) -> Choice:
        """The chat head's reading, or the analyst's when the head is unsure of it: the analyst
        reads real messages better (its own prompt, its own adapter) and costs one short pass,
        paid only for those messages (docs/chat.md has the figures)."""
        if read.probability is None or read.probability >= self.settings.second_opinion_below:
            return read
        analyst = self.analyst.analyze(message)
        analyst.latency_ms += read.latency_ms
        return analyst

    def _mood_on_the_chat_pass(self, tokens: list[int]) -> Choice:
        start = time.perf_counter()
        hidden = self.engine.hidden_state(tokens, self.chat_head.layers, lane=Lane.CHAT, complete=True)
        probs = self.chat_head.probabilities(hidden)
        return Choice.from_probabilities(self.mood.label_names, probs, (time.perf_counter() - start) * 1000)

    def complete(
        self,
        messages: Sequence[dict],
        *,
        sampling: Sampling | None = None,
        stop: Sequence[str] = (),
        should_stop: Callable[[], bool] | None = None,
    ) -> tuple[TextStream, int]:
        """A plain chat completion over caller-given messages (role/content dicts), with the
        model's chat template; returns the text stream and the prompt's token count."""
        if not messages:
            raise InputError("messages must not be empty")
        for m in messages:
            if (
                not isinstance(m, dict)
                or m.get("role") not in ("system", "user", "assistant")
                or not isinstance(m.get("content"), str)
            ):
                raise InputError("each message needs a role (system, user or assistant) and a string content")
        sampling = sampling or self.completion_sampling()
        tokens = self.chat.template.tokens(messages)
        room = self.engine.lane_context_size(Lane.COMPLETION)
        if len(tokens) + 1 > room:
            raise InputError(f"the messages need {len(tokens)} tokens; the context holds {room}")
        generation = self.engine.generate(tokens, sampling, lane=Lane.COMPLETION, should_stop=should_stop)
        return TextStream(self.engine.token_bytes, generation, stop=stop), len(tokens)
