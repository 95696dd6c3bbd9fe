"""What the MoE families share: which layers are MoE, and the router settings an HF model can express."""

from __future__ import annotations

import argparse

from ..errors import CheckpointError

__all__ = ["check_softmax_router", "moe_layer_pattern"]


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
