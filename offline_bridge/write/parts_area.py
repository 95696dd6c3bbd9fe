"""The parts area beside OUT_DIR (`.<OUT_DIR>.parts/`): `convert --part I/N` runs, on one machine or on many
sharing a file system, write their output files into it, and `finalize` checks them and puts them in place.

A part writes its files (each recorded once complete, `completed`), then last its part manifest
`.meta/part-I-of-N.json`: the plan's digest, its files, and what the final manifest needs (options, sources).
Part 0 also writes the side files (config.json, the index, tokenizer and quant files), listed with their
sha256. A part holds a lock of its own (`.meta/part-I.lock`, `output_lock`) while it runs; different parts
never write the same file. Our own code: the layout is ours.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, OptionError
from ..files.small_files import JSON_LIMIT, load_json
from .completed import META, record_path
from .json_file import write_json
from .out_paths import hidden_prefix, output_path, refuse_overlap, replaced, resolved
from .output_lock import OutputLock

__all__ = ["PartsArea", "area_of", "check_out_dir", "part_locks", "read_part_manifests"]

_MANIFEST = re.compile(r"part-([0-9]{1,6})-of-([0-9]{1,6})\.json", re.ASCII)
_LOCK = re.compile(r"part-[0-9]{1,6}\.lock", re.ASCII)


def area_of(out_dir: str | Path) -> tuple[Path, Path]:
    """(OUT_DIR as it will be replaced, its parts area)."""
    out = output_path(out_dir)
    return out, out.parent / f"{hidden_prefix(out)}parts"


def check_out_dir(out_dir: str | Path, overwrite: bool, inputs: Iterable[str | Path | None]) -> None:
    """What a part (or the process that starts the parts) checks before reading: OUT_DIR and its parts area
    overlap no input, and a non-empty OUT_DIR is refused now unless ``overwrite``, not after every part ran."""
    out, area = area_of(out_dir)
    sources = resolved(inputs)
    refuse_overlap(out, sources)
    refuse_overlap(area, sources)
    replaced(out, overwrite)


class PartsArea:
    """The area as one part (``index`` of ``count``) uses it, from before the checkpoint is read until its
    part manifest is written; entering checks OUT_DIR and the inputs and takes the part's lock."""

    def __init__(
        self, out_dir: str | Path, index: int, count: int, *, overwrite: bool, inputs: Iterable[str | Path | None]
    ) -> None:
        self.out, self.path = area_of(out_dir)
        self.index, self.count = index, count
        self._overwrite = overwrite
        self._inputs = list(inputs)
        self._lock = OutputLock(self.path / META / f"part-{index}.lock", self.out)

    def __enter__(self) -> PartsArea:
        check_out_dir(self.out, self._overwrite, self._inputs)
        try:
            (self.path / META).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OptionError(f"{self.path}: cannot create the parts area beside OUT_DIR ({exc.strerror})") from exc
        self._lock.acquire()
        return self

    def __exit__(self, *_: object) -> None:
        self._lock.release()

    def check_inputs(self, inputs: Iterable[str | Path | None]) -> None:
        """OUT_DIR and the area may not overlap any input (those found while reading too)."""
        check_out_dir(self.out, self._overwrite, [*self._inputs, *inputs])

    def clear(self, names: Iterable[str]) -> None:
        """Forget this part's earlier files (a run without `--resume` writes them all again)."""
        self._manifest_path().unlink(missing_ok=True)
        for name in names:
            record_path(self.path, name).unlink(missing_ok=True)
            (self.path / name).unlink(missing_ok=True)

    def write_manifest(self, body: dict[str, Any]) -> None:
        """The part manifest, written last and renamed into place: its presence means the part is complete."""
        path = self._manifest_path()
        temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        write_json(temporary, {"part": self.index, "parts": self.count, **body})
        with open(temporary, "rb") as file:
            os.fsync(file.fileno())
        temporary.rename(path)

    def _manifest_path(self) -> Path:
        return self.path / META / f"part-{self.index}-of-{self.count}.json"


def read_part_manifests(area: Path) -> list[dict[str, Any]]:
    """Every part manifest in ``area``, each checked to be of the shape `write_manifest` writes."""
    meta = area / META
    if not meta.is_dir():
        raise CheckpointError(f"{area}: no parts to finalize; run `convert ... --part I/N` for every I first")
    found = []
    for path in sorted(meta.iterdir()):
        match = _MANIFEST.fullmatch(path.name)
        if match is None:
            continue
        body = load_json(path, JSON_LIMIT, "part manifest")
        shaped = (
            isinstance(body, dict)
            and [body.get("part"), body.get("parts")] == [int(match.group(1)), int(match.group(2))]
            and isinstance(body.get("plan_sha256"), str)
            and isinstance(body.get("files"), list)
            and all(isinstance(name, str) for name in body["files"])
            and isinstance(body.get("extras"), dict)
            and isinstance(body.get("extra_digests"), dict)
            and all(_plain(name) for name in [*body["files"], *body["extras"], *body["extra_digests"]])
        )
        if not shaped:
            raise CheckpointError(f"{path}: not a part manifest offline-bridge wrote")
        found.append(body)
    return found


def _plain(name: object) -> bool:
    """A file name of the area itself: what `finalize` opens must not lie anywhere else."""
    return isinstance(name, str) and name not in ("", ".", "..", META) and not any(c in name for c in "/\\\0")


@contextlib.contextmanager
def part_locks(area: Path, out: Path) -> Iterator[None]:
    """Hold every part's lock: a part still running makes `finalize` fail at once, naming its pid."""
    locks = [OutputLock(p, out) for p in sorted((area / META).iterdir()) if _LOCK.fullmatch(p.name)]
    held = []
    try:
        for lock in locks:
            lock.acquire()
            held.append(lock)
        yield
    finally:
        for lock in held:
            lock.release()
