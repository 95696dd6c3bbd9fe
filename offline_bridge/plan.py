"""The conversion plan: every HF tensor's name, shape, dtype, file and byte position, and the Megatron
tensor (or part of it) it comes from — all decided from metadata before any tensor byte is read."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, replace

from .dtypes import DType
from .errors import CheckpointError, OptionError
from .families import Family
from .readers.base import Box, CheckpointReader, is_model_key
from .rules import Dims, Rule

__all__ = ["FilePlan", "Plan", "Source", "Step", "Target", "build_plan", "parse_size"]


@dataclass(frozen=True)
class Source:
    """A Megatron tensor, or one layer of a stacked one (``box`` picks it, ``shape`` drops the layer axis)."""

    key: str
    box: Box
    shape: tuple[int, ...]
    dtype: DType


@dataclass(frozen=True)
class Target:
    """An HF tensor and where its bytes go (``file``, absolute byte ``offset``), once laid out."""

    name: str
    shape: tuple[int, ...]
    dtype: DType
    file: str = ""
    offset: int = 0

    @property
    def nbytes(self) -> int:
        size = self.dtype.itemsize
        for n in self.shape:
            size *= n
        return size

    @property
    def numel(self) -> int:
        return self.nbytes // self.dtype.itemsize


@dataclass(frozen=True)
class Step:
    """One read and one rule: ``source`` → ``targets``."""

    rule: Rule
    source: Source
    targets: tuple[Target, ...]


@dataclass(frozen=True)
class FilePlan:
    name: str
    header: bytes  # the 8-byte length plus the JSON header, padded to 8 bytes
    size: int  # total file size


@dataclass(frozen=True)
class Plan:
    steps: tuple[Step, ...]
    files: tuple[FilePlan, ...]
    dtype: DType
    dims: Dims

    def targets(self) -> Iterator[Target]:
        for step in self.steps:
            yield from step.targets

    @property
    def total_size(self) -> int:
        return sum(t.nbytes for t in self.targets())


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


def _resolve(reader: CheckpointReader, rule: Rule, layer: int | None, dims: Dims) -> Source:
    """Find the rule's tensor: a per-layer key, or layer ``layer`` of the stacked ``decoder.layers.<sub>``."""
    tried = []
    for pattern in rule.sources:
        if layer is None:
            candidates = [(pattern, None)]
        else:
            candidates = [(pattern.format(i=layer), None), (pattern.replace(".{i}.", "."), layer)]
        for key, index in candidates:
            tried.append(key)
            info = reader.tensors.get(key)
            if info is None:
                continue
            if index is None:
                return Source(key, tuple((0, n) for n in info.shape), info.shape, info.dtype)
            if info.shape[0] != dims.num_layers:
                raise CheckpointError(
                    f"{key} stacks {info.shape[0]} layers but the config has num_hidden_layers={dims.num_layers}"
                )
            return Source(key, ((index, index + 1), *((0, n) for n in info.shape[1:])), info.shape[1:], info.dtype)
    where = f" for layer {layer}" if layer is not None else ""
    raise CheckpointError(
        f"{reader.path}: no tensor{where} matching {' or '.join(tried)}; wrong --model-type or config?"
    )


def _steps(family: Family, reader: CheckpointReader, dims: Dims, dtype: DType) -> list[Step]:
    work = [(rule, None) for rule in family.head]
    work += [(rule, i) for i in range(dims.num_layers) for rule in family.layer]
    work += [(rule, None) for rule in family.tail]
    steps = []
    for rule, layer in work:
        if rule.when is not None and not rule.when(dims):
            continue
        source = _resolve(reader, rule, layer, dims)
        shapes = rule.target_shapes(source.shape, dims, source.key)
        rows = rule.rows(source.shape, dims)
        if rows != source.shape[0]:  # read only what is kept (vocab trim)
            axis = len(source.box) - len(source.shape)
            box = (*source.box[:axis], (0, rows), *source.box[axis + 1 :])
            source = replace(source, box=box, shape=(rows, *source.shape[1:]))
        names = [t.format(i=layer) if layer is not None else t for t in rule.targets]
        steps.append(Step(rule, source, tuple(Target(n, tuple(s), dtype) for n, s in zip(names, shapes))))
    return steps


def _check_all_used(reader: CheckpointReader, steps: list[Step], family: Family) -> None:
    """Every model tensor in the checkpoint must land somewhere: nothing is dropped silently."""
    used = {step.source.key for step in steps}
    unused = sorted(k for k in reader.tensors if is_model_key(k) and k not in used)
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


def _layout(steps: list[Step], max_shard_size: int) -> tuple[list[Step], list[FilePlan]]:
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
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    files, placed = [], {}
    for name, shard in zip(names, shards):
        header, laid = _safetensors_header([replace(t, file=name) for t in shard])
        files.append(FilePlan(name, header, len(header) + sum(t.nbytes for t in laid)))
        placed.update((t.name, t) for t in laid)
    steps = [replace(s, targets=tuple(placed[t.name] for t in s.targets)) for s in steps]
    return steps, files


def build_plan(family: Family, reader: CheckpointReader, dims: Dims, dtype: DType, max_shard_size: int) -> Plan:
    steps = _steps(family, reader, dims, dtype)
    names = [t.name for s in steps for t in s.targets]
    if len(names) != len(set(names)):
        raise CheckpointError(f"mapping {family.name} produces duplicate HF names")
    _check_all_used(reader, steps, family)
    steps, files = _layout(steps, max_shard_size)
    return Plan(tuple(steps), tuple(files), dtype, dims)
