"""The learned sentiment head on the fake engine (whose logits are a fixed matrix times a hidden
state, like a real model's): recovery of hidden states, folding into logit space, training,
files, and the errors users see."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from allinone.roles.head import (HeadError, HiddenStates, SentimentHead, check_training_labels, fit_logistic,
                                 train_head)
from allinone.roles.prompts import sentiment_prompt
from allinone.roles.sentiment import SentimentAnalyst
from tests.fake_engine import FakeEngine


@pytest.fixture()
def analyst():
    return SentimentAnalyst(FakeEngine(n_ctx=4096), sentiment_prompt("original"))


def texts_and_labels(analyst, n=120, seed=0):
    """Random texts labelled by a rule the prompt knows nothing about: the sign of one direction of
    the fake model's hidden state at the scoring position."""
    rng = np.random.default_rng(seed)
    direction = np.random.default_rng(99).normal(size=16)
    texts, labels = [], []
    for i in range(n):
        text = "".join(rng.choice(list("abcdefghij klmnop")) for _ in range(12)) + str(i)
        tokens, _ = analyst.prompt_tokens(text)
        hidden = analyst.engine.hidden_state(tokens)
        texts.append(text)
        labels.append("positive" if hidden @ direction > 0 else "negative")
    return texts, labels


def test_hidden_states_are_recovered_from_logits(analyst):
    engine = analyst.engine
    tokens, _ = analyst.prompt_tokens("some text")
    recovered = HiddenStates(engine).from_logits(engine.logits(tokens))[0]
    assert np.allclose(recovered, engine.hidden_state(tokens), atol=1e-4)


def test_folded_head_equals_the_head_on_hidden_states(analyst):
    engine = analyst.engine
    states = HiddenStates(engine)
    a = np.random.default_rng(5).normal(size=16)
    head = SentimentHead(model_sha256="x", prompt="original", direction=states.gram_inverse @ a,
                         margin_weight=0.7, bias=-0.3)
    scorer = head.logit_scorer(engine, analyst.candidates)
    for text in ("one", "two words", "三个字"):
        tokens, _ = analyst.prompt_tokens(text)
        logits = engine.logits(tokens)
        margin = logits[analyst.candidates[0]] - logits[analyst.candidates[1]]
        expected = a @ engine.hidden_state(tokens) + 0.7 * margin - 0.3
        assert scorer.positive_probability(logits) == pytest.approx(1 / (1 + math.exp(-expected)), abs=1e-4)


def test_fit_logistic_separates_separable_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 3))
    y = (x[:, 0] - x[:, 1] > 0).astype(float)
    w = fit_logistic(x, y, l2=1.0, penalised=np.ones(3, dtype=bool))
    assert np.mean(((x @ w[:-1] + w[-1]) > 0) == (y == 1)) > 0.97


def test_training_learns_what_the_prompt_does_not_know(analyst):
    texts, labels = texts_and_labels(analyst, n=200)
    head, report = train_head(analyst, texts, labels, model_sha256="abc")
    assert report["heldout_accuracy_head"] >= 0.85
    assert report["heldout_accuracy_prompt"] < 0.75  # the prompt's margin is unrelated to the rule
    analyst.use_head(head.logit_scorer(analyst.engine, analyst.candidates))
    fresh_texts, fresh_labels = texts_and_labels(analyst, n=60, seed=1)
    with_head = [analyst.analyze(t).label for t in fresh_texts]
    without = [analyst.analyze(t, use_head=False).label for t in fresh_texts]
    assert np.mean([p == g for p, g in zip(with_head, fresh_labels)]) >= 0.85
    assert with_head != without


def test_head_file_round_trip_and_lookup(tmp_path, analyst):
    texts, labels = texts_and_labels(analyst, n=40)
    head, _ = train_head(analyst, texts, labels, model_sha256="f00d", source="mine.jsonl")
    path = head.save(tmp_path)
    assert path.name == "f00d.original.json"
    again = SentimentHead.find("f00d", "original", tmp_path)
    assert np.allclose(again.direction, head.direction) and again.bias == head.bias
    assert again.info["source"] == "mine.jsonl"
    assert SentimentHead.find("f00d", "original-chat", tmp_path) is None
    assert SentimentHead.find("beef", "original", tmp_path) is None


def test_a_broken_head_file_is_a_clear_error(tmp_path):
    path = tmp_path / SentimentHead.filename("f00d", "original")
    path.write_text("{not json")
    with pytest.raises(HeadError, match="not a sentiment head"):
        SentimentHead.find("f00d", "original", tmp_path)
    path.write_text(json.dumps({"format": 99}))
    with pytest.raises(HeadError, match="unknown head format"):
        SentimentHead.load(path)


@pytest.mark.parametrize("labels, message", [
    (["positive", "negative"] * 5, "too few"),
    (["positive"] * 30, "only 0 'negative'"),
    (["positive"] * 27 + ["negative"] * 3, "only 3 'negative'"),
])
def test_unusable_training_labels_are_refused(labels, message):
    with pytest.raises(HeadError, match=message):
        check_training_labels(labels)


def test_the_folded_vector_is_cached_and_reused(tmp_path, analyst, monkeypatch):
    texts, labels = texts_and_labels(analyst, n=40)
    head, _ = train_head(analyst, texts, labels, model_sha256="f00d")
    first = head.logit_scorer(analyst.engine, analyst.candidates, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.npy"))) == 1
    monkeypatch.setattr(analyst.engine, "output_weight_chunks", lambda *a, **k: pytest.fail("not reused"))
    second = head.logit_scorer(analyst.engine, analyst.candidates, cache_dir=tmp_path)
    assert np.array_equal(first.weights, second.weights) and first.bias == second.bias
