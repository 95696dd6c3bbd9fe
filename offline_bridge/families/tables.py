"""A family's tables checked when it is registered, and described as rows (for `formats/families.md`).

A table mistake (a `{i}` missing from a layer rule, two rules writing one HF name) then fails at import,
naming the family and the rule, instead of as a wrong plan for the one model that exercises it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..plan.rules import Rule, dense_layer, full_attention_layer, linear_attention_layer, moe_layer

if TYPE_CHECKING:
    from .base import Family

__all__ = ["EXCLUSIVE", "Row", "TableError", "describe", "validate"]

# Conditions that never hold on the same layer: rules under them may write the same HF name.
EXCLUSIVE = frozenset({frozenset({moe_layer, dense_layer}), frozenset({full_attention_layer, linear_attention_layer})})

# Placeholders a rule may hold, per table: (in its Megatron sources, in its HF targets, required in both).
_ALLOWED = {
    "head": (set(), set(), set()),
    "layer": ({"i", "e"}, {"i", "e"}, {"i"}),
    "mtp": ({"k", "j", "e"}, {"i", "k", "m", "e"}, set()),
    "tail": (set(), set(), set()),
}
_PLACEHOLDER = re.compile(r"\{(\w*)\}")


class TableError(ValueError):
    """A family's table contradicts itself (raised at registration: a programming error, not bad input)."""


@dataclass(frozen=True)
class Row:
    table: str  # head, layer, mtp or tail
    hf: tuple[str, ...]  # HF name patterns the rule writes
    megatron: tuple[str, ...]  # Megatron key patterns it reads (alternatives)
    kind: str  # the rule class
    condition: str  # where it applies ("" = always)


def _tables(family: Family) -> Iterator[tuple[str, tuple[Rule, ...]]]:
    yield from (("head", family.head), ("layer", family.layer), ("mtp", family.mtp), ("tail", family.tail))


def describe(family: Family) -> list[Row]:
    return [
        Row(table, rule.targets, rule.sources, type(rule).__name__, rule.when.__name__ if rule.when else "")
        for table, rules in _tables(family)
        for rule in rules
    ]


def _placeholders(patterns: tuple[str, ...]) -> set[str]:
    return {name for pattern in patterns for name in _PLACEHOLDER.findall(pattern)}


def _rule_problems(table: str, rule: Rule) -> list[str]:
    in_sources, in_targets, required = _ALLOWED[table]
    problems = []
    sources, targets = _placeholders(rule.sources), _placeholders(rule.targets)
    if sources - in_sources or targets - in_targets:
        problems.append(f"placeholders {sorted((sources - in_sources) | (targets - in_targets))} in a {table} rule")
    if required - sources or required - targets:
        problems.append(f"a {table} rule without {sorted(required)}")
    if table == "mtp" and "k" not in sources:
        problems.append("an mtp rule whose Megatron names lack {k}")
    if "e" in targets and "e" not in sources:
        problems.append("{e} in HF names but not in the Megatron names")
    if len(set(rule.targets)) != len(rule.targets):
        problems.append("an HF name written twice")
    return [f"{p}: {rule.targets[0]}" for p in problems]


def _clashes(rules: list[Rule]) -> list[str]:
    """HF names two rules write, unless their conditions never hold together."""
    writers: dict[str, list[Rule]] = {}
    for rule in rules:
        for target in rule.targets:
            writers.setdefault(target, []).append(rule)
    return [
        f"{name} written by {len(found)} rules"
        for name, found in writers.items()
        if len(found) > 1 and not (len(found) == 2 and frozenset(r.when for r in found) in EXCLUSIVE)
    ]


def validate(family: Family) -> None:
    """Raise TableError naming every inconsistency of the family's tables."""
    problems = [p for table, rules in _tables(family) for rule in rules for p in _rule_problems(table, rule)]
    problems += _clashes([*family.head, *family.tail]) + _clashes(list(family.layer)) + _clashes(list(family.mtp))
    if problems:
        raise TableError(f"family {family.name}: " + "; ".join(problems))
