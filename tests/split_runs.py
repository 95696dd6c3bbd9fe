"""What the tests of one conversion written in pieces share (`--part`, `--resume`, `--ray`): the bundled example
cut into 9 files, and a directory's files as bytes, compared with a plain run's."""

from __future__ import annotations

from pathlib import Path

from conftest import ROOT

__all__ = ["EXAMPLE", "SHARD", "tree"]

EXAMPLE = ROOT / "examples" / "tiny-llama"
SHARD = "40KB"  # the example's 296 KB in 9 files


def tree(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}
