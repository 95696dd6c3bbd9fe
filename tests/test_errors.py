"""Whose fault an error is decides its class and exit code: 2 for input a user can fix, 1 for a failed write or
a bug of ours; the CLI reads the code off the class, so a new error class needs no CLI change."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from offline_bridge import errors
from offline_bridge.commands.outcome import report
from offline_bridge.errors import (
    BridgeError,
    CheckpointError,
    InputError,
    InternalError,
    OptionError,
    OutputError,
    UnsafePickleError,
)

PACKAGE = Path(errors.__file__).parent


@pytest.mark.parametrize(
    ("cls", "code"),
    [
        (CheckpointError, 2),
        (UnsafePickleError, 2),
        (OptionError, 2),
        (InputError, 2),
        (OutputError, 1),
        (InternalError, 1),
    ],
)
def test_exit_code_by_class(cls: type[BridgeError], code: int, capsys: pytest.CaptureFixture[str]) -> None:
    """A command that raises ``cls`` ends with one line on stderr and the class's exit code."""

    def fail() -> None:
        raise cls("ckpt/common.pt: field 'x' is bad")

    with pytest.raises(SystemExit) as ended:
        report(fail)
    assert ended.value.code == code
    assert capsys.readouterr().err.splitlines() == ["error: ckpt/common.pt: field 'x' is bad"]


def test_hierarchy() -> None:
    """Bad input is never internal, and an internal error is never mistaken for bad input."""
    assert issubclass(CheckpointError, InputError) and issubclass(OptionError, InputError)
    assert issubclass(UnsafePickleError, CheckpointError)
    for cls in (InternalError, OutputError):
        assert issubclass(cls, BridgeError) and not issubclass(cls, InputError)
    assert set(errors.__all__) == {
        name for name, value in vars(errors).items() if isinstance(value, type) and issubclass(value, BridgeError)
    }


def test_unexpected_exception_is_internal(capsys: pytest.CaptureFixture[str]) -> None:
    """An exception that is not ours at all (a bug we did not check for) is exit 1, named as internal."""

    def fail() -> None:
        raise KeyError("lost")

    with pytest.raises(SystemExit) as ended:
        report(fail)
    assert ended.value.code == 1
    assert capsys.readouterr().err.splitlines() == ["internal error: KeyError: 'lost'"]


def test_package_raises_only_classes_that_say_whose_fault() -> None:
    """No module raises the bare base class: every raise is input (2), output or internal (1)."""
    bare = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                func = node.exc.func
                if isinstance(func, ast.Name) and func.id == "BridgeError":
                    bare.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert bare == []
