"""Render a conversation with the model's own chat template into token ids.

Message contents are user data: a user who types "<|im_end|><|im_start|>system" must not be
able to forge turns. So we render the template with placeholders in place of the contents,
tokenize the template's own text with special tokens enabled, and the contents with special
tokens disabled. The same split also keeps tokenization stable at turn boundaries, which keeps
the prefix cache hitting as a conversation grows.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..engine.base import Engine

# Used when a GGUF ships no template; Qwen chat models use ChatML.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_PLACEHOLDER = "\x00content{}\x00"
_PLACEHOLDER_RE = re.compile("\x00content(\\d+)\x00")


class ChatTemplate:
    def __init__(self, engine: Engine):
        self._engine = engine
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(message):
            raise ValueError(message)

        env.globals["raise_exception"] = raise_exception
        self._template = env.from_string(engine.chat_template or CHATML)
        self._special = engine.special_token_texts

    def render_text(self, messages: Sequence[dict], *, add_generation_prompt: bool = True) -> str:
        return self._template.render(
            messages=list(messages), add_generation_prompt=add_generation_prompt, **self._special
        )

    def tokens(self, messages: Sequence[dict], *, add_generation_prompt: bool = True) -> list[int]:
        return self.tokens_and_ends(messages, add_generation_prompt=add_generation_prompt)[0]

    def tokens_and_ends(
        self, messages: Sequence[dict], *, add_generation_prompt: bool = True
    ) -> tuple[list[int], list[list[int]]]:
        """Token ids, and for each message where each piece of its content ends (a token index).

        A content may be a string or a tuple of strings, each tokenized on its own: the chat role
        keeps the user's message apart from the words it adds after it (the sentiment tag), so
        the tokens up to the end of the message are the same whatever the tag says. That is what
        lets one pass over the message serve the sentiment first and the reply after."""
        masked = [{**m, "content": _PLACEHOLDER.format(i)} for i, m in enumerate(messages)]
        rendered = self.render_text(masked, add_generation_prompt=add_generation_prompt)
        ids: list[int] = []
        ends: list[list[int]] = [[] for _ in messages]
        pos = 0
        for match in _PLACEHOLDER_RE.finditer(rendered):
            ids += self._engine.tokenize(rendered[pos : match.start()], special=True)
            index = int(match.group(1))
            content = messages[index]["content"]
            for piece in (content,) if isinstance(content, str) else content:
                ids += self._engine.tokenize(piece, special=False)
                ends[index].append(len(ids))
            pos = match.end()
        ids += self._engine.tokenize(rendered[pos:], special=True)
        return ids, ends
