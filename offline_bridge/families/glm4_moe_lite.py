"""GLM-4.7-Flash (`Glm4MoeLiteForCausalLM`): DeepSeek-V3's multi-latent attention (`families.mla`) on the GLM
MoE body, which is DeepSeek-V3's: the same tables. Its HF config lists the dense and MoE layers in
`mlp_layer_types` (transformers 5 ignores `first_k_dense_replace`, also written, as the Hub config has it).

Megatron args cannot tell it from DeepSeek-V3 (the same modules): only --model-type or --hf-config choose it.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from ..config.hf_fields import hf_value
from . import deepseek_v3, llama
from .base import Family
from .mla import mla_fields
from .moe import dense_first_experts, mtp_depth, sigmoid_moe_fields

__all__ = ["FAMILY"]


def _from_args(args: argparse.Namespace) -> dict[str, Any]:
    fields = {**mla_fields(args), **sigmoid_moe_fields(args, "GLM-4.7-Flash")}
    first, layers = fields["first_k_dense_replace"], int(args.num_layers)
    return {**fields, "mlp_layer_types": ["dense"] * first + ["sparse"] * (layers - first)}


def _experts(config: Mapping[str, Any]) -> tuple[int, frozenset[int]]:
    """MoE layers by `mlp_layer_types` (MTP layers are MoE), else by `first_k_dense_replace`."""
    types = hf_value(config, "mlp_layer_types", None)
    if types is None:
        return dense_first_experts(config)
    layers = int(hf_value(config, "num_hidden_layers"))
    moe = {i for i, kind in enumerate(types) if kind == "sparse"} | set(range(layers, layers + mtp_depth(config)))
    return int(hf_value(config, "n_routed_experts")), frozenset(moe)


FAMILY = Family(
    name="glm4_moe_lite",
    architecture="Glm4MoeLiteForCausalLM",
    model_type="glm4_moe_lite",
    head=llama.EMBEDDING,
    layer=deepseek_v3.LAYER,
    tail=llama.FINAL,
    detect=None,  # the same args as DeepSeek-V3
    mtp=deepseek_v3.MTP,
    config={"attention_bias": False},
    from_args=_from_args,
    experts=_experts,
    mtp_layers=mtp_depth,
)
