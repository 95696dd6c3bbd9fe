"""How a command ends: its result, or one line on stderr and an exit code (2 bad input or option, 1
internal), a traceback only with `--debug`; and reports as JSON whatever the checkpoint's args hold."""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Callable
from typing import TypeVar

import click

from ..errors import BridgeError
from ..files.small_files import clip
from ..write.jsonable import jsonable

__all__ = ["as_json", "internal_error", "report"]

INTERNAL_LIMIT = 300  # characters of an unexpected exception's text shown on its one line

T = TypeVar("T")


def report(produce: Callable[[], T]) -> T:
    """``produce()``; an exception becomes one line on stderr (the traceback with `--debug`) and its exit code.
    Interrupts (KeyboardInterrupt) go through to `cli.run`."""
    try:
        return produce()
    except Exception as exc:
        context = click.get_current_context(silent=True)
        if context is not None and (context.find_root().obj or {}).get("debug"):
            traceback.print_exc()
        elif isinstance(exc, BridgeError):
            click.echo(f"error: {exc}", err=True)
        else:
            click.echo(internal_error(exc), err=True)
        sys.exit(exc.exit_code if isinstance(exc, BridgeError) else 1)


def internal_error(exc: BaseException) -> str:
    """The one line for an exception we did not expect: its text may be anything (a whole file, many
    lines, an int too long to print), so it is put on one line and clipped."""
    try:
        text = " ".join(str(exc).split())
    except Exception:  # str() of a hostile value (an int of 5000 digits) may raise anything
        text = "<unprintable>"
    return f"internal error: {type(exc).__name__}: {clip(text, INTERNAL_LIMIT)}"


def as_json(value: object) -> str:
    """``value`` as indented JSON text, made JSON-safe first (`write.jsonable`)."""
    return json.dumps(jsonable(value), indent=2)
