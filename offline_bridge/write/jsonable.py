"""Values from a checkpoint (args, ModelOpt state, inspect's findings) as JSON: one conversion for the
manifest, `hf_quant_config.json` and `inspect --json`, whose text does not depend on set order or identity.

Our own because `json.dumps(default=...)` cannot change what it does with keys, sets, bytes or NaN.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping
from typing import Any

__all__ = ["jsonable"]


def jsonable(value: Any) -> Any:
    """``value`` made of JSON types: keys as strings, tuples as lists, sets as sorted lists, bytes decoded (bad
    bytes escaped), non-finite floats and unknown objects by their text, objects with attributes (an
    `argparse.Namespace`) as ``{"type": ..., **attributes}``."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        return {_key(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((jsonable(v) for v in value), key=repr)
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "backslashreplace")
    if isinstance(value, argparse.Namespace) or hasattr(value, "__dict__"):
        return {"type": type(value).__name__, **jsonable(vars(value))}
    return repr(value)


def _key(key: object) -> str:
    safe = jsonable(key)
    return safe if isinstance(safe, str) else json.dumps(safe)
