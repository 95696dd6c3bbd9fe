"""Where a table rule's tensor is in the checkpoint: its key in any of Megatron's spellings, or a slice of a
stacked tensor, resolved to a `Source`; and every rule of a family expanded over layers and experts."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterator
from functools import partial

from ..errors import CheckpointError
from ..families import Family
from ..readers.base import CheckpointReader, RowOrder, TensorInfo
from .rules import Dims, Rule
from .schema import Source

__all__ = ["expand", "finder", "missing", "packs_experts", "resolve"]


# A placeholder is spelled out in the key (in one of several spellings) or is a leading axis of a stacked
# tensor: token in the table → (spellings, stacked form). Megatron 0.16 writes singleton experts as
# `experts.experts.{e}.`.
_FORMS = {
    "i": (".{i}.", (".{i}.",), "."),
    "e": (".experts.{e}.", (".experts.{e}.", ".experts.experts.{e}."), ".experts.experts."),
}


@functools.cache
def _spellings(pattern: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """Every spelling of ``pattern`` (a key template), each with the placeholders that are leading axes; once
    per pattern, since a 100k-tensor model asks for the same few hundred patterns at every layer and expert."""
    present = [name for name, (token, _, _) in _FORMS.items() if token in pattern]
    choices = [[(form, None) for form in _FORMS[name][1]] + [(_FORMS[name][2], name)] for name in present]
    found = []
    for combo in itertools.product(*choices):
        key = pattern
        for name, (form, _) in zip(present, combo):
            key = key.replace(_FORMS[name][0], form)
        found.append((key, tuple(axis for _, axis in combo if axis)))
    return tuple(found)


def _candidates(pattern: str, index: dict[str, int]) -> Iterator[tuple[str, tuple[str, ...]]]:
    """Keys that may hold ``pattern`` at ``index``, each with the placeholders that are leading axes."""
    for key, axes in _spellings(pattern):
        yield key.format(**index), axes


def _find(
    reader: CheckpointReader,
    patterns: tuple[str, ...],
    index: dict[str, int],
    dims: Dims,
    *,
    diagnose: bool = False,
    saved_apart: tuple[str, ...] = (),
) -> Source | None:
    """The tensor of the first pattern present: spelled out per layer / expert, or a slice of a stacked one,
    or its pieces saved apart (swiglu halves `_w` / `_v`, or the rule's ``saved_apart`` suffixes).

    A key whose stacked axes have the wrong size does not match; with ``diagnose`` it raises instead.
    """
    sizes = {"i": ("num_hidden_layers", dims.num_layers), "e": ("num_experts", dims.num_experts)}
    for pattern in patterns:
        for key, axes in _candidates(pattern, index):
            apart = [[key + p for p in split] for split in (("_w", "_v"), saved_apart) if split]
            keys = (
                [key]
                if key in reader.tensors
                else next((k for k in apart if all(x in reader.tensors for x in k)), [key])
            )
            infos = [reader.tensors.get(k) for k in keys]
            if None in infos:
                continue
            mismatch = next(
                (
                    f"{info.key} has shape {list(info.shape)}, but axis {axis} should hold the config's "
                    f"{sizes[name][0]}={sizes[name][1]}"
                    for info in infos
                    for axis, name in enumerate(axes)
                    if len(info.shape) <= axis or info.shape[axis] != sizes[name][1]
                ),
                None,
            )
            if mismatch is not None:
                if diagnose:
                    raise CheckpointError(mismatch)
                continue
            parts = []
            for info in infos:
                lead = tuple((index[name], index[name] + 1) for name in axes)
                parts.append((info.key, (*lead, *((0, n) for n in info.shape[len(axes) :]))))
            rest = infos[0].shape[len(axes) :]
            shape = (sum(info.shape[len(axes)] for info in infos), *rest[1:]) if rest else rest
            return Source(tuple(parts), shape, infos[0].dtype, pattern, _row_order(infos, axes))
    return None


def _row_order(infos: list[TensorInfo], axes: tuple[str, ...]) -> RowOrder | None:
    """The TP row order the reader found the tensor stored in (`TensorInfo.row_order`), for a whole tensor."""
    orders = {info.row_order for info in infos}
    if orders == {None}:
        return None
    if len(infos) > 1 or axes:
        raise CheckpointError(f"{infos[0].key}: rows stored in TP order in a stacked tensor or one saved in parts")
    return infos[0].row_order


def _joined_order(experts: list[Source]) -> RowOrder | None:
    """The row order of every expert's rows stacked: each expert's block in its own order."""
    orders = {s.row_order for s in experts}
    if orders == {None}:
        return None
    order = orders.pop()
    if orders or order is None or order.parts or order.kind == "tp_blocks":
        raise CheckpointError(f"{experts[0].key}: experts stored in different TP row orders cannot be packed")
    return RowOrder(order.kind, order.tp, tuple(s.shape[0] for s in experts))


def packs_experts(rule: Rule, index: dict[str, int]) -> bool:
    """A rule that stacks every expert of a layer into one HF parameter (`{e}` in its source only)."""
    return "e" not in index and "{e}" in rule.sources[0]


def resolve(reader: CheckpointReader, rule: Rule, index: dict[str, int], dims: Dims) -> Source | None:
    """The rule's tensor at ``index``, or None when the checkpoint has none (`missing` says what was tried)."""
    if packs_experts(rule, index):  # every expert's parts, rows joined expert-major: one layer at a time
        experts = [resolve(reader, rule, {**index, "e": e}, dims) for e in range(dims.num_experts)]
        if None in experts:
            return None
        first = experts[0]
        rows = sum(s.shape[0] for s in experts)
        parts = tuple(p for s in experts for p in s.parts)
        return Source(parts, (rows, *first.shape[1:]), first.dtype, first.pattern, _joined_order(experts))
    return _find(reader, rule.sources, index, dims, saved_apart=rule.saved_apart) or _find(
        reader, rule.sources, index, dims, diagnose=True, saved_apart=rule.saved_apart
    )


def missing(reader: CheckpointReader, rule: Rule, index: dict[str, int], dims: Dims) -> str:
    """What `resolve` looked for and did not find (for packed experts: the first expert missing)."""
    if packs_experts(rule, index):
        e = next(e for e in range(dims.num_experts) if resolve(reader, rule, {**index, "e": e}, dims) is None)
        return missing(reader, rule, {**index, "e": e}, dims)
    names = {"i": "layer", "e": "expert", "k": "MTP depth"}
    where = "".join(f" for {names[k]} {v}" for k, v in index.items() if k in names)
    tried = [key for pattern in rule.sources for key, _ in _candidates(pattern, index)]
    return f"no tensor{where} matching {' or '.join(tried)}"


def expand(family: Family, dims: Dims) -> list[tuple[Rule, dict[str, int]]]:
    """Every (rule, placeholder values) the family's tables apply to this model, in HF state-dict order."""

    def per_expert(rules: tuple[Rule, ...], index: dict[str, int]) -> list[tuple[Rule, dict[str, int]]]:
        return [
            (rule, {**index, "e": e} if "{e}" in rule.targets[0] else index)
            for rule in rules
            for e in (range(dims.num_experts) if "{e}" in rule.targets[0] else [None])
        ]

    work = per_expert(family.head, {})
    for layer in range(dims.num_layers):
        work += per_expert(family.layer, {"i": layer})
    block = family.mtp_block(dims.config)
    for layer in range(dims.num_mtp_layers):  # MTP layer m is HF layer num_layers + m: inner layer j of depth k
        depth, inner = divmod(layer, block)
        work += per_expert(family.mtp, {"k": depth, "j": inner, "m": layer, "i": dims.num_layers + layer})
    work += per_expert(family.tail, {})
    return [(rule, index) for rule, index in work if rule.when is None or rule.when(dims, index.get("i"))]


def finder(reader: CheckpointReader, index: dict[str, int], dims: Dims) -> Callable[[tuple[str, ...]], Source | None]:
    """Look tensors up by table pattern at fixed placeholder values."""
    return partial(_find, reader, index=index, dims=dims)
