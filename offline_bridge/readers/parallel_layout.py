"""The parallel layout a checkpoint was saved with (TP, PP, VPP, EP, ETP), from its metadata alone.

The parallel layout is read off the checkpoint itself, not its args (which may be absent or wrong):
- TP / expert TP: how many pieces one layer's (one expert's) tensor is cut into (a gated fc1 and its
  adapter are cut into twice as many, so fc1 is left out);
- PP, VPP and EP (torch_dist): which writer rank's file (`__<rank>_<n>.distcp`) holds each layer's and each
  expert's chunks. Ranks of different pipeline stages (expert-parallel ranks) share no layer (expert), so
  the stages are the groups of layers linked through a common writer, and a stage owning k separate runs
  of consecutive layers has k virtual stages;
- legacy `torch`: the `mp_rank_TT[_PPP][_EEE]` directory names and the `model0`, `model1`, ... entries.
What the files cannot tell (zarr keeps no writer) comes from the args, and the report says so. The args'
own values are reported beside (`layout_args`), so a disagreement shows.

`pipeline_stages` says which layers each stage (and virtual stage) holds: legacy rank files by the split the
reader placed their stage-local layers with (Megatron's, `pipeline_split`); torch_dist by which writer holds
which layer (its keys are global already); otherwise by the args' split.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from ..errors import CheckpointError
from .base import CheckpointReader, is_model_key
from .fsdp_dtensor import FsdpDtensorReader
from .legacy import LegacyReader
from .pipeline_split import Split, layer_split
from .torch_dist import TorchDistReader

__all__ = ["ARGS_LAYOUT", "Stages", "parallel_layout", "pipeline_stages"]

# per pipeline stage, per virtual stage in order: its [first, last] global layer, None for a chunk with none
Stages = list[list[tuple[int, int] | None]]

_PER_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_STACKED_LAYERS = re.compile(r"^decoder\.layers\.(?!\d)")
_PER_EXPERT = re.compile(r"\.experts\.(?:experts\.|local_experts\.)?(\d+)\.")
_STACKED_EXPERTS = re.compile(r"\.experts\.experts\.(?!\d)")
_WRITER = re.compile(r"^__(\d+)_\d+\.distcp$")
ARGS_LAYOUT = {
    "tp": "tensor_model_parallel_size",
    "pp": "pipeline_model_parallel_size",
    "vpp": "virtual_pipeline_model_parallel_size",
    "ep": "expert_model_parallel_size",
    "etp": "expert_tensor_parallel_size",
}


def _axes(key: str) -> tuple[int | None, int | None]:
    """Which leading axes of a tensor are stacked layers and stacked experts."""
    layer = 0 if _STACKED_LAYERS.match(key) else None
    expert = (0 if layer is None else 1) if _STACKED_EXPERTS.search(key) else None
    return layer, expert


def _pieces_per_slice(key: str, boxes: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> int:
    """Into how many pieces one layer's (one expert's) slice of ``key`` is cut."""
    stacked = [a for a in _axes(key) if a is not None]
    slices = {tuple(offsets[a] for a in stacked) for offsets, _ in boxes}
    return len(boxes) // max(1, len(slices))


class _Groups:
    """Union-find over hashable nodes."""

    def __init__(self) -> None:
        self.parent: dict[Any, Any] = {}

    def find(self, node: Any) -> Any:
        self.parent.setdefault(node, node)
        while self.parent[node] != node:
            self.parent[node] = self.parent[self.parent[node]]
            node = self.parent[node]
        return node

    def join(self, a: Any, b: Any) -> None:
        self.parent[self.find(a)] = self.find(b)

    def groups(self, kind: str) -> list[list[int]]:
        found: dict[Any, list[int]] = {}
        for node in list(self.parent):
            if node[0] == kind:
                found.setdefault(self.find(node), []).append(node[1])
        return sorted(sorted(g) for g in found.values())


def _runs(layers: Iterable[int]) -> int:
    ordered = sorted(layers)
    return sum(1 for i, n in enumerate(ordered) if i == 0 or n != ordered[i - 1] + 1)


def _writer_groups(reader: TorchDistReader, keys: list[str]) -> tuple[list[list[int]], list[list[int]]]:
    """The layers of each stage and the experts of each expert-parallel rank, grouped by the writer ranks
    whose files hold their chunks."""
    layers, experts = _Groups(), _Groups()
    for key in keys:
        layer_axis, expert_axis = _axes(key)
        per_layer, per_expert = _PER_LAYER.match(key), _PER_EXPERT.search(key)
        for offsets, _ in reader.chunk_boxes(key):
            writer = _WRITER.match(reader.chunk_file(key, offsets) or "")
            if writer is None:
                continue
            rank = ("rank", int(writer.group(1)))
            layer = int(per_layer.group(1)) if per_layer else None if layer_axis is None else offsets[layer_axis]
            expert = int(per_expert.group(1)) if per_expert else None if expert_axis is None else offsets[expert_axis]
            if layer is not None:
                layers.join(("layer", layer), rank)
            if expert is not None:
                experts.join(("expert", expert), rank)
    return layers.groups("layer"), experts.groups("expert")


def _writer_layout(reader: TorchDistReader, keys: list[str]) -> dict[str, int]:
    """PP, VPP and EP from which writer rank's file holds which layer's and expert's chunks."""
    stages, expert_groups = _writer_groups(reader, keys)
    return {
        "pp": max(1, len(stages)),
        "vpp": max((_runs(stage) for stage in stages), default=1),
        "ep": max(1, len(expert_groups)),
    }


def _split_stages(split: Split) -> Stages:
    pp, vpp = 1 + max(p for _, p in split), 1 + max(v for v, _ in split)
    chunks = [[split[(v, p)] for v in range(vpp)] for p in range(pp)]
    return [[(first, first + n - 1) if n else None for first, n in stage] for stage in chunks]


def _spans(layers: list[int]) -> list[tuple[int, int] | None]:
    """Runs of consecutive layers as [first, last]."""
    starts = [n for i, n in enumerate(layers) if i == 0 or n != layers[i - 1] + 1]
    stops = [n for i, n in enumerate(layers) if i == len(layers) - 1 or layers[i + 1] != n + 1]
    return list(zip(starts, stops))


def pipeline_stages(reader: CheckpointReader, layout: dict[str, int | None]) -> tuple[Stages | None, str]:
    """Which layers each pipeline stage holds (per virtual stage), and where that was read from; None when
    neither the files nor the args say (no decoder layers, or args that do not split them)."""
    if isinstance(reader, LegacyReader):
        return _split_stages(reader.split), "rank files"
    if isinstance(reader, TorchDistReader) and not isinstance(reader, FsdpDtensorReader):  # fsdp: DP writers
        stages, _ = _writer_groups(reader, [k for k in reader.tensors if is_model_key(k)])
        return ([_spans(stage) for stage in stages] or None), "writer ranks"
    layers = getattr(reader.args, "num_layers", None)
    if not isinstance(layers, int) or layers < 1:
        return None, "args"
    try:
        split = layer_split(reader.args, layers, layout["pp"] or 1, layout["vpp"] or 1, str(reader.path))
    except CheckpointError:
        return None, "args"
    return _split_stages(split), "args"


def parallel_layout(reader: CheckpointReader) -> tuple[dict[str, int | None], dict[str, str]]:
    """(TP, PP, VPP, EP, ETP) and where each value was read from."""
    keys = [k for k in reader.tensors if is_model_key(k)]
    has_experts = any(".experts." in k for k in keys)
    counted = [k for k in keys if "linear_fc1" not in k]
    pieces = {k: _pieces_per_slice(k, reader.chunk_boxes(k)) for k in counted}
    layout: dict[str, int | None] = {
        "tp": max((n for k, n in pieces.items() if ".experts." not in k), default=1),
        "etp": max((n for k, n in pieces.items() if ".experts." in k), default=1) if has_experts else None,
    }
    source = {"tp": "chunk grid", "etp": "chunk grid"}
    if isinstance(reader, LegacyReader):
        ranks = reader.ranks
        layout.update(
            tp=1 + max(t for t, _, _ in ranks),
            pp=1 + max(p for _, p, _ in ranks),
            vpp=reader.virtual_stages,
            ep=1 + max(e for _, _, e in ranks),
        )
        source = dict.fromkeys(("tp", "pp", "vpp", "ep"), "rank files")
        args = reader.args
        layout["etp"] = (getattr(args, "expert_tensor_parallel_size", None) or layout["tp"]) if has_experts else None
        source["etp"] = "args"
    elif isinstance(reader, TorchDistReader) and not isinstance(reader, FsdpDtensorReader):
        layout.update(_writer_layout(reader, keys))
        source.update(dict.fromkeys(("pp", "vpp", "ep"), "writer ranks"))
    else:  # zarr keeps no writer; fsdp_dtensor's chunks are data-parallel shards of global tensors
        from_args = ("tp", "pp", "vpp", "ep") if isinstance(reader, FsdpDtensorReader) else ("pp", "vpp", "ep")
        for name in from_args:
            layout[name] = int(getattr(reader.args, ARGS_LAYOUT[name], None) or 1)
            source[name] = "args"
        if "tp" in from_args and has_experts:
            layout["etp"] = int(getattr(reader.args, ARGS_LAYOUT["etp"], None) or layout["tp"] or 1)
            source["etp"] = "args"
    if not has_experts:
        layout["ep"] = 1
    return {k: layout[k] for k in ARGS_LAYOUT}, source
