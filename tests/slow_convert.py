"""A real `offline-bridge` process whose every write sleeps: long enough for a test to signal, kill or race it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import ROOT

__all__ = ["SLOW_CONVERT", "start_slow_convert"]

SLOW_CONVERT = """
import os, sys, time
delay = float(sys.argv.pop(1))
def slowed(real):
    def slow(*args):
        time.sleep(delay)
        return real(*args)
    return slow
for name in ("pwrite", "pwritev", "copy_file_range"):
    setattr(os, name, slowed(getattr(os, name)))
from offline_bridge.commands.cli import entry
entry()
"""


def start_slow_convert(
    ckpt: Path, out: Path, *extra: str, ignore: signal.Signals | None = None, delay: float = 0.05
) -> subprocess.Popen[str]:
    """`convert CKPT OUT --quiet --workers 1 EXTRA...` with ``delay`` seconds per write call, returned once it
    writes into its staging directory; ``ignore``: a signal it starts with ignored."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, "-c", SLOW_CONVERT, str(delay), "convert", str(ckpt), str(out), "--quiet"]
    ignoring = None if ignore is None else lambda: signal.signal(ignore, signal.SIG_IGN)
    started = subprocess.Popen(
        [*args, "--workers", "1", *extra], env=env, stderr=subprocess.PIPE, text=True, preexec_fn=ignoring
    )
    staging = out.parent / f".{out.name}.partial-{started.pid}"
    deadline = time.monotonic() + 60
    while not (staging / "model.safetensors").exists() and started.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert started.poll() is None, "the conversion ended before the test could act on it"
    return started
