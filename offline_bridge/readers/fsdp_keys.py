"""Megatron-FSDP `fsdp_dtensor` key names as the torch_dist per-layer keys the family tables read.

What megatron-core's `transformer/fsdp_dtensor_checkpoint.py` and Megatron-LM's
`tools/checkpoint/checkpoint_inspector.py` write (see formats/fsdp_dtensor.md): the wrapped model's own
`state_dict()` under `model.module.` (layers numbered globally, never stacked), TE grouped experts by global
id as `mlp.experts.linear_fc1.weight{e}` (sequential ones as `local_experts.{e}.`), the SwiGLU fc1 split
into `<key>_w` (gate) and `<key>_v` (up) and, before core restored the old name, the MTP block's layer as
`mtp_model_layer`. Anything outside `model.` (optimizer state, rng state, args) is not a model tensor.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from ..errors import CheckpointError

__all__ = ["present_keys"]

_WRAPPED = re.compile(r"^model\.(?:module\.)*")
_GROUPED_EXPERT = re.compile(r"\.mlp\.experts\.linear_fc([12])\.(weight|bias)(\d+)(_w|_v)?$")
_SEQUENTIAL_EXPERT = re.compile(r"\.mlp\.experts\.local_experts\.(\d+)\.")
_MTP_INNER = re.compile(r"^(mtp\.layers\.\d+\.)mtp_model_layer\.")


def _present(stored: str) -> str | None:
    """The torch_dist per-layer key of a stored model key; optimizer state as it is (never read, but
    `inspect` counts it); None for anything else."""
    if stored.startswith("optimizer."):
        return stored
    wrapped = _WRAPPED.match(stored)
    if wrapped is None or wrapped.end() == len(stored):
        return None
    key = stored[wrapped.end() :]
    key = _GROUPED_EXPERT.sub(lambda m: f".mlp.experts.{m[3]}.linear_fc{m[1]}.{m[2]}{m[4] or ''}", key)
    key = _SEQUENTIAL_EXPERT.sub(r".mlp.experts.\1.", key)
    return _MTP_INNER.sub(r"\1transformer_layer.", key)


def present_keys(stored_keys: Iterable[str], source: str) -> dict[str, str]:
    """Presented key → stored key for every model tensor; two stored keys naming one tensor are refused."""
    found: dict[str, str] = {}
    for stored in stored_keys:
        key = _present(stored)
        if key is None:
            continue
        if key in found:
            raise CheckpointError(f"{source}: tensors {found[key]!r} and {stored!r} are both {key!r}")
        found[key] = stored
    return found
