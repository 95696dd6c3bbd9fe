"""What a legacy `torch` checkpoint's rank-local names mean globally: the torch_dist key of a local key (layer
and expert offsets), the model dicts of a file, and how each tensor's TP shards join."""

from __future__ import annotations

import re

from ..errors import CheckpointError

__all__ = ["LAYER", "TP_RULES", "chunk_layers", "global_key", "models_of", "tp_join"]

LAYER = re.compile(r"^(decoder\.layers\.)(\d+)\.(.*)$")
_LOCAL_EXPERT = re.compile(r"^(mlp\.experts\.)local_experts\.(\d+)\.(.*)$")
_GROUPED_EXPERT = re.compile(r"^(mlp\.experts\.)(linear_fc[12]\.(?:weight|bias))(\d+)$")

# How tensor-parallel shards join, by the end of the key: 0 = rows (column-parallel), 1 = columns
# (row-parallel), "gated" = rows of per-rank [gate_r; up_r] halves, kept rank-major and reported as the
# `rank_major_gated` row order (undone by the plan like every TP order). Anything else is replicated.
TP_RULES: tuple[tuple[str, int | str], ...] = (
    ("linear_qkv.weight", 0),
    ("linear_qkv.bias", 0),
    ("linear_fc1.weight", "gated"),
    ("linear_fc1.bias", "gated"),
    ("word_embeddings.weight", 0),
    ("output_layer.weight", 0),
    ("linear_q_proj.weight", 0),
    ("linear_q_up_proj.weight", 0),
    ("linear_kv_up_proj.weight", 0),
    ("eh_proj.weight", 0),
    ("linear_proj.weight", 1),
    ("linear_fc2.weight", 1),
    # ModelOpt per-channel weight amax [rows, 1] of column-parallel linears; fc1's stays rank-major
    # [gate_0; up_0; gate_1; ...], as torch_dist holds it (see formats/quant.md). Scalars are replicated.
    ("linear_qkv.weight_quantizer._amax", 0),
    ("linear_fc1.weight_quantizer._amax", 0),
    # Gated DeltaNet: in_proj and conv1d stay fused, rank-major (the GDN rules regroup them by the args' TP)
    ("in_proj.weight", 0),
    ("conv1d.weight", 0),
    ("A_log", 0),
    ("dt_bias", 0),
    # Mamba-2 mixers (MambaModel): also the conv bias, D and the gated norm, sharded by heads / groups
    ("conv1d.bias", 0),
    ("mixer.D", 0),
    ("mixer.norm.weight", 0),
    ("out_proj.weight", 1),
)


def tp_join(key: str) -> int | str | None:
    """How ``key``'s TP shards join by `TP_RULES` (0 rows, 1 columns, "gated"), None if replicated."""
    return next((rule for suffix, rule in TP_RULES if key.endswith(suffix)), None)


def models_of(state: dict, source: str) -> list[tuple[str, dict]]:
    """The model dicts of one file: `model`, or `model0`, `model1`, ... with virtual pipelining."""
    models = sorted((k, v) for k, v in state.items() if re.fullmatch(r"model\d*", k) and isinstance(v, dict))
    if not models:
        raise CheckpointError(f"{source}: no 'model' entry")
    return models


def global_key(name: str, layer_offset: int, ep: int, per_ep: int) -> tuple[str, bool]:
    """A local key as the torch_dist per-layer key, and whether it is an expert's tensor."""
    match = LAYER.match(name)
    if not match:
        return name, False
    prefix, local, sub = match.groups()
    expert = _LOCAL_EXPERT.match(sub) or _GROUPED_EXPERT.match(sub)
    if expert:
        head, a, b = expert.groups()
        local_expert, rest = (int(a), b) if expert.re is _LOCAL_EXPERT else (int(b), a)
        sub = f"{head}{ep * per_ep + local_expert}.{rest}"
    return f"{prefix}{layer_offset + int(local)}.{sub}", bool(expert)


def chunk_layers(files: list[tuple[str, int, dict]]) -> dict[tuple[int, int], int]:
    """(vp, pp) → how many layers that chunk holds (local numbers 0..n-1), from (source, pp rank, state) per
    rank file; every rank of a stage must hold as many."""
    found: dict[tuple[int, int], int] = {}
    for source, pp, state in files:
        for model, chunk_state in models_of(state, source):
            layers = {int(m.group(2)) for name in chunk_state if (m := LAYER.match(name))}
            count, chunk = max(layers) + 1 if layers else 0, (int(model[5:] or 0), pp)
            if found.setdefault(chunk, count) != count:
                raise CheckpointError(
                    f"{source}: {count} layers in {model}, other ranks of stage {pp} have {found[chunk]}"
                )
    return found
