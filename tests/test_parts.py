"""`convert --part I/N` + `finalize` (issue 21): any split gives the bytes and manifest of one plain run, and a
missing, damaged, foreign or still-running part makes `finalize` fail naming it, keeping the parts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from split_runs import EXAMPLE, SHARD, tree

from offline_bridge import convert
from offline_bridge.commands.cli import run
from offline_bridge.commands.parts import finalize
from offline_bridge.errors import CheckpointError, OptionError
from offline_bridge.plan.parts import parse_part
from offline_bridge.write.output_lock import OutputLock


def _parts(out: Path, count: int, skip: tuple[int, ...] = (), **options: object) -> Path:
    for index in range(count):
        if index not in skip:
            convert(EXAMPLE, out, max_shard_size=SHARD, progress=False, part=f"{index}/{count}", **options)
    return out.parent / f".{out.name}.parts"


@pytest.mark.parametrize("count", [1, 2, 3, 7, 12])
def test_any_split_gives_the_plain_output(count: int, plain: dict[str, bytes], tmp_path: Path) -> None:
    out = tmp_path / "out"
    area = _parts(out, count)
    assert not out.exists()  # nothing looks complete before finalize
    finalize(out)
    assert tree(out) == plain  # weights, index, config and manifest, byte for byte
    assert not area.exists()


def test_parts_in_any_order_and_again(plain: dict[str, bytes], tmp_path: Path) -> None:
    out = tmp_path / "out"
    for index in (2, 0, 1, 2):
        convert(EXAMPLE, out, max_shard_size=SHARD, progress=False, part=f"{index}/3")
    finalize(out)
    assert tree(out) == plain


def test_a_missing_part_is_named(tmp_path: Path) -> None:
    area = _parts(tmp_path / "out", 3, skip=(1,))
    with pytest.raises(CheckpointError, match=r"part\(s\) 1/3 missing"):
        finalize(tmp_path / "out")
    assert area.is_dir() and not (tmp_path / "out").exists()  # kept for another try


def test_a_damaged_file_is_named_with_its_part(tmp_path: Path) -> None:
    area = _parts(tmp_path / "out", 3)
    victim = json.loads((area / ".meta" / "part-2-of-3.json").read_text())["files"][0]
    data = bytearray((area / victim).read_bytes())
    data[-1] ^= 1
    (area / victim).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{victim}: missing or damaged; run .* --part 2/3 --resume"):
        finalize(tmp_path / "out")
    convert(EXAMPLE, tmp_path / "out", max_shard_size=SHARD, progress=False, part="2/3", resume=True)
    finalize(tmp_path / "out")  # the damaged file was written again, the others kept


def test_a_damaged_side_file_is_named(tmp_path: Path) -> None:
    area = _parts(tmp_path / "out", 2)
    (area / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"config\.json: missing or damaged"):
        finalize(tmp_path / "out")


def test_parts_of_different_runs_are_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    convert(EXAMPLE, out, max_shard_size=SHARD, progress=False, part="0/2")
    convert(EXAMPLE, out, max_shard_size=SHARD, progress=False, part="1/2", dtype="fp32")
    with pytest.raises(CheckpointError, match="disagree on plan_sha256"):
        finalize(out)
    convert(EXAMPLE, out, max_shard_size=SHARD, progress=False, part="1/3")
    with pytest.raises(CheckpointError, match="different splits"):
        finalize(out)


def test_a_stray_file_is_refused(tmp_path: Path) -> None:
    area = _parts(tmp_path / "out", 2)
    (area / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match=r"notes\.txt, which no part wrote"):
        finalize(tmp_path / "out")


def test_finalize_waits_for_no_one(tmp_path: Path) -> None:
    """A part still running (its lock held) makes finalize fail at once."""
    area = _parts(tmp_path / "out", 2)
    lock = OutputLock(area / ".meta" / "part-1.lock", tmp_path / "out")
    lock.acquire()
    try:
        with pytest.raises(OptionError, match="another run"):
            finalize(tmp_path / "out")
    finally:
        lock.release()
    finalize(tmp_path / "out")


def test_nothing_to_finalize(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no parts to finalize"):
        finalize(tmp_path / "out")


@pytest.mark.parametrize("text", ["3/3", "-1/2", "1/0", "1", "a/b", "1/2/3", " 1/2", "١/٢"])
def test_bad_part_is_refused_before_reading(text: str, tmp_path: Path) -> None:
    with pytest.raises(OptionError, match="--part must be I/N"):
        parse_part(text)
    with pytest.raises(OptionError, match="--part must be I/N"):
        convert(tmp_path / "missing", tmp_path / "out", part=text)


def test_a_non_empty_out_dir_is_refused_by_every_part(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("x")
    with pytest.raises(OptionError, match="not empty"):
        convert(EXAMPLE, out, part="0/2")


def test_cli(plain: dict[str, bytes], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    for index in range(2):
        assert run(["convert", str(EXAMPLE), str(out), "--max-shard-size", SHARD, "--part", f"{index}/2", "-q"]) == 0
    assert run(["finalize", str(out), "-q"]) == 0
    assert tree(out) == plain
    assert run(["finalize", str(tmp_path / "other")]) == 2
    assert "no parts to finalize" in capsys.readouterr().err


def test_finalize_overwrites_only_with_overwrite(plain: dict[str, bytes], tmp_path: Path) -> None:
    out = tmp_path / "out"
    _parts(out, 2)
    out.mkdir()
    (out / "config.json").write_text("{}")  # an HF model directory, replaceable with --overwrite
    with pytest.raises(OptionError, match="not empty"):
        finalize(out)
    finalize(out, overwrite=True)
    assert tree(out) == plain


def test_files_of_an_earlier_split_are_not_taken_for_side_files(tmp_path: Path) -> None:
    """Parts run again with other options: the earlier run's files are not the new plan's, nor its side files."""
    out = tmp_path / "out"
    _parts(out, 2)
    for index in range(2):
        convert(EXAMPLE, out, max_shard_size="100KB", progress=False, part=f"{index}/2")
    with pytest.raises(CheckpointError, match=r"model-00001-of-00009\.safetensors.*which no part wrote"):
        finalize(out)


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd", "..", ".meta", "a\\b", "x\0y"])
def test_a_part_manifest_naming_a_file_elsewhere_is_refused(name: str, tmp_path: Path) -> None:
    """finalize opens only files of the parts area, whatever a (damaged or forged) part manifest lists."""
    area = _parts(tmp_path / "out", 2)
    (tmp_path / "outside.safetensors").write_bytes(b"secret")
    manifest = area / ".meta" / "part-1-of-2.json"
    body = json.loads(manifest.read_text())
    body["files"].append(name)
    manifest.write_text(json.dumps(body))
    with pytest.raises(CheckpointError, match=r"part-1-of-2\.json: not a part manifest"):
        finalize(tmp_path / "out")
