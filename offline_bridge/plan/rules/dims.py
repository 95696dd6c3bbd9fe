"""What the rules know of the model: its dimensions (from the HF config) and the per-layer conditions a
table rule may carry (`only(moe_layer, ...)`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Condition",
    "Dims",
    "Shape",
    "dense_layer",
    "full_attention_layer",
    "linear_attention_layer",
    "moe_layer",
    "untied",
]


Shape = tuple[int, ...]


@dataclass(frozen=True)
class Dims:
    """Model dimensions the rules need, taken from the HF config (derived or given)."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int
    tied: bool
    num_experts: int = 0
    moe_layers: frozenset[int] = frozenset()  # layers whose MLP is a mixture of experts (MTP layers included)
    num_mtp_layers: int = 0
    config: Mapping[str, Any] = field(default_factory=dict, compare=False)  # the whole HF config


Condition = Callable[[Dims, "int | None"], bool]  # (dims, layer) → does the rule apply?


def untied(dims: Dims, layer: int | None) -> bool:
    return not dims.tied


def moe_layer(dims: Dims, layer: int | None) -> bool:
    return layer in dims.moe_layers


def dense_layer(dims: Dims, layer: int | None) -> bool:
    return layer not in dims.moe_layers


def linear_attention_layer(dims: Dims, layer: int | None) -> bool:
    """A Gated DeltaNet layer (HF config `layer_types`)."""
    return layer is not None and dims.config["layer_types"][layer] == "linear_attention"


def full_attention_layer(dims: Dims, layer: int | None) -> bool:
    return layer is not None and dims.config["layer_types"][layer] == "full_attention"
