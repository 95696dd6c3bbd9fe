"""The README's first command: the bundled example converts with the installed console script."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from judge import load_clean

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "tiny-llama"


def test_console_script_converts_the_example(tmp_path: Path) -> None:
    out = tmp_path / "tiny-llama-hf"
    done = subprocess.run(["offline-bridge", "convert", str(EXAMPLE), str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "INFO written " in done.stderr  # progress goes to stderr: lines, as it is not a terminal
    model = load_clean(out)
    assert type(model).__name__ == "LlamaForCausalLM"


def test_moving_bytes_never_imports_torch(tmp_path: Path) -> None:
    """--dtype auto only moves bytes: torch (1.6 s, 220 MB to import) stays out of the process."""
    code = (
        "import sys; from offline_bridge import convert; "
        f"convert({str(EXAMPLE)!r}, {str(tmp_path / 'out')!r}, progress=False); "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_cli_errors_are_one_line_with_exit_code(tmp_path: Path) -> None:
    done = subprocess.run(
        ["offline-bridge", "convert", str(tmp_path / "missing"), str(tmp_path / "out")], capture_output=True, text=True
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"error: {tmp_path / 'missing'}: checkpoint directory does not exist"]


def test_help_lists_every_option() -> None:
    done = subprocess.run(["offline-bridge", "convert", "--help"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    for option in (
        "--hf-config",
        "--model-type",
        "--iteration",
        "--dtype",
        "--max-shard-size",
        "--vocab-size",
        "--overwrite",
        "--quiet",
    ):
        assert option in done.stdout
