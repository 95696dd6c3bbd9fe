"""The plan is pure data: printed, compared and sent through JSON, it comes back equal, and converting with
the plan read back writes the same bytes. Fast tier: the bundled example and metadata-only fake readers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from megatron_keys import BF16, CASES, MetadataReader

from offline_bridge.commands.planning import plan_conversion
from offline_bridge.config.hf_config import dims_of
from offline_bridge.errors import CheckpointError
from offline_bridge.families import FAMILIES
from offline_bridge.plan.planner import build_plan
from offline_bridge.plan.rules import GatedMLP
from offline_bridge.plan.rules.registry import rule_of, rule_ref
from offline_bridge.plan.schema import Plan
from offline_bridge.plan.serial import plan_from_json, plan_to_json
from offline_bridge.readers import open_reader
from offline_bridge.write.writer import write_weights

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny-llama" / "iter_0000010"


def _round_trip(plan: Plan) -> Plan:
    back = plan_from_json(plan_to_json(plan))
    assert back == plan
    assert plan_to_json(back) == plan_to_json(plan)
    assert repr(back) == repr(plan)  # printable, and printed alike
    return back


@pytest.mark.parametrize("name", sorted(CASES))
def test_family_plan_round_trips(name: str) -> None:
    family = FAMILIES[name]
    fields, keys = CASES[name]
    plan = build_plan(
        family, MetadataReader(keys), dims_of({"model_type": family.model_type, **fields}, family), BF16, 2**20
    )
    back = _round_trip(plan)
    assert [rule_of(s.rule) for s in back.steps] == [rule_of(s.rule) for s in plan.steps]


@pytest.mark.parametrize("dtype", ["auto", "fp32"])  # bytes moved file to file / cast in memory
def test_example_converts_alike_from_the_plan_read_back(tmp_path: Path, dtype: str) -> None:
    with open_reader(EXAMPLE) as reader:
        plan = plan_conversion(reader, None, dtype=dtype, max_shard_size="100KB").plan
        back = _round_trip(plan)
        for name, which in (("first", plan), ("second", back)):
            (tmp_path / name).mkdir()
            write_weights(which, reader, tmp_path / name, progress=False)
    written = sorted(p.name for p in (tmp_path / "first").iterdir())
    assert len(written) > 1  # sharded: several files and an index
    for file in written:
        assert (tmp_path / "first" / file).read_bytes() == (tmp_path / "second" / file).read_bytes(), file


def test_a_rule_as_data_names_its_fields_only() -> None:
    rule = GatedMLP.of("decoder.layers.{i}.mlp.linear_fc1.weight", "gate", "up", when=lambda dims, layer: True)
    ref = rule_ref(rule)
    assert ref.name == "GatedMLP"
    assert dict(ref.params)["targets"] == ("gate", "up")
    assert "when" not in dict(ref.params)
    assert rule_of(ref).apply is not None and rule_of(ref).targets == rule.targets


def test_text_that_is_no_plan_is_refused() -> None:
    with pytest.raises(CheckpointError, match="not a serialised plan"):
        plan_from_json('{"class": "Target", "name": "x", "shape": [], "dtype": {"dtype": "float32"}}')
    with pytest.raises(CheckpointError, match="not a serialised plan"):
        plan_from_json('{"class": "Nothing"}')


def test_a_fresh_process_computing_a_plan_knows_every_rule(tmp_path: Path) -> None:
    """The rules a plan names (the families' own, the quantizer's) are registered wherever steps run."""
    family = FAMILIES["qwen3_next"]
    fields, keys = CASES["qwen3_next"]
    dims = dims_of({"model_type": family.model_type, **fields}, family)
    (tmp_path / "plan.json").write_text(plan_to_json(build_plan(family, MetadataReader(keys), dims, BF16, 2**20)))
    code = (
        "import sys; from pathlib import Path; import offline_bridge.transform.compute; "
        "from offline_bridge.plan.serial import plan_from_json; from offline_bridge.plan.rules.registry import rule_of; "
        f"plan = plan_from_json(Path({str(tmp_path / 'plan.json')!r}).read_text()); "
        "print(sorted({type(rule_of(s.rule)).__name__ for s in plan.steps}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "GatedDeltaInProj" in done.stdout and "GatedQKV" in done.stdout
