"""The same weights saved at different parallel layouts convert to byte-identical files."""

from __future__ import annotations

from pathlib import Path

from conftest import BASE_SPEC

from offline_bridge import convert
from tools.megatron_fixtures import reshard


def test_tp1pp1_and_tp2pp2_saves_convert_identically(checkpoints: dict, tmp_path: Path) -> None:
    resharded = reshard(checkpoints[BASE_SPEC], BASE_SPEC, tmp_path / "tp2pp2", tp=2, pp=2)
    assert len(list((resharded / "iter_0000010").glob("*.distcp"))) > len(
        list((checkpoints[BASE_SPEC] / "iter_0000010").glob("*.distcp"))
    )
    a = convert(checkpoints[BASE_SPEC], tmp_path / "a", progress=False)
    b = convert(resharded, tmp_path / "b", progress=False)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_same_input_gives_same_bytes(checkpoints: dict, tmp_path: Path) -> None:
    first = convert(checkpoints[BASE_SPEC], tmp_path / "a", progress=False, max_shard_size="100KB")
    second = convert(checkpoints[BASE_SPEC], tmp_path / "b", progress=False, max_shard_size="100KB")
    for path in sorted(first.iterdir()):
        assert path.read_bytes() == (second / path.name).read_bytes(), path.name
