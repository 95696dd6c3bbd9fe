"""Find the iteration directory inside what the user passed as CKPT_DIR.

CKPT_DIR is either a save root (`latest_checkpointed_iteration.txt`, `iter_0000100/`, `release/`) or an
iteration directory itself, as Megatron-LM's training loop lays them out.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import CheckpointError

__all__ = ["find_iteration_dir", "iterations_present"]

TRACKER = "latest_checkpointed_iteration.txt"
_ITER_DIR = re.compile(r"^iter_(\d{7,})$")


def _iterations(root: Path) -> dict[str, Path]:
    found = {}
    for child in root.iterdir():
        match = _ITER_DIR.match(child.name)
        if child.is_dir() and (match or child.name == "release"):
            found[str(int(match.group(1))) if match else "release"] = child
    return found


def iterations_present(ckpt_dir: str | Path) -> list[str]:
    """The saved iterations of a save root, in order ("release" last); an iteration directory's own one."""
    root = Path(ckpt_dir)
    if _is_iteration_dir(root) and not (root / TRACKER).exists():
        match = _ITER_DIR.match(root.name)
        return [str(int(match.group(1))) if match else root.name]
    return sorted(_iterations(root), key=lambda k: (k == "release", int(k) if k.isdigit() else 0))


def _is_iteration_dir(path: Path) -> bool:
    return (
        bool(_ITER_DIR.match(path.name))
        or path.name == "release"
        or (path / ".metadata").exists()
        or (path / "metadata.json").exists()
    )


def find_iteration_dir(ckpt_dir: str | Path, iteration: int | str | None = None) -> Path:
    """The iteration directory to convert; ``iteration`` picks one other than the latest."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        raise CheckpointError(f"{root}: checkpoint directory does not exist")
    if _is_iteration_dir(root) and not (root / TRACKER).exists():
        if iteration is not None:
            raise CheckpointError(
                f"{root} is an iteration directory; pass its save root to choose --iteration {iteration}"
            )
        return root
    present = _iterations(root)
    if iteration is None:
        tracker = root / TRACKER
        if tracker.is_file():
            iteration = tracker.read_text().strip()
        elif present:
            iteration = max((k for k in present if k != "release"), key=int, default="release")
        else:
            raise CheckpointError(
                f"{root}: no {TRACKER} and no iter_* or release directory; not a Megatron save directory"
            )
    key = str(iteration).strip()
    key = str(int(key)) if key.isdigit() else key
    if key not in present:
        listing = ", ".join(sorted(present, key=lambda k: (k == "release", int(k) if k.isdigit() else 0))) or "none"
        raise CheckpointError(f"{root}: iteration {iteration} not found (iterations present: {listing})")
    return present[key]
