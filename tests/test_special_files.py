"""Special and giant files where offline-bridge opens a file, and values that used to escape as tracebacks:
FIFOs (opened blocking, they hang forever), /dev/zero, sparse files of hundreds of GB, tracker files and
`--iteration` values that are not ASCII numbers, hostile safetensors headers in `diff` and hostile manifests
in `verify`. Each runs the CLI in a subprocess under a memory cap and a time limit (tests/hostile.py)."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest
from hostile import Outcome, assert_refused, run_cli

import offline_bridge
from offline_bridge.write.manifest import MANIFEST

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "tiny-llama"  # torch_dist, iteration 10
TINY = REPO / "formats" / "vectors" / "tiny.safetensors"
TRACKER = "latest_checkpointed_iteration.txt"
ITER = "iter_0000010"
MEMORY = 512 << 20  # a refused run needs well under 100 MiB
GIANT = 300 * 10**9  # bytes of a sparse file


def _special(path: Path, kind: str) -> None:
    """Put a FIFO, a link to /dev/zero, a directory or a 300 GB sparse file at ``path``."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev-zero":
        path.symlink_to("/dev/zero")
    elif kind == "directory":
        path.mkdir()
    else:
        path.touch()
        os.truncate(path, GIANT)


def _bounded(outcome: Outcome) -> Outcome:
    assert outcome.maxrss < MEMORY, f"peak memory {outcome.maxrss >> 20} MiB"
    return outcome


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    return Path(shutil.copytree(EXAMPLE, tmp_path / "ckpt"))


def _convert(ckpt: Path, tmp_path: Path, *extra: str) -> Outcome:
    return _bounded(run_cli("convert", ckpt, tmp_path / "out", "--quiet", *extra, cwd=tmp_path))


# --------------------------------------------------------------------------- tracker and --iteration


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("²", "neither an iteration number"),
        ("٣", "neither an iteration number"),
        ("1" * 5000, "neither an iteration number"),
        (b"\xff\xfe10", "not UTF-8"),
        ("10\n\n" + "x" * 100_000, "more than the 65536"),
    ],
    ids=["superscript", "arabic-indic", "5000-digits", "not-utf8", "big"],
)
def test_tracker_that_is_not_a_number(content: str | bytes, needle: str, ckpt: Path, tmp_path: Path) -> None:
    tracker = ckpt / TRACKER
    tracker.write_bytes(content if isinstance(content, bytes) else content.encode())
    line = assert_refused(_convert(ckpt, tmp_path), TRACKER, needle)
    assert len(line) < 400


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "directory", "sparse"])
def test_special_tracker(kind: str, ckpt: Path, tmp_path: Path) -> None:
    _special(ckpt / TRACKER, kind)
    needle = "more than" if kind == "sparse" else "not a regular file"
    assert_refused(_convert(ckpt, tmp_path), TRACKER, needle)


@pytest.mark.parametrize(
    "value", ["²", "١٠", "1" * 5000, "-1", "10 10"], ids=["superscript", "arabic-indic", "5000-digits", "neg", "two"]
)
def test_iteration_option_that_is_not_a_number(value: str, ckpt: Path, tmp_path: Path) -> None:
    line = assert_refused(_convert(ckpt, tmp_path, "--iteration", value), "--iteration")
    assert len(line) < 300


# --------------------------------------------------------------------------- files a reader opens


@pytest.mark.parametrize("name", ["__0_0.distcp", ".metadata", "common.pt"])
@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_special_checkpoint_file(name: str, kind: str, ckpt: Path, tmp_path: Path) -> None:
    _special(ckpt / ITER / name, kind)
    assert_refused(_convert(ckpt, tmp_path), f"{ITER}/{name}", "not a regular file")


def test_fingerprint_hashes_only_fixed_files(ckpt: Path, tmp_path: Path) -> None:
    """300 GB sparse files named like metadata, deeper in the checkpoint, and a FIFO: recorded by size (the
    FIFO not at all), never read; the conversion finishes in seconds."""
    notes = ckpt / ITER / "notes"
    notes.mkdir()
    for name in ("config.json", "metadata.json", ".metadata", "common.pt"):
        _special(notes / name, "sparse")
    _special(notes / "pipe", "fifo")
    outcome = _convert(ckpt, tmp_path)
    assert outcome.code == 0, outcome.stderr
    files = json.loads((tmp_path / "out" / MANIFEST).read_text())["sources"][0]["files"]
    assert files["notes/config.json"] == {"size": GIANT} and files["notes/.metadata"] == {"size": GIANT}
    assert "notes/pipe" not in files
    assert {name for name, entry in files.items() if "sha256" in entry} == {".metadata", "common.pt", "metadata.json"}


def test_dev_zero_as_checkpoint(tmp_path: Path) -> None:
    assert_refused(_bounded(run_cli("convert", "/dev/zero", tmp_path / "out", cwd=tmp_path)), "/dev/zero")


# --------------------------------------------------------------------------- diff on hostile safetensors


def _header(tensors: dict[str, Any] | str) -> bytes:
    """A safetensors file with ``tensors`` (a dict, or raw header text) and 26 bytes of data."""
    text = tensors if isinstance(tensors, str) else json.dumps(tensors)
    return struct.pack("<Q", len(text)) + text.encode() + bytes(26)


@pytest.mark.parametrize(
    ("header", "needle"),
    [
        ({"t": {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}}, "unsupported dtype ['F32']"),
        ({"t": {"dtype": "F32", "shape": [1] * 65, "data_offsets": [0, 4]}}, "65 dimensions"),
        ({"t": {"dtype": "F32", "shape": [0, 2**63], "data_offsets": [0, 0]}}, "larger than numpy can index"),
        ({"t": {"dtype": "F32", "shape": [2**64, 0], "data_offsets": [0, 0]}}, "larger than numpy can index"),
        ({"t": {"dtype": {"a": 1}, "shape": [2], "data_offsets": [0, 8]}}, "unsupported dtype"),
        ({"x" * 100_000: {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, "characters)"),
        ('{"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "t": {}}', "appears twice"),
        ("[" * 50_000, "nests too deeply"),
        ('{"t": 1' + "0" * 5000 + "}", "not UTF-8 JSON"),
    ],
    ids=["list-dtype", "65-dims", "0x2^63", "2^64x0", "dict-dtype", "long-name", "repeated", "deep", "5000-digits"],
)
def test_diff_hostile_header(header: dict | str, needle: str, tmp_path: Path) -> None:
    hostile = tmp_path / "hostile.safetensors"
    hostile.write_bytes(_header(header))
    line = assert_refused(_bounded(run_cli("diff", hostile, TINY, cwd=tmp_path)), "hostile.safetensors", needle)
    assert len(line) < 400


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "sparse"])
def test_diff_special_file(kind: str, tmp_path: Path) -> None:
    """A single file, and the same inside an HF directory: never opened blocking, never read whole."""
    _special(tmp_path / "a.safetensors", kind)
    assert_refused(_bounded(run_cli("diff", tmp_path / "a.safetensors", TINY, cwd=tmp_path)), "a.safetensors")
    model = tmp_path / "model"
    model.mkdir()
    _special(model / "model.safetensors", kind)
    assert_refused(_bounded(run_cli("diff", TINY, model, cwd=tmp_path)), "model.safetensors")


# --------------------------------------------------------------------------- verify on hostile outputs


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return offline_bridge.convert(EXAMPLE, tmp_path_factory.mktemp("special") / "hf", progress=False)


@pytest.fixture
def out(converted: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(converted, tmp_path / "hf"))


def _edit_manifest(out: Path, files: dict[str, Any]) -> None:
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["files"].update(files)
    (out / MANIFEST).write_text(json.dumps(manifest))


def _verify(out: Path) -> Outcome:
    return _bounded(run_cli("verify", out, cwd=out.parent))


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "directory"])
@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_verify_special_output_file(name: str, kind: str, out: Path) -> None:
    size = (out / name).stat().st_size
    _special(out / name, kind)
    _edit_manifest(out, {name: {**json.loads((out / MANIFEST).read_text())["files"][name], "size": size}})
    assert_refused(_verify(out), name, "not a regular file")


def test_verify_manifest_naming_a_directory(out: Path) -> None:
    (out / "sub").mkdir()
    _edit_manifest(out, {"sub": {"size": (out / "sub").stat().st_size, "sha256": "0" * 64}})
    assert_refused(_verify(out), "sub", "not a regular file")


@pytest.mark.parametrize("name", ["..", ".", "a\0b", "a/b", MANIFEST])
def test_verify_manifest_naming_no_plain_file(name: str, out: Path) -> None:
    """Reported as an edited manifest (exit 1, one line each), never opened."""
    _edit_manifest(out, {name: {"size": 0, "sha256": "0" * 64}})
    outcome = _verify(out)
    assert outcome.code == 1 and not outcome.stderr, outcome.stderr
    assert "not a plain file name" in outcome.stdout and outcome.stdout.endswith("1 mismatch(es)\n")


@pytest.mark.parametrize(
    ("kind", "needle"),
    [
        ("fifo", "not a regular file"),
        ("dev-zero", "not a regular file"),
        ("directory", "not a regular file"),
        ("sparse", "more than"),
        ("deep", "nests too deeply"),
        ("not-utf8", "not UTF-8"),
    ],
)
def test_verify_hostile_manifest(kind: str, needle: str, out: Path) -> None:
    manifest = out / MANIFEST
    if kind == "deep":
        manifest.write_text("[" * 50_000)
    elif kind == "not-utf8":
        manifest.write_bytes(b'{"manifest_version": 1, "files": {"\xff": {}}}')
    else:
        _special(manifest, kind)
    assert_refused(_verify(out), MANIFEST, needle)


def test_verify_dev_zero(tmp_path: Path) -> None:
    assert_refused(_bounded(run_cli("verify", "/dev/zero", cwd=tmp_path)), "no manifest")


# --------------------------------------------------------------------------- --hf-config


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "sparse"])
@pytest.mark.parametrize("where", ["file", "model-dir"])
def test_special_hf_config(kind: str, where: str, ckpt: Path, tmp_path: Path) -> None:
    """A FIFO, /dev/zero or a 300 GB sparse file as `--hf-config` (or as its directory's config.json)."""
    given = tmp_path / "hf"
    if where == "model-dir":
        given.mkdir()
    _special(given / "config.json" if where == "model-dir" else given, kind)
    needle = "more than" if kind == "sparse" else "not a regular file"
    line = assert_refused(_convert(ckpt, tmp_path, "--hf-config", str(given)), "--hf-config", needle)
    assert len(line) < 400


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "directory", "sparse"])
def test_special_run_config_of_an_adapter_save(kind: str, tmp_path: Path) -> None:
    """Bridge's run_config.yaml (which names the adapter's base and its LoRA settings) as a special file."""
    bridge = Path(shutil.copytree(REPO / "tests" / "data" / "bridge" / "dense", tmp_path / "bridge", symlinks=True))
    _special(bridge / "lora" / "ckpt" / "iter_0000020" / "run_config.yaml", kind)
    outcome = _bounded(
        run_cli("convert", bridge / "base", tmp_path / "out", "--adapter", bridge / "lora" / "ckpt", cwd=tmp_path)
    )
    needle = "more than" if kind == "sparse" else "not a regular file"
    line = assert_refused(outcome, "run_config.yaml", needle)
    assert len(line) < 400


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_verify_names_a_directory_that_is_not_there(kind: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    if kind == "file":
        out.write_text("{}")
    needle = "no such directory" if kind == "missing" else "not a directory"
    line = assert_refused(run_cli("verify", out, cwd=tmp_path), str(out), needle)
    assert "offline-bridge.json" not in line
