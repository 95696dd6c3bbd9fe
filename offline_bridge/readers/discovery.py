"""Find the iteration directory inside what the user passed as CKPT_DIR.

CKPT_DIR is either a save root (`latest_checkpointed_iteration.txt`, `iter_0000100/`, `release/`) or an
iteration directory itself, as Megatron-LM's training loop lays them out. Only what Megatron writes is taken:
the tracker holds `str(iteration)` or `release` (ASCII digits, read as a small regular file) and iteration
directories are named `iter_{iteration:07d}`, so `iter_00000100`, `iter_٠٠٠٠١٠٠` or `iter_²` name nothing.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import CheckpointError, OptionError
from ..files.small_files import TEXT_LIMIT, clip, quote, read_small_text

__all__ = ["find_iteration_dir", "iteration_key", "iterations_present"]

TRACKER = "latest_checkpointed_iteration.txt"
_NUMBER = re.compile(r"[0-9]{1,20}")  # ASCII only: str.isdigit() and int() also take '²' and '٣'
_LISTED = 200  # characters of the iterations present that an error lists


def iteration_key(text: str) -> str | None:
    """ "release", or the iteration number without leading zeros, for the text Megatron writes; else None."""
    text = text.strip()
    if text == "release":
        return text
    return str(int(text)) if _NUMBER.fullmatch(text) else None


def _dir_key(name: str) -> str | None:
    """The iteration an iteration directory's name stands for, if Megatron would have named it so."""
    if name == "release":
        return name
    key = iteration_key(name[5:]) if name.startswith("iter_") else None
    return key if key is not None and name == f"iter_{int(key):07d}" else None


def _iterations(root: Path) -> dict[str, Path]:
    found = {}
    for child in root.iterdir():
        key = _dir_key(child.name)
        if key is not None and child.is_dir():
            found[key] = child
    return found


def _in_order(keys: list[str] | dict[str, Path]) -> list[str]:
    return sorted(keys, key=lambda k: (k == "release", int(k) if k != "release" else 0))


def iterations_present(ckpt_dir: str | Path) -> list[str]:
    """The saved iterations of a save root, in order ("release" last); an iteration directory's own one."""
    root = Path(ckpt_dir)
    if _is_iteration_dir(root) and not (root / TRACKER).exists():
        return [_dir_key(root.name) or root.name]
    return _in_order(_iterations(root))


def _is_iteration_dir(path: Path) -> bool:
    return _dir_key(path.name) is not None or (path / ".metadata").exists() or (path / "metadata.json").exists()


def _tracked(root: Path) -> str:
    """The iteration the tracker file names; anything else in it is an error, as for Megatron."""
    tracker = root / TRACKER
    text = read_small_text(tracker, TEXT_LIMIT, "tracker file")
    key = iteration_key(text)
    if key is None:
        raise CheckpointError(
            f"{tracker}: the tracker file holds {quote(text)}, neither an iteration number nor 'release'"
        )
    return key


def find_iteration_dir(ckpt_dir: str | Path, iteration: int | str | None = None) -> Path:
    """The iteration directory to convert; ``iteration`` picks one other than the latest."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        raise CheckpointError(f"{root}: checkpoint directory does not exist")
    key = None if iteration is None else iteration_key(str(iteration))
    if iteration is not None and key is None:
        raise OptionError(f"--iteration {quote(str(iteration))}: neither an iteration number nor 'release'")
    if _is_iteration_dir(root) and not (root / TRACKER).exists():
        if key is not None:
            raise CheckpointError(f"{root} is an iteration directory; pass its save root to choose --iteration {key}")
        return root
    present = _iterations(root)
    if key is None:
        if os.path.lexists(root / TRACKER):  # a FIFO or a directory there is an error, not "no tracker"
            key = _tracked(root)
        elif present:
            key = max((k for k in present if k != "release"), key=int, default="release")
        else:
            raise CheckpointError(
                f"{root}: no {TRACKER} and no iter_* or release directory; not a Megatron save directory"
            )
    if key not in present:
        listing = clip(", ".join(_in_order(present)), _LISTED) or "none"
        raise CheckpointError(f"{root}: iteration {key} not found (iterations present: {listing})")
    return present[key]
