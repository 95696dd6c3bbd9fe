"""SIGINT and SIGTERM in the `offline-bridge` command: one line and exit 128 + the signal, never a traceback.

While the modules load (`exit_while_loading`, nothing touched yet) a signal ends the process at once. Once
the command runs (`interrupt_on_signals`) it raises `Interrupted` in the main thread, so the `finally` blocks
remove the staging directory and release the OUT_DIR lock; a second signal during that cleanup is ignored.
Library callers keep Python's defaults: `cli` installs these only when this process is the command itself.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from types import FrameType

__all__ = ["Interrupted", "exit_while_loading", "ignore_signals", "interrupt_on_signals", "is_command"]

SIGNALS = (signal.SIGINT, signal.SIGTERM)
COMMAND = "offline-bridge"


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; a KeyboardInterrupt, so `except Exception` lets it through to the CLI."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}; nothing was left behind")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def is_command() -> bool:
    """Whether this process is `offline-bridge` (the console script) or `python -m offline_bridge`."""
    argv = getattr(sys, "orig_argv", [])
    module = argv[argv.index("-m") + 1 : argv.index("-m") + 2] if "-m" in argv else []
    return os.path.basename(sys.argv[0]) == COMMAND or module == ["offline_bridge"]


def exit_while_loading() -> None:
    """Until the command runs, a signal ends the process with one line (nothing was touched yet)."""
    _handle(_exit_now)


def interrupt_on_signals() -> None:
    """From here on, a signal raises `Interrupted` in the main thread."""
    _handle(_interrupt)


def _handle(handler: Callable[[int, FrameType | None], None]) -> None:
    for signum in SIGNALS:
        if signal.getsignal(signum) is not signal.SIG_IGN:  # ignored by who started us (`cmd &` in a script)
            signal.signal(signum, handler)


def ignore_signals() -> None:
    for signum in SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def _exit_now(signum: int, _frame: FrameType | None) -> None:
    os.write(2, f"error: {Interrupted(signum)}\n".encode())
    os._exit(128 + signum)


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    ignore_signals()  # the cleanup the exception starts runs to its end
    raise Interrupted(signum)
