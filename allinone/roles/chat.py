"""The chat assistant: the model's chat template, a system prompt, history, streamed replies."""

from __future__ import annotations

from collections.abc import Sequence

from ..conversation.history import Turn, fit_turns
from ..engine.base import Engine, Sampling
from ..engine.text import TextStream
from .adapter import ChatAdapter
from .definition import ChatPromptSpec
from .head import ReadingPoint
from .inputs import InputError
from .language import detect_language
from .template import ChatTemplate

# Belt and braces: if a model emits a turn marker as text instead of its end-of-turn token.
_STOP_STRINGS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")


def _is_east_asian(piece: bytes) -> bool:
    """Whether a token's bytes start an East Asian character: UTF-8 lead bytes E3-ED cover
    U+3000-U+DFFF (CJK punctuation, kana, ideographs, Hangul), EF covers fullwidth forms such as
    "，". Continuation bytes alone cannot start a character, so lead bytes are enough."""
    return any(0xE3 <= b <= 0xED or b == 0xEF for b in piece)


class ChatRole:
    def __init__(self, engine: Engine, prompt: ChatPromptSpec, *, lane: int = 1, reply_max_tokens: int = 256):
        self.engine = engine
        self.prompt = prompt
        self.lane = lane
        self.reply_max_tokens = reply_max_tokens
        self.template = ChatTemplate(engine)
        self._east_asian_tokens: frozenset[int] | None = None
        self.adapter: ChatAdapter | None = None

    def use_adapter(self, adapter: ChatAdapter | None) -> None:
        """Run the chat lane with this LoRA adapter (roles/adapter.py), or on the model's own weights."""
        self.engine.use_adapter(self.lane, adapter.path if adapter is not None else None)
        self.adapter = adapter

    @property
    def head_key(self) -> str:
        """The key of a head that reads this role's pass, with its current weights."""
        return self.prompt.head_key(self.adapter.sha256 if self.adapter is not None else None)

    def script_guard(self, message: str) -> frozenset[int]:
        """Tokens the reply to `message` must not use. The 0.5B model, told in Chinese how to
        behave, sometimes answers an English message in Chinese (2 of 20 chat-dev messages);
        no prompt wording fixed that, so an English message's reply may not contain East Asian
        characters. A Chinese message gets no guard: English words are normal in Chinese text."""
        if detect_language(message) != "en":
            return frozenset()
        if self._east_asian_tokens is None:  # one pass over the vocabulary (~0.3 s), once
            self._east_asian_tokens = frozenset(
                t
                for t in range(self.engine.n_vocab)
                if t not in self.engine.eog_tokens and _is_east_asian(self.engine.token_bytes(t))
            )
        return self._east_asian_tokens

    def _tag(self, message: str, label: str | None) -> str:
        tags = self.prompt.tags
        if self.prompt.tags_by_language:
            tags = self.prompt.tags_by_language.get(detect_language(message), tags)
        if label is None:  # not known yet: the longest tag stands in, for counting tokens
            return max(tags.values(), key=len)
        return tags[label]

    def user_parts(self, message: str, label: str | None) -> tuple[str, str, str]:
        """The user turn as the model sees it, in three pieces, each tokenized on its own (see
        ChatTemplate.tokens_and_ends): what the chat prompt puts before the message, the message,
        what it puts after it."""
        before, after = self.prompt.user_template.split("{message}")
        tag = self._tag(message, label)
        return before.format(tag=tag), message, after.format(tag=tag)

    def user_content(self, message: str, label: str) -> str:
        return "".join(self.user_parts(message, label))

    def reading_point(self) -> ReadingPoint:
        """Where a head for the respond flow's shared pass reads (for training it): the end of
        the message, as the first message of a conversation."""

        def tokens(text: str) -> list[int]:
            ids, _, message_end = self.prompt_tokens([], text, None, 1)
            return ids[:message_end]

        return ReadingPoint(
            key=self.head_key,
            engine=self.engine,
            lane=self.lane,
            tokens=tokens,
            adapter=self.adapter.path if self.adapter is not None else None,
        )

    def _turn_content(self, turn: Turn) -> str | tuple[str, ...]:
        parts = self.user_parts(turn.message, turn.sentiment)
        # A turn recorded under another chat prompt is shown as it was.
        return parts if "".join(parts) == turn.user_content else turn.user_content

    def messages(self, turns: Sequence[Turn], user_content: str | tuple[str, ...]) -> list[dict]:
        messages = [{"role": "system", "content": self.prompt.system}]
        for message, label, reply in self.prompt.examples:
            messages.append({"role": "user", "content": self.user_parts(message, label)})
            messages.append({"role": "assistant", "content": reply})
        for turn in turns:
            messages.append({"role": "user", "content": self._turn_content(turn)})
            messages.append({"role": "assistant", "content": turn.reply})
        messages.append({"role": "user", "content": user_content})
        return messages

    def text_messages(self, turns: Sequence[Turn], message: str, label: str) -> list[dict]:
        """The same messages with each content as one string, as other chat APIs take them."""
        return [
            {**m, "content": m["content"] if isinstance(m["content"], str) else "".join(m["content"])}
            for m in self.messages(turns, self.user_parts(message, label))
        ]

    def prompt_tokens(
        self, turns: Sequence[Turn], message: str, label: str | None, reply_max_tokens: int
    ) -> tuple[list[int], int, int]:
        """Token ids of the prompt; how many of the oldest turns had to be dropped to leave room
        for the reply; and where the message ends in the ids (the tokens before that do not
        depend on `label`). The system prompt and the new message are never dropped. With
        label None the longest tag stands in: the count, the drop and the tokens up to the
        message's end are then what they will be for either label."""
        budget = self.lane_context_size() - reply_max_tokens
        parts = self.user_parts(message, label)

        def render(kept):
            return self.template.tokens_and_ends(self.messages(kept, parts))

        # The whole conversation is rendered once; only when it does not fit are shorter
        # histories counted (fit_turns) and the kept one rendered again.
        tokens, ends = render(turns)
        dropped = 0
        if len(tokens) > budget:
            dropped = fit_turns(turns, lambda kept: len(render(kept)[0]), budget)
            tokens, ends = render(turns[dropped:])
        if len(tokens) > budget:
            raise InputError(
                f"the message needs {len(tokens)} tokens with the system prompt; "
                f"only {budget} fit beside a {reply_max_tokens}-token reply"
            )
        return tokens, dropped, ends[-1][1]

    def warm_prefix(self) -> None:
        """Leave the lane holding just the prompt's fixed beginning (system prompt, examples): the
        state a new conversation finds (used to time the respond flow fairly)."""
        tokens, ends = self.template.tokens_and_ends(self.messages([], self.user_parts("", None)))
        self.engine.logits(tokens[: ends[-1][0]], lane=self.lane)

    def lane_context_size(self) -> int:
        return self.engine.lane_context_size(self.lane)

    def stream(
        self, tokens: Sequence[int], sampling: Sampling, stop: Sequence[str] = (), should_stop=None
    ) -> TextStream:
        generation = self.engine.generate(tokens, sampling, lane=self.lane, should_stop=should_stop)
        return TextStream(self.engine.token_bytes, generation, stop=[*_STOP_STRINGS, *stop])
