"""A head's n-gram reader (roles/ngrams.py) and a head that carries one: grams, fitting, mixing,
files and their errors. No model: the hidden-state side is the fake engine's."""

from __future__ import annotations

import json

import numpy as np
import pytest

from allinone.roles.head import ChoiceHead, HeadError, mix, train_head
from allinone.roles.ngrams import NGRAM_SHARE, NgramModel, grams
from tests.fake_engine import FakeEngine, make_analyst


def test_chinese_texts_give_characters_one_to_three_and_english_words_and_characters():
    assert grams("多少钱") == ["多", "少", "钱", "多少", "少钱", "多少钱"]
    english = grams("Lost  my Card")
    assert english[:5] == ["lost", "my", "card", "lost my", "my card"]  # lower case, spaces collapsed
    assert "# l" in english and "#card " in english and "#lost " in english
    assert all(len(g) <= 6 for g in english if g.startswith("#"))


# A label set that turns on surface words: how much (多少钱), how to (怎么办), what is (是什么).
TRAIN = {
    "price": ["做个胃镜多少钱", "拔牙大概多少钱", "核磁共振要多少钱", "种植牙多少钱一颗", "体检套餐多少钱"],
    "advice": ["失眠了怎么办", "孩子发烧怎么办", "牙疼得厉害怎么办", "血压高怎么办", "老是咳嗽怎么办"],
    "definition": ["幽门螺杆菌是什么", "甲亢是什么病", "HPV是什么意思", "尿酸高是什么原因", "痛风是什么"],
}


def fitted() -> tuple[NgramModel, list[str]]:
    labels = list(TRAIN)
    texts = [t for label in labels for t in TRAIN[label]]
    y = np.array([labels.index(label) for label in labels for _ in TRAIN[label]])
    return NgramModel.fit(texts, y, len(labels)), labels


def test_the_model_learns_surface_words_and_its_json_gives_the_same_answers():
    model, labels = fitted()
    fresh = ["补牙要多少钱", "头疼怎么办", "糖尿病是什么"]
    assert [labels[i] for i in model.logits(fresh).argmax(axis=1)] == labels
    again = NgramModel.from_json(json.loads(json.dumps(model.to_json())), len(labels))
    assert np.allclose(again.logits(fresh), model.logits(fresh), atol=1e-3)
    assert "胃镜" in model.vocabulary and "多少钱" in model.vocabulary and "洗牙" not in model.vocabulary


def test_a_text_with_no_known_gram_leaves_the_bias_alone():
    model, _ = fitted()
    assert np.allclose(model.logits(["zzz"])[0], model.bias)


def test_mix_is_the_normalised_weighted_geometric_mean():
    head = np.array([0.7, 0.2, 0.1])
    ngram_logits = np.log(np.array([0.1, 0.6, 0.3]))
    expected = head ** (1 - NGRAM_SHARE) * np.array([0.1, 0.6, 0.3]) ** NGRAM_SHARE
    assert np.allclose(mix(head, ngram_logits), expected / expected.sum())
    assert np.allclose(mix(head, ngram_logits + 5.0), mix(head, ngram_logits))  # logits up to a constant


def test_broken_shapes_are_refused():
    model, labels = fitted()
    payload = model.to_json()
    with pytest.raises(ValueError, match="do not match"):
        NgramModel.from_json(payload, len(labels) + 1)
    payload["idf"] = payload["idf"][:-1]
    with pytest.raises(ValueError, match="do not match"):
        NgramModel.from_json(payload, len(labels))


def head_with_ngrams(tmp_path):
    analyst = make_analyst(FakeEngine(n_ctx=4096), "original")
    labels = tuple(TRAIN)
    prefixes = ("", "请问", "医生你好,", "想问一下")
    texts = [p + t for p in prefixes for label in labels for t in TRAIN[label]]
    tags = [label for _ in prefixes for label in labels for _ in TRAIN[label]]
    head, report = train_head(
        analyst.reading_point(), texts, tags, labels, role="ask", model_sha256="f00d", layers=2, ngrams=True
    )
    return head, report, labels


def test_a_head_with_ngrams_reports_both_readers_and_round_trips(tmp_path):
    head, report, labels = head_with_ngrams(tmp_path)
    assert {"heldout_accuracy_head", "heldout_accuracy_hidden_alone"} <= set(report)
    # the fake model's hidden state knows nothing of these words; the n-grams do
    assert report["heldout_accuracy_head"] > report["heldout_accuracy_hidden_alone"]
    path = head.save(tmp_path)
    again = ChoiceHead.find("f00d", head.point, tmp_path, "ask", labels)
    hidden = np.random.default_rng(0).normal(size=16)
    assert np.allclose(again.probabilities(hidden, "洗牙多少钱"), head.probabilities(hidden, "洗牙多少钱"), atol=1e-3)
    assert labels[int(np.argmax(again.probabilities(hidden, "洗牙多少钱")))] == "price"
    with pytest.raises(HeadError, match="pass the text"):
        again.probabilities(hidden)
    payload = json.loads(path.read_text())
    payload["ngrams"]["weights"] = payload["ngrams"]["weights"][:1]
    path.write_text(json.dumps(payload))
    with pytest.raises(HeadError, match="n-gram model is broken"):
        ChoiceHead.load(path)


def test_fit_softmax_gives_the_same_weights_on_a_sparse_matrix():
    from scipy import sparse

    from allinone.roles.head import fit_softmax

    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 8)) * (rng.random((60, 8)) < 0.3)
    y = rng.integers(0, 3, size=60)
    assert np.allclose(fit_softmax(sparse.csr_matrix(x), y, 3, 0.1), fit_softmax(x, y, 3, 0.1), atol=1e-5)
