"""Llama (`LlamaForCausalLM`): the dense GPT table the other dense families extend.

Megatron names are the TE-fused ones the checkpoint holds; the separate-norm names of the local spec
(`input_layernorm`, `pre_mlp_layernorm`) are listed as aliases.
"""

from __future__ import annotations

from ..plan.rules import QKV, Copy, GatedMLP, VocabRows, untied
from .base import Family

__all__ = [
    "ATTENTION",
    "EMBEDDING",
    "FAMILY",
    "FINAL",
    "FINAL_NORM",
    "GATED_MLP",
    "INPUT_NORM",
    "NORMS",
    "OUTPUT_LAYER",
    "PRE_MLP_NORM",
    "H",
    "M",
]

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

GATED_MLP = (
    GatedMLP.of(M + "mlp.linear_fc1.weight", H + "mlp.gate_proj.weight", H + "mlp.up_proj.weight"),
    Copy.of(M + "mlp.linear_fc2.weight", H + "mlp.down_proj.weight"),
)

INPUT_NORM = Copy.of(
    (M + "self_attention.linear_qkv.layer_norm_weight", M + "input_layernorm.weight"), H + "input_layernorm.weight"
)
PRE_MLP_NORM = Copy.of(
    (M + "mlp.linear_fc1.layer_norm_weight", M + "pre_mlp_layernorm.weight"), H + "post_attention_layernorm.weight"
)
NORMS = (INPUT_NORM, PRE_MLP_NORM)

FINAL_NORM = Copy.of("decoder.final_layernorm.weight", "model.norm.weight")
OUTPUT_LAYER = VocabRows.of("output_layer.weight", "lm_head.weight", when=untied)
FINAL = (FINAL_NORM, OUTPUT_LAYER)

FAMILY = Family(
    name="llama",
    architecture="LlamaForCausalLM",
    model_type="llama",
    head=EMBEDDING,
    layer=ATTENTION + GATED_MLP + NORMS,
    tail=FINAL,
    detect=lambda args: True,  # the plain decoder: any args, unless a more specific family matches
    priority=0,
    config={"attention_bias": False, "mlp_bias": False},
)
