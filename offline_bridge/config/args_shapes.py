"""Megatron args checked against the tensors they describe, before planning.

Args are trusted for what the tensors cannot say (which family, rope settings, where MoE layers are), but
a size that the tensors also show must agree with them: `hidden_size` with the embedding's width,
`ffn_hidden_size` with fc1 / fc2, `num_layers` with the layer axis or keys, the attention sizes with the
QKV rows, the expert count with the router. A disagreement names both values and the tensor key.
Every check looks at the global shapes only (metadata, no tensor byte).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ..errors import CheckpointError
from ..readers.base import TensorInfo

__all__ = ["SHAPE_CHECKS", "check_args_against_tensors"]

Args = argparse.Namespace


def _get(args: Args, name: str) -> int | None:
    value = getattr(args, name, None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _groups(args: Args) -> int | None:
    return (
        _get(args, "num_query_groups")
        if getattr(args, "group_query_attention", False)
        else _get(args, "num_attention_heads")
    )


def _head_dim(args: Args) -> int | None:
    hidden, heads = _get(args, "hidden_size"), _get(args, "num_attention_heads")
    return _get(args, "kv_channels") or (hidden // heads if hidden and heads else None)


def _qkv_rows(args: Args) -> int | None:
    """Rows of the fused QKV: per query group its query heads (and as many gate heads), one k and one v."""
    heads, groups, head_dim = _get(args, "num_attention_heads"), _groups(args), _head_dim(args)
    if not (heads and groups and head_dim) or heads % groups:
        return None
    gate = 2 if getattr(args, "attention_output_gate", False) else 1
    return groups * (gate * heads // groups + 2) * head_dim


def _fc1_rows(args: Args) -> int | None:
    ffn = _get(args, "ffn_hidden_size")
    return ffn and (2 * ffn if getattr(args, "swiglu", False) else ffn)


def _expert_ffn(args: Args) -> int | None:
    return _get(args, "moe_ffn_hidden_size") or _get(args, "ffn_hidden_size")


@dataclass(frozen=True)
class ShapeCheck:
    """Tensors whose key matches ``pattern`` have ``expected(args)`` at ``axis`` (counted from the end)."""

    pattern: re.Pattern[str]
    axis: int
    expected: Callable[[Args], int | None]
    names: tuple[str, ...]  # the args fields the expectation comes from, shown in the error
    derived: str = ""  # what the expectation is when computed from several fields ("QKV rows")

    def said(self, args: Args, expected: int) -> str:
        values = ", ".join(f"{n}={getattr(args, n, None)}" for n in self.names)
        return f"{values} give {expected} {self.derived}" if self.derived else values


def _check(pattern: str, axis: int, field: str) -> ShapeCheck:
    return ShapeCheck(re.compile(pattern), axis, lambda a: _get(a, field), (field,))


_LAYER = r"^decoder\.layers\.(?:\d+\.)?"
_EXPERTS = r"mlp\.experts\.(?:experts\.|local_experts\.)?(?:\d+\.)?"

SHAPE_CHECKS = (
    _check(r"^embedding\.word_embeddings\.weight$", -1, "hidden_size"),
    _check(r"^output_layer\.weight$", -1, "hidden_size"),
    _check(r"^decoder\.final_layernorm\.weight$", -1, "hidden_size"),
    _check(r"^embedding\.word_embeddings\.weight$", -2, "padded_vocab_size"),
    _check(_LAYER + r"mlp\.linear_fc2\.weight$", -1, "ffn_hidden_size"),
    _check(_LAYER + r"mlp\.linear_fc2\.weight$", -2, "hidden_size"),
    ShapeCheck(re.compile(_LAYER + r"mlp\.linear_fc1\.weight$"), -2, _fc1_rows, ("ffn_hidden_size", "swiglu"), "rows"),
    _check(_LAYER + r"mlp\.linear_fc1\.weight$", -1, "hidden_size"),
    ShapeCheck(
        re.compile(_LAYER + r"self_attention\.linear_qkv\.weight$"),
        -2,
        _qkv_rows,
        ("num_attention_heads", "num_query_groups", "kv_channels", "group_query_attention"),
        "QKV rows",
    ),
    _check(_LAYER + r"self_attention\.linear_qkv\.weight$", -1, "hidden_size"),
    _check(_LAYER + r"mlp\.router\.weight$", -2, "num_experts"),
    ShapeCheck(
        re.compile(_LAYER + _EXPERTS + r"linear_fc2\.weight$"),
        -1,
        _expert_ffn,
        ("moe_ffn_hidden_size", "ffn_hidden_size"),
        "expert columns",
    ),
)

_PER_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_STACKED_LAYERS = re.compile(r"^decoder\.layers\.(?!\d)")
_PER_EXPERT = re.compile(r"\.experts\.(?:experts\.|local_experts\.)?(\d+)\.")


def _counts(args: Args, tensors: Mapping[str, TensorInfo], where: str) -> None:
    """Layer and expert indices (or the stacked layer axis) within num_layers / num_experts."""
    layers, experts = _get(args, "num_layers"), _get(args, "num_experts")
    for key, info in tensors.items():
        layer, expert = _PER_LAYER.match(key), _PER_EXPERT.search(key)
        if layers and layer and int(layer.group(1)) >= layers:
            raise CheckpointError(f"{where}: num_layers={layers} but the checkpoint holds {key}")
        if layers and _STACKED_LAYERS.match(key) and info.shape and info.shape[0] != layers:
            raise CheckpointError(
                f"{where}: num_layers={layers} but {key} stacks {info.shape[0]} layers (shape {list(info.shape)})"
            )
        if experts and expert and key.startswith("decoder.") and int(expert.group(1)) >= experts:
            raise CheckpointError(f"{where}: num_experts={experts} but the checkpoint holds {key}")


def check_args_against_tensors(args: Args, tensors: Mapping[str, TensorInfo], where: str) -> None:
    """Raise if a size in ``args`` (read from ``where``) contradicts a tensor's shape."""
    for check in SHAPE_CHECKS:
        expected = check.expected(args)
        if expected is None:
            continue
        for key, info in tensors.items():
            if not check.pattern.search(key) or len(info.shape) < -check.axis:
                continue
            if info.shape[check.axis] != expected:
                raise CheckpointError(
                    f"{where}: {check.said(args, expected)}, but {key} has shape {list(info.shape)} "
                    f"({info.shape[check.axis]} on axis {len(info.shape) + check.axis})"
                )
    vocab, rows = _get(args, "vocab_size"), tensors.get("embedding.word_embeddings.weight")
    if vocab and rows is not None and rows.shape and rows.shape[0] < vocab:
        raise CheckpointError(
            f"{where}: vocab_size={vocab} but embedding.word_embeddings.weight has only {rows.shape[0]} rows"
        )
    _counts(args, tensors, where)
