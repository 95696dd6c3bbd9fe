"""Megatron-FSDP `fsdp_dtensor` checkpoints: saves of real megatron-core models' weights as DTensors in uneven
data-parallel chunks (tools/fsdp_fixtures.py says how and why), judged by Megatron's own forward and byte for
byte against the torch_dist conversion of the same weights; forged tilings and records are refused."""

from __future__ import annotations

import argparse
import io
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from click.testing import CliRunner
from hostile import assert_refused, run_cli
from judge import assert_matches_megatron, assert_same_output
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
from torch_forgery import Payload, load_metadata, save_metadata, with_pickle

from offline_bridge import convert
from offline_bridge.commands.cli import main
from offline_bridge.errors import CheckpointError
from offline_bridge.readers import FsdpDtensorReader, TorchDistReader, open_reader
from offline_bridge.readers.coverage import check_tiling
from offline_bridge.readers.fsdp_keys import present_keys
from tools.fsdp_fixtures import FsdpSpec, build_fsdp_fixtures, flat_row_owners
from tools.megatron_fixtures import FixtureSpec

DENSE = FsdpSpec(FixtureSpec("qwen3"))  # gated MLP split into _w / _v, on 3 data-parallel ranks
MTP = FsdpSpec(FixtureSpec("deepseek_v3", tp=2, ep=2), mtp_model_layer=True)  # local_experts, shared experts, MTP
FSDP_SPECS = [
    DENSE,
    FsdpSpec(FixtureSpec("qwen3"), world=6, tp=2),  # TP2 x DP3: the _w / _v halves cut over TP, rows over DP
    # EP2 x expert-DP2 (core's handle_experts_in_state_dict makes local ids global), named linear_fc1.weight{e}_w
    FsdpSpec(FixtureSpec("qwen3_moe", tp=2, ep=2), world=4, ep=2, grouped_experts=True),
    MTP,
]
ITERATION = "iter_0000010"
QKV = "model.module.decoder.layers.1.self_attention.linear_qkv.weight"  # cut unevenly across ranks 0 and 1


@pytest.fixture(scope="module")
def fsdp(checkpoints: dict, megatron_cache: Path) -> dict[FsdpSpec, Path]:
    return build_fsdp_fixtures(FSDP_SPECS, megatron_cache, checkpoints)


def _uneven(iteration: Path) -> list[str]:
    """Model tensors stored in chunks of different sizes."""
    metadata = dcp.FileSystemReader(iteration).read_metadata().state_dict_metadata
    return [
        key
        for key, entry in metadata.items()
        if key.startswith("model.") and len({tuple(c.sizes) for c in getattr(entry, "chunks", [])}) > 1
    ]


@pytest.mark.parametrize("spec", FSDP_SPECS, ids=lambda s: s.name)
def test_matches_megatron_and_the_torch_dist_conversion(spec: FsdpSpec, fsdp: dict, checkpoints: dict, tmp_path: Path):
    assert _uneven(fsdp[spec] / ITERATION)
    with open_reader(fsdp[spec] / ITERATION) as reader:
        assert isinstance(reader, FsdpDtensorReader) and reader.format == "fsdp_dtensor"
        gate = next(k for k in reader.tensors if k.endswith("linear_fc1.weight_w"))
        assert reader.extents(gate) is not None  # the halves go file to file, no copy
    out = convert(fsdp[spec], tmp_path / "fsdp", progress=False)
    twin = convert(checkpoints[spec.base], tmp_path / "dist", progress=False)
    assert_same_output(out, twin)
    mtp = rf"model\.layers\.{spec.base.num_layers}\..*" if spec.base.mtp_num_layers else None
    assert_matches_megatron(out, spec.base, checkpoints[spec.base], extra=mtp)


def test_inspect_shows_the_format_and_the_args_layout(fsdp: dict) -> None:
    result = CliRunner().invoke(main, ["inspect", str(fsdp[MTP]), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["format"] == "fsdp_dtensor" and report["family"] == "deepseek_v3"
    assert report["layout"] == {"tp": 1, "pp": 1, "vpp": 1, "ep": 1, "etp": 1}  # chunks are DP shards
    assert report["pipeline"] == {"stages": [[[0, MTP.base.num_layers - 1]]], "source": "args"}
    keys = {t["key"] for t in report["tensors"]}
    assert "mtp.layers.0.transformer_layer.mlp.experts.0.linear_fc1.weight_w" in keys
    model = [k for k in keys if not k.startswith("optimizer.")]
    assert not [k for k in model if "mtp_model_layer" in k or k.startswith("model.")]
    exp_avg = [t["bytes"] for t in report["tensors"] if t["key"].startswith("optimizer.state.module.module.module.")]
    assert report["bytes"]["optimizer"] == sum(exp_avg) == report["bytes"]["model"]  # an fp32 exp_avg per tensor


def _copy(fsdp: dict, tmp_path: Path) -> Path:
    return Path(shutil.copytree(fsdp[DENSE], tmp_path / "ckpt")) / ITERATION


@pytest.mark.parametrize(
    "second, problem",
    [((1, 94), "leave a gap"), ((0, 96), "overlap"), ((1, 96), "lies outside")],  # (first row, rows)
    ids=["gap", "overlap", "out-of-bounds"],
)
def test_forged_tilings_are_refused(second: tuple[int, int], problem: str, fsdp: dict, tmp_path: Path) -> None:
    iteration = _copy(fsdp, tmp_path)
    metadata = load_metadata(iteration)
    chunks = metadata.state_dict_metadata[QKV].chunks
    assert [(c.offsets[0], c.sizes[0]) for c in chunks] == [(0, 1), (1, 95)]  # the fixture's uneven cut
    row, rows = second
    chunks[1] = ChunkStorageMetadata(offsets=torch.Size([row, 0]), sizes=torch.Size([rows, 64]))
    save_metadata(iteration, metadata)
    outcome = run_cli("convert", iteration.parent, tmp_path / "out", "-q", cwd=tmp_path)
    assert_refused(outcome, str(iteration / ".metadata"), QKV, problem)
    assert not (tmp_path / "out").exists()


def test_a_forged_bytesio_record_is_refused(fsdp: dict, tmp_path: Path) -> None:
    """The args record (a torch.save archive, as DCP writes every non-tensor value) made to run code."""
    iteration = _copy(fsdp, tmp_path)
    marker = tmp_path / "ran"
    metadata = load_metadata(iteration)
    index = next(i for i in metadata.storage_data if i.fqn == "args")
    info = metadata.storage_data[index]
    file = iteration / info.relative_path
    record = file.read_bytes()[info.offset : info.offset + info.length]
    forged = with_pickle(record, pickle.dumps(Payload(marker), protocol=2))
    info.offset, info.length = file.stat().st_size, len(forged)
    with open(file, "ab") as handle:
        handle.write(forged)
    save_metadata(iteration, metadata)
    outcome = run_cli("convert", iteration.parent, tmp_path / "out", "-q", cwd=tmp_path)
    assert_refused(outcome, str(file), "[args]")
    assert not marker.exists() and not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- fast: no megatron-core


def test_keys_as_torch_dist_names_them() -> None:
    stored = [
        "model.module.decoder.layers.3.mlp.experts.linear_fc1.weight5_w",
        "model.module.decoder.layers.3.mlp.experts.linear_fc2.weight12",
        "model.module.decoder.layers.3.mlp.experts.local_experts.7.linear_fc1.weight_v",
        "model.module.mtp.layers.0.mtp_model_layer.mlp.linear_fc1.weight_w",
        "model.module.mtp.layers.0.enorm.weight",
        "model.module.decoder.layers.0.mlp.linear_fc1.weight_w",
        "optimizer.state.module.module.module.decoder.layers.0.mlp.linear_fc2.weight.exp_avg",
        "rng_state",
    ]
    assert present_keys(stored, "meta") == {
        "decoder.layers.3.mlp.experts.5.linear_fc1.weight_w": stored[0],
        "decoder.layers.3.mlp.experts.12.linear_fc2.weight": stored[1],
        "decoder.layers.3.mlp.experts.7.linear_fc1.weight_v": stored[2],
        "mtp.layers.0.transformer_layer.mlp.linear_fc1.weight_w": stored[3],
        "mtp.layers.0.enorm.weight": stored[4],
        "decoder.layers.0.mlp.linear_fc1.weight_w": stored[5],
        stored[6]: stored[6],  # optimizer state: not a model key, shown by inspect
    }
    twice = ["model.module.decoder.layers.3.mlp.experts.linear_fc2.weight1", *stored[1:2]]
    twice.append("model.module.decoder.layers.3.mlp.experts.local_experts.1.linear_fc2.weight")
    with pytest.raises(CheckpointError, match=r"meta: tensors .* are both 'decoder.layers.3.mlp.experts.1.linear_fc2"):
        present_keys(twice, "meta")


def test_uneven_data_parallel_tilings() -> None:
    """Rows handed out as Megatron-FSDP's flat buffer hands them: uneven, some ranks empty; all tile."""
    shapes = [(256, 64), (64,), (96, 64), (96, 64), (64, 96), (8,)]
    for world in (2, 3, 5, 8):
        for shape, owners in zip(shapes, flat_row_owners(shapes, world)):
            chunks = []
            for rank in sorted(set(owners)):
                rows = [r for r, owner in enumerate(owners) if owner == rank]
                chunks.append(((rows[0], *[0] * (len(shape) - 1)), (len(rows), *shape[1:])))
            check_tiling("k", shape, chunks, "meta")
    with pytest.raises(CheckpointError, match="overlap"):
        check_tiling("k", (96, 64), [((0, 0), (1, 64)), ((0, 0), (95, 64)), ((95, 0), (1, 64))], "meta")
    with pytest.raises(CheckpointError, match="gap"):
        check_tiling("k", (96, 64), [((0, 0), (1, 64)), ((2, 0), (94, 64))], "meta")


def _tiny_dcp(path: Path, **args: object) -> Path:
    """A DCP directory of `model.module.*` tensors and args, written by torch without a process group."""
    state = {
        "model": {"module": {"decoder.final_layernorm.weight": torch.ones(4)}},
        "args": argparse.Namespace(num_layers=1, **args),
        "iteration": 1,
        "opt_param_scheduler": io.BytesIO(b"not read"),
    }
    dcp.save(state, checkpoint_id=path, no_dist=True)
    return path


@pytest.mark.parametrize("args", [{"use_megatron_fsdp": True}, {"ckpt_format": "fsdp_dtensor"}])
def test_told_apart_from_torch_dcp_by_the_args(args: dict, tmp_path: Path) -> None:
    with open_reader(_tiny_dcp(tmp_path / "fsdp", **args)) as reader:
        assert reader.format == "fsdp_dtensor" and list(reader.tensors) == ["decoder.final_layernorm.weight"]
        assert reader.read("decoder.final_layernorm.weight").tolist() == [1.0] * 4
    with open_reader(_tiny_dcp(tmp_path / "plain", use_megatron_fsdp=False)) as reader:
        assert type(reader) is TorchDistReader and "model.module.decoder.final_layernorm.weight" in reader.tensors
