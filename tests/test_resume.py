"""`--resume` (issue 21): a conversion killed (SIGKILL) at several points and started again keeps the files it
had completed, untouched, writes only the rest, and ends with the bytes of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import ROOT
from slow_convert import SLOW_CONVERT
from split_runs import EXAMPLE, SHARD, tree

from offline_bridge import convert
from offline_bridge.commands.parts import finalize

pytestmark = pytest.mark.slow  # real processes killed mid-write: seconds each


def _killed(out: Path, staging: Callable[[int], Path], done: int, *extra: str) -> Path:
    """Start a slow `convert EXAMPLE OUT`, SIGKILL it once ``done`` files are recorded complete; its staging."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, "-c", SLOW_CONVERT, "0.05", "convert", str(EXAMPLE), str(out), "--quiet"]
    process = subprocess.Popen([*args, "--workers", "1", "--max-shard-size", SHARD, *extra], env=env)
    directory = staging(process.pid)
    records = directory / ".meta" / "done"
    deadline = time.monotonic() + 60
    while process.poll() is None and time.monotonic() < deadline:
        count = len(list(records.glob("*.json"))) if records.is_dir() else 0
        if count >= done and (directory / "model-00001-of-00009.safetensors").exists():
            break
        time.sleep(0.005)
    assert process.poll() is None, "the conversion ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    return directory


def _stamps(directory: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of every file recorded complete: unchanged means not written again."""
    names = [p.name.removesuffix(".json") for p in (directory / ".meta" / "done").glob("*.json")]
    return {name: ((s := os.stat(directory / name)).st_ino, s.st_mtime_ns) for name in names}


@pytest.mark.parametrize("done", [0, 1, 4])
def test_killed_run_resumes(done: int, plain: dict[str, bytes], tmp_path: Path) -> None:
    out = tmp_path / "out"
    staging = _killed(out, lambda pid: tmp_path / f".out.partial-{pid}", done)
    before = _stamps(staging) if done else {}
    assert len(before) >= done
    convert(EXAMPLE, out, max_shard_size=SHARD, progress=False, resume=True)
    assert tree(out) == plain
    assert before == {name: ((s := os.stat(out / name)).st_ino, s.st_mtime_ns) for name in before}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_without_resume_the_killed_run_is_discarded(plain: dict[str, bytes], tmp_path: Path) -> None:
    out = tmp_path / "out"
    staging = _killed(out, lambda pid: tmp_path / f".out.partial-{pid}", 2)
    before = _stamps(staging)
    convert(EXAMPLE, out, max_shard_size=SHARD, progress=False)
    assert tree(out) == plain
    assert all(os.stat(out / name).st_mtime_ns != stamp[1] for name, stamp in before.items())


def test_a_damaged_complete_file_is_written_again(plain: dict[str, bytes], tmp_path: Path) -> None:
    out = tmp_path / "out"
    staging = _killed(out, lambda pid: tmp_path / f".out.partial-{pid}", 2)
    victim = sorted(_stamps(staging))[0]
    data = bytearray((staging / victim).read_bytes())
    data[-1] ^= 1
    (staging / victim).write_bytes(bytes(data))
    convert(EXAMPLE, out, max_shard_size=SHARD, progress=False, resume=True)
    assert tree(out) == plain


def test_killed_part_resumes(plain: dict[str, bytes], tmp_path: Path) -> None:
    out = tmp_path / "out"
    area = _killed(out, lambda pid: tmp_path / ".out.parts", 1, "--part", "0/2")
    before = _stamps(area)
    assert before and not (area / ".meta" / "part-0-of-2.json").exists()
    convert(EXAMPLE, out, max_shard_size=SHARD, progress=False, part="1/2")
    convert(EXAMPLE, out, max_shard_size=SHARD, progress=False, part="0/2", resume=True)
    kept = {name: ((s := os.stat(area / name)).st_ino, s.st_mtime_ns) for name in before}
    assert kept == before
    finalize(out)
    assert tree(out) == plain


def test_resumed_with_other_options_keeps_nothing_foreign(tmp_path: Path) -> None:
    """The killed run wrote 9 files; resumed with another shard size, only the new plan's files are output."""
    out = tmp_path / "out"
    _killed(out, lambda pid: tmp_path / f".out.partial-{pid}", 2)
    convert(EXAMPLE, out, max_shard_size="100KB", progress=False, resume=True)
    expected = convert(EXAMPLE, tmp_path / "plain", max_shard_size="100KB", progress=False)
    assert tree(out) == tree(expected)
