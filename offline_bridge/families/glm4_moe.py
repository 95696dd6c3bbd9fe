"""GLM-4.5 / 4.6 / 4.7 (`Glm4MoeForCausalLM`): grouped-query attention with q/k/v biases and optional per-head
q/k norms (`use_qk_norm`), partial RoPE (`partial_rotary_factor`: the rotated half of each head keeps
Megatron's layout, so no permutation), and DeepSeek-V3's MoE body: sigmoid router with its score bias, shared
experts, `first_k_dense_replace` dense layers and MTP layers written as `model.layers.{num_layers + k}`.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..config.hf_fields import hf_value
from ..plan.rules import Dims, only
from . import deepseek_v3, llama, qwen2, qwen3
from .base import Family, flag
from .decoder import Decoder
from .moe import dense_first_experts, mtp_depth, sigmoid_moe_fields

__all__ = ["FAMILY", "attention_bias", "qk_norm"]


def attention_bias(dims: Dims, layer: int | None) -> bool:
    """q/k/v have biases (HF `attention_bias`, Megatron `add_qkv_bias`)."""
    return bool(hf_value(dims.config, "attention_bias", False))


def qk_norm(dims: Dims, layer: int | None) -> bool:
    """Per-head RMSNorms on q and k (HF `use_qk_norm`, Megatron `qk_layernorm`)."""
    return bool(hf_value(dims.config, "use_qk_norm", False))


LAYER = llama.ATTENTION + only(attention_bias, qwen2.QKV_BIAS) + only(qk_norm, qwen3.QK_NORMS) + deepseek_v3.MOE_BODY


def _from_args(args: argparse.Namespace) -> dict[str, Any]:
    return {
        **sigmoid_moe_fields(args, "GLM-4.5"),
        "attention_bias": flag(args, "add_qkv_bias"),
        "use_qk_norm": flag(args, "qk_layernorm"),
        "partial_rotary_factor": float(getattr(args, "rotary_percent", 1.0)),  # also in rope_parameters
    }


FAMILY = Family(
    name="glm4_moe",
    architecture="Glm4MoeForCausalLM",
    model_type="glm4_moe",
    head=llama.EMBEDDING,
    layer=LAYER,
    tail=llama.FINAL,
    # experts behind a sigmoid router without MLA; DeepSeek-V3 (MLA, 30) and Qwen3-Next (40) outrank it
    detect=lambda args: flag(args, "num_experts") and getattr(args, "moe_router_score_function", None) == "sigmoid",
    priority=25,  # refines Qwen3-MoE (q/k norms, 20) and Mixtral (experts, 10)
    mtp=deepseek_v3.mtp_block(LAYER),
    from_args=_from_args,
    experts=dense_first_experts,
    mtp_layers=mtp_depth,
    decoder=Decoder(partial_rotary=True),
)
