"""Every prompt the product sends to the model, as data, in one place.

A sentiment prompt is a template around the user's text plus the label words the model should
continue with. A chat prompt is a system prompt plus the shape of the user turn, which carries
the sentiment we detected. Prompts are chosen by name (settings `sentiment_prompt`,
`chat_prompt`); "original" is the recipe this project started from, kept verbatim.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

LABELS = ("positive", "negative")

# How a label is shown to a person (CLI, page).
LABEL_DISPLAY = {
    "positive": {"emoji": "😄", "zh": "正面", "en": "Positive"},
    "negative": {"emoji": "😞", "zh": "负面", "en": "Negative"},
}


@dataclass(frozen=True)
class SentimentPrompt:
    name: str
    description: str
    # "plain": `template` is the whole prompt; "chat": `template` is the user turn of the
    # model's chat template, `system` the system turn, and scoring happens at the assistant's
    # first token.
    format: Literal["plain", "chat"]
    template: str  # contains "{text}" exactly once; everything before it is cached
    label_words: dict[str, str]  # label -> the exact text of the model's next token
    system: str | None = None


@dataclass(frozen=True)
class ChatPrompt:
    name: str
    description: str
    system: str
    user_template: str  # "{message}" and "{tag}" (the detected sentiment, in `tags` wording)
    tags: dict[str, str] = field(default_factory=lambda: {"positive": "正面", "negative": "负面"})


SENTIMENT_PROMPTS: dict[str, SentimentPrompt] = {
    p.name: p
    for p in [
        SentimentPrompt(
            name="original",
            description="The original recipe's prompt, verbatim, as plain text (no chat template).",
            format="plain",
            template='你是一个冷酷的情感分析师。你的任务是对用户的每一条输入进行严格的情绪判断。 '
                     '只允许输出两种结果:"Positive" 或 "Negative",不得添加任何解释或标点。 '
                     '用户输入:{text} 分析结果:',
            # After "分析结果:" the model continues with a space: " Positive" / " Negative" are
            # single tokens in Qwen's vocabulary; the space-less ones score wrongly here.
            label_words={"positive": " Positive", "negative": " Negative"},
        ),
        SentimentPrompt(
            name="original-chat",
            description="The original instructions as the system turn of the model's chat template; "
                        "the text is the user turn; the assistant's first token is scored.",
            format="chat",
            system='你是一个冷酷的情感分析师。你的任务是对用户的每一条输入进行严格的情绪判断。 '
                   '只允许输出两种结果:"Positive" 或 "Negative",不得添加任何解释或标点。',
            template="{text}",
            # At the start of the assistant turn there is no leading space.
            label_words={"positive": "Positive", "negative": "Negative"},
        ),
    ]
}

CHAT_PROMPTS: dict[str, ChatPrompt] = {
    p.name: p
    for p in [
        ChatPrompt(
            name="original",
            description="The original recipe: empathetic system prompt, sentiment tag in the user turn.",
            system="你是一个富有同理心的AI助手,请以温暖、自然的方式回应用户。",
            user_template='[情感标签:{tag}] 用户说:"{message}" 请以助手身份回应。',
        ),
    ]
}


def sentiment_prompt(name: str) -> SentimentPrompt:
    try:
        return SENTIMENT_PROMPTS[name]
    except KeyError:
        raise ValueError(f"unknown sentiment prompt {name!r}; known: {', '.join(SENTIMENT_PROMPTS)}") from None


def chat_prompt(name: str) -> ChatPrompt:
    try:
        return CHAT_PROMPTS[name]
    except KeyError:
        raise ValueError(f"unknown chat prompt {name!r}; known: {', '.join(CHAT_PROMPTS)}") from None
