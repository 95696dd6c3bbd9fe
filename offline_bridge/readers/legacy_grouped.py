"""megatron-core's non-TE `GroupedMLP` (`--moe-grouped-gemm` with the local spec; removed in core 0.17) in legacy
rank files: every local expert of a layer in two tensors, cut by expert TP like the per-expert linears.

- ``mlp.experts.weight1`` ``[H, E_local·2I/etp]``: the module views its storage as ``[E_local, H, 2I/etp]``
  (a reinterpretation of the flat bytes, not a column split), so expert ``j``'s fc1 is the transpose of the
  j-th ``H·2I/etp`` block: its rank-local `[gate_t; up_t]` rows, as a per-expert `linear_fc1.weight` shard;
- ``mlp.experts.weight2`` ``[E_local·I/etp, H]``, viewed as ``[E_local, I/etp, H]``: expert ``j``'s fc2 shard
  is the transpose of rows ``j·I/etp ...``.

(`GroupedMLP.forward` and `sharded_state_dict`, core 0.16.) Each expert is served under the key a SequentialMLP
save spells (`mlp.experts.local_experts.{j}.linear_fc{1,2}.weight`), so the rest of the reader is shared.
"""

from __future__ import annotations

import re

import numpy as np

from ..errors import CheckpointError

__all__ = ["expert_shape", "expert_view", "grouped_experts"]

_GROUPED = re.compile(r"^(decoder\.layers\.\d+\.mlp\.experts\.)weight([12])$")


def grouped_experts(name: str, local_experts: int) -> list[tuple[str, int, int]]:
    """For a GroupedMLP tensor, each expert's (SequentialMLP-style name, which weight 1 or 2, local index);
    [] for any other tensor."""
    match = _GROUPED.match(name)
    if not match:
        return []
    head, which = match.group(1), int(match.group(2))
    return [(f"{head}local_experts.{j}.linear_fc{which}.weight", which, j) for j in range(local_experts)]


def expert_shape(shape: tuple[int, ...], which: int, local_experts: int, source: str, name: str) -> tuple[int, int]:
    """The shape of one expert's linear weight cut out of a GroupedMLP tensor of ``shape``."""
    axis = 1 if which == 1 else 0
    if len(shape) != 2 or not local_experts or shape[axis] % local_experts:
        raise CheckpointError(
            f"{source}: {name} is {list(shape)}, which does not hold {local_experts} experts (args.num_experts / EP)"
        )
    return (shape[1] // local_experts, shape[0]) if which == 1 else (shape[1], shape[0] // local_experts)


def expert_view(array: np.ndarray, which: int, index: int, local_experts: int) -> np.ndarray:
    """Expert ``index``'s linear weight (``[out, in]``) out of a GroupedMLP tensor, as GroupedMLP views it."""
    flat = np.ascontiguousarray(array)
    if which == 1:
        return flat.reshape(local_experts, array.shape[0], -1)[index].T
    return flat.reshape(local_experts, -1, array.shape[1])[index].T
