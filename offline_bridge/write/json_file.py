"""JSON side files (index, config, manifest) written byte for byte as transformers writes them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["write_json"]


def write_json(path: Path, data: Any) -> None:
    """JSON as transformers writes it: sorted keys, two-space indent, trailing newline."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
