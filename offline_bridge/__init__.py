"""offline-bridge: Megatron-Core checkpoints to Hugging Face safetensors, offline and model-free.

The package imports lazily (PEP 562): `import offline_bridge.errors` loads nothing else, and
`offline_bridge.convert` loads the pipeline only when it is first used.
"""

from __future__ import annotations

import sys
from importlib import import_module
from types import ModuleType
from typing import Any

__all__ = ["BridgeError", "CheckpointError", "OptionError", "UnsafePickleError", "convert", "export_adapter"]
__version__ = "0.1.0"

_HOMES = {
    "BridgeError": "errors",
    "CheckpointError": "errors",
    "OptionError": "errors",
    "UnsafePickleError": "errors",
    "convert": "convert",
    "export_adapter": "export_adapter",
}


class _Package(ModuleType):
    """Keeps `offline_bridge.convert` the function: importing the submodule of the same name would otherwise
    rebind the package attribute to the module."""

    def __setattr__(self, name: str, value: Any) -> None:
        if not (isinstance(value, ModuleType) and _HOMES.get(name) == name):
            super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_HOMES[name]}", __name__), name)
    globals()[name] = value  # the function shadows its submodule's name from now on, as an eager import did
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
