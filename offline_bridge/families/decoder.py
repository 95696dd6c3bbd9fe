"""A family's config hooks: which Megatron settings its HF class can express (norm, activation, rotary
embedding, biases, zero-centred norms, rope scaling) and the HF config fields it writes for them.

Every family today is an RMSNorm / SwiGLU / RoPE decoder, so `Decoder()` describes it; a family that
computes something else passes its own `Decoder` (or a subclass overriding `problems` / `fields`).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

__all__ = ["Decoder", "zero_centred_gamma"]


def zero_centred_gamma(args: argparse.Namespace) -> bool:
    """Megatron-LM's `--apply-layernorm-1p` (TransformerConfig `layernorm_zero_centered_gamma`)."""
    return bool(getattr(args, "apply_layernorm_1p", False) or getattr(args, "layernorm_zero_centered_gamma", False))


def _first(args: argparse.Namespace, *names: str, default: Any) -> Any:
    """The first of ``names`` that args set (Megatron-LM renamed some arguments across versions)."""
    return next((getattr(args, n) for n in names if getattr(args, n, None) is not None), default)


@dataclass(frozen=True)
class Decoder:
    """What the HF decoder block computes, as far as Megatron args can contradict it."""

    norm: str = "RMSNorm"  # Megatron `normalization` the HF norms compute
    gated_silu: bool = True  # the MLP is SwiGLU (Megatron `swiglu`), HF `hidden_act="silu"`
    linear_bias: bool = False  # HF linears have biases everywhere (Megatron `add_bias_linear`)
    position: str = "rope"  # Megatron `position_embedding_type`
    partial_rotary: bool = False  # the config can express `rotary_percent` < 1 (`partial_rotary_factor`)
    # HF norms compute `x · (1 + w)` like Megatron's zero-centred gamma (Gated DeltaNet hybrids)
    zero_centred_norms: bool = False

    def problems(self, args: argparse.Namespace, family: str) -> list[str]:
        """What in ``args`` this decoder cannot express, one phrase each (empty: all of it)."""
        problems = []
        if getattr(args, "normalization", "RMSNorm") != self.norm:
            problems.append(f"normalization={args.normalization} (need {self.norm})")
        if self.gated_silu and not getattr(args, "swiglu", True):
            problems.append("swiglu=False (need a gated SiLU MLP)")
        if getattr(args, "add_bias_linear", False) != self.linear_bias:
            problems.append(f"add_bias_linear={getattr(args, 'add_bias_linear', False)} (linear biases)")
        if getattr(args, "position_embedding_type", "rope") != self.position:
            problems.append(f"position_embedding_type={args.position_embedding_type} (need {self.position})")
        if getattr(args, "rotary_percent", 1.0) != 1.0 and not self.partial_rotary:
            problems.append(f"rotary_percent={args.rotary_percent} (partial rotary)")
        if getattr(args, "use_rope_scaling", False):
            problems.append("use_rope_scaling=True (Llama-3 rope scaling is not mapped yet)")
        if getattr(args, "rotary_seq_len_interpolation_factor", None) not in (None, 1, 1.0):
            problems.append(
                f"rotary_seq_len_interpolation_factor={args.rotary_seq_len_interpolation_factor} (linear rope scaling)"
            )
        if zero_centred_gamma(args) != self.zero_centred_norms:
            problems.append(
                f"zero-centred layernorm gamma {'off' if self.zero_centred_norms else 'on'} "
                f"({family} norms are {'zero-centred' if self.zero_centred_norms else 'plain RMSNorm'})"
            )
        return problems

    def fields(self, args: argparse.Namespace) -> dict[str, Any]:
        """The HF config fields for the norm, activation and rotary embedding (a family's `from_args` may
        refine the rope fields: YaRN, partial rotary)."""
        rope_theta = float(getattr(args, "rotary_base", 10000))
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": rope_theta}
        if self.partial_rotary:
            rope["partial_rotary_factor"] = float(getattr(args, "rotary_percent", 1.0))
        return {
            "hidden_act": "silu",
            "rms_norm_eps": float(_first(args, "norm_epsilon", "layernorm_epsilon", default=1e-5)),
            "rope_theta": rope_theta,
            "rope_parameters": rope,
        }
