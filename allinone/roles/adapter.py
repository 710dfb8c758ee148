"""The chat role's LoRA adapter: weights that teach the model how to reply, applied on the chat lane
only (the sentiment analyst keeps its own weights and its own adapter).

An adapter belongs to one model (keyed by the model file's sha256) and one chat prompt, the one it
was trained under (tools/chat_lora). It is a llama.cpp adapter GGUF with a small JSON manifest
beside it: `<model sha256>.chat-<prompt>.adapter.json` names the GGUF, its sha256 (checked on
load: a damaged or swapped file is refused, as the model is) and how it was trained. Packaged
adapters ship in `roles/adapters/`; one in `<home>/adapters/` wins over them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

ADAPTER_FORMAT = 1
PACKAGED_ADAPTERS = Path(__file__).with_name("adapters")


class AdapterError(ValueError):
    """An unusable adapter file; the message says why."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class ChatAdapter:
    model_sha256: str
    prompt: str  # the chat prompt's key, "chat-<name>"
    path: Path  # the adapter GGUF
    sha256: str  # of the GGUF
    info: dict = field(default_factory=dict)  # how it was trained

    @staticmethod
    def manifest_name(model_sha256: str, prompt: str) -> str:
        return f"{model_sha256}.{prompt}.adapter.json"

    def save(self, directory: Path) -> Path:
        """Copy the GGUF into `directory` and write its manifest there."""
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / f"{self.model_sha256}.{self.prompt}.lora.gguf"
        if Path(self.path).resolve() != target.resolve():
            tmp = target.with_suffix(".tmp")
            tmp.write_bytes(Path(self.path).read_bytes())
            tmp.replace(target)
        manifest = directory / self.manifest_name(self.model_sha256, self.prompt)
        payload = {
            "format": ADAPTER_FORMAT,
            "model_sha256": self.model_sha256,
            "prompt": self.prompt,
            "adapter": target.name,
            "sha256": file_sha256(target),
            "info": self.info,
        }
        tmp = manifest.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload, ensure_ascii=False, indent=1))
        tmp.replace(manifest)
        return manifest

    @classmethod
    def load(cls, manifest: Path) -> ChatAdapter:
        try:
            payload = json.loads(Path(manifest).read_text())
            if payload.get("format") != ADAPTER_FORMAT:
                raise AdapterError(f"{manifest}: adapter format {payload.get('format')!r} is not {ADAPTER_FORMAT}")
            path = Path(manifest).parent / Path(payload["adapter"]).name
            if not path.is_file():
                raise AdapterError(f"{manifest}: its adapter file {path.name} is missing")
            actual = file_sha256(path)
            if actual != payload["sha256"]:
                raise AdapterError(
                    f"{path}: sha256 {actual[:12]}… is not the manifest's {payload['sha256'][:12]}…; "
                    "the file is damaged or was replaced"
                )
            return cls(
                model_sha256=payload["model_sha256"],
                prompt=payload["prompt"],
                path=path,
                sha256=actual,
                info=payload.get("info", {}),
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            if isinstance(err, AdapterError):
                raise
            raise AdapterError(f"{manifest}: not a chat adapter manifest ({err})") from None

    @classmethod
    def find(cls, model_sha256: str, prompt: str, user_dir: Path) -> ChatAdapter | None:
        """The user's adapter for this model and chat prompt if there is one, else a packaged one."""
        name = cls.manifest_name(model_sha256, prompt)
        for directory in (user_dir, PACKAGED_ADAPTERS):
            if (directory / name).is_file():
                return cls.load(directory / name)
        return None
