"""Choice roles on the fake engine: labels scored over all their tokens, several roles on one pass,
roles without a head scored by their own prompt, and /v1/analyze's plumbing and refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fastapi.testclient import TestClient

from allinone.conversation.history import Conversation
from allinone.conversation.store import SessionStore
from allinone.roles.choice import ChoiceRole
from allinone.roles.definition import RoleError, parse_role
from allinone.roles.head import ChoiceHead
from allinone.server.app import create_app
from allinone.service import Assistant, Lane
from allinone.settings import Settings

from .fake_engine import GUARDS_OFF, HIDDEN, FakeEngine


def role(labels, name="orders", **extra):
    return parse_role(
        {"name": name, "kind": "choice", "description": "test", "instruction": "Which?", "labels": labels, **extra},
        source="test",
    )


def test_labels_sharing_their_first_tokens_are_scored_over_all_of_them():
    engine = FakeEngine(n_ctx=4096)
    orders = ChoiceRole(engine, role(["order_status", "order_cancel", "refund"]))
    assert not orders.one_token  # bytes: every label is several tokens, two share their first ones
    tokens, _ = orders.prompt_tokens("where is my parcel")
    logprobs = orders._word_logprobs(tokens)
    for word, got in zip(orders.words, logprobs, strict=True):
        # The same sum from scratch, one full recompute per position: the tree walk reuses the
        # prompt's cache and shares inner nodes, and must change nothing.
        expected = 0.0
        for k, token in enumerate(word):
            logits = engine.full_recompute_logits(tokens + word[:k])
            expected += logits[token] - np.logaddexp.reduce(logits)
        assert got == pytest.approx(expected, abs=1e-4)  # float32 logits
    assert logprobs[0] != logprobs[1]  # told apart beyond their shared "order_"
    choice = orders.analyze("where is my parcel")
    assert set(choice.probabilities) == {"order_status", "order_cancel", "refund"}
    assert sum(choice.probabilities.values()) == pytest.approx(1.0)
    assert choice.label == max(choice.probabilities, key=choice.probabilities.get)


def test_the_generated_prompt_lists_labels_descriptions_and_examples_but_keeps_one_text_slot():
    labelled = role(
        [{"name": "a", "description": "first {text} kind"}, "b"],
        examples=[{"text": "an a", "label": "a"}, {"text": "a b", "label": "b"}],
    )
    prompt = ChoiceRole(FakeEngine(), labelled).prompt
    assert prompt.template.count("{text}") == 1 and prompt.template.endswith("用户输入:{text} 分析结果:")
    assert "- a: first { text } kind" in prompt.template and "- b" in prompt.template
    assert "用户输入:an a 分析结果: a" in prompt.template
    assert prompt.label_words == {"a": " a", "b": " b"}


@pytest.fixture()
def assistant(tmp_path):
    settings = Settings(home=tmp_path, sentiment_prompt="original", **GUARDS_OFF)
    made = Assistant(engine=FakeEngine(reply="好的", n_ctx=4096), settings=settings)
    made.model_sha256 = lambda: "f00d"
    rng = np.random.default_rng(7)
    mood = made.mood
    made.use_heads(
        ChoiceHead("f00d", "original", 2, rng.normal(size=HIDDEN), 0.0).for_labels(mood.label_names, mood.name),
        None,
    )
    emotion = made.roles.get("emotion")
    # Pooled, as the shipped emotion and intent heads: the last position and the mean over the text.
    ChoiceHead(
        "f00d",
        made.analysis_point().key,
        2,
        rng.normal(size=(len(emotion.labels), 2 * HIDDEN)),
        np.zeros(7),
        pooling="last+mean",
    ).for_labels(emotion.label_names, emotion.name).save(tmp_path / "heads")
    return made


def test_roles_with_heads_share_one_pass_and_answer_as_they_would_alone(assistant):
    text = "今天的实验终于成功了"
    alone_sentiment = assistant.analyze(text)
    alone_emotion = assistant.analyze_roles(text, ["emotion"])["emotion"]
    assistant.analyst.warm_prefix()
    before = assistant.engine.decoded_tokens
    both = assistant.analyze_roles(text, ["sentiment", "emotion"])
    one_pass = assistant.engine.decoded_tokens - before
    assistant.analyst.warm_prefix()
    before = assistant.engine.decoded_tokens
    assistant.analyze(text)
    assert one_pass == assistant.engine.decoded_tokens - before  # emotion cost no tokens of its own
    assert both["sentiment"].probabilities == pytest.approx(alone_sentiment.probabilities, abs=1e-4)
    assert both["emotion"].probabilities == pytest.approx(alone_emotion.probabilities, abs=1e-4)
    assert both["emotion"].label in assistant.roles.get("emotion").label_names


def test_a_role_without_a_head_is_scored_by_its_own_prompt_on_a_lane_of_its_own(assistant):
    result = assistant.analyze_roles("帮我订一张明天去上海的票", ["intent"])["intent"]
    assert result.label in assistant.roles.get("intent").label_names
    assert assistant.role_head(assistant.roles.get("intent")) is None
    assert assistant.engine.lane_tokens(Lane.ZERO_SHOT)  # its prompt lives there, not on the analysis lane


def test_a_head_for_other_labels_is_refused_with_the_reason(assistant, tmp_path):
    intent = assistant.roles.get("intent")
    wrong = ChoiceHead("f00d", assistant.analysis_point().key, 2, np.zeros((2, HIDDEN)), np.zeros(2))
    wrong.for_labels(("x", "y"), "intent").save(tmp_path / "heads")
    with pytest.raises(ValueError, match="trained for the labels"):
        assistant.role_head(intent)


@pytest.fixture()
def client(assistant, tmp_path):
    app = create_app(assistant, assistant.settings, store=SessionStore(tmp_path / "sessions.sqlite3"))
    with TestClient(app) as client:
        yield client


def test_analyze_answers_named_and_inline_roles_for_a_text_and_a_batch(client):
    inline = {
        "name": "topic",
        "kind": "choice",
        "description": "t",
        "instruction": "Topic?",
        "labels": ["work", "home"],
    }
    one = client.post("/v1/analyze", json={"text": "加班到十点", "roles": ["sentiment", "emotion", inline]})
    assert one.status_code == 200, one.text
    roles = one.json()["roles"]
    assert list(roles) == ["sentiment", "emotion", "topic"]
    assert roles["topic"]["label"] in ("work", "home")
    assert sum(roles["emotion"]["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    assert roles["sentiment"]["display"].startswith(("😄", "😞"))
    batch = client.post("/v1/analyze", json={"texts": ["a", "b"], "roles": ["emotion"]})
    assert batch.status_code == 200 and len(batch.json()["results"]) == 2
    listing = client.get("/v1/roles").json()["roles"]
    assert {r["name"]: r["head"] for r in listing if r["kind"] == "choice"}["emotion"] is True


@pytest.mark.parametrize(
    "body, status, fragment",
    [
        ({"text": "x", "roles": ["nope"]}, 404, "unknown role 'nope'; roles: "),
        ({"text": "x", "roles": ["chat"]}, 422, "is a chat role"),
        ({"text": "x", "roles": []}, 422, "roles"),
        ({"text": "x", "roles": ["emotion", "emotion"]}, 422, "asked twice"),
        ({"text": "x", "roles": [{"name": "t", "kind": "choice", "labels": ["a"]}]}, 422, "roles[0]"),
        (
            {
                "text": "x",
                "roles": [
                    {
                        "name": "t",
                        "kind": "choice",
                        "description": "d",
                        "instruction": "i",
                        "labels": [f"l{i}" for i in range(51)],
                    }
                ],
            },
            422,
            "labels",
        ),
        (
            {
                "text": "x",
                "roles": [
                    {
                        "name": "t",
                        "kind": "choice",
                        "description": "d" * 70_000,
                        "instruction": "i",
                        "labels": ["a", "b"],
                    }
                ],
            },
            422,
            "roles[0]",
        ),
    ],
)
def test_analyze_refuses_bad_roles_clearly_and_changes_nothing(client, assistant, body, status, fragment):
    known = list(assistant.roles.roles)
    response = client.post("/v1/analyze", content=json.dumps(body), headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    assert fragment in response.json()["error"]["message"]
    assert list(assistant.roles.roles) == known


def test_respond_reads_the_chat_roles_after_the_first_token_and_keeps_them_in_the_turn(assistant):
    assert [r.name for r in assistant.chat_roles()] == ["emotion"]  # intent has no head here
    conversation = Conversation()
    response = assistant.respond(conversation, "好朋友结婚没有邀请我,有点难过。")
    deltas = iter(response)
    next(deltas)
    assert response.annotations is None  # the person sees the reply begin first
    list(deltas)
    assert response.annotations is not None
    alone = assistant.analyze_roles("好朋友结婚没有邀请我,有点难过。", ["emotion"])["emotion"]
    assert response.annotations["emotion"].probabilities == pytest.approx(alone.probabilities, abs=1e-4)
    turn = conversation.turns[-1]
    assert set(turn.annotations) == {"sentiment", "emotion"}
    assert turn.annotations["emotion"]["label"] == alone.label
    label = assistant.roles.get("emotion").label(alone.label)
    assert assistant.annotation_line({"emotion": alone.label}) == f"{label.emoji} {label.shown('zh')}"


def test_chat_roles_can_be_turned_off_and_a_wrong_name_is_a_clear_error(assistant):
    assistant.settings = assistant.settings.model_copy(update={"chat_roles": ""})
    response = assistant.respond(Conversation(), "你好")
    response.text()
    assert response.annotations == {}
    assistant.settings = assistant.settings.model_copy(update={"chat_roles": "emotion,moods"})
    with pytest.raises(RoleError, match="moods"):
        assistant.chat_roles()
    assistant.settings = assistant.settings.model_copy(update={"chat_roles": "chat"})
    with pytest.raises(RoleError, match="not a choice role"):
        assistant.chat_roles()


def test_the_page_flow_streams_the_annotations_and_the_session_keeps_them(client):
    r = client.post("/v1/respond", json={"message": "我升职了!", "stream": True})
    kinds = [line.removeprefix("event: ") for line in r.text.splitlines() if line.startswith("event: ")]
    assert kinds[0] == "sentiment" and kinds[1] == "delta" and kinds[-1] == "done"
    assert kinds.count("annotations") == 1
    events = [json.loads(line.removeprefix("data: ")) for line in r.text.splitlines() if line.startswith("data: ")]
    shown = events[kinds.index("annotations")]
    assert list(shown["roles"]) == ["emotion"] and shown["display"]
    assert events[-1]["annotations"] == shown
    session = events[0]["session_id"]
    stored = client.get(f"/v1/sessions/{session}").json()["turns"][0]
    assert stored["annotations"]["emotion"]["label"] == shown["roles"]["emotion"]["label"]
    assert stored["annotations_display"] == shown["display"]
    whole = client.post("/v1/respond", json={"message": "好累啊", "session_id": session}).json()
    assert list(whole["annotations"]["roles"]) == ["emotion"]
