"""The package's floors: no module imports from a floor above its own (issue #20). Read from the
source (every ``import dcc.X`` / ``from dcc.X import``, at any depth of a function), so a new
upward import fails here."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "dcc"

# lowest first; a sub-package may import from its own floor's neighbours and from below
FLOORS = [
    {"spatial", "models"},
    {"similarity", "metrics"},
    {"losses"},
    {"data"},
    {"nets", "coreg", "evaluation"},
    {"lit"},
    {"cli"},
]
LEVEL = {name: level for level, names in enumerate(FLOORS) for name in names}


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dcc."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("dcc.")}
    return found


def test_every_subpackage_has_a_floor():
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    assert packages == set(LEVEL), packages ^ set(LEVEL)


def test_no_module_imports_from_a_floor_above():
    upward = []
    for path in sorted(ROOT.rglob("*.py")):
        package = path.relative_to(ROOT).parts[0]
        if package not in LEVEL:
            continue
        for target in _imports(path) - {package}:
            if LEVEL[target] > LEVEL[package] or (
                LEVEL[target] == LEVEL[package] and target != package
                and len(FLOORS[LEVEL[package]]) > 1
            ):
                upward.append(f"{path.relative_to(ROOT.parent)} imports dcc.{target}")
    assert not upward, upward
