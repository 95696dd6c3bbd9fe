"""Which decoder layers each pipeline stage (and virtual stage) holds, from the args, as megatron-core 0.16
computes it (`get_transformer_layer_offset` / `get_num_layers_to_build`, and
`PipelineParallelLayerLayout` for `--pipeline-model-parallel-layout`).

Legacy rank files number their layers from 0 on every stage, so this is how their keys become global. Chunks
follow Megatron's order, virtual stage first: (vp 0, pp 0), (vp 0, pp 1), ..., (vp 1, pp 0), ...; a chunk's
first global layer is the number of layers in the chunks before it (Megatron's offsets, which it asserts are
divisible, are that sum). The layout string is parsed here, not by megatron-core, which the converter never
imports.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable

from ..errors import CheckpointError

__all__ = ["Split", "checked_split", "layer_split", "parse_layout"]

Split = dict[tuple[int, int], tuple[int, int]]  # (vp, pp) -> (first global layer, number of layers)

_LAYER_NAMES = {"E": "embedding", "L": "loss", "t": "decoder", "m": "mtp"}
_REPEAT_GROUP = re.compile(r"\(([^)]+)\)\*(\d+)")
_REPEAT_ONE = re.compile(r"(.)\*(\d+)")
_MAX_LAYOUT = 1 << 16  # characters of an unrolled layout: far beyond any model's layer count


def _unroller(where: str) -> Callable[[re.Match[str]], str]:
    """`x*n` → n times x, refusing a layout that would unroll beyond ``_MAX_LAYOUT`` characters in all."""
    budget = [_MAX_LAYOUT]

    def unroll(match: re.Match[str]) -> str:
        digits = match.group(2)
        count = int(digits) if len(digits) <= 6 else _MAX_LAYOUT + 1
        budget[0] -= len(match.group(1)) * count
        if budget[0] < 0:
            raise CheckpointError(f"{where}: args.pipeline_model_parallel_layout unrolls to too many layers")
        return match.group(1) * count

    return unroll


def parse_layout(layout: object, where: str) -> list[list[str]]:
    """`pipeline_model_parallel_layout` as its stages' layer names: core 0.16's string form ("Et*3|(tt|)*29,m|L":
    `|` between stages, `*n` repeats, commas cosmetic) or its list form (names like "decoder")."""
    if isinstance(layout, str):
        text = layout.replace(",", "")
        for pattern in (_REPEAT_GROUP, _REPEAT_ONE):  # one pass each, as megatron-core parses it
            text = pattern.sub(_unroller(where), text)
        if unknown := sorted(set(text) - set(_LAYER_NAMES) - {"|"}):
            raise CheckpointError(f"{where}: args.pipeline_model_parallel_layout has unknown layers {unknown[:4]}")
        return [[_LAYER_NAMES[c] for c in stage] for stage in text.split("|")]
    if isinstance(layout, list) and all(isinstance(s, list) and all(isinstance(x, str) for x in s) for s in layout):
        return [[x.strip().lower() for x in stage] for stage in layout]
    raise CheckpointError(f"{where}: args.pipeline_model_parallel_layout is a {type(layout).__name__}, not a layout")


def _layers_arg(args: argparse.Namespace, name: str, where: str) -> int | None:
    value = getattr(args, name, None)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise CheckpointError(f"{where}: args.{name}={value!r} is not a number of layers")
    return value


def _chunk_counts(args: argparse.Namespace, layers: int, pp: int, vpp: int, where: str) -> list[list[int]]:
    """Layers per [vp][pp] chunk."""
    layout = getattr(args, "pipeline_model_parallel_layout", None)
    if layout is not None:
        stages = parse_layout(layout, where)
        if len(stages) != pp * vpp:
            raise CheckpointError(
                f"{where}: args.pipeline_model_parallel_layout has {len(stages)} stages, the files PP={pp} x VPP={vpp}"
            )
        return [[stages[vp * pp + p].count("decoder") for p in range(pp)] for vp in range(vpp)]
    first, last = (_layers_arg(args, f"decoder_{end}_pipeline_num_layers", where) for end in ("first", "last"))
    embedding = bool(getattr(args, "account_for_embedding_in_pipeline_split", False))
    loss = bool(getattr(args, "account_for_loss_in_pipeline_split", False))
    if pp == 1:
        first = last = None
        embedding = loss = False
    if (first is not None or last is not None) and (embedding or loss):
        raise CheckpointError(f"{where}: args set uneven first/last stages with account_for_*_in_pipeline_split")
    if first is not None or last is not None:
        stages = pp - (first is not None) - (last is not None)
        middle = layers - (first or 0) - (last or 0)
        per_stage = [middle // stages if stages else 0] * pp
        if first is not None:
            per_stage[0] = first
        if last is not None:
            per_stage[-1] = last
        uneven = middle < 0 or (middle % stages if stages else middle)
    else:
        total = layers + embedding + loss
        per_stage = [total // pp] * pp
        uneven = total % pp
    if uneven or any(n < 0 or n % vpp for n in per_stage):
        raise CheckpointError(
            f"{where}: args split num_layers={layers} over PP={pp} x VPP={vpp} unevenly "
            f"(decoder_first/last_pipeline_num_layers={first}/{last}, account_for_embedding/loss={embedding}/{loss})"
        )
    counts = [[n // vpp for n in per_stage] for _ in range(vpp)]
    counts[0][0] -= embedding
    counts[-1][-1] -= loss
    if min(counts[0][0], counts[-1][-1]) < 0:
        raise CheckpointError(f"{where}: args leave the embedding or loss stage fewer than 0 layers")
    return counts


def layer_split(args: argparse.Namespace, layers: int, pp: int, vpp: int, where: str) -> Split:
    """(vp, pp) → (first global layer, layer count) for ``layers`` decoder layers over PP x VPP chunks."""
    counts = _chunk_counts(args, layers, pp, vpp, where)
    split, first = {}, 0
    for vp in range(vpp):
        for p in range(pp):
            split[(vp, p)] = (first, counts[vp][p])
            first += counts[vp][p]
    if first != layers:
        raise CheckpointError(f"{where}: args place {first} decoder layers but num_layers={layers}")
    return split


def checked_split(args: argparse.Namespace, found: dict[tuple[int, int], int], pp: int, where: str) -> Split:
    """The args' split of the chunks ``found`` ((vp, pp) → the layers their files hold), which must match it."""
    total = sum(found.values())
    layers = int(getattr(args, "num_layers", total) or total)
    split = layer_split(args, layers, pp, 1 + max(vp for vp, _ in found), where)
    wrong = [(chunk, n, split[chunk][1]) for chunk, n in sorted(found.items()) if split[chunk][1] != n]
    if wrong:
        shown = ", ".join(f"stage {p} chunk {vp} holds {n} (args: {want})" for (vp, p), n, want in wrong[:4])
        raise CheckpointError(f"{where}: the rank files' layers per pipeline chunk do not match the args: {shown}")
    return split
