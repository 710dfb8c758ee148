"""The package's layers import only downward, as docs/architecture.md's table says: a newcomer can
trust the table, and a change that breaks it fails here."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "allinone"
# layer -> the layers it may import (the same table as docs/architecture.md)
MAY_USE = {
    "machine": set(),
    "conversation": set(),
    "settings": {"machine"},
    "engine": {"machine"},
    "model": {"engine"},
    "roles": {"engine", "conversation"},
    "service": {"roles", "conversation", "engine", "model", "settings"},
    "server": {"roles", "conversation", "engine", "settings", "machine"},
    "evaluation": {"service", "roles", "conversation", "engine", "model", "settings", "machine"},
    "scale": {"server", "service", "conversation", "settings", "machine"},
    "cli": {
        *("scale", "server", "evaluation", "service", "roles", "conversation", "engine", "model", "settings"),
        "machine",
    },
    "__main__": {"cli"},
}


def layer_of(module: str) -> str:
    return module.split(".")[1] if "." in module else module


def internal_imports(path: Path) -> set[str]:
    """The allinone modules a file imports (relative imports resolved)."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = parts[:-1]  # what a relative import of level 1 starts from
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            found.add(target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m == "allinone" or m.startswith("allinone.")}


def test_every_layer_imports_only_what_the_table_allows():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "__init__.py" and path.parent == PACKAGE:
            continue
        own = layer_of(".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts))
        assert own in MAY_USE, f"{path}: a layer the table does not know ({own}); add it to the table"
        for target in internal_imports(path):
            used = layer_of(target)
            if used != own and used not in MAY_USE[own]:
                wrong.append(f"{path.relative_to(PACKAGE.parent)} imports {target} ({own} may not use {used})")
    assert not wrong, "\n".join(wrong)


def test_the_table_has_no_cycle():
    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n})) for n in MAY_USE.get(start, ()))

    assert not [layer for layer in MAY_USE if reaches(layer, layer, set())]


def test_answering_does_not_import_the_training_libraries():
    """scipy.optimize alone adds ~50 MB of resident memory; only fitting a head needs it, so the
    modules that answer (service, server, the CLI's dispatcher) must not import it."""
    import subprocess
    import sys

    code = (
        "import sys, allinone.service, allinone.server.app, allinone.cli.main\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'scipy', 'torch', 'transformers', 'ray'}))"
    )
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert found.stdout.strip() == "[]"
