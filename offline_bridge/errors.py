"""The exceptions offline-bridge raises; the CLI maps each to one line and its class's ``exit_code``.

Whose fault it is decides the class, and so the exit code:

    BridgeError             a conversion could not be completed (base; exit 1)
    ├── InputError          the user can fix it: exit 2
    │   ├── CheckpointError     the checkpoint (or another file we read) is missing, damaged or not as described
    │   │   └── UnsafePickleError   a pickle asks for something outside the allow-list
    │   └── OptionError         an option is invalid or contradicts the checkpoint
    ├── OutputError         the output could not be written (disk full, permissions): exit 1
    └── InternalError       a check of our own failed: a bug in offline-bridge, not in the input; exit 1
"""

from __future__ import annotations

__all__ = [
    "BridgeError",
    "CheckpointError",
    "InputError",
    "InternalError",
    "OptionError",
    "OutputError",
    "UnsafePickleError",
]


class BridgeError(Exception):
    """Base class: a conversion could not be completed. Subclasses say whose fault it was."""

    exit_code = 1


class InputError(BridgeError):
    """Bad input the user can act on; the message names the file or option and the field. Exit code 2."""

    exit_code = 2


class CheckpointError(InputError):
    """The checkpoint on disk is missing, damaged or not what the options describe. Exit code 2."""


class UnsafePickleError(CheckpointError):
    """A pickle in the checkpoint references something outside the allow-list; nothing was executed."""


class OptionError(InputError):
    """An option value is invalid or contradicts the checkpoint. Exit code 2."""


class OutputError(BridgeError):
    """The output could not be written (disk full, permissions); nothing was left behind. Exit code 1."""

    exit_code = 1


class InternalError(BridgeError):
    """An invariant offline-bridge checks of itself failed (planned sizes, shapes): a bug. Exit code 1."""

    exit_code = 1
