"""Megatron args are checked by a schema (type and range per field) and against the tensors' shapes: forged
args in a real checkpoint's `common.pt` give one line naming the file, the field and, for a shape, the key."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from judge import convert_fails

from offline_bridge.config.args_schema import ARGS_SCHEMA, checked_args
from offline_bridge.config.args_shapes import check_args_against_tensors
from offline_bridge.dtypes import by_option
from offline_bridge.errors import CheckpointError
from offline_bridge.readers.base import TensorInfo

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny-llama"
COMMON = "iter_0000010/common.pt"


@pytest.fixture
def example(tmp_path: Path) -> Path:
    return Path(shutil.copytree(EXAMPLE, tmp_path / "ckpt"))


def set_args(root: Path, **changes: object) -> None:
    """Rewrite the args saved in the example's common.pt (our own file: loaded in full)."""
    state = torch.load(root / COMMON, weights_only=False)
    vars(state["args"]).update(changes)
    torch.save(state, root / COMMON)


@pytest.mark.parametrize(
    ("field", "value", "kind"),
    [
        ("hidden_size", 64.0, "a positive int"),  # an integral float is refused too
        ("hidden_size", "64", "a positive int"),
        ("num_attention_heads", True, "a positive int"),
        ("norm_epsilon", [1e-6], "a number in (0, 1)"),
        ("tensor_model_parallel_size", b"2", "a positive int"),
        ("vocab_size", -5, "a positive int"),
        ("padded_vocab_size", 0, "a positive int"),
        ("swiglu", "true", "a bool"),
        ("untie_embeddings_and_output_weights", 1, "a bool"),
        ("rotary_base", float("nan"), "a positive number"),
        ("rotary_percent", 1.5, "a number in (0, 1]"),
        ("normalization", ["RMSNorm"], "a string"),
    ],
)
def test_args_of_the_wrong_kind(example: Path, tmp_path: Path, field: str, value: object, kind: str) -> None:
    set_args(example, **{field: value})
    line = convert_fails(example, tmp_path / "out")
    assert "common.pt" in line and f"{field} must be {kind}" in line


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"hidden_size": 32}, ("hidden_size=32", "embedding.word_embeddings.weight", "[256, 64]")),
        ({"ffn_hidden_size": 128}, ("ffn_hidden_size=128", "decoder.layers.mlp.linear_fc2.weight", "96")),
        ({"swiglu": False}, ("swiglu=False", "decoder.layers.mlp.linear_fc1.weight", "192")),
        ({"num_query_groups": 4}, ("num_query_groups=4", "decoder.layers.self_attention.linear_qkv.weight", "96")),
        ({"kv_channels": 16}, ("kv_channels=16", "linear_qkv.weight")),
        ({"padded_vocab_size": 384}, ("padded_vocab_size=384", "embedding.word_embeddings.weight")),
        ({"vocab_size": 300}, ("vocab_size=300", "embedding.word_embeddings.weight", "256 rows")),
        ({"num_layers": 3}, ("num_layers=3", "decoder.layers.", "stacks 4 layers")),
    ],
)
def test_args_that_contradict_the_tensors(example: Path, tmp_path: Path, changes: dict, named: tuple) -> None:
    set_args(example, **changes)
    line = convert_fails(example, tmp_path / "out")
    assert "common.pt" in line and all(n in line for n in named), line


def test_numpy_numbers_become_python_ones() -> None:
    args = checked_args(
        argparse.Namespace(hidden_size=np.int64(64), norm_epsilon=np.float32(1e-5), swiglu=np.bool_(True)), "args"
    )
    assert type(args.hidden_size) is int and type(args.norm_epsilon) is float and args.swiglu is True


def test_layer_patterns() -> None:
    args = checked_args(argparse.Namespace(moe_layer_freq=[0, 1, True], linear_attention_freq=4), "args")
    assert args.moe_layer_freq == [0, 1, 1] and args.linear_attention_freq == 4
    assert checked_args(argparse.Namespace(moe_layer_freq="[0]+[1]*3"), "a").moe_layer_freq == "[0]+[1]*3"
    for bad in ([0, 2], 0, [0.0, 1.0], {"a": 1}):
        with pytest.raises(CheckpointError, match="moe_layer_freq must be"):
            checked_args(argparse.Namespace(moe_layer_freq=bad), "args")


def test_unknown_and_absent_fields_are_left_alone() -> None:
    args = checked_args(argparse.Namespace(save="/x", hidden_size=None, lr=object), "args")
    assert args.save == "/x" and args.hidden_size is None and args.lr is object
    assert "hidden_size" in ARGS_SCHEMA and "save" not in ARGS_SCHEMA


def _tensors(**shapes: tuple[int, ...]) -> dict[str, TensorInfo]:
    keys = {name.replace("__", "."): shape for name, shape in shapes.items()}
    return {k: TensorInfo(k, shape, by_option("fp32")) for k, shape in keys.items()}


def test_expert_count_against_the_router_and_expert_keys() -> None:
    args = argparse.Namespace(num_layers=2, hidden_size=8, num_experts=4, moe_ffn_hidden_size=6)
    router = "decoder.layers.0.mlp.router.weight"
    fc2 = "decoder.layers.0.mlp.experts.3.linear_fc2.weight"
    check_args_against_tensors(args, {router: TensorInfo(router, (4, 8), by_option("fp32"))}, "f")
    with pytest.raises(CheckpointError, match=rf"num_experts=8, but {router} has shape \[4, 8\]"):
        check_args_against_tensors(
            argparse.Namespace(**{**vars(args), "num_experts": 8}),
            {router: TensorInfo(router, (4, 8), by_option("fp32"))},
            "f",
        )
    with pytest.raises(CheckpointError, match=rf"num_experts=3 but the checkpoint holds {fc2}"):
        check_args_against_tensors(
            argparse.Namespace(**{**vars(args), "num_experts": 3}),
            {fc2: TensorInfo(fc2, (8, 6), by_option("fp32"))},
            "f",
        )
    with pytest.raises(CheckpointError, match="moe_ffn_hidden_size=4"):
        check_args_against_tensors(
            argparse.Namespace(**{**vars(args), "moe_ffn_hidden_size": 4}),
            {fc2: TensorInfo(fc2, (8, 6), by_option("fp32"))},
            "f",
        )


def test_args_whose_keys_are_not_names() -> None:
    """A pickle may give a Namespace any keys: they are kept, never passed as keywords."""
    args = argparse.Namespace()
    vars(args).update({1: "x", "hidden_size": np.int32(64)})
    checked = vars(checked_args(args, "common.pt"))
    assert checked == {1: "x", "hidden_size": 64} and type(checked["hidden_size"]) is int
