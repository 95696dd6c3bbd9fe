"""`metadata.json`, the marker Megatron's dist-checkpointing writes last into an iteration directory.

It says which backend saved the sharded tensors (`{"sharded_backend": "zarr", "sharded_backend_version": 1,
...}`, about 130 bytes). Read once, through `small_files` (a regular file of at most `TEXT_LIMIT` bytes),
by `open_reader` to choose a reader and by the zarr reader to confirm it was chosen rightly.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from ..files.small_files import TEXT_LIMIT, load_json

__all__ = ["MARKER", "read_marker"]

MARKER = "metadata.json"


def read_marker(iteration_dir: Path) -> dict[str, Any] | None:
    """The marker's JSON object; None when the directory has none (a FIFO or a directory there is an error)."""
    file = iteration_dir / MARKER
    if not os.path.lexists(file):
        return None
    marker = load_json(file, TEXT_LIMIT, "dist-checkpointing marker")
    if not isinstance(marker, dict):
        raise CheckpointError(f"{file}: the dist-checkpointing marker is not a JSON object")
    return marker
