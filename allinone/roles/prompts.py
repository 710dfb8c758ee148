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


def sentiment_display(label: str) -> str:
    """The line a person sees for a detected sentiment: `😄 LLM 情感判断: 正面` (CLI, page, API)."""
    shown = LABEL_DISPLAY[label]
    return f"{shown['emoji']} LLM 情感判断: {shown['zh']}"


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
    # Tag wording per message language ("zh"/"en"), when it should follow the user's language:
    # an English tag after a Chinese message pulls a small model into answering in English.
    tags_by_language: dict[str, dict[str, str]] | None = None
    # Example exchanges (message, detected label, reply), shown to the model as earlier turns
    # right after the system prompt: part of the cached prefix, so free per request.
    examples: tuple[tuple[str, str, str], ...] = ()

    @property
    def sentiment_follows_message(self) -> bool:
        """Whether the tag comes after the message: then the tokens up to the message's end do
        not depend on the sentiment, and one pass over them can serve both the sentiment (read
        part-way up by a head) and the reply."""
        return "{tag}" not in self.user_template.split("{message}")[0]

    @property
    def key(self) -> str:
        """What heads and adapters made for this prompt are filed under."""
        return f"chat-{self.name}"

    def head_key(self, adapter_sha256: str | None = None) -> str:
        """The key of a head that reads at the end of the user's message in this prompt, on a
        chat lane that runs the adapter with this sha256 (None: the model's own weights): the
        adapter changes the states the head reads, so a head fits only the weights it read."""
        return self.key if adapter_sha256 is None else f"{self.key}@{adapter_sha256[:12]}"


# From ../shared/data/sentiment-train.jsonl (never the dev set), chosen to show the convention on
# mixed reviews: the overall verdict decides.
_FEWSHOT_EXAMPLES = [
    ("菜品足,非常好", "Positive"),
    ("@USAirways where's our luggage? Been waiting more than an hour! Flight 2118.", "Negative"),
    ("酒店不错，只是电视机小了一点，下次还会入住。", "Positive"),
    ("it has all the excitement of eating oatmeal .", "Negative"),
    ("味道还好，就是送餐太慢了", "Negative"),
    ("I highly recommend this case.", "Positive"),
    ("我下单后就降价还送东西，这个我接受不了，还不给申请价格保护，让人难以接受", "Negative"),
    ("@JetBlue thank you guys! You are the best!", "Positive"),
]

SENTIMENT_PROMPTS: dict[str, SentimentPrompt] = {
    p.name: p
    for p in [
        SentimentPrompt(
            name="original",
            description="The original recipe's prompt, verbatim, as plain text (no chat template).",
            format="plain",
            template="你是一个冷酷的情感分析师。你的任务是对用户的每一条输入进行严格的情绪判断。 "
            '只允许输出两种结果:"Positive" 或 "Negative",不得添加任何解释或标点。 '
            "用户输入:{text} 分析结果:",
            # After "分析结果:" the model continues with a space: " Positive" / " Negative" are
            # single tokens in Qwen's vocabulary; the space-less ones score wrongly here.
            label_words={"positive": " Positive", "negative": " Negative"},
        ),
        SentimentPrompt(
            name="fewshot",
            description="The original instructions and format, with eight short labelled examples from "
            "the training split (both languages, mixed reviews included) in the cached prefix.",
            format="plain",
            template="你是一个冷酷的情感分析师。你的任务是对用户的每一条输入进行严格的情绪判断。 "
            '只允许输出两种结果:"Positive" 或 "Negative",不得添加任何解释或标点。\n'
            + "".join(f"用户输入:{text} 分析结果: {label}\n" for text, label in _FEWSHOT_EXAMPLES)
            + "用户输入:{text} 分析结果:",
            label_words={"positive": " Positive", "negative": " Negative"},
        ),
        SentimentPrompt(
            name="original-chat",
            description="The original instructions as the system turn of the model's chat template; "
            "the text is the user turn; the assistant's first token is scored.",
            format="chat",
            system="你是一个冷酷的情感分析师。你的任务是对用户的每一条输入进行严格的情绪判断。 "
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
        ChatPrompt(
            name="warm",
            description="A caring friend: same language as the user, 1-3 short sentences, no lists; the "
            "detected mood follows the message; four example exchanges (ours) set the tone.",
            system="你是一个温暖、体贴的朋友。用户会分享生活里的好消息或坏消息,消息后面的括号里是检测到的情绪。"
            "用和用户相同的语言回复:用户写中文就用中文,用户写英文就用英文。"
            "只说一到三句简短、自然、真诚的话:好消息就真心为对方高兴,坏消息就先表示理解和安慰。"
            "不要重复用户的话,不要提情绪标签,不要列清单,不要用 Markdown。",
            user_template="{message}\n({tag})",
            tags={"positive": "mood: positive", "negative": "mood: negative"},
            tags_by_language={
                "zh": {"positive": "情绪:正面", "negative": "情绪:负面"},
                "en": {"positive": "mood: positive", "negative": "mood: negative"},
            },
            examples=(
                (
                    "I finally fixed the old bike my dad gave me!",
                    "positive",
                    "That's so satisfying, nice work! I bet it feels special to ride it again.",
                ),
                ("我养的多肉终于开花了!", "positive", "哇,多肉开花可不常见,你的用心照顾有回报啦!记得拍张照片留念。"),
                (
                    "I missed the bus and was late for my exam.",
                    "negative",
                    "Oh no, what a stressful start to the day. I'm sorry that happened. "
                    "Were you still able to sit the exam?",
                ),
                (
                    "最近加班太多,感觉身体被掏空了。",
                    "negative",
                    "连续加班真的太消耗人了,辛苦你了。今晚能早点休息吗?身体比什么都重要。",
                ),
            ),
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
