"""`inspect`: the layout it reads off the files is the one the fixture was saved with, and its tensor table
is what torch's own DCP reader sees in the metadata."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from click.testing import CliRunner
from conftest import LEGACY_SPECS, LORA_SPECS, MOE_SPECS, PARITY_SPECS, ROOT

from offline_bridge.commands.cli import main
from offline_bridge.commands.inspection import inspect_checkpoint
from tools.megatron_fixtures import FixtureSpec, legacy_root

SPECS = [
    next(s for s in PARITY_SPECS if (s.family, s.tp, s.pp, s.dtype, s.tied) == ("qwen3", 2, 2, "fp32", False)),
    next(s for s in PARITY_SPECS if (s.family, s.pp, s.vpp) == ("qwen2", 2, 2)),
    MOE_SPECS[1],  # qwen3_moe TP2 EP2, expert TP 2
    next(s for s in MOE_SPECS if s.family == "qwen3_moe" and s.etp == 1),
    next(s for s in MOE_SPECS if s.family == "qwen3_moe" and s.vpp == 2),
    next(s for s in MOE_SPECS if s.family == "deepseek_v3"),  # shared experts, MTP
    *LEGACY_SPECS,  # TP2 PP2 VPP2; an uneven first stage; MoE TP2 EP2
]


def _expected_layout(spec: FixtureSpec) -> dict:
    return {"tp": spec.tp, "pp": spec.pp, "vpp": spec.vpp, "ep": spec.ep, "etp": spec.etp}


def _inspect(path: Path) -> dict:
    """Through the command line, as a user runs it."""
    result = CliRunner().invoke(main, ["inspect", str(path), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_layout_and_table_match_the_save(spec: FixtureSpec, checkpoints: dict) -> None:
    report = _inspect(checkpoints[spec])
    assert report["format"] == "torch_dist" and report["iterations"] == [str(spec.iteration)]
    assert report["layout"] == _expected_layout(spec)
    assert all(v in (None, report["layout"][k]) for k, v in report["layout_args"].items())
    assert report["family"] == spec.family and report["adapter"] is None
    assert report["args"]["num_layers"] == spec.num_layers
    metadata = dcp.FileSystemReader(str(checkpoints[spec] / f"iter_{spec.iteration:07d}")).read_metadata()
    theirs = {
        key: (list(entry.size), str(entry.properties.dtype).removeprefix("torch."), len(entry.chunks))
        for key, entry in metadata.state_dict_metadata.items()
        if hasattr(entry, "chunks")
    }
    ours = {t["key"]: (t["shape"], t["dtype"], t["chunks"]) for t in report["tensors"]}
    assert ours == theirs
    sizes = {key: torch.empty(0, dtype=getattr(torch, dtype)).element_size() for key, (_, dtype, _) in theirs.items()}
    model = sum(sizes[t["key"]] * torch.Size(t["shape"]).numel() for t in report["tensors"])
    assert report["bytes"]["model"] == model  # the fixtures hold no optimizer state
    files = (checkpoints[spec] / f"iter_{spec.iteration:07d}").iterdir()
    assert report["bytes"]["total"] == sum(p.stat().st_size for p in files)


@pytest.mark.parametrize("spec", [s for s in SPECS if s.legacy_twin], ids=lambda s: s.name)
def test_legacy_twin(spec: FixtureSpec, checkpoints: dict) -> None:
    legacy, twin = _inspect(legacy_root(checkpoints[spec])), _inspect(checkpoints[spec])
    assert legacy["format"] == "torch" and legacy["layout"] == _expected_layout(spec)
    assert legacy["family"] == spec.family
    assert legacy["bytes"]["model"] == twin["bytes"]["model"]  # per-layer keys there, stacked ones here
    assert {t["chunks"] for t in legacy["tensors"]} == {spec.tp}  # one piece per TP rank file


def test_lora_adapter(adapters: dict) -> None:
    spec = LORA_SPECS[0]
    report = _inspect(adapters[spec])
    adapter = report["adapter"]
    assert adapter.pop("base").endswith(f"{spec.base.name}/ckpt")  # run_config.yaml's pretrained_checkpoint
    assert adapter == {
        "type": spec.kind,
        "targets": sorted(spec.targets),
        "adapter_only": True,
        "alpha": spec.alpha,
        "dim": spec.dim,
    }
    assert report["layout"] == {"tp": spec.tp, "pp": 1, "vpp": 1, "ep": 1, "etp": None}
    assert report["family"] == spec.base.family and report["args"] is None  # family from the base's args


def test_text_report_and_bad_input(checkpoints: dict, tmp_path: Path) -> None:
    spec = SPECS[0]
    result = CliRunner().invoke(main, ["inspect", str(checkpoints[spec])])
    assert result.exit_code == 0, result.output
    assert "TP2 PP2 VPP1 EP1 ETP-" in result.stdout
    assert "decoder.layers.self_attention.linear_qkv.weight" in result.stdout
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "does not exist" in result.stderr


def test_reads_no_tensor_bytes(checkpoints: dict, tmp_path: Path) -> None:
    """Metadata only: with every .distcp file emptied, inspect still reports the same."""
    spec = SPECS[0]
    source = checkpoints[spec] / "iter_0000010"
    copy = tmp_path / "iter_0000010"
    copy.mkdir()
    for path in source.iterdir():
        (copy / path.name).write_bytes(b"" if path.suffix == ".distcp" else path.read_bytes())
    report, original = inspect_checkpoint(copy), inspect_checkpoint(source)
    assert report["tensors"] == original["tensors"] and report["layout"] == original["layout"]


def test_zarr_layout_agrees_with_megatrons_args() -> None:
    """zarr keeps no writer ranks: TP comes from the chunk grid, the rest from the args megatron saved."""
    report = _inspect(ROOT / "tests" / "data" / "zarr" / "zarr_ckpt")
    args = report["args"]
    assert report["format"] == "zarr" and report["layout_source"]["tp"] == "chunk grid"
    assert (report["layout"]["tp"], report["layout"]["pp"]) == (
        args["tensor_model_parallel_size"],
        args["pipeline_model_parallel_size"],
    )
    assert report["layout"]["tp"] == 2


def test_args_that_disagree_with_the_files_are_shown(checkpoints: dict, tmp_path: Path) -> None:
    source = checkpoints[SPECS[0]] / "iter_0000010"
    copy = Path(shutil.copytree(source, tmp_path / "iter_0000010"))
    common = torch.load(copy / "common.pt", weights_only=False)  # our own fixture: trusted here
    common["args"].tensor_model_parallel_size = 4
    torch.save(common, copy / "common.pt")
    result = CliRunner().invoke(main, ["inspect", str(copy)])
    assert result.exit_code == 0, result.output
    assert "TP2 PP2" in result.stdout and "the args say TP4" in result.stdout
