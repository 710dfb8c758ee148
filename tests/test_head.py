"""The learned sentiment head on the fake engine (which has a residual stream per depth, and whose
logits say nothing about the rule the tests label by): training, the early-stopping pass it
reads from, files, and the errors users see."""

from __future__ import annotations

import json

import numpy as np
import pytest

from allinone.roles.head import (
    ChoiceHead,
    HeadError,
    check_training_labels,
    default_layers,
    fit_softmax,
    normalise,
    train_head,
)
from tests.fake_engine import FakeEngine, chat_prompt, make_analyst


@pytest.fixture()
def analyst():
    return make_analyst(FakeEngine(n_ctx=4096), "original")


LABELS = ("positive", "negative")


def train(analyst, texts, labels, **options):
    options = {"model_sha256": "abc", "role": "sentiment", **options}
    return train_head(analyst.reading_point(), texts, labels, LABELS, **options)


def texts_and_labels(analyst, n=120, seed=0, layers=2):
    """Random texts labelled by a rule the prompt knows nothing about: the sign of one direction of
    the fake model's residual stream after `layers` blocks at the scoring position."""
    rng = np.random.default_rng(seed)
    direction = np.random.default_rng(99).normal(size=16)
    texts, labels = [], []
    for i in range(n):
        text = "".join(rng.choice(list("abcdefghij klmnop")) for _ in range(12)) + str(i)
        tokens, _ = analyst.prompt_tokens(text)
        hidden = normalise(analyst.engine.model_hidden_state(tokens, layers))
        texts.append(text)
        labels.append("positive" if hidden @ direction > 0 else "negative")
    return texts, labels


def test_hidden_state_is_the_residual_stream_at_that_depth_and_stops_there(analyst):
    engine = analyst.engine
    tokens, _ = analyst.prompt_tokens("some text")
    before = engine.decoded_tokens
    hidden = engine.hidden_state(tokens, 2)
    assert np.allclose(hidden, engine.model_hidden_state(tokens, 2), atol=1e-6)
    assert engine.decoded_tokens - before == len(tokens)
    # The lane's entries are shallow now: a full pass must not reuse them (the fake engine
    # asserts if it reads an entry computed by fewer blocks), but a pass as shallow may.
    logits = engine.logits(tokens)
    assert np.allclose(logits, engine.full_recompute_logits(tokens))
    assert engine.last_stats.reused == 0
    engine.hidden_state(tokens[:-3] + [ord("x")] * 3, 2)  # complete up to len - 3, shallow after
    engine.hidden_state(tokens, 1)
    assert engine.last_stats.reused == len(tokens) - 3
    engine.hidden_state(tokens + [ord("y")], 2)  # deeper than the last pass: stops at its start
    assert engine.last_stats.reused == len(tokens) - 3
    engine.logits(tokens + [ord("y")])
    assert engine.last_stats.reused == len(tokens) - 3


def test_shallow_entries_are_not_borrowed_by_a_deeper_pass_on_another_lane(analyst):
    engine = analyst.engine
    tokens, _ = analyst.prompt_tokens("borrowed")
    engine.logits(tokens[:10], lane=1)  # complete entries for the first 10 tokens
    engine.hidden_state(tokens, 2, lane=0)
    engine.logits(tokens, lane=2)
    assert engine.last_stats.reused == 10  # from lane 1, not lane 0's longer shallow prefix
    engine.hidden_state(tokens, 2, lane=2)
    assert engine.last_stats.reused == len(tokens) - 1
    with pytest.raises(Exception, match="layers must be in 1..3"):
        engine.hidden_state(tokens, 4)


def test_a_complete_pass_reads_the_same_state_and_leaves_full_entries(analyst):
    engine = analyst.engine
    tokens, _ = analyst.prompt_tokens("one pass for two roles")
    engine.hidden_state(tokens[:5], 1)  # shallow entries at the start: a complete pass must redo them
    hidden = engine.hidden_state(tokens, 2, complete=True)
    assert np.allclose(hidden, engine.model_hidden_state(tokens, 2), atol=1e-6)
    assert engine.last_stats.reused == 0
    # Every entry is complete now: a generation that extends the tokens evaluates only its own.
    logits = engine.logits(tokens + [ord("!")] * 3)
    assert engine.last_stats.reused == len(tokens)
    assert np.allclose(logits, engine.full_recompute_logits(tokens + [ord("!")] * 3))


def test_default_depth_is_five_eighths_of_the_model():
    assert default_layers(24) == 15 and default_layers(4) == 2 and default_layers(1) == 1


def test_fit_softmax_separates_separable_data_with_several_labels():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 3))
    y = np.argmax(x @ np.array([[1.0, -1.0, 0.0], [0.0, 1.0, -1.0], [-1.0, 0.0, 1.0]]), axis=1)
    w = fit_softmax(x, y, 3, l2=1.0)
    assert np.mean(np.argmax(x @ w[:-1] + w[-1], axis=1) == y) > 0.95


def test_training_learns_what_the_prompt_does_not_know(analyst):
    texts, labels = texts_and_labels(analyst, n=200)
    head, report = train(analyst, texts, labels, layers=2)
    assert report["layers"] == head.layers == 2
    assert report["heldout_accuracy_head"] >= 0.85
    assert report["heldout_accuracy_prompt"] < 0.75  # the prompt's margin is unrelated to the rule
    analyst.use_head(head)
    fresh_texts, fresh_labels = texts_and_labels(analyst, n=60, seed=1)
    with_head = [analyst.analyze(t).label for t in fresh_texts]
    without = [analyst.analyze(t, use_head=False).label for t in fresh_texts]
    assert np.mean([p == g for p, g in zip(with_head, fresh_labels, strict=True)]) >= 0.85
    assert with_head != without


@pytest.mark.parametrize("layers", [0, 4, -1])
def test_a_depth_outside_the_model_is_refused(analyst, layers):
    texts, labels = texts_and_labels(analyst, n=20)
    with pytest.raises(HeadError, match="layers must be in 1..3"):
        train(analyst, texts, labels, layers=layers)


def test_a_head_at_the_wrong_depth_learns_nothing(analyst):
    texts, labels = texts_and_labels(analyst, n=200, layers=2)
    _, report = train(analyst, texts, labels, layers=1)
    assert report["heldout_accuracy_head"] < 0.75


def test_head_file_round_trip_and_lookup(tmp_path, analyst):
    texts, labels = texts_and_labels(analyst, n=40)
    head, _ = train(analyst, texts, labels, model_sha256="f00d", source="mine.jsonl")
    path = head.save(tmp_path)
    assert path.name == "f00d.original.sentiment.json"
    again = ChoiceHead.find("f00d", "original", tmp_path, "sentiment", LABELS)
    assert np.allclose(again.weights, head.weights) and np.allclose(again.bias, head.bias)
    assert again.layers == head.layers and again.labels == LABELS
    assert again.info["source"] == "mine.jsonl"
    assert ChoiceHead.find("f00d", "original-chat", tmp_path, "sentiment", LABELS) is None
    assert ChoiceHead.find("beef", "original", tmp_path, "sentiment", LABELS) is None
    # A head made for other labels is refused by name, not silently misread.
    with pytest.raises(HeadError, match="trained for the labels"):
        ChoiceHead.find("f00d", "original", tmp_path, "sentiment", ("negative", "positive"))


def test_a_format_3_head_loads_as_a_two_label_head_of_the_role_that_asks(tmp_path):
    """The heads that shipped before roles were data: one weight row, no label list."""
    weights = np.random.default_rng(3).normal(size=16)
    (tmp_path / "f00d.fewshot.json").write_text(
        json.dumps(
            {
                "format": 3,
                "model_sha256": "f00d",
                "prompt": "fewshot",
                "layers": 2,
                "bias": 0.25,
                "weights": list(weights),
                "adapter": None,
            }
        )
    )
    head = ChoiceHead.find("f00d", "fewshot", tmp_path, "sentiment", LABELS)
    hidden = np.random.default_rng(4).normal(size=16)
    positive = 1 / (1 + np.exp(-(normalise(hidden) @ weights + 0.25)))
    assert head.labels == LABELS and np.allclose(head.probabilities(hidden), [positive, 1 - positive])
    with pytest.raises(HeadError, match="2-label head cannot serve"):
        ChoiceHead.load(tmp_path / "f00d.fewshot.json").for_labels(("a", "b", "c"), "emotion")
    assert ChoiceHead.find("f00d", "fewshot", tmp_path, "emotion", ("a", "b", "c")) is None


def test_a_broken_head_file_is_a_clear_error(tmp_path):
    path = tmp_path / ChoiceHead.filename("f00d", "original", "sentiment")
    path.write_text("{not json")
    with pytest.raises(HeadError, match="not a head file"):
        ChoiceHead.find("f00d", "original", tmp_path, "sentiment", LABELS)
    path.write_text(json.dumps({"format": 1}))
    with pytest.raises(HeadError, match="train it again"):
        ChoiceHead.load(path)
    head = ChoiceHead(model_sha256="f00d", point="original", layers=30, weights=np.zeros(16), bias=0.0)
    with pytest.raises(HeadError, match="does not fit"):
        head.check_fits(n_layers=24, n_embd=16)


@pytest.mark.parametrize(
    "labels, message",
    [
        (["positive", "negative"] * 5, "too few"),
        (["positive"] * 30, "only 0 'negative'"),
        (["positive"] * 28 + ["negative"] * 2, "only 2 'negative'"),
    ],
)
def test_unusable_training_labels_are_refused(labels, message):
    with pytest.raises(HeadError, match=message):
        check_training_labels(labels, LABELS)


def test_a_head_with_an_adapter_round_trips_and_a_missing_adapter_is_a_clear_error(tmp_path):
    adapter = tmp_path / "trained.gguf"
    adapter.write_bytes(b"GGUF adapter bytes")
    head = ChoiceHead(
        model_sha256="f00d", point="fewshot", layers=2, weights=np.ones(16), bias=0.5, adapter=adapter
    ).for_labels(LABELS, "sentiment")
    store = tmp_path / "heads"
    path = head.save(store)
    assert path.name == "f00d.fewshot.sentiment.json"
    again = ChoiceHead.find("f00d", "fewshot", store, "sentiment", LABELS)
    assert again.adapter == store / "f00d.fewshot.lora.gguf" and again.adapter.read_bytes() == b"GGUF adapter bytes"
    # A head trained again without an adapter replaces both files: no stale adapter is left to apply.
    ChoiceHead(model_sha256="f00d", point="fewshot", layers=2, weights=np.ones(16), bias=0.5).for_labels(
        LABELS, "sentiment"
    ).save(store)
    assert ChoiceHead.find("f00d", "fewshot", store, "sentiment", LABELS).adapter is None
    assert not (store / "f00d.fewshot.lora.gguf").exists()
    head.save(store)
    (store / "f00d.fewshot.lora.gguf").unlink()
    with pytest.raises(HeadError, match="adapter f00d.fewshot.lora.gguf is missing"):
        ChoiceHead.load(path)
    # Format 2 (before adapters) still loads, as a two-label head without one.
    path.write_text(
        json.dumps(
            {"format": 2, "model_sha256": "f00d", "prompt": "fewshot", "layers": 2, "bias": 0.5, "weights": [1.0] * 16}
        )
    )
    assert ChoiceHead.load(path).adapter is None


class AdapterEngine(FakeEngine):
    """The fake model, recording which adapter each pass on a lane would run with."""

    def __init__(self):
        super().__init__(n_ctx=4096)
        self.passes: list[tuple[str, object]] = []

    def use_adapter(self, lane, path):
        if self.lane_adapter.get(lane) != path:
            self.lane_adapter.pop(lane, None)
            if path is not None:
                self.lane_adapter[lane] = path
            self.forget(lane)

    def hidden_state(self, tokens, layers, lane=0, complete=False):
        self.passes.append(("head", self.lane_adapter.get(lane)))
        return super().hidden_state(tokens, layers, lane=lane, complete=complete)

    def score(self, tokens, candidates, lane=0):
        self.passes.append(("prompt", self.lane_adapter.get(lane)))
        return super().score(tokens, candidates, lane=lane)


def test_the_heads_adapter_runs_for_the_heads_passes_only(tmp_path):
    """The adapter is trained with the head: the prompt-only and seed methods, and a new head's
    training, must read the model's own weights."""
    engine = AdapterEngine()
    analyst = make_analyst(engine, "original")
    adapter = tmp_path / "a.gguf"
    head = ChoiceHead(
        model_sha256="f00d", point="original", layers=2, weights=np.ones(16), bias=0.0, adapter=adapter
    ).for_labels(LABELS, "sentiment")
    analyst.use_head(head)
    assert engine.lane_adapter == {0: adapter}
    analyst.analyze("good")
    analyst.analyze("good", use_head=False)
    analyst.warm_prefix()
    analyst.analyze("good")
    assert engine.passes == [("head", adapter), ("prompt", None), ("prompt", adapter), ("head", adapter)]
    # A head trained on this pass reads what the lane runs: the adapted weights, named by the point.
    point = analyst.reading_point()
    assert point.adapter == adapter
    analyst.use_head(None)
    assert engine.lane_adapter == {}
    with pytest.raises(HeadError, match="other weights than the ones it is meant for"):
        train_head(point, *texts_and_labels(analyst, n=40), LABELS, role="sentiment", model_sha256="f00d")


def test_an_engine_without_adapter_support_refuses_one(tmp_path):
    from allinone.engine.base import EngineError

    engine = FakeEngine()
    engine.use_adapter(0, None)
    with pytest.raises(EngineError, match="cannot apply LoRA adapters"):
        engine.use_adapter(0, tmp_path / "a.gguf")


def test_a_chat_head_reads_the_weights_the_chat_lane_runs(tmp_path):
    """A chat head is trained on the chat lane with the chat adapter in place (the respond flow
    reads it there); reading with other weights than the point names is refused."""
    from allinone.roles.adapter import ChatAdapter
    from allinone.roles.chat import ChatRole
    from allinone.roles.head import collect_features

    engine = AdapterEngine()
    chat = ChatRole(engine, chat_prompt("warm"), lane=1)
    adapter = ChatAdapter(model_sha256="f00d", prompt="chat-warm", path=tmp_path / "c.gguf", sha256="c0" * 32)
    chat.use_adapter(adapter)
    point = chat.reading_point()
    assert point.key == "chat-warm@c0c0c0c0c0c0" and point.adapter == adapter.path
    assert collect_features(point, ["good", "bad"], 2).shape == (2, 16)
    engine.use_adapter(1, None)  # the lane changed under the point
    with pytest.raises(HeadError, match="other weights"):
        collect_features(point, ["good"], 2)
