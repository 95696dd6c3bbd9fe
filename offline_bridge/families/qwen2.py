"""Qwen2 (`Qwen2ForCausalLM`): Llama plus biases on q, k and v (Megatron `add_qkv_bias`)."""

from __future__ import annotations

from ..plan.rules import QKV
from . import llama
from .base import Family, flag

__all__ = ["FAMILY", "QKV_BIAS"]

M, H = llama.M, llama.H

QKV_BIAS = (
    QKV.of(
        M + "self_attention.linear_qkv.bias",
        H + "self_attn.q_proj.bias",
        H + "self_attn.k_proj.bias",
        H + "self_attn.v_proj.bias",
    ),
)

FAMILY = Family(
    name="qwen2",
    architecture="Qwen2ForCausalLM",
    model_type="qwen2",
    head=llama.EMBEDDING,
    layer=llama.ATTENTION + QKV_BIAS + llama.GATED_MLP + llama.NORMS,
    tail=llama.FINAL,
    detect=lambda args: flag(args, "add_qkv_bias"),
    priority=10,
    config={"use_sliding_window": False},
)
