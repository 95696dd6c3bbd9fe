"""A plan cut into parts that separate processes or machines write (`convert --part I/N`): every output file is
an independent unit, so a part is a set of whole files. The cut depends only on the plan, so every machine
computes the same one; `plan_digest` tells the parts of one plan from another's."""

from __future__ import annotations

import hashlib
import re

from ..errors import OptionError
from .schema import Plan
from .serial import plan_to_json

__all__ = ["parse_part", "plan_digest", "split_files"]

_PART = re.compile(r"([0-9]{1,6})/([0-9]{1,6})", re.ASCII)


def parse_part(text: str) -> tuple[int, int]:
    """``I/N`` (0 <= I < N: the index a SLURM array or a Kubernetes indexed job hands out) as (I, N)."""
    match = _PART.fullmatch(text)
    if match is None or not int(match.group(1)) < int(match.group(2)):
        raise OptionError(f"--part must be I/N with 0 <= I < N (e.g. 0/4 ... 3/4), got {text[:40]!r}")
    return int(match.group(1)), int(match.group(2))


def split_files(plan: Plan, count: int) -> tuple[tuple[str, ...], ...]:
    """The output files in ``count`` parts of about equal bytes, in file order: part k takes the files whose
    first byte lies in the k-th ``count``-th of all bytes (a part may be empty when files are few and large)."""
    total = sum(file.size for file in plan.files)
    parts: list[list[str]] = [[] for _ in range(count)]
    start = 0
    for file in plan.files:
        parts[min(count - 1, start * count // total) if total else 0].append(file.name)
        start += file.size
    return tuple(tuple(names) for names in parts)


def plan_digest(plan: Plan) -> str:
    """sha256 of the plan as JSON: equal on every machine for the same checkpoint and options."""
    return hashlib.sha256(plan_to_json(plan).encode()).hexdigest()
