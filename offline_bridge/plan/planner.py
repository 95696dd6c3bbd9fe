"""The conversion plan: every HF tensor's name, shape, dtype, file and byte position, and the Megatron
tensor (or part of it) it comes from — all decided from metadata before any tensor byte is read."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterator
from dataclasses import replace
from functools import partial

from ..dtypes import DType
from ..errors import CheckpointError, OptionError
from ..families import Family
from ..readers.base import CheckpointReader, is_model_key, is_quantizer_key
from .adapters import find_delta
from .rules import Dims, GatedDeltaPieces, Rule
from .schema import Delta, FilePlan, Lora, Plan, Source, Step, Target

__all__ = ["Delta", "FilePlan", "Lora", "Plan", "Source", "Step", "Target", "build_plan", "parse_size"]


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str | int) -> int:
    """`5GB` → 5·10⁹ (decimal, as transformers counts); `KiB`/`MiB`/`GiB` are binary."""
    if isinstance(text, int):
        return text
    value = text.strip().upper()
    number = value.rstrip("KMGTIB")
    unit = value[len(number) :]
    try:
        return int(float(number) * _UNITS[unit])
    except (KeyError, ValueError):
        raise OptionError(f"invalid size {text!r}; use e.g. 5GB, 500MB or 2GiB") from None


# A placeholder is spelled out in the key (in one of several spellings) or is a leading axis of a stacked
# tensor: token in the table → (spellings, stacked form). Megatron 0.16 writes singleton experts as
# `experts.experts.{e}.`.
_FORMS = {
    "i": (".{i}.", (".{i}.",), "."),
    "e": (".experts.{e}.", (".experts.{e}.", ".experts.experts.{e}."), ".experts.experts."),
}


def _candidates(pattern: str, index: dict[str, int]) -> Iterator[tuple[str, tuple[str, ...]]]:
    """Keys that may hold ``pattern`` at ``index``, each with the placeholders that are leading axes."""
    present = [name for name, (token, _, _) in _FORMS.items() if token in pattern]
    choices = [[(form, None) for form in _FORMS[name][1]] + [(_FORMS[name][2], name)] for name in present]
    for combo in itertools.product(*choices):
        key = pattern
        for name, (form, _) in zip(present, combo):
            key = key.replace(_FORMS[name][0], form)
        yield key.format(**index), tuple(axis for _, axis in combo if axis)


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
            return Source(tuple(parts), shape, infos[0].dtype, pattern)
    return None


def _packs_experts(rule: Rule, index: dict[str, int]) -> bool:
    """A rule that stacks every expert of a layer into one HF parameter (`{e}` in its source only)."""
    return "e" not in index and "{e}" in rule.sources[0]


def _resolve(reader: CheckpointReader, rule: Rule, index: dict[str, int], dims: Dims) -> Source:
    if _packs_experts(rule, index):  # every expert's parts, rows joined expert-major: one layer at a time
        experts = [_resolve(reader, rule, {**index, "e": e}, dims) for e in range(dims.num_experts)]
        first = experts[0]
        rows = sum(s.shape[0] for s in experts)
        return Source(tuple(p for s in experts for p in s.parts), (rows, *first.shape[1:]), first.dtype, first.pattern)
    source = _find(reader, rule.sources, index, dims, saved_apart=rule.saved_apart) or _find(
        reader, rule.sources, index, dims, diagnose=True, saved_apart=rule.saved_apart
    )
    if source is not None:
        return source
    names = {"i": "layer", "e": "expert", "k": "MTP depth"}
    where = "".join(f" for {names[k]} {v}" for k, v in index.items())
    tried = [key for pattern in rule.sources for key, _ in _candidates(pattern, index)]
    raise CheckpointError(
        f"{reader.path}: no tensor{where} matching {' or '.join(tried)}; wrong --model-type or config?"
    )


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
    for depth in range(dims.num_mtp_layers):  # MTP layer k is HF layer num_layers + k
        work += per_expert(family.mtp, {"k": depth, "i": dims.num_layers + depth})
    work += per_expert(family.tail, {})
    return [(rule, index) for rule, index in work if rule.when is None or rule.when(dims, index.get("i"))]


def finder(reader: CheckpointReader, index: dict[str, int], dims: Dims) -> Callable[[tuple[str, ...]], Source | None]:
    """Look tensors up by table pattern at fixed placeholder values."""
    return partial(_find, reader, index=index, dims=dims)


def _steps(family: Family, reader: CheckpointReader, dims: Dims, dtype: DType, lora: Lora | None) -> list[Step]:
    steps = []
    for rule, index in expand(family, dims):
        source = _resolve(reader, rule, index, dims)
        if _packs_experts(rule, index):
            delta = _stacked_delta(reader, rule, index, dims, lora)
        else:
            delta = find_delta(finder(reader, index, dims), source.pattern, lora, dims, source)
        if isinstance(rule, GatedDeltaPieces):
            source, rule = _gated_delta_layout(reader, rule, source, delta)
        rule.check(source.shape, dims, source.key)
        shapes = rule.target_shapes(source.shape, dims, source.key)
        rows = rule.rows(source.shape, dims)
        if rows != source.shape[0]:  # read only what is kept (vocab trim)
            (key, box), *more = source.parts
            axis = len(box) - len(source.shape)
            if more:
                raise CheckpointError(f"{key}: cannot trim rows of a tensor saved in parts")
            box = (*box[:axis], (0, rows), *box[axis + 1 :])
            source = replace(source, parts=((key, box),), shape=(rows, *source.shape[1:]))
        names = [t.format(**index) for t in rule.targets]
        steps.append(Step(rule, source, tuple(Target(n, tuple(s), dtype) for n, s in zip(names, shapes)), delta))
    return steps


def _stacked_delta(
    reader: CheckpointReader, rule: Rule, index: dict[str, int], dims: Dims, lora: Lora | None
) -> Delta | None:
    """The expert adapters on a packed parameter: expert e's `B_e @ A_e` lands on its rows of the stack."""
    deltas = []
    for e in range(dims.num_experts):
        expert = {**index, "e": e}
        deltas.append(
            find_delta(finder(reader, expert, dims), rule.sources[0], lora, dims, _resolve(reader, rule, expert, dims))
        )
    found = [d for d in deltas if d is not None]
    if not found:
        return None
    if len(found) != len(deltas) or any(d.layout != "plain" or d.magnitude is not None for d in found):
        raise CheckpointError(
            f"{found[0].sources()[0].key}: packed experts take plain LoRA adapters on every expert; "
            "use a per-expert family (e.g. --model-type qwen3_next) for this adapter"
        )
    return replace(found[0], pieces=tuple(d.pieces[0] for d in found), layout="stacked")


def _gated_delta_layout(
    reader: CheckpointReader, rule: GatedDeltaPieces, source: Source, delta: Delta | None
) -> tuple[Source, GatedDeltaPieces]:
    """How a GDN in_proj / conv1d is read: a fused tensor (one part) holds rows in TP-local blocks at the
    training TP. A LoRA B has no split factory, so its rows are TP-local blocks at the adapter's TP: the base
    pieces are then read in that order too, base and delta add up, and the rule regroups the sum."""
    if len(source.parts) == 1:
        tp = _training_tp(reader, source.key)
        if delta is not None and delta.tp != tp:
            raise CheckpointError(
                f"{source.key} is fused at training TP {tp} but its LoRA adapter was saved at TP {delta.tp}"
            )
        return source, replace(rule, tp=tp)
    if delta is None:
        return source, rule
    return _rank_major(source, delta.tp), replace(rule, tp=delta.tp)


def _rank_major(source: Source, tp: int) -> Source:
    """The pieces' rows read as TP rank t's slice of every piece in turn, for t = 0 … tp-1."""
    parts = []
    for rank in range(tp):
        for key, box in source.parts:
            axis = len(box) - len(source.shape)  # the row axis, after any stacked axes
            start, stop = box[axis]
            if (stop - start) % tp:
                raise CheckpointError(f"{key}: {stop - start} rows cannot be split over the adapter's TP {tp}")
            rows = (stop - start) // tp
            parts.append((key, (*box[:axis], (start + rank * rows, start + (rank + 1) * rows), *box[axis + 1 :])))
    return replace(source, parts=tuple(parts))


def _training_tp(reader: CheckpointReader, key: str) -> int:
    """The TP a TP-local layout was saved at, from the checkpoint's args."""
    tp = getattr(reader.args, "tensor_model_parallel_size", None)
    if not isinstance(tp, int) or tp < 1:
        raise CheckpointError(f"{key} is fused in its TP-local layout, but the checkpoint's args give no training TP")
    return tp


def _check_all_used(reader: CheckpointReader, steps: list[Step], family: Family) -> None:
    """Every model tensor in the checkpoint must land somewhere: nothing is dropped silently."""
    sources = [s for step in steps for s in (step.source, *(step.delta.sources() if step.delta else ()))]
    used = {key for source in sources for key, _ in source.parts}
    unused = sorted(k for k in reader.tensors if is_model_key(k) and not is_quantizer_key(k) and k not in used)
    if unused:
        shown = ", ".join(unused[:5]) + (f" and {len(unused) - 5} more" if len(unused) > 5 else "")
        raise CheckpointError(
            f"{reader.path}: checkpoint tensors the {family.name} mapping does not use: {shown}; "
            "pass the right --model-type or --hf-config"
        )


def _safetensors_header(targets: list[Target]) -> tuple[bytes, list[Target]]:
    """Header bytes and targets with offsets; tensor order as safetensors' own writer (alignment, name)."""
    ordered = sorted(targets, key=lambda t: (-t.dtype.itemsize, t.name))
    entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
    position = 0
    for t in ordered:
        entries[t.name] = {
            "dtype": t.dtype.safetensors,
            "shape": list(t.shape),
            "data_offsets": [position, position + t.nbytes],
        }
        position += t.nbytes
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    header = len(text).to_bytes(8, "little") + text
    placed, position = {}, len(header)
    for t in ordered:
        placed[t.name] = replace(t, offset=position)
        position += t.nbytes
    return header, [placed[t.name] for t in targets]


def layout(steps: list[Step], max_shard_size: int, stem: str = "model") -> tuple[list[Step], list[FilePlan]]:
    """Greedy fill in state-dict order, as transformers shards; one file needs no index."""
    shards: list[list[Target]] = [[]]
    size = 0
    for target in (t for step in steps for t in step.targets):
        if shards[-1] and size + target.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(target)
        size += target.nbytes
    names = (
        [f"{stem}.safetensors"]
        if len(shards) == 1
        else [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    files, placed = [], {}
    for name, shard in zip(names, shards):
        header, laid = _safetensors_header([replace(t, file=name) for t in shard])
        files.append(FilePlan(name, header, len(header) + sum(t.nbytes for t in laid)))
        placed.update((t.name, t) for t in laid)
    steps = [replace(s, targets=tuple(placed[t.name] for t in s.targets)) for s in steps]
    return steps, files


def build_plan(
    family: Family, reader: CheckpointReader, dims: Dims, dtype: DType, max_shard_size: int, lora: Lora | None = None
) -> Plan:
    steps = _steps(family, reader, dims, dtype, lora)
    if lora is not None and not any(step.delta for step in steps):
        raise CheckpointError(f"{reader.path}: LoRA settings were given but the checkpoint holds no adapter tensors")
    names = [t.name for s in steps for t in s.targets]
    if len(names) != len(set(names)):
        raise CheckpointError(f"mapping {family.name} produces duplicate HF names")
    _check_all_used(reader, steps, family)
    steps, files = layout(steps, max_shard_size)
    return Plan(tuple(steps), tuple(files), dtype, dims)
