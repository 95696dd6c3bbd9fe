"""Declared dependencies match use: every third-party module the package imports (lazily too) is a declared
dependency, every declared dependency is imported, and what tests and tools import is declared or in `test`."""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
_DISTRIBUTIONS = packages_distributions()


def _name(requirement: str) -> str:
    """A requirement's distribution name, normalised (PEP 503)."""
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement.strip())
    assert match, requirement
    return re.sub(r"[-_.]+", "-", match.group()).lower()


def _imports(folder: Path, local: set[str]) -> dict[str, list[str]]:
    """Third-party top-level module → the files importing it (in functions too), under ``folder``."""
    found: dict[str, list[str]] = {}
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for top in {name.split(".")[0] for name in names} - local - set(sys.stdlib_module_names):
                found.setdefault(top, []).append(str(path.relative_to(ROOT)))
    return found


def _distribution(module: str) -> str:
    """The installed distribution that provides ``module``."""
    names = _DISTRIBUTIONS.get(module)
    assert names, f"{module} is imported but no installed distribution provides it"
    return _name(names[0])


def test_package_imports_are_declared_and_declared_are_imported() -> None:
    """Required dependencies, and the optional extras (`ray`) the package imports only when asked for."""
    extras = [r for name, found in PROJECT["optional-dependencies"].items() if name != "test" for r in found]
    declared = {_name(r) for r in [*PROJECT["dependencies"], *extras]}
    used = {_distribution(m): files for m, files in _imports(ROOT / "offline_bridge", {"offline_bridge"}).items()}
    assert {d: f for d, f in used.items() if d not in declared} == {}, "imported but not in [project] dependencies"
    assert declared - used.keys() == set(), "declared in [project] dependencies but never imported"


@pytest.mark.parametrize("folder", ["tests", "tools"])
def test_test_and_tool_imports_are_declared(folder: str) -> None:
    declared = {_name(r) for r in [*PROJECT["dependencies"], *PROJECT["optional-dependencies"]["test"]]}
    local = {"offline_bridge", "tools", *(p.stem for p in (ROOT / folder).glob("*.py"))}
    used = {_distribution(m): files for m, files in _imports(ROOT / folder, local).items()}
    assert {d: f for d, f in used.items() if d not in declared} == {}, "imported but not declared, not even in test"
