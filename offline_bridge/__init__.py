"""offline-bridge: Megatron-Core checkpoints to Hugging Face safetensors, offline and model-free."""

from __future__ import annotations

from .interrupts import exit_while_loading, is_command

if is_command():  # `offline-bridge`: Ctrl-C while the modules below load is one line, not a traceback
    exit_while_loading()

from .convert import convert
from .errors import BridgeError, CheckpointError, OptionError, UnsafePickleError
from .export_adapter import export_adapter

__all__ = ["BridgeError", "CheckpointError", "OptionError", "UnsafePickleError", "convert", "export_adapter"]
__version__ = "0.1.0"
