"""Roles, conversation trimming and the respond flow on the fake engine."""

import pytest

from allinone.conversation.history import Conversation, Turn, fit_turns
from allinone.roles.prompts import SENTIMENT_PROMPTS
from allinone.roles.sentiment import InputError, SentimentAnalyst
from allinone.service import Assistant
from allinone.settings import Settings

from .fake_engine import WORDS, FakeEngine


def make_assistant(n_ctx=2048, **overrides):
    # The byte-level fake tokenizer makes the few-shot prompt ~900 tokens: the short original
    # prompt keeps these small-context tests about the chat history.
    overrides.setdefault("sentiment_prompt", "original")
    settings = Settings(home="/nonexistent", **overrides)
    return Assistant(engine=FakeEngine(reply="谢谢你的分享!", n_ctx=n_ctx), settings=settings)


def test_label_candidates_come_from_the_prompt():
    engine = FakeEngine()
    plain = SentimentAnalyst(engine, SENTIMENT_PROMPTS["original"])
    assert plain.candidates == [WORDS[" Positive"], WORDS[" Negative"]]
    chat = SentimentAnalyst(engine, SENTIMENT_PROMPTS["original-chat"])
    assert chat.candidates == [WORDS["Positive"], WORDS["Negative"]]


def test_analyze_gives_a_label_and_probability_and_reuses_the_prompt_prefix():
    assistant = make_assistant()
    first = assistant.analyze("今天很好")
    assert first.label in ("positive", "negative") and 0.5 <= first.probability <= 1.0
    assistant.analyze("今天很差")
    prefix_len = len(assistant.analyst._before)
    assert assistant.engine.last_stats.reused >= prefix_len


@pytest.mark.parametrize("bad", ["", "   \n\t", None, 42, "x" * 20_001])
def test_bad_text_is_rejected_clearly(bad):
    assistant = make_assistant()
    with pytest.raises(InputError):
        assistant.analyze(bad)


def test_long_text_is_cut_to_head_and_tail():
    assistant = make_assistant(max_text_tokens=64)
    text = "开头" + "中间" * 500 + "结尾"
    result = assistant.analyze(text)
    assert result.truncated
    tokens, truncated = assistant.analyst.prompt_tokens(text)
    assert truncated
    assert len(tokens) == len(assistant.analyst._before) + 64 + len(assistant.analyst._after)


def test_respond_gives_sentiment_first_then_reply_and_records_the_turn():
    assistant = make_assistant()
    conversation = Conversation()
    response = assistant.respond(conversation, "我升职了!")
    assert response.sentiment.label in ("positive", "negative")
    assert conversation.turns == []  # nothing recorded before the reply is produced
    assert response.text() == "谢谢你的分享!"
    assert len(conversation.turns) == 1
    turn = conversation.turns[0]
    assert turn.message == "我升职了!" and turn.reply == "谢谢你的分享!"
    # the detected sentiment reaches the model in the user turn, worded for the message's language
    assert turn.user_content == assistant.chat.user_content("我升职了!", response.sentiment.label)
    assert "情绪:" in turn.user_content
    assert response.stats.finish_reason == "stop"
    assert response.stats.completion_tokens > 0


@pytest.mark.parametrize("message,tag", [("今天下雨了", "[情感标签:"), ("It rained today", "[情感标签:")])
def test_original_chat_format_stays_available(message, tag):
    assistant = make_assistant(chat_prompt="original")
    assert assistant.chat.user_content(message, "positive").startswith(tag + "正面]")


def test_warm_prompt_examples_precede_the_history():
    assistant = make_assistant()
    messages = assistant.chat.messages([], "now")
    assert messages[0]["role"] == "system"
    assert len(messages) == 2 + 2 * len(assistant.chat.prompt.examples)
    assert [m["role"] for m in messages[1:-1]] == ["user", "assistant"] * len(assistant.chat.prompt.examples)
    assert assistant.chat.user_content("I won!", "positive").endswith("(mood: positive)")


def test_second_turn_reuses_the_first_turns_cache():
    assistant = make_assistant()
    conversation = Conversation()
    assistant.respond(conversation, "first message").text()
    response = assistant.respond(conversation, "second message")
    response.text()
    first_turn_tokens = assistant.chat.prompt_tokens([], conversation.turns[0].user_content, 256)[0]
    assert response.stats.cached_tokens >= len(first_turn_tokens)


def test_interrupted_reply_keeps_the_partial_turn():
    assistant = make_assistant()
    conversation = Conversation()
    response = assistant.respond(conversation, "hello")
    it = iter(response)
    first = next(it)
    response.close()
    assert conversation.turns[0].reply == first
    assert response.stats.finish_reason == "cancelled"


def test_history_is_trimmed_from_the_oldest_turn_and_system_prompt_stays():
    # the original chat prompt: short enough for this small byte-level context
    assistant = make_assistant(n_ctx=700, reply_max_tokens=64, chat_prompt="original")
    conversation = Conversation()
    for i in range(12):
        assistant.respond(conversation, f"message number {i} " + "blah " * 10).text()
    tokens, dropped = assistant.chat.prompt_tokens(conversation.turns, "next", 64)
    assert len(tokens) <= assistant.engine.n_ctx - 64
    assert conversation.turns[-1].message.startswith("message number 11")
    assert len(conversation.turns) < 12
    text = assistant.engine.detokenize(tokens)
    assert text.startswith("<|im_start|>system\n" + assistant.chat.prompt.system)


def test_fit_turns_drops_with_slack():
    turns = [Turn("m", "positive", "u" * 10, "r" * 10) for _ in range(10)]

    def count(kept):
        return 5 + 20 * len(kept)

    assert fit_turns(turns, count, budget=1000) == 0
    dropped = fit_turns(turns, count, budget=150)  # 205 > 150; target 112 -> keep 5
    assert dropped == 5


def test_message_too_long_for_context_is_an_input_error():
    assistant = make_assistant(n_ctx=300, reply_max_tokens=64, max_text_tokens=16)
    with pytest.raises(InputError):
        assistant.respond(Conversation(), "x" * 400)


def test_complete_streams_a_plain_chat_completion():
    assistant = make_assistant()
    stream, n_prompt = assistant.complete([{"role": "system", "content": "be brief"},
                                           {"role": "user", "content": "hi"}])
    assert "".join(stream) == "谢谢你的分享!" and n_prompt > 0
    assert stream.finish_reason == "stop"
    stream, _ = assistant.complete([{"role": "user", "content": "hi"}], stop=["分享"])
    assert "".join(stream) == "谢谢你的"


@pytest.mark.parametrize("messages", [[], [{"role": "robot", "content": "x"}], [{"role": "user", "content": 3}],
                                      ["not a dict"]])
def test_complete_rejects_malformed_messages(messages):
    with pytest.raises(InputError):
        make_assistant().complete(messages)


def test_a_reply_to_an_english_message_cannot_use_east_asian_characters():
    assistant = make_assistant()  # the fake model would answer "谢谢你的分享!" to anything
    reply = "".join(assistant.respond(Conversation(), "Thanks for listening, I feel better."))
    # (the fake model then emits stray bytes; a real one picks English words)
    assert reply and not any("\u3000" <= ch <= "\u9fff" for ch in reply)
    assert "谢谢" in "".join(assistant.respond(Conversation(), "谢谢你听我说。"))  # Chinese: no guard
    unguarded = make_assistant(reply_in_script=False)
    assert "谢谢" in "".join(unguarded.respond(Conversation(), "Thanks for listening, I feel better."))
