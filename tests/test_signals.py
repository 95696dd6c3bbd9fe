"""SIGINT and SIGTERM: a running conversion cleans up (no staging directory, no lock, no OUT_DIR, inputs as
they were) and exits 130 / 143 with one line; while the modules load, no KeyboardInterrupt traceback."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT
from test_output_dir import EXAMPLE, hidden, start_slow_convert, tree_hash


@pytest.mark.parametrize(("sent", "workers"), [(signal.SIGINT, "1"), (signal.SIGINT, "3"), (signal.SIGTERM, "1")])
def test_signal_during_conversion_cleans_up(sent: signal.Signals, workers: str, tmp_path: Path) -> None:
    ckpt = Path(shutil.copytree(EXAMPLE, tmp_path / "ckpt"))
    before, out = tree_hash(ckpt), tmp_path / "out"
    running = start_slow_convert(ckpt, out, "--workers", workers)
    running.send_signal(sent)
    assert running.wait(timeout=30) == 128 + sent
    assert running.stderr.read().splitlines() == [f"error: interrupted by {sent.name}; nothing was left behind"]
    assert not out.exists() and hidden(tmp_path) == []  # no staging directory, no lock file
    assert tree_hash(ckpt) == before


def test_earlier_output_survives_an_interrupted_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "out"
    subprocess.run([sys.executable, "-m", "offline_bridge", "convert", str(EXAMPLE), str(out), "-q"], check=True)
    before = tree_hash(out)
    running = start_slow_convert(EXAMPLE, out, "--overwrite")
    running.send_signal(signal.SIGINT)
    assert running.wait(timeout=30) == 130
    assert tree_hash(out) == before and hidden(tmp_path) == []


def test_no_traceback_while_loading(tmp_path: Path) -> None:
    """Signals sent while the modules load (the checkpoint is missing: a run that got past them exits 2)."""
    command = [sys.executable, "-m", "offline_bridge", "convert", str(tmp_path / "missing"), str(tmp_path / "out")]
    codes = []
    for delay in (0.05, 0.1, 0.15, 0.2, 0.3, 0.4):
        started = subprocess.Popen(
            command, env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.PIPE, text=True
        )
        time.sleep(delay)
        started.send_signal(signal.SIGINT)
        codes.append(started.wait(timeout=30))
        stderr = started.stderr.read()
        assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
        assert codes[-1] in (130, 2, -signal.SIGINT), stderr  # -SIGINT: before Python set up its own handler
        if codes[-1] == 130:
            assert stderr.splitlines() == ["error: interrupted by SIGINT; nothing was left behind"]
    assert 130 in codes, codes


def test_library_keeps_python_defaults() -> None:
    code = "import signal, offline_bridge.cli; assert signal.getsignal(signal.SIGINT) is signal.default_int_handler"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_ignored_sigint_stays_ignored(tmp_path: Path) -> None:
    """Started with SIGINT ignored (`cmd &` in a script), a Ctrl-C meant for the shell does not stop us."""
    out = tmp_path / "out"
    running = start_slow_convert(EXAMPLE, out, ignore=signal.SIGINT)
    running.send_signal(signal.SIGINT)
    assert running.wait(timeout=60) == 0 and (out / "offline-bridge.json").is_file()
