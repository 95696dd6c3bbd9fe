"""Llama (`LlamaForCausalLM`): the dense GPT table the other dense families extend.

Megatron names are the TE-fused ones the checkpoint holds; the separate-norm names of the local spec
(`input_layernorm`, `pre_mlp_layernorm`) are listed as aliases.
"""

from __future__ import annotations

from ..plan.rules import QKV, Copy, GatedMLP, VocabRows, untied
from .base import Family, flag

__all__ = ["ATTENTION", "EMBEDDING", "FAMILY", "FINAL", "MLP", "NORMS", "H", "M"]

M = "decoder.layers.{i}."  # Megatron layer prefix
H = "model.layers.{i}."  # HF layer prefix

EMBEDDING = (VocabRows.of("embedding.word_embeddings.weight", "model.embed_tokens.weight"),)

ATTENTION = (
    QKV.of(
        M + "self_attention.linear_qkv.weight",
        H + "self_attn.q_proj.weight",
        H + "self_attn.k_proj.weight",
        H + "self_attn.v_proj.weight",
    ),
    Copy.of(M + "self_attention.linear_proj.weight", H + "self_attn.o_proj.weight"),
)

MLP = (
    GatedMLP.of(M + "mlp.linear_fc1.weight", H + "mlp.gate_proj.weight", H + "mlp.up_proj.weight"),
    Copy.of(M + "mlp.linear_fc2.weight", H + "mlp.down_proj.weight"),
)

NORMS = (
    Copy.of(
        (M + "self_attention.linear_qkv.layer_norm_weight", M + "input_layernorm.weight"), H + "input_layernorm.weight"
    ),
    Copy.of(
        (M + "mlp.linear_fc1.layer_norm_weight", M + "pre_mlp_layernorm.weight"), H + "post_attention_layernorm.weight"
    ),
)

FINAL = (
    Copy.of("decoder.final_layernorm.weight", "model.norm.weight"),
    VocabRows.of("output_layer.weight", "lm_head.weight", when=untied),
)

FAMILY = Family(
    name="llama",
    architecture="LlamaForCausalLM",
    model_type="llama",
    head=EMBEDDING,
    layer=ATTENTION + MLP + NORMS,
    tail=FINAL,
    detect=lambda args: (
        not flag(args, "qk_layernorm") and not flag(args, "add_qkv_bias") and not flag(args, "num_experts")
    ),
    config={"attention_bias": False, "mlp_bias": False},
)
