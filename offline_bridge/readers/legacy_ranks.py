"""Which (tp, pp, ep) rank each `mp_rank_TT[_PPP][_EEE]` directory of a legacy checkpoint holds.

The parallel sizes come from the args, which a file may forge (TP = PP = 100000 would ask for 10^10 rank
files): each is checked against the directories actually present before anything is sized from it.

Megatron-LM saves one file per (tp, pp, ep) rank of expert-data-parallel rank 0. With expert TP = TP that is
every combination; with expert TP 1 under TP > 1 and EP > 1 it is not (TP2 EP2 on two GPUs writes
`mp_rank_00_000` and `mp_rank_01_001`): then every TP rank and every EP rank of each stage must be present.
"""

from __future__ import annotations

import argparse
import itertools
import re
from pathlib import Path

from ..errors import CheckpointError

__all__ = ["RANK_DIR", "Layout", "rank_layout"]

RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")
_SHOWN = 8  # missing ranks named in an error

Layout = tuple[dict[tuple[int, int, int], int], int, int, int, int]


def rank_layout(path: Path, ranks: list[Path], args: argparse.Namespace) -> Layout:
    """(tp, pp, ep) → index into ``ranks``, and the TP, PP, EP and expert TP sizes; every rank Megatron
    writes present exactly once."""
    source = ranks[0] / "model_optim_rng.pt"
    tp_size, pp_size, ep_size = (
        parallel_size(args, name, len(ranks), source)
        for name in ("tensor_model_parallel", "pipeline_model_parallel", "expert_model_parallel")
    )
    etp = parallel_size(args, "expert_tensor_parallel", len(ranks), source, tp_size)
    if etp not in (1, tp_size):
        raise CheckpointError(f"{path}: expert_tensor_parallel_size={etp} with TP={tp_size} is not supported")
    sizes = f"TP={tp_size} PP={pp_size} EP={ep_size}"
    coords: dict[tuple[int, int, int], int] = {}
    for index, rank in enumerate(ranks):
        tp, *rest = (int(g) for g in RANK_DIR.match(rank.name).groups() if g is not None)
        if len(rest) != (pp_size > 1) + (ep_size > 1):
            raise CheckpointError(f"{rank}: name does not fit {sizes} from the args")
        coord = (tp, rest.pop(0) if pp_size > 1 else 0, rest.pop(0) if ep_size > 1 else 0)
        if coord in coords:
            raise CheckpointError(f"{rank}: claims rank (tp, pp, ep) = {coord} like {ranks[coords[coord]]}")
        coords[coord] = index
    if any(t >= tp_size or p >= pp_size or e >= ep_size for t, p, e in coords):
        raise CheckpointError(f"{path}: rank directories {[r.name for r in ranks]} do not match {sizes}")
    if etp == 1 and min(tp_size, ep_size) > 1:  # not a grid: each TP and each EP rank of every stage
        _check_covered(path, coords, tp_size, pp_size, ep_size)
    elif len(coords) != tp_size * pp_size * ep_size:  # fewer: each size is at most len(ranks), so this is short
        every = itertools.product(range(tp_size), range(pp_size), range(ep_size))
        missing = list(itertools.islice((c for c in every if c not in coords), _SHOWN))
        raise CheckpointError(f"{path}: missing rank files for (tp, pp, ep) {missing}; the checkpoint is incomplete")
    return coords, tp_size, pp_size, ep_size, etp


def _check_covered(path: Path, coords: dict, tp_size: int, pp_size: int, ep_size: int) -> None:
    for pp in range(pp_size):
        for axis, size, name in ((0, tp_size, "TP"), (2, ep_size, "EP")):
            present = {c[axis] for c in coords if c[1] == pp}
            if missing := sorted(set(range(size)) - present)[:_SHOWN]:
                raise CheckpointError(
                    f"{path}: no rank file of pipeline stage {pp} holds {name} ranks {missing}; the checkpoint is incomplete"
                )


def parallel_size(args: argparse.Namespace, name: str, limit: int, source: Path, default: int = 1) -> int:
    """``args.<name>_size`` (``default`` if unset): a positive integer, at most ``limit`` (the ranks present)."""
    value = getattr(args, f"{name}_size", None) or default
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
        raise CheckpointError(f"{source}: args.{name}_size={value!r} does not fit the {limit} rank directories present")
    return value
