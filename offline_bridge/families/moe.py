"""What the MoE families share: which layers are MoE, and the router settings an HF model can express
(softmax top-k routers; DeepSeek-V3's sigmoid router with score bias, shared experts, dense first layers
and MTP layers, which GLM-4.5 and GLM-4.7-Flash reuse)."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from ..config.hf_fields import hf_value
from ..errors import CheckpointError

__all__ = ["check_softmax_router", "dense_first_experts", "moe_layer_pattern", "mtp_depth", "sigmoid_moe_fields"]


def moe_layer_pattern(args: argparse.Namespace) -> list[bool]:
    """Megatron's `moe_layer_freq`: an int k (every k-th layer, from layer 0) or a 0/1 list per layer."""
    num_layers = int(args.num_layers)
    freq = getattr(args, "moe_layer_freq", 1) or 1
    if isinstance(freq, str):  # Megatron-LM also accepts a Python list expression, e.g. "[0]+[1]*3"
        raise CheckpointError(f"args.moe_layer_freq is the unevaluated string {freq!r}; pass --hf-config")
    pattern = (
        [bool(x) for x in freq] if isinstance(freq, (list, tuple)) else [i % int(freq) == 0 for i in range(num_layers)]
    )
    if len(pattern) != num_layers:
        raise CheckpointError(f"args.moe_layer_freq has {len(pattern)} entries but num_layers={num_layers}")
    return pattern


def check_softmax_router(args: argparse.Namespace, family: str) -> None:
    """Softmax top-k routers (Qwen3-MoE, Mixtral) have no expert bias, groups or scaling factor."""
    problems = []
    if getattr(args, "moe_router_score_function", "softmax") != "softmax":
        problems.append(f"moe_router_score_function={args.moe_router_score_function}")
    for name in ("moe_router_enable_expert_bias", "moe_router_num_groups"):
        if getattr(args, name, None):
            problems.append(f"{name}={getattr(args, name)}")
    if getattr(args, "moe_router_topk_scaling_factor", None) not in (None, 1, 1.0):
        problems.append(f"moe_router_topk_scaling_factor={args.moe_router_topk_scaling_factor}")
    if problems:
        raise CheckpointError(f"{family} routers cannot express {', '.join(problems)}; this is not a {family} model")


def _first_k_dense(args: argparse.Namespace, family: str) -> int:
    pattern = moe_layer_pattern(args)
    k = pattern.index(True) if True in pattern else len(pattern)
    if not all(pattern[k:]):
        raise CheckpointError(f"{family} has dense layers only first; args.moe_layer_freq gives {pattern}")
    return k


def sigmoid_moe_fields(args: argparse.Namespace, family: str) -> dict[str, Any]:
    """The HF config fields of a DeepSeek-V3-style MoE (`n_routed_experts`, `first_k_dense_replace`, ...)."""
    problems = []
    if getattr(args, "moe_router_score_function", None) != "sigmoid":
        problems.append(f"moe_router_score_function={getattr(args, 'moe_router_score_function', None)} (need sigmoid)")
    groups, group_topk = getattr(args, "moe_router_num_groups", None), getattr(args, "moe_router_group_topk", None)
    if groups and groups > 1 and int(args.moe_router_topk) // int(group_topk or 1) != 2:
        problems.append(  # Megatron scores a group by its top topk // group_topk experts, HF by its top 2
            f"group routing with moe_router_topk={args.moe_router_topk} // moe_router_group_topk={group_topk} != 2"
        )
    if problems:
        raise CheckpointError(f"{family} cannot express " + "; ".join(problems))
    moe_ffn = int(args.moe_ffn_hidden_size)
    shared = int(getattr(args, "moe_shared_expert_intermediate_size", None) or 0)
    if shared % moe_ffn:
        raise CheckpointError(
            f"moe_shared_expert_intermediate_size={shared} is not a multiple of moe_ffn_hidden_size={moe_ffn}"
        )
    return {
        "n_routed_experts": int(args.num_experts),
        "num_experts_per_tok": int(args.moe_router_topk),
        "moe_intermediate_size": moe_ffn,
        "n_shared_experts": shared // moe_ffn,
        "routed_scaling_factor": float(getattr(args, "moe_router_topk_scaling_factor", None) or 1.0),
        "n_group": int(getattr(args, "moe_router_num_groups", None) or 1),
        "topk_group": int(getattr(args, "moe_router_group_topk", None) or 1),
        "norm_topk_prob": True,  # Megatron renormalizes sigmoid top-k scores
        "first_k_dense_replace": _first_k_dense(args, family),
        "num_nextn_predict_layers": int(getattr(args, "mtp_num_layers", None) or 0),
    }


def mtp_depth(config: Mapping[str, Any]) -> int:
    """MTP layers the HF config describes (`num_nextn_predict_layers` or an alias)."""
    return int(hf_value(config, "num_nextn_predict_layers", 0) or 0)


def dense_first_experts(config: Mapping[str, Any]) -> tuple[int, frozenset[int]]:
    """(experts, MoE layers) of a model whose first `first_k_dense_replace` layers are dense (MTP layers MoE)."""
    first = int(hf_value(config, "first_k_dense_replace", None) or 0)
    return int(hf_value(config, "n_routed_experts")), frozenset(
        range(first, int(hf_value(config, "num_hidden_layers")) + mtp_depth(config))
    )
