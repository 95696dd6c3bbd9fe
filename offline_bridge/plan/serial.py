"""A plan as JSON and back (the multi-node work ships plan parts to other machines): every plan item is a
frozen dataclass of plain data, written as an object tagged with its class. Tuples come back as tuples,
header bytes as base64; the HF config inside `Dims` is kept as the JSON it came from.

Our own code: `json` with a tagged encoding, since no library knows these classes and the round trip must
give an equal plan (``==``), which pickle-free libraries (dataclasses-json, pydantic) would need schemas for.
"""

from __future__ import annotations

import base64
import json
from dataclasses import fields, is_dataclass
from typing import Any

from ..dtypes import DTYPES, DType
from ..errors import CheckpointError
from ..readers.base import RowOrder
from .rules.dims import Dims
from .schema import Delta, FilePlan, Lora, Plan, RuleRef, Source, Step, Target

__all__ = ["plan_from_json", "plan_to_json"]

_CLASSES = {cls.__name__: cls for cls in (Delta, Dims, FilePlan, Lora, Plan, RowOrder, RuleRef, Source, Step, Target)}
_DTYPES = {dtype.torch_name: dtype for dtype in DTYPES}
_RAW = ("config",)  # fields kept as plain JSON (lists stay lists)


def _encode(value: Any) -> Any:
    if isinstance(value, DType):
        return {"dtype": value.torch_name}
    if is_dataclass(value):
        body = {f.name: getattr(value, f.name) for f in fields(value)}
        return {"class": type(value).__name__, **{k: v if k in _RAW else _encode(v) for k, v in body.items()}}
    if isinstance(value, bytes):
        return {"bytes": base64.b64encode(value).decode()}
    if isinstance(value, frozenset):
        return {"set": sorted(_encode(v) for v in value)}
    if isinstance(value, (tuple, list)):
        return [_encode(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"a plan holds {type(value).__name__}, which is not plan data")


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_decode(v) for v in value)
    if not isinstance(value, dict):
        return value
    if "class" in value:
        cls = _CLASSES[value["class"]]
        return cls(**{k: v if k in _RAW else _decode(v) for k, v in value.items() if k != "class"})
    if "dtype" in value:
        return _DTYPES[value["dtype"]]
    if "bytes" in value:
        return base64.b64decode(value["bytes"])
    return frozenset(_decode(v) for v in value["set"])


def plan_to_json(plan: Plan) -> str:
    return json.dumps(_encode(plan), separators=(",", ":"))


def plan_from_json(text: str) -> Plan:
    """The plan `plan_to_json` wrote; a text that is not one raises `CheckpointError`."""
    try:
        plan = _decode(json.loads(text))
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"not a serialised plan: {exc}") from exc
    if not isinstance(plan, Plan):
        raise CheckpointError("not a serialised plan: the top level is no Plan")
    return plan
