"""Roles, conversation trimming and the respond flow on the fake engine."""

import math

import numpy as np
import pytest

from allinone.conversation.history import Conversation, Turn, fit_turns
from allinone.roles.inputs import InputError
from allinone.service import Assistant
from allinone.settings import Settings

from .fake_engine import GUARDS_OFF, WORDS, FakeEngine, make_analyst, runs


def make_assistant(n_ctx=2048, **overrides):
    # The byte-level fake tokenizer makes the few-shot prompt ~900 tokens: the short original
    # prompt keeps these small-context tests about the chat history.
    overrides.setdefault("sentiment_prompt", "original")
    settings = Settings(home="/nonexistent", **(GUARDS_OFF | overrides))
    return Assistant(engine=FakeEngine(reply="谢谢你的分享!", n_ctx=n_ctx), settings=settings)


def test_label_candidates_come_from_the_prompt():
    engine = FakeEngine()
    plain = make_analyst(engine, "original")
    assert plain.candidates == [WORDS[" Positive"], WORDS[" Negative"]]
    chat = make_analyst(engine, "original-chat")
    assert chat.candidates == [WORDS["Positive"], WORDS["Negative"]]


def test_analyze_gives_a_label_and_probability_and_reuses_the_prompt_prefix():
    assistant = make_assistant()
    first = assistant.analyze("今天很好")
    assert first.label in ("positive", "negative") and 0.5 <= first.probability <= 1.0
    assistant.analyze("今天很差")
    prefix_len = len(assistant.analyst.prefix_tokens)
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
    assert len(tokens) == len(assistant.analyst.prefix_tokens) + 64 + len(assistant.analyst.suffix_tokens)


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
    first = conversation.turns[0]
    first_turn_tokens = assistant.chat.prompt_tokens([], first.message, first.sentiment, 256)[0]
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
    tokens, dropped, _ = assistant.chat.prompt_tokens(conversation.turns, "next", "positive", 64)
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
    stream, n_prompt = assistant.complete(
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    )
    assert "".join(stream) == "谢谢你的分享!" and n_prompt > 0
    assert stream.finish_reason == "stop"
    stream, _ = assistant.complete([{"role": "user", "content": "hi"}], stop=["分享"])
    assert "".join(stream) == "谢谢你的"


@pytest.mark.parametrize(
    "messages", [[], [{"role": "robot", "content": "x"}], [{"role": "user", "content": 3}], ["not a dict"]]
)
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


# ---- one prefill for both roles ------------------------------------------------------------------


def with_chat_head(assistant, layers=2):
    """Attach a chat head (random weights) to a fake-engine assistant, as attach_head would."""
    from allinone.roles.head import ChoiceHead

    weights = np.random.default_rng(5).normal(size=assistant.engine.hidden_size)
    assistant.chat_head = ChoiceHead(
        model_sha256="fake", point=assistant.chat.prompt.head_key(), layers=layers, weights=weights, bias=0.0
    ).for_labels(assistant.mood.label_names, assistant.mood.name)
    return assistant


def test_tokens_up_to_the_message_end_do_not_depend_on_the_sentiment():
    assistant = make_assistant()
    conversation = Conversation()
    assistant.respond(conversation, "第一条消息").text()
    chat = assistant.chat
    unknown, _, end = chat.prompt_tokens(conversation.turns, "I passed!", None, 64)
    for label in ("positive", "negative"):
        tokens, dropped, label_end = chat.prompt_tokens(conversation.turns, "I passed!", label, 64)
        assert label_end == end and tokens[:end] == unknown[:end] and dropped == 0
        assert assistant.engine.detokenize(tokens[:end]).endswith("I passed!")
    assert chat.prompt.mood_follows_message
    assert not make_assistant(chat_prompt="original").chat.prompt.mood_follows_message


def test_shared_prefill_reads_the_sentiment_on_the_chat_lane_and_evaluates_the_message_once():
    shared = with_chat_head(make_assistant(second_opinion_below=0.5))  # the head's reading, always
    shared.chat.warm_prefix()
    before = shared.engine.decoded_tokens
    response = shared.respond(Conversation(), "我升职了!")
    assert response.text() == "谢谢你的分享!"
    probe, _, end = shared.chat.prompt_tokens([], "我升职了!", None, 256)
    hidden = shared.engine.model_hidden_state(probe[:end], 2).astype(np.float32)  # as engines return it
    expected = shared.chat_head.probabilities(hidden)[0]
    assert response.sentiment.label == ("positive" if expected >= 0.5 else "negative")
    assert math.isclose(response.sentiment.probability, max(expected, 1 - expected))
    shared_cost = shared.engine.decoded_tokens - before

    # The same message with two passes: the analyst's pass, then the chat lane evaluates it again.
    two = make_assistant()
    two.chat.warm_prefix()
    two.analyst.warm_prefix()
    before = two.engine.decoded_tokens
    assert two.respond(Conversation(), "我升职了!").text() == "谢谢你的分享!"
    message_tokens = len(two.engine.tokenize("我升职了!"))
    assert two.engine.decoded_tokens - before >= shared_cost + message_tokens


@pytest.mark.parametrize("threshold,unsure", [(0.5, False), (0.999, True)])
def test_an_unsure_chat_head_gets_the_analysts_second_opinion(threshold, unsure):
    assistant = with_chat_head(make_assistant(second_opinion_below=threshold))
    message = "我升职了!"
    probe, _, end = assistant.chat.prompt_tokens([], message, None, 256)
    hidden = assistant.engine.model_hidden_state(probe[:end], 2).astype(np.float32)
    head_p = assistant.chat_head.probabilities(hidden)
    analyst = assistant.analyze(message)
    assistant.analyst.warm_prefix()
    before = assistant.engine.lane_tokens(0)
    conversation = Conversation()
    response = assistant.respond(conversation, message)
    response.text()
    assert conversation.turns[-1].annotations["sentiment"]["label"] == response.sentiment.label
    assert (max(head_p) < threshold) == unsure  # (the fake head reads 0.93 here: both branches run)
    if not unsure:  # the head's reading, no pass on the analyst's lane
        assert math.isclose(response.sentiment.probability, max(head_p), rel_tol=1e-6)
        assert assistant.engine.lane_tokens(0) == before
    else:  # the analyst's answer (here the other label), and the chat role is told that one
        assert response.sentiment.label != ("positive" if head_p[0] >= 0.5 else "negative")
        assert response.sentiment.probabilities == pytest.approx(analyst.probabilities, abs=1e-6)
        assert assistant.engine.lane_tokens(0) != before
    assert assistant.analyze(message, method="chat").label == response.sentiment.label


def test_shared_prefill_second_turn_reuses_the_first_and_can_be_turned_off_per_call():
    assistant = with_chat_head(make_assistant())
    conversation = Conversation()
    first = assistant.respond(conversation, "第一条")
    first.text()
    second = assistant.respond(conversation, "第二条")
    second.text()
    assert second.stats.cached_tokens >= first.stats.prompt_tokens  # counted before the shared pass
    assert [t.message for t in conversation.turns] == ["第一条", "第二条"]
    third = assistant.respond(conversation, "第三条", shared_prefill=False)
    assert third.text() == "谢谢你的分享!"
    assert assistant.engine.last_stats.reused > 0


def test_chat_head_needs_the_tag_after_the_message(tmp_path):
    from allinone.roles.head import ChoiceHead

    for chat_prompt, expect_head in (("warm", True), ("original", False)):
        assistant = make_assistant(chat_prompt=chat_prompt)
        assistant.settings = assistant.settings.model_copy(update={"home": tmp_path})
        assistant.model_sha256 = lambda: "f00d"
        ChoiceHead(
            model_sha256="f00d",
            point=assistant.chat.prompt.head_key(),
            layers=2,
            weights=np.zeros(assistant.engine.hidden_size),
            bias=0.0,
        ).for_labels(("positive", "negative"), "sentiment").save(tmp_path / "heads")
        assistant.attach_head()
        assert (assistant.chat_head is not None) == expect_head
        off = make_assistant(chat_prompt=chat_prompt, shared_prefill=False)
        off.settings = off.settings.model_copy(update={"home": tmp_path})
        off.model_sha256 = lambda: "f00d"
        off.attach_head()
        assert off.chat_head is None


# ---- the chat role's own weights and guards ------------------------------------------------------


def test_a_chat_head_is_used_only_with_the_weights_it_read(tmp_path):
    """A head trained on the chat lane with an adapter is keyed by that adapter: it is found when
    the lane runs that adapter, never for the model's own weights (and the other way round)."""
    from allinone.roles.adapter import ChatAdapter
    from allinone.roles.head import ChoiceHead

    assistant = make_assistant()
    assistant.settings = assistant.settings.model_copy(update={"home": tmp_path})
    assistant.model_sha256 = lambda: "f00d"
    adapter = ChatAdapter(model_sha256="f00d", prompt="chat-warm", path=tmp_path / "a.gguf", sha256="5a" * 32)
    ChoiceHead(
        model_sha256="f00d",
        point=assistant.chat.prompt.head_key(adapter.sha256),
        layers=2,
        weights=np.zeros(assistant.engine.hidden_size),
        bias=0.0,
    ).for_labels(("positive", "negative"), "sentiment").save(tmp_path / "heads")
    assistant.attach_head()
    assert assistant.chat_head is None  # the lane runs the model's own weights
    assistant.chat.adapter = adapter  # as use_adapter leaves it (the fake engine takes no adapter)
    assistant.attach_head()
    assert assistant.chat_head is not None and assistant.chat_head.point == "chat-warm@5a5a5a5a5a5a"


def test_the_reply_may_not_hand_the_message_back():
    message = "我今天终于拿到驾照了"
    copier = Assistant(
        engine=FakeEngine(reply=message + ",太开心了!", n_ctx=2048),
        settings=Settings(home="/nonexistent", sentiment_prompt="original", reply_max_copy=0),
    )
    assert message in copier.respond(Conversation(), message).text()
    guarded = Assistant(
        engine=FakeEngine(reply=message + ",太开心了!", n_ctx=2048),
        settings=Settings(home="/nonexistent", sentiment_prompt="original", reply_max_copy=4),
    )
    reply = guarded.respond(Conversation(), message)
    text = reply.text()
    source = guarded.engine.tokenize(message)
    tokens = guarded.engine.tokenize(text)
    assert not set(runs(tokens, 5)) & set(runs(source, 5))
    assert guarded.default_sampling().max_copy == 4


def test_a_later_reply_may_not_say_an_earlier_one_again():
    def assistant(**guards):
        return Assistant(
            engine=FakeEngine(reply="I'm sorry to hear that, I hope you feel better.", n_ctx=2048),
            settings=Settings(home="/nonexistent", sentiment_prompt="original", reply_max_copy=4, **guards),
        )

    def two_replies(assistant):
        conversation = Conversation()
        first = assistant.respond(conversation, "My cat is sick.").text()
        return first, assistant.respond(conversation, "The vet says she will be fine.").text()

    first, again = two_replies(assistant(reply_copy_earlier=False))
    assert again == first  # the fake model says the same thing to every message
    guarded = assistant()
    first, second = two_replies(guarded)
    earlier, tokens = guarded.engine.tokenize(first), guarded.engine.tokenize(second)
    assert second and not set(runs(tokens, 5)) & set(runs(earlier, 5))


def test_plain_completions_run_without_the_chat_roles_reply_guards():
    """A caller's own completion may rightly be one word or quote its prompt; the guards are the
    chat role's, on by default there."""
    assistant = Assistant(engine=FakeEngine(reply="Yes."), settings=Settings(home="/nonexistent"))
    chat, plain = assistant.default_sampling(), assistant.completion_sampling()
    assert chat.min_tokens > 0 and chat.max_copy > 0 and chat.no_repeat_ngram > 0
    assert (plain.min_tokens, plain.max_copy, plain.no_repeat_ngram, plain.repeat_penalty) == (0, 0, 0, 1.0)
    stream, _ = assistant.complete([{"role": "user", "content": "Is the sky blue? One word."}])
    assert "".join(stream) == "Yes."
