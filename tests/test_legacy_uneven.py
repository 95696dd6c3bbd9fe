"""Uneven pipelines at three stages in legacy rank files, whose layer numbers are stage-local (issue 20): first /
last stage sizes, and a `pipeline_model_parallel_layout` with two virtual stages, written by megatron-core. The
output is byte for byte the conversion of the same weights re-saved evenly (torch_dist at PP1), the logits are
Megatron's, and `inspect` shows the split for the legacy files and for the torch_dist save."""

from __future__ import annotations

from pathlib import Path

import pytest
from judge import assert_matches_megatron, assert_same_output

from offline_bridge import convert
from offline_bridge.commands.inspection import format_report, inspect_checkpoint
from tools.legacy_fixtures import UNEVEN_SPECS, even_twin
from tools.megatron_fixtures import FixtureSpec, build_fixtures, legacy_root

# per spec, what each stage holds: [first, last] global layer per virtual stage
STAGES = {
    UNEVEN_SPECS[0].name: [[[0, 0]], [[1, 2]], [[3, 5]]],
    UNEVEN_SPECS[1].name: [[[0, 0], [4, 4]], [[1, 2], [5, 5]], [[3, 3], [6, 6]]],
}


@pytest.fixture(scope="module")
def uneven(megatron_cache: Path) -> dict[FixtureSpec, Path]:
    return build_fixtures(UNEVEN_SPECS, megatron_cache)


@pytest.mark.parametrize("spec", UNEVEN_SPECS, ids=lambda s: s.name)
def test_same_bytes_as_the_even_save(spec: FixtureSpec, uneven: dict, megatron_cache: Path, tmp_path: Path) -> None:
    root = uneven[spec]
    ours = convert(legacy_root(root), tmp_path / "legacy", progress=False)
    even = convert(even_twin(megatron_cache, spec, root), tmp_path / "even", progress=False)
    assert_same_output(ours, even)
    assert_matches_megatron(ours, spec, root)


@pytest.mark.parametrize("spec", UNEVEN_SPECS, ids=lambda s: s.name)
def test_inspect_shows_the_split(spec: FixtureSpec, uneven: dict) -> None:
    for root, source in ((legacy_root(uneven[spec]), "rank files"), (uneven[spec], "writer ranks")):
        report = inspect_checkpoint(root)
        assert report["pipeline"] == {"stages": [[tuple(c) for c in s] for s in STAGES[spec.name]], "source": source}
        assert (report["layout"]["pp"], report["layout"]["vpp"]) == (spec.pp, spec.vpp)
        assert "pipeline    layers PP0 0" in format_report(report)
