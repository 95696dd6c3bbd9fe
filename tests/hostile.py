"""Running the CLI on hostile inputs, each run in its own process under a memory cap (RLIMIT_AS) and a time
limit, with its exit code, its output and its peak resident memory; and forged compressed streams (bombs).

A server process imports the CLI once and forks a child per run (0.3 s of imports saved per case, so a
hundred cases stay within the test budget); the child sets the cap, runs `main` with stdout and stderr in
files and reports; the server kills it at the time limit (a FIFO opened blocking would hang forever).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CAP = 3 << 30  # address space of the CLI under test
TIMEOUT = 30  # seconds
_SERVER = """
import json, os, resource, signal, sys, time
from offline_bridge.commands.cli import main

def run(request):
    resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[1]), int(sys.argv[1])))
    os.chdir(request["cwd"])
    for fd, name in ((1, "stdout"), (2, "stderr")):
        os.dup2(os.open(request[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    try:
        main(request["args"], prog_name="offline-bridge")
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    sys.stdout.flush()
    sys.stderr.flush()
    with open(request["report"], "w") as out:
        json.dump({"code": code, "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}, out)

for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        try:
            run(request)
        finally:
            os._exit(0)
    deadline, status = time.monotonic() + request["timeout"], None
    while status is None:
        done, code = os.waitpid(pid, os.WNOHANG)
        if done:
            status = os.waitstatus_to_exitcode(code)
        elif time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            status = "timeout"
        else:
            time.sleep(0.005)
    print(json.dumps(status), flush=True)
"""
_server: list[subprocess.Popen] = []


@dataclass
class Outcome:
    code: int | str  # "timeout" when killed at the time limit
    stdout: str
    stderr: list[str]
    maxrss: int  # bytes


def _serve() -> subprocess.Popen:
    if not _server or _server[0].poll() is not None:
        env = {**os.environ, "PYTHONPATH": str(REPO), "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
        server = subprocess.Popen(
            [sys.executable, "-c", _SERVER, str(CAP)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        atexit.register(server.kill)
        _server[:] = [server]
    return _server[0]


def run_cli(*args: str | Path, cwd: Path) -> Outcome:
    """`offline-bridge ARGS` in a process of its own, capped at `CAP` bytes of address space."""
    files = {name: cwd / f".{name}" for name in ("stdout", "stderr", "report")}
    request = {
        "args": [str(a) for a in args],
        "cwd": str(cwd),
        "timeout": TIMEOUT,
        **{k: str(v) for k, v in files.items()},
    }
    server = _serve()
    assert server.stdin is not None and server.stdout is not None
    server.stdin.write(json.dumps(request) + "\n")
    server.stdin.flush()
    status = json.loads(server.stdout.readline())
    result = json.loads(files["report"].read_text()) if files["report"].exists() else {"code": status, "maxrss": 0}
    text = {name: files[name].read_text(errors="replace") for name in ("stdout", "stderr")}
    for file in files.values():
        file.unlink(missing_ok=True)
    return Outcome(result["code"], text["stdout"], text["stderr"].strip().splitlines(), result["maxrss"])


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


GIANT = 300 * 10**9  # a sparse file's claimed size: holds nothing, would take minutes to read


def make_special(path: Path, kind: str) -> None:
    """Put a FIFO, a link to /dev/zero, a directory or a 300 GB sparse file at ``path``."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev-zero":
        path.symlink_to("/dev/zero")
    elif kind == "directory":
        path.mkdir()
    else:
        path.touch()
        os.truncate(path, GIANT)
