"""offline-bridge: Megatron-Core checkpoints to Hugging Face safetensors, offline and model-free."""

from __future__ import annotations

from .convert import convert
from .errors import BridgeError, CheckpointError, OptionError, UnsafePickleError
from .export_adapter import export_adapter

__all__ = ["BridgeError", "CheckpointError", "OptionError", "UnsafePickleError", "convert", "export_adapter"]
__version__ = "0.1.0"
