"""Mixtral (`MixtralForCausalLM`): Llama attention, every layer a softmax top-k mixture of SwiGLU experts.

HF names on disk: `block_sparse_moe.gate` and `block_sparse_moe.experts.{e}.w1` (gate), `w3` (up), `w2` (down).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from ..config.hf_fields import hf_value
from ..errors import CheckpointError
from ..plan.rules import Copy, GatedMLP
from . import llama
from .base import Family, flag
from .moe import check_softmax_router, moe_layer_pattern

__all__ = ["EXPERTS", "FAMILY", "MOE", "ROUTER"]

M, H = llama.M, llama.H
MOE = H + "block_sparse_moe."

ROUTER = (
    Copy.of(
        M + "mlp.router.weight",
        MOE + "gate.weight",
        expect=lambda c: (hf_value(c, "num_local_experts"), hf_value(c, "hidden_size")),
    ),
)

EXPERTS = (
    GatedMLP.of(
        M + "mlp.experts.{e}.linear_fc1.weight",
        MOE + "experts.{e}.w1.weight",
        MOE + "experts.{e}.w3.weight",
        expect=lambda c: (2 * hf_value(c, "intermediate_size"), hf_value(c, "hidden_size")),
    ),
    Copy.of(M + "mlp.experts.{e}.linear_fc2.weight", MOE + "experts.{e}.w2.weight"),
)


def _from_args(args: argparse.Namespace) -> dict[str, Any]:
    check_softmax_router(args, "Mixtral")
    if getattr(args, "moe_router_pre_softmax", False):
        raise CheckpointError("Mixtral renormalizes its top-k weights; moe_router_pre_softmax=True does not")
    if not all(moe_layer_pattern(args)):
        raise CheckpointError(
            "Mixtral has no dense layers but args.moe_layer_freq makes some; use --model-type qwen3_moe?"
        )
    return {
        "num_local_experts": int(args.num_experts),
        "num_experts_per_tok": int(args.moe_router_topk),
        "intermediate_size": int(getattr(args, "moe_ffn_hidden_size", None) or args.ffn_hidden_size),
        "output_router_logits": False,
        "router_aux_loss_coef": float(getattr(args, "moe_aux_loss_coeff", 0.0) or 0.0),
    }


def _experts(config: Mapping[str, Any]) -> tuple[int, frozenset[int]]:
    return int(hf_value(config, "num_local_experts")), frozenset(range(int(hf_value(config, "num_hidden_layers"))))


FAMILY = Family(
    name="mixtral",
    architecture="MixtralForCausalLM",
    model_type="mixtral",
    head=llama.EMBEDDING,
    layer=llama.ATTENTION + ROUTER + EXPERTS + llama.NORMS,
    tail=llama.FINAL,
    detect=lambda args: flag(args, "num_experts"),
    priority=10,
    config={"sliding_window": None},
    from_args=_from_args,
    experts=_experts,
)
