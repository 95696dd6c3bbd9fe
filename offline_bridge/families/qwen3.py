"""Qwen3 (`Qwen3ForCausalLM`): Llama plus per-head RMSNorms on q and k (Megatron `qk_layernorm`)."""

from __future__ import annotations

from ..plan.rules import Copy
from . import llama
from .base import Family, flag

__all__ = ["FAMILY", "QK_NORMS"]

M, H = llama.M, llama.H

QK_NORMS = (
    Copy.of(M + "self_attention.q_layernorm.weight", H + "self_attn.q_norm.weight"),
    Copy.of(M + "self_attention.k_layernorm.weight", H + "self_attn.k_norm.weight"),
)

FAMILY = Family(
    name="qwen3",
    architecture="Qwen3ForCausalLM",
    model_type="qwen3",
    head=llama.EMBEDDING,
    layer=llama.ATTENTION + QK_NORMS + llama.GATED_MLP + llama.NORMS,
    tail=llama.FINAL,
    detect=lambda args: flag(args, "qk_layernorm"),
    priority=10,
    config={"attention_bias": False, "use_sliding_window": False},
)
