"""How a command ends when something unexpected is raised: one clipped line, exit 1 (issue 23)."""

from __future__ import annotations

import pytest

from offline_bridge.commands import cli
from offline_bridge.commands.outcome import report


class _Unprintable(Exception):
    def __str__(self) -> str:
        raise ValueError("Exceeds the limit for integer string conversion")


@pytest.mark.parametrize("exc", [RuntimeError("x" * 1_000_000), RuntimeError("a\nb\n" * 1000), _Unprintable()])
def test_an_internal_error_is_one_clipped_line(exc: Exception, capsys: pytest.CaptureFixture) -> None:
    def fail() -> None:
        raise exc

    with pytest.raises(SystemExit) as exited:
        report(fail)
    assert exited.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith(f"internal error: {type(exc).__name__}: ") and err.count("\n") == 1
    assert len(err) < 400


def test_an_internal_error_outside_a_command_is_clipped(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError("y" * 1_000_000)

    monkeypatch.setattr(cli.main, "make_context", fail)
    assert cli.run(["inspect", "."]) == 1
    err = capsys.readouterr().err
    assert err.startswith("internal error: RuntimeError: ") and err.count("\n") == 1 and len(err) < 400
