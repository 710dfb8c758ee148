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


class ChatRole:
    def __init__(self, engine: Engine, prompt: ChatPrompt, *, lane: int = 1, reply_max_tokens: int = 256):
        self.engine = engine
        self.prompt = prompt
        self.lane = lane
        self.reply_max_tokens = reply_max_tokens
        self.template = ChatTemplate(engine)

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
