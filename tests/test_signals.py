"""SIGINT and SIGTERM: a running conversion cleans up (no staging directory, no lock, no OUT_DIR, inputs as
they were) and exits 130 / 143 with one line; while the modules load, no KeyboardInterrupt traceback."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from slow_convert import start_slow_convert
from test_output_dir import EXAMPLE, hidden, tree_hash


@pytest.mark.parametrize(("sent", "workers"), [(signal.SIGINT, "1"), (signal.SIGINT, "3"), (signal.SIGTERM, "1")])
def test_signal_during_conversion_cleans_up(sent: signal.Signals, workers: str, tmp_path: Path) -> None:
    ckpt = Path(shutil.copytree(EXAMPLE, tmp_path / "ckpt"))
    before, out = tree_hash(ckpt), tmp_path / "out"
    running = start_slow_convert(ckpt, out, "--workers", workers, delay=0.5)  # ends by the signal
    running.send_signal(sent)
    assert running.wait(timeout=30) == 128 + sent
    assert running.stderr.read().splitlines() == [f"error: interrupted by {sent.name}; nothing was left behind"]
    assert not out.exists() and hidden(tmp_path) == []  # no staging directory, no lock file
    assert tree_hash(ckpt) == before


def test_earlier_output_survives_an_interrupted_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "out"
    subprocess.run([sys.executable, "-m", "offline_bridge", "convert", str(EXAMPLE), str(out), "-q"], check=True)
    before = tree_hash(out)
    running = start_slow_convert(EXAMPLE, out, "--overwrite", delay=0.5)
    running.send_signal(signal.SIGINT)
    assert running.wait(timeout=30) == 130
    assert tree_hash(out) == before and hidden(tmp_path) == []


def test_no_traceback_while_loading(tmp_path: Path) -> None:
    """SIGINT once click is imported, while the pipeline's modules (numpy, the family tables) still load;
    `-X importtime` says when on stderr. The checkpoint is missing: a run past the imports exits 2, which on a
    loaded machine (the test's signal arriving late) is tried again, up to three times."""
    command = [sys.executable, "-X", "importtime", "-m", "offline_bridge", "convert", str(tmp_path / "missing"), "o"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for _ in range(3):
        started = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
        assert started.stderr is not None
        for line in started.stderr:
            if line.rsplit("|", 1)[-1].strip() == "click":
                break
        started.send_signal(signal.SIGINT)
        lines = [line for line in started.stderr.read().splitlines() if not line.startswith("import time:")]
        code = started.wait(timeout=30)
        if code != 2:
            break
    assert code == 130, lines
    assert lines == ["error: interrupted by SIGINT; nothing was left behind"]


def test_library_keeps_python_defaults() -> None:
    code = "import signal, offline_bridge.commands.cli; assert signal.getsignal(signal.SIGINT) is signal.default_int_handler"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_ignored_sigint_stays_ignored(tmp_path: Path) -> None:
    """Started with SIGINT ignored (`cmd &` in a script), a Ctrl-C meant for the shell does not stop us."""
    out = tmp_path / "out"
    running = start_slow_convert(EXAMPLE, out, ignore=signal.SIGINT)
    running.send_signal(signal.SIGINT)
    assert running.wait(timeout=60) == 0 and (out / "offline-bridge.json").is_file()
