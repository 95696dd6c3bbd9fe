"""The one planner, on metadata-only checkpoints (tests/megatron_keys.py): convert, quantizer export and
export-adapter build their steps through its hooks, and a checkpoint that does not fit is refused once,
with every missing, unused and duplicate tensor named."""

from __future__ import annotations

import pytest
from megatron_keys import BF16, CASES, HD, HEADS, H, Keys, MetadataReader

from offline_bridge.config.hf_config import dims_of
from offline_bridge.errors import CheckpointError
from offline_bridge.families import FAMILIES
from offline_bridge.plan.peft_adapter import build_adapter_plan
from offline_bridge.plan.planner import Planner, build_plan
from offline_bridge.plan.rules import Copy, Dims
from offline_bridge.plan.schema import Lora
from offline_bridge.transform.quant import find_quant

LLAMA = FAMILIES["llama"]
PROJ = "decoder.layers.self_attention.linear_proj.weight"


def _llama(keys: Keys | None = None) -> tuple[MetadataReader, Dims]:
    fields, base = CASES["llama"]
    return MetadataReader(base if keys is None else keys), dims_of({"model_type": "llama", **fields}, LLAMA)


def test_every_problem_is_named_at_once() -> None:
    keys = dict(CASES["llama"][1])
    del keys[PROJ]
    keys["decoder.layers.self_attention.stray.weight"] = (2, H, H)
    keys["embedding.extra.weight"] = (H,)
    reader, dims = _llama(keys)
    with pytest.raises(CheckpointError) as error:
        build_plan(LLAMA, reader, dims, BF16, 2**30)
    message = str(error.value)
    assert "\n" not in message
    for layer in (0, 1):
        assert (
            f"no tensor for layer {layer} matching decoder.layers.{layer}.self_attention.linear_proj.weight" in message
        )
    assert "decoder.layers.self_attention.stray.weight" in message and "embedding.extra.weight" in message
    assert message.endswith("pass the right --model-type or --hf-config")


def test_duplicate_names_are_refused_with_the_rest() -> None:
    reader, dims = _llama()
    planner = Planner(LLAMA, reader, dims)
    rule = Copy.of("embedding.word_embeddings.weight", "model.embed_tokens.weight")
    source = planner.resolve(rule, {})
    assert source is not None and source.shape == (64, H)
    planner.add(rule, source, ["model.embed_tokens.weight"], BF16)
    planner.add(rule, source, ["model.embed_tokens.weight"], BF16)
    with pytest.raises(CheckpointError) as error:
        planner.checked(lambda key: True, "checkpoint tensors")
    message = str(error.value)
    assert "duplicate HF names model.embed_tokens.weight" in message
    unused = len(reader.tensors) - 1  # all but the embedding; five are listed
    assert "does not use: decoder.final_layernorm.weight" in message and f"and {unused - 5} more" in message


def test_a_fitting_checkpoint_plans_every_tensor_once() -> None:
    reader, dims = _llama()
    plan = build_plan(LLAMA, reader, dims, BF16, 2**30)
    used = {key for step in plan.steps for key, _ in step.source.parts}
    assert used == set(reader.tensors)
    names = [t.name for t in plan.targets()]
    assert len(names) == len(set(names)) and "model.layers.1.self_attn.o_proj.weight" in names


def test_quantizer_state_goes_through_the_planner() -> None:
    amax = "decoder.layers.self_attention.linear_proj.weight_quantizer._amax"
    reader, dims = _llama({**CASES["llama"][1], amax: (2,)})
    quant = find_quant(LLAMA, reader, dims)
    assert quant is not None
    assert [(t.name, t.shape) for s in quant.steps for t in s.targets] == [
        (f"model.layers.{i}.self_attn.o_proj.weight_quantizer._amax", ()) for i in (0, 1)
    ]
    stray = "decoder.layers.self_attention.nowhere.weight_quantizer._amax"
    reader, dims = _llama({**CASES["llama"][1], amax: (2,), stray: (2,)})
    with pytest.raises(CheckpointError, match=f"quantizer state the llama mapping does not use: {stray};"):
        find_quant(LLAMA, reader, dims)


def test_export_adapter_goes_through_the_planner() -> None:
    rank = 4
    module = "decoder.layers.self_attention.linear_proj.adapter."  # both layers stacked on axis 0
    keys = {module + "linear_in.weight": (2, rank, HEADS * HD), module + "linear_out.weight": (2, H, rank)}
    reader, dims = _llama(keys)
    plan = build_adapter_plan(LLAMA, reader, dims, Lora(alpha=8.0, dim=rank), "auto")
    names = sorted(t.name for t in plan.targets())
    assert names == sorted(
        f"base_model.model.model.layers.{i}.self_attn.o_proj.lora_{side}.weight" for i in (0, 1) for side in "AB"
    )
    reader, dims = _llama({**keys, "decoder.layers.mlp.linear_fc9.adapter.linear_in.weight": (2, rank, H)})
    with pytest.raises(CheckpointError, match="adapter tensors the llama mapping does not use"):
        build_adapter_plan(LLAMA, reader, dims, Lora(alpha=8.0, dim=rank), "auto")
