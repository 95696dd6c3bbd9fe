"""OUT_DIR is never an input, is replaced only when it is recognisably an output, is locked against a second
run, follows a symlink to its target, and takes any name a file system takes; every refusal is one line,
exit 2, with the inputs and OUT_DIR as they were."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import LORA_SPECS, ROOT
from slow_convert import start_slow_convert

from offline_bridge.commands.cli import run
from offline_bridge.write.manifest import verify

EXAMPLE = ROOT / "examples" / "tiny-llama"


def tree_hash(root: Path) -> str:
    """Every path under ``root`` with its kind and bytes (link targets for symlinks)."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(str(path.relative_to(root)).encode())
        if path.is_symlink():
            digest.update(b"link:" + os.readlink(path).encode())
        elif path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, list[str]]:
    code = run([str(a) for a in args])
    return code, capsys.readouterr().err.strip().splitlines()


def hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    """A copy of the bundled example (a failing test must not damage the repository's)."""
    return Path(shutil.copytree(EXAMPLE, tmp_path / "work" / "ckpt"))


@pytest.mark.parametrize(
    ("out_of", "relation"),
    [
        (lambda c: c, "is"),
        (lambda c: c / "iter_0000010", "lies inside"),  # the iteration directory read
        (lambda c: c / "hf", "lies inside"),
        (lambda c: c / "iter_0000010" / "hf", "lies inside"),
        (lambda c: c.parent, "contains"),
    ],
)
def test_output_overlapping_the_checkpoint_is_refused(
    ckpt: Path, capsys: pytest.CaptureFixture[str], out_of, relation: str
) -> None:
    out, before = out_of(ckpt), tree_hash(ckpt.parent)
    code, lines = cli(capsys, "convert", ckpt, out, "--quiet", "--overwrite")
    assert code == 2 and len(lines) == 1, lines
    assert f"OUT_DIR {relation} the input" in lines[0]
    assert tree_hash(ckpt.parent) == before


@pytest.mark.parametrize("target", ["ckpt", "parent"])
def test_symlink_to_the_checkpoint_is_refused(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], target: str
) -> None:
    link = tmp_path / "link"
    link.symlink_to(ckpt if target == "ckpt" else ckpt.parent)
    before = tree_hash(ckpt.parent)
    code, lines = cli(capsys, "convert", ckpt, link, "--quiet", "--overwrite")
    assert code == 2 and len(lines) == 1 and "the input" in lines[0], lines
    assert tree_hash(ckpt.parent) == before and link.is_symlink()
    # the other way round: the checkpoint reached through a link, OUT_DIR inside its real directory
    (tmp_path / "ckpt-link").symlink_to(ckpt)
    code, lines = cli(capsys, "convert", tmp_path / "ckpt-link", ckpt / "hf", "--quiet")
    assert code == 2 and "lies inside the input" in lines[0], lines


def test_hf_config_in_the_output_is_refused(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert cli(capsys, "convert", ckpt, out, "--quiet")[0] == 0
    before = tree_hash(out)
    for config in (out, out / "config.json"):
        code, lines = cli(capsys, "convert", ckpt, out, "--quiet", "--overwrite", "--hf-config", config)
        assert code == 2 and len(lines) == 1 and f"the input {config}" in lines[0], lines
    assert tree_hash(out) == before


def test_adapter_and_base_are_inputs(adapters: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--adapter, --base and the base run_config.yaml names are inputs too (copies: nothing shared at risk)."""
    adapter = Path(shutil.copytree(adapters[LORA_SPECS[0]], tmp_path / "adapter"))
    run_config = next(adapter.rglob("run_config.yaml"))
    cached_base = next(
        line.split(": ", 1)[1] for line in run_config.read_text().splitlines() if "pretrained_ch" in line
    )
    base = Path(shutil.copytree(cached_base, tmp_path / "base"))
    run_config.write_text(run_config.read_text().replace(cached_base, str(base)))
    before = tree_hash(tmp_path)
    cases = [
        (["convert", adapter, base], f"contains the input {base}/iter_"),  # the base run_config.yaml names
        (["convert", adapter, base / "hf", "--base", base], "lies inside the input"),
        (["convert", base, adapter, "--adapter", adapter], "is the input"),
    ]
    for args, relation in cases:
        code, lines = cli(capsys, *args, "--quiet", "--overwrite")
        assert code == 2 and len(lines) == 1 and relation in lines[0], lines
    assert tree_hash(tmp_path) == before


def test_overwrite_replaces_only_an_output(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A directory of someone's files survives --overwrite; an earlier output or an HF model directory goes."""
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    code, lines = cli(capsys, "convert", ckpt, out, "--quiet", "--overwrite")
    assert code == 2 and len(lines) == 1 and "holds notes.txt, sub" in lines[0], lines
    assert (out / "notes.txt").read_text() == "mine"
    code, lines = cli(capsys, "convert", tmp_path / "missing", out, "--quiet")  # refused before reading anything
    assert code == 2 and lines == [f"error: {out}: output directory is not empty; pass --overwrite to replace it"]
    shutil.rmtree(out / "sub")
    (out / "config.json").write_text("{}")  # now a (flat) HF model directory
    assert cli(capsys, "convert", ckpt, out, "--quiet", "--overwrite")[0] == 0
    assert not (out / "notes.txt").exists() and verify(out) == []
    assert cli(capsys, "convert", ckpt, out, "--quiet", "--overwrite")[0] == 0  # our own output
    assert hidden(tmp_path) == [] and verify(out) == []


def test_input_named_like_a_leftover_is_kept(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A checkpoint named like the staging directory of a dead run into OUT_DIR is an input, not debris."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    ckpt = Path(shutil.copytree(EXAMPLE, tmp_path / f".out.partial-{dead.stdout.strip()}"))
    before = tree_hash(ckpt)
    assert cli(capsys, "convert", ckpt, tmp_path / "out", "--quiet") == (0, [])
    assert tree_hash(ckpt) == before and verify(tmp_path / "out") == []


def test_symlinked_output_replaces_its_target(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    real, link = tmp_path / "real", tmp_path / "link"
    real.mkdir()
    link.symlink_to(real)
    for extra in ([], ["--overwrite"]):
        code, lines = cli(capsys, "convert", ckpt, link, "--quiet", *extra)
        assert code == 0 and lines == [], lines
        assert link.is_symlink() and link.resolve() == real and verify(link) == []
        assert hidden(tmp_path) == []
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    code, lines = cli(capsys, "convert", ckpt, dangling, "--quiet")
    assert code == 2 and len(lines) == 1 and "cannot resolve OUT_DIR" in lines[0]
    assert not (tmp_path / "nowhere").exists()


def test_long_and_special_names(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    longest = tmp_path / ("x" * 250)  # `.x….partial-<pid>` would pass NAME_MAX: the hidden names are cut and hashed
    assert cli(capsys, "convert", ckpt, longest, "--quiet")[0] == 0
    assert verify(longest) == [] and hidden(tmp_path) == []
    for name in ["y" * 256, ".", "..", "/", "sub/.."]:
        code, lines = cli(capsys, "convert", ckpt, name if name != "sub/.." else tmp_path / name, "--quiet")
        assert code == 2 and len(lines) == 1 and "OUT_DIR" in lines[0], (name, lines)


def test_second_run_into_the_same_output_fails_at_once(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    first = start_slow_convert(ckpt, out)
    second = subprocess.run(
        [sys.executable, "-m", "offline_bridge", "convert", str(ckpt), str(out), "--quiet", "--overwrite"],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
    )
    assert second.returncode == 2
    assert second.stderr.strip().splitlines() == [
        f"error: {out}: another run (pid {first.pid}) is writing this OUT_DIR; wait for it or choose another"
    ]
    code, lines = cli(capsys, "convert", tmp_path / "missing", out, "--quiet")  # locked before reading anything
    assert code == 2 and lines == [
        f"error: {out}: another run (pid {first.pid}) is writing this OUT_DIR; wait for it or choose another"
    ]
    assert first.poll() is None, "the second run waited for the first"
    assert first.wait() == 0 and first.stderr.read() == ""
    assert verify(out) == [] and hidden(tmp_path) == []  # the lock file goes with the run
