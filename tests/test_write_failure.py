"""Failures while writing: a full disk or a killed process leave nothing that looks like a finished output,
and running the same command again succeeds."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from conftest import BASE_SPEC
from slow_convert import start_slow_convert

from offline_bridge.commands.cli import main
from offline_bridge.write.manifest import MANIFEST, verify


def _convert(ckpt: Path, out: Path) -> Result:
    return CliRunner().invoke(main, ["convert", str(ckpt), str(out), "--quiet"])


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


WRITE_CALLS = ("pwrite", "pwritev", "copy_file_range")


def _disk_full(*_: object) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("stage", ["tensors", "manifest"])
def test_disk_full(stage: str, checkpoints: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt, out = checkpoints[BASE_SPEC], tmp_path / "out"
    if stage == "tensors":  # every way the writer puts bytes into a file fails after a few calls
        calls = []

        def failing(real: Callable[..., int]) -> Callable[..., int]:
            def write(*args: object) -> int:
                calls.append(args)
                return _disk_full() if len(calls) > 10 else real(*args)

            return write

        for name in WRITE_CALLS:
            monkeypatch.setattr(os, name, failing(getattr(os, name)))
    else:  # everything but the manifest is in place when the disk fills up
        real_write = Path.write_text
        monkeypatch.setattr(
            Path, "write_text", lambda p, *a, **k: (_disk_full if p.name == MANIFEST else real_write)(p, *a, **k)
        )
    result = _convert(ckpt, out)
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        f"error: {out}: writing the output failed ([Errno 28] No space left on device); nothing was left behind"
    ]
    assert not out.exists() and _leftovers(out) == []
    monkeypatch.undo()
    assert _convert(ckpt, out).exit_code == 0
    assert verify(out) == []


def test_killed_run_is_cleaned_up_by_the_next(checkpoints: dict, tmp_path: Path) -> None:
    ckpt, out = checkpoints[BASE_SPEC], tmp_path / "out"
    run = start_slow_convert(ckpt, out, "--workers", "4")
    staging = tmp_path / f".out.partial-{run.pid}"
    run.send_signal(signal.SIGKILL)
    assert run.wait() == -signal.SIGKILL, "the conversion ended before it could be killed"
    # named as incomplete, beside OUT_DIR; its lock file stays too, unlocked: the next run takes it
    assert not out.exists() and _leftovers(out) == [".out.lock", staging.name]
    assert _convert(ckpt, out).exit_code == 0
    assert _leftovers(out) == [] and verify(out) == []


def test_leftovers_of_dead_runs_are_removed(checkpoints: dict, tmp_path: Path) -> None:
    """Staging and old-output directories whose process is gone go; a live process's staging stays."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    out = tmp_path / "out"
    for name in (f".out.partial-{dead.stdout.strip()}", f".out.old-{dead.stdout.strip()}", ".out.partial-1"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"stale")
    assert _convert(checkpoints[BASE_SPEC], out).exit_code == 0
    assert _leftovers(out) == [".out.partial-1"]  # pid 1 is alive: another run's, not ours to delete
    assert verify(out) == []
