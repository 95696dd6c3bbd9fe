"""Progress in a log file (issue 22): one INFO line now and then, no `\\r` frames; nothing with --quiet."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from offline_bridge.dtypes import by_torch_name
from offline_bridge.plan.schema import FilePlan, Plan, Step, Target
from offline_bridge.write.progress import LineProgress

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "tiny-llama"


def _convert_logged(ckpt: Path, out: Path, *extra: str) -> str:
    """`convert` with stderr going to a log file (not a terminal); the log's text, `\r` kept."""
    log = out.with_suffix(".log")
    with log.open("wb") as stderr:
        command = [sys.executable, "-m", "offline_bridge", "convert", str(ckpt), str(out), *extra]
        done = subprocess.run(command, stderr=stderr, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    text = log.read_bytes().decode()
    assert done.returncode == 0, text
    return text


def test_a_conversion_logged_to_a_file_has_lines_not_frames(tmp_path: Path) -> None:
    ckpt = Path(shutil.copytree(EXAMPLE, tmp_path / "ckpt"))
    text = _convert_logged(ckpt, tmp_path / "out")
    assert "\r" not in text
    lines = [line for line in text.split("\n") if line.startswith("INFO written ")]
    assert lines and lines[-1].endswith("(100%), 1 of 1 files"), text
    assert _convert_logged(ckpt, tmp_path / "quiet", "--quiet") == ""


def _plan(sizes: list[tuple[str, int]]) -> Plan:
    float32 = by_torch_name("float32")
    targets = tuple(Target(f"t{i}", (size // 4,), float32, file) for i, (file, size) in enumerate(sizes))
    steps = tuple(Step(None, None, (target,)) for target in targets)  # type: ignore[arg-type]
    files = tuple(FilePlan(name, b"", 0) for name in dict.fromkeys(file for file, _ in sizes))
    return Plan(steps, files, float32, None)  # type: ignore[arg-type]


def test_lines_come_every_tenth_or_every_five_seconds(caplog: pytest.LogCaptureFixture) -> None:
    plan = _plan([("a", 400)] * 50 + [("b", 400)] * 50)
    now = [0.0]
    line = LineProgress(plan, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="offline_bridge.write.progress"):
        for step in plan.steps:
            line.update(step.targets)
        assert len(caplog.records) == 10  # every 10% of the bytes, the last at 100%
        assert caplog.records[4].getMessage() == "written 0.0 MB / 0.0 MB (50%), 1 of 2 files"
        caplog.clear()
        slow = LineProgress(_plan([("a", 4)] * 1000), clock=lambda: now[0])
        for _ in range(3):
            now[0] += 5.0
            slow.update(plan.steps[0].targets[:0])
        assert len(caplog.records) == 3
