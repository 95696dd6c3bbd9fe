"""offline-bridge: Megatron-Core checkpoints to Hugging Face safetensors, offline and model-free.

The package imports lazily (PEP 562): `import offline_bridge.errors` loads nothing else, and
`offline_bridge.convert` loads the pipeline only when it is first used.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__all__ = [
    "BridgeError",
    "CheckpointError",
    "InputError",
    "InternalError",
    "OptionError",
    "OutputError",
    "UnsafePickleError",
    "convert",
    "export_adapter",
]
__version__ = "0.1.0"

_HOMES = {
    "BridgeError": "errors",
    "CheckpointError": "errors",
    "InputError": "errors",
    "InternalError": "errors",
    "OptionError": "errors",
    "OutputError": "errors",
    "UnsafePickleError": "errors",
    "convert": "commands.convert",
    "export_adapter": "commands.export_adapter",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_HOMES[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
