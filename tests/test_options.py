"""Every option is range-checked before the checkpoint is read, on the command line and in the Python API;
any error in a command is one line (exit 2 for input and options, 1 internal), its traceback only with
--debug, and `--json` reports are JSON whatever values they hold."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import ROOT

import offline_bridge.commands.inspection
from offline_bridge import OptionError, convert, export_adapter
from offline_bridge.commands.cli import run
from offline_bridge.write.manifest import verify

EXAMPLE = ROOT / "examples" / "tiny-llama"

BAD_CONVERT = [
    ("--max-shard-size", "abc"),
    ("--max-shard-size", "0"),
    ("--max-shard-size", "-5GB"),
    ("--max-shard-size", "inf"),
    ("--max-shard-size", "nan"),
    ("--max-shard-size", "1e30GB"),
    ("--max-shard-size", "5XB"),
    ("--workers", "0"),
    ("--workers", "-1"),
    ("--workers", "65"),
    ("--workers", "1000000000"),
    ("--workers", "four"),
    ("--vocab-size", "0"),
    ("--vocab-size", "-3"),
    ("--vocab-size", str(2**31)),
    ("--lora-alpha", "nan"),
    ("--lora-alpha", "inf"),
    ("--lora-alpha", "-inf"),
    ("--lora-dim", "0"),
    ("--lora-dim", "-8"),
    ("--lora-dim", "65537"),
    ("--iteration", "²"),
    ("--iteration", "٣"),  # an Arabic-Indic digit: int() takes it, Megatron's iter_%07d never writes it
    ("--iteration", "-1"),
    ("--iteration", "1" * 5000),
    ("--iteration", "latest"),
    ("--iteration", " 10"),
    ("--device", "tpu"),
    ("--device", "cuda:x"),
    ("--device", "cuda:1:2"),
    ("--device", "meta"),
]


def cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, list[str]]:
    code = run([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines()


@pytest.mark.parametrize(("option", "value"), BAD_CONVERT)
def test_bad_convert_option_is_one_line_before_reading(
    option: str, value: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The checkpoint does not exist: an error about the option shows it was checked first."""
    code, lines = cli(capsys, "convert", tmp_path / "missing", tmp_path / "out", option, value)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: ") and option in lines[0] and "does not exist" not in lines[0]
    assert len(lines[0]) < 200
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args",
    [
        ["inspect", "CKPT", "--iteration", "²"],
        ["diff", "CKPT", "CKPT", "--atol", "-1"],
        ["diff", "CKPT", "CKPT", "--atol", "nan"],
        ["diff", "CKPT", "CKPT", "--rtol", "inf"],
        ["export-adapter", "CKPT", "OUT", "--iteration", "release2"],
        ["export-adapter", "CKPT", "OUT", "--lora-dim", "0"],
        ["export-adapter", "CKPT", "OUT", "--lora-alpha", "nan"],
    ],
)
def test_bad_option_of_other_commands(args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = {"CKPT": str(tmp_path / "missing"), "OUT": str(tmp_path / "out")}
    code, lines = cli(capsys, *(paths.get(a, a) for a in args))
    option = next(a for a in args if a.startswith("--"))
    assert code == 2 and len(lines) == 1 and option in lines[0], lines


@pytest.mark.parametrize(
    "options",
    [
        {"workers": 0},
        {"workers": True},
        {"workers": 2.0},
        {"iteration": -1},
        {"iteration": 10**12},
        {"iteration": "²"},
        {"max_shard_size": 0},
        {"max_shard_size": "inf"},
        {"vocab_size": 0},
        {"lora_alpha": math.nan},
        {"lora_alpha": 10**400},
        {"lora_dim": 0},
        {"device": "cuda:"},
    ],
)
def test_python_api_checks_the_same(options: dict, tmp_path: Path) -> None:
    with pytest.raises(OptionError, match="--" + next(iter(options)).replace("_", "-")):
        convert(tmp_path / "missing", tmp_path / "out", progress=False, **options)
    if set(options) <= {"iteration", "lora_dim", "lora_alpha"}:
        with pytest.raises(OptionError):
            export_adapter(tmp_path / "missing", tmp_path / "out", progress=False, **options)


def test_values_in_range_convert(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    options = ["--iteration", "10", "--workers", "64", "--max-shard-size", "100KB", "--device", "cpu"]
    code, lines = cli(capsys, "convert", EXAMPLE, out, "--quiet", *options)
    assert code == 0 and lines == [], lines
    assert verify(out) == [] and len(list(out.glob("model-*.safetensors"))) > 1
    assert convert(EXAMPLE, tmp_path / "api", iteration=10, workers=1, progress=False).is_dir()


def test_usage_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for args in (["convert", EXAMPLE], ["convert", EXAMPLE, tmp_path / "out", "--bogus"], ["nonsense"]):
        code, lines = cli(capsys, *args)
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines


def test_json_report_holds_anything(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Args are the checkpoint's: bytes, sets, tuple keys, NaN or objects still give a JSON report."""
    odd = {
        "args": {"blob": b"\xff\x00ab", "groups": {3, 1}, (1, 2): "tuple key", "eps": math.nan, "obj": object()},
        "errors": [],
    }
    monkeypatch.setattr(offline_bridge.commands.inspection, "inspect_checkpoint", lambda *_: odd)
    code = run(["inspect", str(EXAMPLE), "--json"])
    out = capsys.readouterr().out
    assert code == 0
    report = json.loads(out, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    assert report["args"]["blob"] == "\\xff\x00ab" and report["args"]["groups"] == [1, 3]
    assert report["args"]["[1, 2]"] == "tuple key" and report["args"]["eps"] == "nan"


def test_internal_error_is_one_line_and_debug_shows_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(*_: object) -> dict:
        raise ValueError("an internal mistake")

    monkeypatch.setattr(offline_bridge.commands.inspection, "inspect_checkpoint", broken)
    code, lines = cli(capsys, "inspect", EXAMPLE)
    assert code == 1 and lines == ["internal error: ValueError: an internal mistake"]
    code, lines = cli(capsys, "--debug", "inspect", EXAMPLE)
    assert code == 1 and lines[0] == "Traceback (most recent call last):" and lines[-1].endswith("an internal mistake")
    monkeypatch.undo()
    code, lines = cli(capsys, "--debug", "inspect", EXAMPLE / "missing")  # bad input: its own exit code
    assert code == 2 and lines[0] == "Traceback (most recent call last):" and "does not exist" in lines[-1]
