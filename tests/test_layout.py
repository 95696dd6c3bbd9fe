"""The package's shape (issue 17): small modules, imports that only go down the pipeline, honest `__all__`.

Parsed with `ast`, nothing imported: fast, and no module's import side effects.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "offline_bridge"
MAX_LINES = 260

# Stages, lowest first. A module imports only from its own stage or lower ones. The rules and the HF field
# helpers are the vocabulary family tables are written in, so they sit below `families`; the planner and the
# model description read the tables, so they sit above. The args schema (a leaf) checks the args a reader
# sizes itself by (legacy rank files), so it sits with the readers.
STAGES = [
    ("errors", "dtypes"),
    ("files",),
    ("readers", "config.args_schema"),
    ("plan.rules", "plan.schema", "config.hf_fields"),
    ("families",),
    ("plan",),
    ("config",),
    ("transform",),
    ("write",),
    ("commands",),
]


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = _modules()


def _stage(module: str) -> int | None:
    """The stage of a module (dotted, relative to the package), by its longest matching prefix."""
    best, rank = -1, None
    for index, prefixes in enumerate(STAGES):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), index
    return rank


def _imports(name: str, path: Path) -> set[str]:
    """Modules of ours that ``name`` imports, anywhere in its body (function-level imports too)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    package = [p for p in package if p]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            elif node.module and node.module.startswith("offline_bridge"):
                target = node.module.removeprefix("offline_bridge").lstrip(".")
            else:
                continue
            found.add(target)
            found.update(f"{target}.{a.name}" if target else a.name for a in node.names if _is_module(target, a.name))
        elif isinstance(node, ast.Import):
            found.update(
                a.name.removeprefix("offline_bridge.") for a in node.names if a.name.startswith("offline_bridge.")
            )
    return {m for m in found if m}


def _is_module(package: str, name: str) -> bool:
    return (f"{package}.{name}" if package else name) in MODULES


@pytest.mark.parametrize("name", sorted(MODULES), ids=str)
def test_module_is_small(name: str) -> None:
    path = MODULES[name]
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, (
        f"{path.relative_to(PACKAGE)} has {lines} lines (at most {MAX_LINES}): split it along a seam"
    )


def test_imports_go_down_the_pipeline() -> None:
    wrong = []
    for name, path in MODULES.items():
        own = _stage(name)
        for target in _imports(name, path):
            theirs = _stage(target)
            if own is not None and theirs is not None and theirs > own:
                wrong.append(f"{name} (stage {STAGES[own][0]}) imports {target} (stage {STAGES[theirs][0]})")
    assert not wrong, "imports from a higher stage:\n" + "\n".join(sorted(wrong))


def _defined(tree: ast.Module, init: bool) -> set[str]:
    """Names a module binds itself; a package's `__init__` may also name what it re-exports."""
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif init and isinstance(node, ast.ImportFrom) and node.level:
            names.update(a.asname or a.name for a in node.names)
    if "__getattr__" in names and "_HOMES" in names:  # the lazy top level: what `__getattr__` loads on first use
        (homes,) = (
            n.value for n in tree.body if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "_HOMES"
        )
        names.update(ast.literal_eval(homes))
    return names


@pytest.mark.parametrize("name", sorted(MODULES), ids=str)
def test_all_names_what_the_module_defines(name: str) -> None:
    path = MODULES[name]
    tree = ast.parse(path.read_text())
    declared = [
        node.value
        for node in tree.body
        if isinstance(node, (ast.Assign, ast.AnnAssign))
        and any(
            isinstance(t, ast.Name) and t.id == "__all__"
            for t in getattr(node, "targets", [getattr(node, "target", None)])
        )
    ]
    if path.name == "__main__.py":
        return
    assert declared, f"{path.relative_to(PACKAGE)} declares no __all__"
    exported = ast.literal_eval(declared[0])
    foreign = sorted(set(exported) - _defined(tree, path.name == "__init__.py"))
    assert not foreign, f"{path.relative_to(PACKAGE)}: __all__ names {foreign}, which it does not define"
