"""Where every tensor goes: shard files of at most the given size, each with its safetensors header bytes
and each tensor's offset in it, as transformers lays them out."""

from __future__ import annotations

import json

from .schema import FilePlan, Step, Target

__all__ = ["layout"]


def _safetensors_header(targets: list[Target], file: str) -> tuple[bytes, list[Target]]:
    """Header bytes and the targets placed in ``file`` at their offsets, in the order given; tensor order in the
    file as safetensors' own writer (alignment, name)."""
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
        placed[t.name] = Target(t.name, t.shape, t.dtype, file, position)
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
        header, laid = _safetensors_header(shard, name)
        files.append(FilePlan(name, header, len(header) + sum(t.nbytes for t in laid)))
        placed.update((t.name, t) for t in laid)
    steps = [Step(s.rule, s.source, tuple(placed[t.name] for t in s.targets), s.delta) for s in steps]
    return steps, files
