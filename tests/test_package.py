"""Package boundaries: a lazy top level, and every module's `__all__` naming what it defines."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys

import pytest

import offline_bridge

MODULES = sorted(
    m.name for m in pkgutil.walk_packages(offline_bridge.__path__, "offline_bridge.") if "__main__" not in m.name
)


def test_errors_import_alone() -> None:
    """Importing the exceptions (as a caller catching them does) loads no other module of ours, nor tqdm."""
    code = "import sys, offline_bridge.errors; print(sorted(m for m in sys.modules if m.startswith(('offline_bridge', 'tqdm', 'numpy', 'torch'))))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "['offline_bridge', 'offline_bridge.errors']"


def test_top_level_names() -> None:
    assert callable(offline_bridge.convert) and callable(offline_bridge.export_adapter)
    importlib.import_module("offline_bridge.commands.convert")  # the submodule of the same name does not rebind it
    assert callable(offline_bridge.convert)
    assert issubclass(offline_bridge.CheckpointError, offline_bridge.BridgeError)
    with pytest.raises(AttributeError):
        _ = offline_bridge.no_such_name


@pytest.mark.parametrize("name", MODULES)
def test_module_exports(name: str) -> None:
    """`__all__` is declared, lists only names the module has, and is what a star-import gives."""
    module = importlib.import_module(name)
    exported = getattr(module, "__all__", None)
    assert exported is not None, f"{name} declares no __all__"
    missing = [n for n in exported if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ names {missing}, which it does not define"
