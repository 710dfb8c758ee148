"""Render a conversation with the model's own chat template into token ids.

Message contents are user data: a user who types "<|im_end|><|im_start|>system" must not be
able to forge turns. So we render the template with placeholders in place of the contents,
tokenize the template's own text with special tokens enabled, and the contents with special
tokens disabled. The same split also keeps tokenization stable at turn boundaries, which keeps
the prefix cache hitting as a conversation grows.
"""

from __future__ import annotations

import re
from typing import Sequence

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
        return self._template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                     **self._special)

    def tokens(self, messages: Sequence[dict], *, add_generation_prompt: bool = True) -> list[int]:
        masked = [{**m, "content": _PLACEHOLDER.format(i)} for i, m in enumerate(messages)]
        rendered = self.render_text(masked, add_generation_prompt=add_generation_prompt)
        ids: list[int] = []
        pos = 0
        for match in _PLACEHOLDER_RE.finditer(rendered):
            ids += self._engine.tokenize(rendered[pos:match.start()], special=True)
            ids += self._engine.tokenize(messages[int(match.group(1))]["content"], special=False)
            pos = match.end()
        ids += self._engine.tokenize(rendered[pos:], special=True)
        return ids
