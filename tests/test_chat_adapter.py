"""The chat adapter's manifest: found by model and prompt, verified by sha256 (no model needed)."""

import json

import pytest

from allinone.roles.adapter import AdapterError, ChatAdapter, file_sha256
from tests.fake_engine import chat_prompt


def make_adapter(tmp_path, content=b"not really a gguf", prompt="chat-warm"):
    source = tmp_path / "trained.gguf"
    source.write_bytes(content)
    return ChatAdapter(
        model_sha256="ab" * 32, prompt=prompt, path=source, sha256=file_sha256(source), info={"steps": 3}
    )


def test_saved_adapter_loads_and_is_found_for_its_model_and_prompt(tmp_path):
    manifest = make_adapter(tmp_path).save(tmp_path / "adapters")
    loaded = ChatAdapter.load(manifest)
    assert loaded.path.read_bytes() == b"not really a gguf" and loaded.info == {"steps": 3}
    assert ChatAdapter.find("ab" * 32, "chat-warm", tmp_path / "adapters").sha256 == loaded.sha256
    assert ChatAdapter.find("ab" * 32, "chat-original", tmp_path / "adapters") is None
    assert ChatAdapter.find("cd" * 32, "chat-warm", tmp_path / "adapters") is None


def test_a_damaged_or_missing_adapter_file_is_refused_with_the_reason(tmp_path):
    manifest = make_adapter(tmp_path).save(tmp_path / "adapters")
    gguf = tmp_path / "adapters" / json.loads(manifest.read_text())["adapter"]
    gguf.write_bytes(b"something else")
    with pytest.raises(AdapterError, match="damaged or was replaced"):
        ChatAdapter.load(manifest)
    gguf.unlink()
    with pytest.raises(AdapterError, match="missing"):
        ChatAdapter.load(manifest)
    manifest.write_text("{not json")
    with pytest.raises(AdapterError, match="not a chat adapter manifest"):
        ChatAdapter.load(manifest)


def test_a_head_on_the_chat_lane_is_keyed_by_the_adapter_it_read():
    prompt = chat_prompt("warm")
    assert prompt.head_key() == "chat-warm"  # the model's own weights: the key heads always had
    assert prompt.head_key("0123456789abcdef") == "chat-warm@0123456789ab"
