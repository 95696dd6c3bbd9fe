"""Rules as data and back: a plan step names its rule by class name and fields (`RuleRef`), so a plan holds
no functions; every `Rule` subclass registers itself under its class name when it is defined."""

from __future__ import annotations

from dataclasses import fields
from functools import cache
from typing import Any

from ...errors import InternalError
from ..schema import RuleRef
from .core import RULES, Rule

__all__ = ["PLANNING_ONLY", "rule_of", "rule_ref"]

PLANNING_ONLY = ("when", "expect")  # functions the planner uses to pick and check rules; not part of a step


def _data(value: Any) -> Any:
    if isinstance(value, Rule):
        return rule_ref(value)
    if isinstance(value, tuple):
        return tuple(_data(v) for v in value)
    return value


def rule_ref(rule: Rule) -> RuleRef:
    """``rule`` as data: its class name and every field but the planning-only ones."""
    params = tuple((f.name, _data(getattr(rule, f.name))) for f in fields(rule) if f.name not in PLANNING_ONLY)
    return RuleRef(type(rule).__name__, params)


def _value(value: Any) -> Any:
    if isinstance(value, RuleRef):
        return rule_of(value)
    if isinstance(value, tuple):
        return tuple(_value(v) for v in value)
    return value


@cache
def rule_of(ref: RuleRef) -> Rule:
    """The rule ``ref`` names (built once per distinct ref)."""
    cls = RULES.get(ref.name)
    if cls is None:
        raise InternalError(f"internal error: no rule named {ref.name!r} is registered")
    return cls(**{key: _value(value) for key, value in ref.params})
