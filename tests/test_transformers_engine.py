"""What is particular to the transformers engine: parity with Hugging Face `generate` (the original
recipe), candidate-only projection, bounded cache memory, dtype, engine choice, the CLI on an HF
directory; and the real default model loaded from its GGUF through transformers, whose labels
must agree with the llama.cpp engine's."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from allinone.engine import EngineError, open_engine, pick_engine
from allinone.engine.base import Sampling, log_softmax
from allinone.roles.template import ChatTemplate
from allinone.settings import Settings
from tests.fake_engine import make_analyst, sentiment_role

RECIPE_TEXTS = ["今天的实验终于成功了,太棒了!", "The service was slow and the food was cold.", "Not bad at all."]


def hf_greedy(engine, tokens, max_new_tokens=10):
    """The original recipe's call: transformers generate, greedy, 10 new tokens."""
    import torch

    out = engine.hf_model.generate(
        torch.tensor([tokens]),
        attention_mask=torch.ones(1, len(tokens), dtype=torch.long),
        max_new_tokens=max_new_tokens,
        do_sample=False,
    )
    return [t for t in out[0, len(tokens) :].tolist() if t not in engine.eog_tokens]


@pytest.mark.parametrize("text", RECIPE_TEXTS)
def test_greedy_generation_equals_hf_generate_and_seed_method_reproduces_the_recipe(tiny_engine, text):
    engine = tiny_engine
    analyst = make_analyst(engine, "original", lane=0)
    tokens, _ = analyst.prompt_tokens(text)
    expected = hf_greedy(engine, tokens)
    engine.forget()
    assert list(engine.generate(tokens, Sampling(max_tokens=10))) == expected
    # the chat form too, from a warm cache this time
    chat = ChatTemplate(engine).tokens([{"role": "user", "content": text}])
    assert list(engine.generate(chat, Sampling(max_tokens=10), lane=1)) == hf_greedy(engine, chat)
    # --method seed = generate(max_new_tokens=10) + "Positive" substring on the decoded output
    decoded = engine.hf_tokenizer.decode(expected, skip_special_tokens=True)
    result = analyst.analyze_by_generation(text)
    assert result.label == ("positive" if "Positive" in decoded else "negative")


def test_scoring_projects_only_the_candidate_rows(tiny_engine, monkeypatch):
    engine = tiny_engine
    analyst = make_analyst(engine, "original", lane=0)
    tokens, _ = analyst.prompt_tokens("The room was clean.")
    engine.forget()
    full = log_softmax(engine.logits(tokens, lane=0)[analyst.candidates])

    def no_full_projection(*args, **kwargs):
        raise AssertionError("the whole vocabulary was projected")

    monkeypatch.setattr(engine.hf_model.get_output_embeddings(), "forward", no_full_projection)
    engine.forget()
    np.testing.assert_allclose(engine.score(tokens, analyst.candidates), full, atol=1e-5)


def test_lane_caches_hold_exactly_their_tokens_over_many_requests(tiny_engine):
    """No leak: after many requests each lane's cache stores its own tokens' keys/values and no
    larger buffer (a view into a bigger tensor would keep that tensor alive)."""
    engine = tiny_engine
    analyst = make_analyst(engine, "original", lane=0)
    engine.forget()
    for i in range(120):
        analyst.label_logprobs(f"request {i}: " + "好" * (i % 7))
        if i % 40 == 0:
            list(engine.generate(analyst.prompt_tokens(f"chat {i}")[0], Sampling(max_tokens=4), lane=1 + i % 3))
    for lane in range(engine.n_lanes):
        cache = engine.lane_cache(lane)
        n = len(engine.lane_tokens(lane))
        if cache is None:
            assert n == 0
            continue
        for layer in cache.layers:
            for tensor in (layer.keys, layer.values):
                assert tensor.shape[-2] >= n  # at most the stray last token of a generation
                assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
        assert cache.get_seq_length() <= n + 1


def test_bfloat16_loads_and_scores(tiny_model_dir):
    import torch

    from allinone.engine.transformers import TransformersEngine

    bf16 = TransformersEngine(tiny_model_dir, context_size=512, batch_size=64, dtype="bfloat16")
    assert "bfloat16" in bf16.description and bf16.hf_model.dtype == torch.bfloat16
    # (the random tiny model is too chaotic to compare bfloat16 with float32 numbers; the real
    # model's figures are in the README)
    logprobs = make_analyst(bf16, "original", lane=0).label_logprobs("good")[0]
    assert np.isfinite(logprobs).all() and abs(np.exp(logprobs).sum() - 1) < 1e-3
    assert list(bf16.generate(bf16.tokenize("hello"), Sampling(max_tokens=3)))
    with pytest.raises(EngineError, match="dtype"):
        TransformersEngine(tiny_model_dir, context_size=512, batch_size=64, dtype="float16")


def test_loading_never_reaches_the_hub(tiny_engine, tmp_path):
    from allinone.engine.transformers import TransformersEngine

    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    with pytest.raises(EngineError):
        TransformersEngine(
            tmp_path / "Qwen" / "Qwen2.5-0.5B-Instruct", context_size=512, batch_size=64
        )  # looks like a hub id: not fetched


def test_engine_choice(tiny_model_dir, tmp_path, default_model_path):
    assert pick_engine(tiny_model_dir) == "transformers"
    assert pick_engine(default_model_path) == "llamacpp"
    assert pick_engine(default_model_path, "transformers") == "transformers"
    (tmp_path / "empty").mkdir()
    with pytest.raises(EngineError, match="config.json"):
        pick_engine(tmp_path / "empty")


def test_cli_on_a_hugging_face_directory(tiny_model_dir, tmp_path, capsys):
    from allinone.cli.main import main

    assert main(["model", "--model", str(tiny_model_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["engine"] == "transformers" and info["format"] == "huggingface"
    assert info["architecture"] == "Qwen2ForCausalLM" and info["context_length"] == 1024
    data = tmp_path / "dev.jsonl"
    data.write_text(
        "".join(
            json.dumps({"text": t, "label": label}, ensure_ascii=False) + "\n"
            for t, label in [("好极了", "positive"), ("太差了", "negative")]
        ),
        encoding="utf-8",
    )
    for method in ("score", "seed"):
        assert (
            main(
                [
                    "eval",
                    str(data),
                    "--model",
                    str(tiny_model_dir),
                    "--json",
                    "--quiet",
                    "--method",
                    method,
                    "--context-size",
                    "1024",
                ]
            )
            == 0
        )
        report = json.loads(capsys.readouterr().out)
        assert report["engine"].startswith("transformers") and report["n"] == 2


# ---- the real default model, from its GGUF, through transformers (loaded once) ----------------

AGREEMENT_TEXTS = [
    ("今天的实验终于成功了,太棒了!", "positive"),
    ("这家酒店的服务太差了,再也不来了。", "negative"),
    ("房间干净,早餐也不错,下次还会再来。", "positive"),
    ("The service was slow and the food was cold.", "negative"),
    ("I absolutely love this phone, best purchase of the year.", "positive"),
    ("The battery died after two days, what a waste of money.", "negative"),
]


@pytest.fixture(scope="session")
def hf_assistant(settings, default_model_path):
    from allinone.service import Assistant

    engine = open_engine(default_model_path, settings.model_copy(update={"engine": "transformers"}))
    yield Assistant(engine=engine, settings=settings, model_path=default_model_path)
    engine.close()


def test_real_model_through_transformers_agrees_with_llamacpp(hf_assistant, assistant):
    engine = hf_assistant.engine
    assert "GGUF dequantised" in engine.description
    assert engine.chat_template == assistant.engine.chat_template
    assert hf_assistant.analyst.candidates == assistant.analyst.candidates  # same vocabulary
    for text, expected in AGREEMENT_TEXTS:
        assert engine.tokenize(text) == assistant.engine.tokenize(text)
        # prompt-only on both sides: the learned head belongs to the llama.cpp side's model file
        ours, theirs = hf_assistant.analyze(text), assistant.analyze(text, method="prompt")
        assert ours.label == theirs.label == expected, text
        # the GGUF dequantised to float32 vs llama.cpp's quantised kernels: close, not equal
        assert abs(ours.probability - theirs.probability) < 0.1, text
    # the prefix cache is exact on the real model too
    cached = hf_assistant.analyst.label_logprobs(AGREEMENT_TEXTS[0][0])[0]
    engine.forget()
    np.testing.assert_allclose(hf_assistant.analyst.label_logprobs(AGREEMENT_TEXTS[0][0])[0], cached, atol=1e-3)


def test_the_packaged_adapters_run_through_transformers_too(hf_assistant, assistant):
    """The default model's packaged heads and chat adapter come with LoRA adapters (llama.cpp
    adapter GGUFs); the transformers engine applies them by forward hooks, so the second engine
    keeps working on the default model and agrees with llama.cpp."""
    hf_assistant.use_heads(assistant.head, None)
    for text, expected in AGREEMENT_TEXTS:
        ours, theirs = hf_assistant.analyze(text), assistant.analyze(text)
        assert ours.label == theirs.label == expected, text
        assert abs(ours.probability - theirs.probability) < 0.1, text
    assert hf_assistant.engine.lane_adapter == {0: assistant.head.adapter}
    hf_assistant.chat.use_adapter(assistant.chat.adapter)
    tokens, _, _ = assistant.chat.prompt_tokens([], "I got my first job offer!", "positive", 8)
    ours = hf_assistant.engine.logits(tokens, lane=1)
    theirs = assistant.engine.logits(tokens, lane=1)
    assert int(np.argmax(theirs)) in np.argsort(ours)[-3:]  # the first reply token, within float noise
    hf_assistant.chat.use_adapter(None)
    plain = hf_assistant.engine.logits(tokens, lane=1)
    assert np.abs(plain - ours).max() > 1.0  # the adapter really changed the chat lane


def test_the_benchmarks_original_recipe_agrees_with_the_seed_method(tiny_model_dir, tiny_engine):
    from allinone.evaluation.original import OriginalRecipe

    recipe = OriginalRecipe(tiny_model_dir, sentiment_role().prompt("original").template, Settings(threads=1))
    analyst = make_analyst(tiny_engine, "original", lane=0)
    for text in RECIPE_TEXTS:
        assert recipe.analyze(text).label == analyst.analyze_by_generation(text).label


def test_hidden_state_is_the_hf_residual_stream_after_that_many_blocks(tiny_engine):
    import torch

    tokens = tiny_engine.tokenize("Not bad at all.")
    tiny_engine.forget()
    tiny_engine.hidden_state(tokens[:3], 1)
    cached = tiny_engine.hidden_state(tokens, 1)  # reuses the first tokens' entries
    assert tiny_engine.last_stats.reused > 0
    with torch.inference_mode():
        out = tiny_engine.hf_model(torch.tensor([tokens]), output_hidden_states=True)
    expected = out.hidden_states[1][0, -1].float().numpy()
    assert np.allclose(cached, expected, atol=1e-4)
    assert tiny_engine.hidden_size == expected.shape[0] and tiny_engine.n_layers == 2


def write_tiny_adapter(path, engine, alpha=4.0, rank=2, seed=0):
    """A llama.cpp adapter GGUF for the tiny model: LoRA on block 1's query and down projections."""
    from gguf import GGUFWriter

    rng = np.random.default_rng(seed)
    layer = engine.hf_model.model.layers[1]
    tensors = {}
    for name, module in (("attn_q", layer.self_attn.q_proj), ("ffn_down", layer.mlp.down_proj)):
        tensors[f"blk.1.{name}.weight.lora_a"] = rng.normal(size=(rank, module.in_features)).astype(np.float32)
        tensors[f"blk.1.{name}.weight.lora_b"] = rng.normal(size=(module.out_features, rank)).astype(np.float32)
    writer = GGUFWriter(str(path), arch="qwen2")
    writer.add_type("adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", alpha)
    for name, tensor in tensors.items():
        writer.add_tensor(name, tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors, alpha / rank


def test_a_lora_adapter_applies_to_its_lane_only_as_merged_weights_would(tiny_model_dir, tmp_path):
    import torch

    from allinone.engine.transformers import TransformersEngine

    engine = TransformersEngine(tiny_model_dir, context_size=512, batch_size=64, n_lanes=2)
    tokens = engine.tokenize("The service was slow and the food was cold.")
    plain = engine.logits(tokens, lane=0)
    tensors, scale = write_tiny_adapter(tmp_path / "tiny.lora.gguf", engine)
    engine.use_adapter(1, tmp_path / "tiny.lora.gguf")
    adapted = engine.logits(tokens, lane=1)
    np.testing.assert_allclose(engine.logits(tokens, lane=0), plain, atol=1e-5)  # lane 0 unchanged
    assert not np.allclose(adapted, plain, atol=1e-3)

    merged = TransformersEngine(tiny_model_dir, context_size=512, batch_size=64, n_lanes=1)
    layer = merged.hf_model.model.layers[1]
    with torch.no_grad():
        for name, module in (("attn_q", layer.self_attn.q_proj), ("ffn_down", layer.mlp.down_proj)):
            a, b = tensors[f"blk.1.{name}.weight.lora_a"], tensors[f"blk.1.{name}.weight.lora_b"]
            module.weight += torch.tensor(b @ a * scale)
    np.testing.assert_allclose(adapted, merged.logits(tokens, lane=0), atol=1e-3)
    engine.use_adapter(1, None)
    np.testing.assert_allclose(engine.logits(tokens, lane=1), plain, atol=1e-5)
    with pytest.raises(EngineError, match="not found"):
        engine.use_adapter(1, tmp_path / "missing.gguf")
