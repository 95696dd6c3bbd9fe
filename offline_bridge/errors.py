"""The exceptions offline-bridge raises; the CLI maps them to one line and an exit code."""

from __future__ import annotations

__all__ = ["BridgeError", "CheckpointError", "OptionError", "UnsafePickleError"]


class BridgeError(Exception):
    """Base class: a conversion could not be completed. Exit code 1 (internal)."""

    exit_code = 1


class CheckpointError(BridgeError):
    """The checkpoint on disk is missing, damaged or not what the options describe. Exit code 2."""

    exit_code = 2


class UnsafePickleError(CheckpointError):
    """A pickle in the checkpoint references something outside the allow-list; nothing was executed."""


class OptionError(BridgeError):
    """An option value is invalid or contradicts the checkpoint. Exit code 2."""

    exit_code = 2
