"""Megatron's pipeline split from the args (`readers.pipeline_split`): hand-worked splits, refusals, and (slow
tier) the same offsets and counts as megatron-core's own `get_transformer_layer_offset` /
`get_num_layers_to_build` over a grid of settings."""

from __future__ import annotations

import itertools
from argparse import Namespace

import pytest

from offline_bridge.errors import CheckpointError
from offline_bridge.readers.pipeline_split import checked_split, layer_split, parse_layout


def _split(layers: int, pp: int, vpp: int = 1, **fields: object) -> list[list[tuple[int, int]]]:
    """[vp][pp] → (first layer, count)."""
    split = layer_split(Namespace(**fields), layers, pp, vpp, "args")
    return [[split[(vp, p)] for p in range(pp)] for vp in range(vpp)]


def test_even() -> None:
    assert _split(8, 2, 2) == [[(0, 2), (2, 2)], [(4, 2), (6, 2)]]


def test_uneven_first_and_last_stage() -> None:
    fields = {"decoder_first_pipeline_num_layers": 1, "decoder_last_pipeline_num_layers": 3}
    assert _split(6, 3, **fields) == [[(0, 1), (1, 2), (3, 3)]]
    fields = {"decoder_first_pipeline_num_layers": 2, "decoder_last_pipeline_num_layers": 2}
    assert _split(12, 3, 2, **fields) == [[(0, 1), (1, 4), (5, 1)], [(6, 1), (7, 4), (11, 1)]]


def test_embedding_and_loss_stages() -> None:
    fields = {"account_for_embedding_in_pipeline_split": True, "account_for_loss_in_pipeline_split": True}
    assert _split(6, 4, **fields) == [[(0, 1), (1, 2), (3, 2), (5, 1)]]
    assert _split(6, 2, 2, **fields) == [[(0, 1), (1, 2)], [(3, 2), (5, 1)]]


def test_layout_string_and_list() -> None:
    assert _split(7, 3, 2, pipeline_model_parallel_layout="Et|tt|t|t|t|tL") == [
        [(0, 1), (1, 2), (3, 1)],
        [(4, 1), (5, 1), (6, 1)],
    ]
    assert parse_layout("E(t|)*2,t*2m|L", "x") == [
        ["embedding", "decoder"],
        ["decoder"],
        ["decoder", "decoder", "mtp"],
        ["loss"],
    ]
    layout = [["embedding", "decoder"], ["decoder", "decoder", "loss"]]
    assert _split(3, 2, pipeline_model_parallel_layout=layout) == [[(0, 1), (1, 2)]]


@pytest.mark.parametrize(
    ("layers", "pp", "vpp", "fields", "message"),
    [
        (7, 2, 1, {}, "unevenly"),
        (8, 2, 2, {"decoder_first_pipeline_num_layers": 3}, "unevenly"),
        (6, 3, 1, {"decoder_first_pipeline_num_layers": 1, "account_for_loss_in_pipeline_split": True}, "with account"),
        (4, 2, 1, {"pipeline_model_parallel_layout": "Et|t|tt|L"}, "4 stages"),
        (4, 2, 1, {"pipeline_model_parallel_layout": "Ett|tx|L"}, "unknown layer"),
        (4, 2, 1, {"pipeline_model_parallel_layout": "Et|tL"}, "place 2 decoder layers"),
        (4, 2, 1, {"pipeline_model_parallel_layout": "E(t*99999)*99999|L"}, "too many"),
        (4, 2, 1, {"pipeline_model_parallel_layout": 3}, "not a layout"),
    ],
)
def test_refused(layers: int, pp: int, vpp: int, fields: dict, message: str) -> None:
    with pytest.raises(CheckpointError, match=message):
        layer_split(Namespace(**fields), layers, pp, vpp, "args")


def test_files_must_hold_the_args_split() -> None:
    args = Namespace(num_layers=6, decoder_first_pipeline_num_layers=1, decoder_last_pipeline_num_layers=3)
    assert checked_split(args, {(0, 0): 1, (0, 1): 2, (0, 2): 3}, 3, "f")[(0, 2)] == (3, 3)
    with pytest.raises(CheckpointError, match=r"f: .*stage 0 chunk 0 holds 2 \(args: 1\)"):
        checked_split(args, {(0, 0): 2, (0, 1): 1, (0, 2): 3}, 3, "f")


def _settings() -> list[tuple[int, int, int, dict]]:
    """(layers, pp, vpp, args fields) Megatron accepts, of every kind of split."""
    found = []
    for layers, pp, vpp in itertools.product((4, 6, 8, 12), (2, 3, 4), (1, 2)):
        found.append((layers, pp, vpp, {}))
        for first, last in itertools.product((None, 1, 2, 4), repeat=2):
            if first is not None or last is not None:
                found.append(
                    (
                        layers,
                        pp,
                        vpp,
                        {"decoder_first_pipeline_num_layers": first, "decoder_last_pipeline_num_layers": last},
                    )
                )
        for embedding, loss in ((True, False), (False, True), (True, True)):
            fields = {"account_for_embedding_in_pipeline_split": embedding, "account_for_loss_in_pipeline_split": loss}
            found.append((layers, pp, vpp, fields))
    found += [
        (7, 3, 2, {"pipeline_model_parallel_layout": "Et|tt|t|t|t|tL"}),
        (5, 2, 2, {"pipeline_model_parallel_layout": "E|tt|t|ttL"}),
        (6, 4, 1, {"pipeline_model_parallel_layout": "Et*2|t|tt|t,L"}),
    ]
    return found


def _megatron(layers: int, pp: int, vpp: int, fields: dict, monkeypatch: pytest.MonkeyPatch) -> dict | str | None:
    """megatron-core's (vp, pp) → (offset, count); None where it asserts the split is impossible, "crash" where
    it fails otherwise (no model of that split can be built, so no checkpoint holds one)."""
    from types import SimpleNamespace

    from megatron.core import parallel_state
    from megatron.core.transformer.pipeline_parallel_layer_layout import PipelineParallelLayerLayout
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    layout = fields.get("pipeline_model_parallel_layout")
    config = SimpleNamespace(
        num_layers=layers,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None,
        pipeline_model_parallel_layout=None if layout is None else PipelineParallelLayerLayout(layout, pp),
        num_layers_in_first_pipeline_stage=fields.get("decoder_first_pipeline_num_layers"),
        num_layers_in_last_pipeline_stage=fields.get("decoder_last_pipeline_num_layers"),
        account_for_embedding_in_pipeline_split=fields.get("account_for_embedding_in_pipeline_split", False),
        account_for_loss_in_pipeline_split=fields.get("account_for_loss_in_pipeline_split", False),
    )
    monkeypatch.setattr(
        parallel_state,
        "get_virtual_pipeline_model_parallel_world_size",
        lambda: config.virtual_pipeline_model_parallel_size,
    )
    found = {}
    try:
        for vp, p in itertools.product(range(vpp), range(pp)):
            monkeypatch.setattr(parallel_state, "get_pipeline_model_parallel_rank", lambda p=p: p)
            vp_stage = vp if vpp > 1 else None
            count = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=p)
            found[(vp, p)] = (get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=p), count)
    except AssertionError:
        return None
    except ZeroDivisionError:  # uneven first and last stage with VPP and no middle stage
        return "crash"
    if sum(n for _, n in found.values()) != layers or min(n for _, n in found.values()) < 0:
        return None  # megatron-core would refuse the config (TransformerConfig / validate_args)
    return found


@pytest.mark.slow
def test_same_split_as_megatron_core(monkeypatch: pytest.MonkeyPatch) -> None:
    compared = 0
    for layers, pp, vpp, fields in _settings():
        expected = _megatron(layers, pp, vpp, fields, monkeypatch)
        if expected == "crash":
            continue
        if expected is None:
            with pytest.raises(CheckpointError):
                layer_split(Namespace(**fields), layers, pp, vpp, "args")
            continue
        assert layer_split(Namespace(**fields), layers, pp, vpp, "args") == expected, (layers, pp, vpp, fields)
        compared += 1
    assert compared > 100
