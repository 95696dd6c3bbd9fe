"""Running the CLI on hostile inputs: a subprocess under a memory cap (RLIMIT_AS) and a time limit, with its
exit code, its stderr lines and its peak resident memory; and forged compressed streams (real bombs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CAP = 3 << 30  # address space of the CLI under test
TIMEOUT = 30  # seconds; a FIFO opened blocking would hang forever
_RUNNER = """
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[1]), int(sys.argv[1])))
from offline_bridge.cli import main
try:
    main(sys.argv[3:], prog_name="offline-bridge")
    code = 0
except SystemExit as exc:
    code = exc.code if isinstance(exc.code, int) else 1
with open(sys.argv[2], "w") as out:
    json.dump({"code": code, "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}, out)
"""


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: list[str]
    maxrss: int  # bytes


def run_cli(*args: str | Path, cwd: Path) -> Outcome:
    """`offline-bridge ARGS` in a fresh interpreter capped at `CAP` bytes of address space."""
    report = cwd / ".outcome.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", _RUNNER, str(CAP), str(report), *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=TIMEOUT,
        check=False,
    )
    result = json.loads(report.read_text()) if report.exists() else {"code": done.returncode, "maxrss": 0}
    report.unlink(missing_ok=True)
    return Outcome(result["code"], done.stdout, done.stderr.strip().splitlines(), result["maxrss"])


def assert_refused(outcome: Outcome, *needles: str, code: int = 2) -> str:
    """Exit ``code`` with one short `error:` line on stderr that holds every needle; the line is returned."""
    assert outcome.code == code, (outcome.code, outcome.stderr, outcome.stdout[-2000:])
    assert len(outcome.stderr) == 1 and outcome.stderr[0].startswith("error: "), outcome.stderr[:5]
    line = outcome.stderr[0]
    assert len(line) < 600, f"error line of {len(line)} characters"
    for needle in needles:
        assert needle in line, (needle, line)
    return line


def zstd_rle_frame(total: int, content_size: int | None) -> bytes:
    """A zstd frame (RFC 8878) of RLE blocks that decodes to ``total`` zero bytes in about total/32768 bytes;
    its header states ``content_size`` (which may lie), or no content size at all."""
    block = 1 << 17  # Block_Maximum_Size with a 128 KiB window
    descriptor = (3 << 6) if content_size is not None else 0  # 8-byte Frame_Content_Size, or none
    header = b"\x28\xb5\x2f\xfd" + bytes([descriptor, (17 - 10) << 3])  # Window_Descriptor: 2**17
    if content_size is not None:
        header += content_size.to_bytes(8, "little")
    blocks = []
    left = total
    while left:
        size = min(block, left)
        left -= size
        blocks.append(((size << 3) | (1 << 1) | (left == 0)).to_bytes(3, "little") + b"\0")  # RLE block
    return header + b"".join(blocks)
