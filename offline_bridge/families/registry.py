"""Families by name, by HF config and by Megatron args: a registry that validates each table it is given."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from ..config.hf_fields import hf_value
from ..errors import OptionError
from .base import Family
from .tables import TableError, validate

__all__ = ["Registry"]


class Registry:
    """Registered families; detection picks the highest-priority family whose `detect` matches."""

    def __init__(self) -> None:
        self.families: dict[str, Family] = {}

    def register(self, family: Family) -> Family:
        validate(family)
        for other in self.families.values():
            shared = family.model_type == other.model_type and family.variant_of != other.name
            if family.name == other.name or shared:
                raise TableError(f"family {family.name}: name or model_type already registered by {other.name}")
        self.families[family.name] = family
        return family

    def by_name(self, name: str) -> Family:
        if name not in self.families:
            raise OptionError(f"unknown model type {name!r}; known: {', '.join(sorted(self.families))}")
        return self.families[name]

    def for_config(self, config: Mapping[str, Any]) -> Family:
        """The family of an HF config, by its `model_type`."""
        model_type = hf_value(config, "model_type", None)
        for family in self.families.values():
            if family.model_type == model_type and family.variant_of is None:
                return family
        raise OptionError(
            f"HF config model_type {model_type!r} is not supported; known: {', '.join(sorted(self.families))}"
        )

    def for_args(self, args: argparse.Namespace) -> Family:
        """The most specific family whose `detect` matches Megatron args; a tie at the top is an error."""
        matches = [f for f in self.families.values() if f.matches(args)]
        top = max((f.priority for f in matches), default=None)
        best = [f for f in matches if f.priority == top]
        if len(best) != 1:
            tie = f" (matches {' and '.join(f.name for f in best)} equally)" if best else ""
            raise OptionError(
                f"cannot infer the model family from the checkpoint's args{tie}; pass --model-type or --hf-config"
            )
        return best[0]
