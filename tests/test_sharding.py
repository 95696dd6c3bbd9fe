"""--max-shard-size splits the weights the way transformers does, with an index transformers reads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from conftest import PARITY_SPECS
from judge import assert_matches_megatron
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from offline_bridge import convert

SPEC = next(s for s in PARITY_SPECS if s.family == "qwen3" and s.tp == 2 and s.dtype == "bf16")


def test_small_shards_with_index(checkpoints: dict, tmp_path: Path) -> None:
    out = convert(checkpoints[SPEC], tmp_path / "hf", max_shard_size="60KB", progress=False)
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 2
    assert [p.name for p in shards] == [
        f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)
    ]
    text = (out / "model.safetensors.index.json").read_text()
    index = json.loads(text)
    assert text == json.dumps(index, indent=2, sort_keys=True) + "\n"
    sizes, numels, seen = 0, 0, {}
    for shard in shards:
        shard_bytes, count = 0, 0
        with safe_open(shard, "np") as f:
            assert f.metadata() == {"format": "pt"}
            for name in f.keys():
                numel = int(np.prod(f.get_slice(name).get_shape()))
                seen[name] = shard.name
                numels, shard_bytes, count = numels + numel, shard_bytes + 2 * numel, count + 1  # bf16
        assert shard_bytes <= 60_000 or count == 1  # a tensor above the limit gets a shard of its own
        sizes += shard_bytes
    assert index["weight_map"] == seen
    assert index["metadata"] == {"total_size": sizes, "total_parameters": numels}
    assert_matches_megatron(out, SPEC, checkpoints[SPEC])


def test_files_are_what_safetensors_itself_writes(checkpoints: dict, tmp_path: Path) -> None:
    """Re-saving our tensors with the safetensors library gives the very same bytes (order, header, padding)."""
    out = convert(checkpoints[SPEC], tmp_path / "hf", progress=False)
    ours = out / "model.safetensors"
    save_file(load_file(ours), tmp_path / "again.safetensors", metadata={"format": "pt"})
    assert ours.read_bytes() == (tmp_path / "again.safetensors").read_bytes()
