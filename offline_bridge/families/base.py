"""What a model family is: its HF names, its mapping table and the config fields only it has."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from ..plan.rules import Rule
from .decoder import Decoder
from .tables import Row, describe

__all__ = ["Family"]


@dataclass(frozen=True)
class Family:
    """One HF architecture. Tables list rules in HF state-dict order; `layer` rules hold ``{i}``."""

    name: str  # the --model-type value
    architecture: str  # HF class in config.json "architectures"
    model_type: str  # HF config "model_type"
    head: tuple[Rule, ...]  # before the layers (embeddings)
    layer: tuple[Rule, ...]  # once per decoder layer
    tail: tuple[Rule, ...]  # after the layers (final norm, output layer)
    # Do Megatron args describe this family? Only the features it needs, never another family's: when several
    # families match, the highest `priority` wins (a family refining another outranks it); None: never inferred.
    detect: Callable[[argparse.Namespace], bool] | None
    priority: int = 0
    mtp: tuple[Rule, ...] = ()  # once per MTP depth ``{k}``, written as HF layer ``{i}`` = num_layers + k
    config: Mapping[str, Any] = field(default_factory=dict)  # fixed HF config fields only this family has
    from_args: Callable[[argparse.Namespace], dict[str, Any]] = lambda args: {}  # derived ones
    experts: Callable[[Mapping[str, Any]], tuple[int, frozenset[int]]] = lambda config: (0, frozenset())
    """(number of experts, MoE layer indices) as the HF config describes them."""
    mtp_layers: Callable[[Mapping[str, Any]], int] = lambda config: 0
    # MTP layers per depth (a hybrid model's MTP pattern): MTP layer ``{m}`` is inner layer ``{j}`` of depth ``{k}``
    mtp_block: Callable[[Mapping[str, Any]], int] = lambda config: 1
    # config hooks: what Megatron args the HF class can express, and the config fields it writes for them
    decoder: Decoder = field(default_factory=Decoder)
    text_config: Callable[[Mapping[str, Any]], Mapping[str, Any]] = lambda config: config
    """The part of the HF config describing the language model (a vision-language config nests it)."""
    # The family whose `model_type` this one shares (Moonlight: "deepseek_v3"): an HF config selects that one,
    # only --model-type selects this one (for the config it derives)
    variant_of: str | None = None

    def matches(self, args: argparse.Namespace) -> bool:
        """Whether detection may pick this family for ``args`` (see `Registry.for_args`)."""
        return self.detect is not None and self.detect(args)

    def describe(self) -> list[Row]:
        """The tables as rows (HF name ← Megatron names, rule kind, condition), in state-dict order."""
        return describe(self)


def as_mtp(rules: tuple[Rule, ...]) -> tuple[Rule, ...]:
    """Decoder-layer rules re-aimed at Megatron's MTP block: `mtp.layers.{k}.transformer_layer.<sub>`."""
    return tuple(
        replace(
            rule,
            sources=tuple(s.replace("decoder.layers.{i}.", "mtp.layers.{k}.transformer_layer.") for s in rule.sources),
        )
        for rule in rules
    )


def flag(args: argparse.Namespace, name: str) -> bool:
    """An arg that is set and truthy (absent in older Megatron-LM versions counts as unset)."""
    return bool(getattr(args, name, None))
