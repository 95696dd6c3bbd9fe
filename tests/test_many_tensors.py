"""Many small tensors (issue 21): planning, byte runs, headers and the manifest cost O(1) per tensor.

Counted, not timed (a noisy 2-core VM makes timed assertions flake): cProfile counts every Python and
builtin call, deterministically, for a DeepSeek-V3-shaped metadata-only checkpoint with E and 4E experts.
A step that scans all chunks or all tensors per tensor would multiply the calls by about 16; linear work by
4 (less: the dense parts do not grow).
"""

from __future__ import annotations

import cProfile
import math
import pstats
from pathlib import Path

import pytest
from megatron_keys import DEEPSEEK, DENSE_MLP, MLA, MOE_LAYER, MetadataReader, ends, mtp, per_layer

from offline_bridge.commands.planning import describe
from offline_bridge.config.hf_config import dims_of
from offline_bridge.dtypes import by_option
from offline_bridge.errors import CheckpointError
from offline_bridge.families import family_by_name
from offline_bridge.plan.extent_index import ExtentIndex
from offline_bridge.plan.planner import build_plan
from offline_bridge.plan.transfer import plan_runs
from offline_bridge.readers.base import Extent
from offline_bridge.readers.pickles.pickle_bounds import check_opcodes
from offline_bridge.readers.pickles.safe_pickle import safe_loads
from offline_bridge.write.manifest import write_manifest
from offline_bridge.write.output_files import OutputFiles
from offline_bridge.write.writer import write_index

LAYERS = 5  # the first dense, 4 MoE, and one MTP layer


class StackedReader(MetadataReader):
    """Megatron's expert weights as one [experts, ...] tensor each, one chunk per expert in one file (where
    torch_dist puts them); other tensors are one chunk. Extents are found once per key, as readers do."""

    def __init__(self, shapes: dict) -> None:
        super().__init__(shapes)
        self._extents: dict[str, list[Extent]] = {}

    def extents(self, key: str) -> list[Extent]:
        if key not in self._extents:
            shape = self.tensors[key].shape
            whole = tuple((0, n) for n in shape[1:])
            if "experts.experts" in key:
                size = 2 * math.prod(shape[1:])
                found = [Extent("chunks", e * size, (1, *shape[1:]), ((e, e + 1), *whole)) for e in range(shape[0])]
            else:
                found = [Extent("chunks", 0, shape, ((0, shape[0]), *whole))]
            self._extents[key] = found
        return self._extents[key]


def _resized(key: str, shape: tuple[int, ...], experts: int) -> tuple[int, ...]:
    if "experts.experts" in key or "router" in key:
        return (experts, *shape[1:])
    return shape


def checkpoint(experts: int) -> tuple[dict, dict]:
    moe = {key: _resized(key, shape, experts) for key, shape in MOE_LAYER.items()}
    keys = {**ends(), **per_layer("decoder.layers.0", {**MLA, **DENSE_MLP})}
    for layer in range(1, LAYERS):
        keys.update(per_layer(f"decoder.layers.{layer}", moe))
    keys.update(mtp(moe))
    config = {**DEEPSEEK, "model_type": "deepseek_v3", "num_hidden_layers": LAYERS, "n_routed_experts": experts}
    return keys, config


def convert_metadata(experts: int, out: Path) -> int:
    """Plan, describe, plan every step's byte runs, write the headers, the index and the manifest; the
    number of HF tensors."""
    keys, config = checkpoint(experts)
    family = family_by_name("deepseek_v3")
    reader = StackedReader(keys)
    plan = build_plan(family, reader, dims_of(config, family), by_option("bf16"), 2**20)
    describe(plan, family)
    index = ExtentIndex(reader)
    runs = [plan_runs(step, index, plan.dims) for step in plan.steps]
    assert sum(r is not None for r in runs) > len(runs) // 2  # the expert weights are byte runs
    out.mkdir()
    names = {f.name for f in plan.files}
    OutputFiles(out, plan, names, False).close()
    write_index(plan, out)
    digests: dict[str, dict[str, str]] = {name: {} for name in names}
    for target in plan.targets():
        digests[target.file][target.name] = "0" * 64
    write_manifest(out, "convert", {}, [], digests)
    return sum(len(found) for found in digests.values())


def calls(experts: int, out: Path) -> tuple[int, int]:
    profile = cProfile.Profile()
    profile.enable()
    tensors = convert_metadata(experts, out)
    profile.disable()
    return pstats.Stats(profile).total_calls, tensors


@pytest.mark.parametrize("experts", [32])
def test_calls_grow_linearly_with_tensors(tmp_path: Path, experts: int) -> None:
    small, small_tensors = calls(experts, tmp_path / "small")
    large, large_tensors = calls(4 * experts, tmp_path / "large")
    assert large_tensors > 3.5 * small_tensors
    per_small, per_large = small / small_tensors, large / large_tensors
    assert per_large < 1.25 * per_small, f"{per_small:.0f} calls per tensor at {small_tensors}, {per_large:.0f} at 4x"


@pytest.mark.parametrize("pickled", [b"\x80\x02K\x01K\x02a.", b")K\x02a.", b"\x80\x02N}b."])
def test_adding_to_a_constant_is_refused(pickled: bytes) -> None:
    """Constants share one cell per size in the bounds walk (memory at 8M opcodes); adding to one is refused
    there, as the unpickler would fail on it."""
    with pytest.raises(ValueError, match="adds to a constant"):
        check_opcodes(pickled)
    with pytest.raises(CheckpointError):
        safe_loads(pickled, "forged")


class _Chunks(MetadataReader):
    def __init__(self, found: list[Extent]) -> None:
        super().__init__({"w": (4, 6, 2, 3)})
        self.found = found

    def extents(self, key: str) -> list[Extent]:
        return self.found


def test_extent_index_finds_the_chunks_of_one_stacked_position() -> None:
    """Chunks spanning several layers, or one expert each, are found at every position they cover, in the
    reader's order; a box spanning several positions gets every chunk (the caller checks the overlap)."""
    span = Extent("f", 0, (2, 6, 2, 3), ((0, 2), (0, 6), (0, 2), (0, 3)))  # layers 0-1, every expert
    each = [
        Extent("f", 100 + e, (1, 1, 2, 3), ((i, i + 1), (e, e + 1), (0, 2), (0, 3))) for i in (2, 3) for e in range(6)
    ]
    index = ExtentIndex(_Chunks([span, *each]))
    rest = ((0, 2), (0, 3))
    assert index.overlapping("w", ((1, 2), (4, 5), *rest), 2) == [span]
    assert index.overlapping("w", ((3, 4), (5, 6), *rest), 2) == [each[11]]
    assert index.overlapping("w", ((2, 3), (0, 6), *rest), 1) == each[:6]
    assert index.overlapping("w", ((0, 4), (0, 6), *rest), 0) == [span, *each]
    assert index.overlapping("w", ((2, 4), (0, 1), *rest), 2) == [span, *each]
