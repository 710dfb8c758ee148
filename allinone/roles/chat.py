"""The chat assistant: the model's chat template, a system prompt, history, streamed replies."""

from __future__ import annotations

from typing import Sequence

from ..conversation.history import Turn, fit_turns
from ..engine.base import Engine, Sampling
from ..engine.text import TextStream
from .language import detect_language
from .prompts import ChatPrompt
from .sentiment import InputError
from .template import ChatTemplate

# Belt and braces: if a model emits a turn marker as text instead of its end-of-turn token.
_STOP_STRINGS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")


def _is_east_asian(piece: bytes) -> bool:
    """Whether a token's bytes start an East Asian character: UTF-8 lead bytes E3-ED cover
    U+3000-U+DFFF (CJK punctuation, kana, ideographs, Hangul), EF covers fullwidth forms such as
    "，". Continuation bytes alone cannot start a character, so lead bytes are enough."""
    return any(0xE3 <= b <= 0xED or b == 0xEF for b in piece)


class ChatRole:
    def __init__(self, engine: Engine, prompt: ChatPrompt, *, lane: int = 1, reply_max_tokens: int = 256):
        self.engine = engine
        self.prompt = prompt
        self.lane = lane
        self.reply_max_tokens = reply_max_tokens
        self.template = ChatTemplate(engine)
        self._east_asian_tokens: frozenset[int] | None = None

    def script_guard(self, message: str) -> frozenset[int]:
        """Tokens the reply to `message` must not use. The 0.5B model, told in Chinese how to
        behave, sometimes answers an English message in Chinese (2 of 20 chat-dev messages);
        no prompt wording fixed that, so an English message's reply may not contain East Asian
        characters. A Chinese message gets no guard: English words are normal in Chinese text."""
        if detect_language(message) != "en":
            return frozenset()
        if self._east_asian_tokens is None:  # one pass over the vocabulary (~0.3 s), once
            self._east_asian_tokens = frozenset(
                t for t in range(self.engine.n_vocab)
                if t not in self.engine.eog_tokens and _is_east_asian(self.engine.token_bytes(t)))
        return self._east_asian_tokens

    def user_content(self, message: str, label: str) -> str:
        tags = self.prompt.tags
        if self.prompt.tags_by_language:
            tags = self.prompt.tags_by_language.get(detect_language(message), tags)
        return self.prompt.user_template.format(message=message, tag=tags[label])

    def messages(self, turns: Sequence[Turn], user_content: str) -> list[dict]:
        messages = [{"role": "system", "content": self.prompt.system}]
        for message, label, reply in self.prompt.examples:
            messages.append({"role": "user", "content": self.user_content(message, label)})
            messages.append({"role": "assistant", "content": reply})
        for turn in turns:
            messages.append({"role": "user", "content": turn.user_content})
            messages.append({"role": "assistant", "content": turn.reply})
        messages.append({"role": "user", "content": user_content})
        return messages

    def prompt_tokens(self, turns: Sequence[Turn], user_content: str, reply_max_tokens: int) -> tuple[list[int], int]:
        """Token ids of the prompt, and how many of the oldest turns had to be dropped to leave
        room for the reply. The system prompt and the new message are never dropped."""
        budget = self.engine.n_ctx - reply_max_tokens

        def count(kept):
            return len(self.template.tokens(self.messages(kept, user_content)))

        dropped = fit_turns(turns, count, budget)
        tokens = self.template.tokens(self.messages(turns[dropped:], user_content))
        if len(tokens) > budget:
            raise InputError(f"the message needs {len(tokens)} tokens with the system prompt; "
                             f"only {budget} fit beside a {reply_max_tokens}-token reply")
        return tokens, dropped

    def stream(self, tokens: Sequence[int], sampling: Sampling, stop: Sequence[str] = (),
               should_stop=None) -> TextStream:
        generation = self.engine.generate(tokens, sampling, lane=self.lane, should_stop=should_stop)
        return TextStream(self.engine.token_bytes, generation, stop=[*_STOP_STRINGS, *stop])
