"""Every family's table against transformers, without megatron-core: a metadata-only checkpoint listing the
Megatron keys and shapes formats/torch_dist.md documents (tests/megatron_keys.py, written by hand, not from
the tables) is planned, and the HF names and shapes must be exactly those of the transformers model built
from the same tiny config on the meta device."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
import transformers
from megatron_keys import BF16, CASES, Keys, MetadataReader
from transformers.conversion_mapping import WeightConverter, get_checkpoint_conversion_mapping

from offline_bridge.config.hf_config import dims_of
from offline_bridge.families import FAMILIES, Family
from offline_bridge.plan.planner import build_plan


def hf_state(family: Family, fields: dict[str, Any]) -> tuple[dict[str, tuple[int, ...]], list[re.Pattern[str]]]:
    """transformers' parameter names and shapes for the config, and the names it skips when loading."""
    model_class: Callable[..., torch.nn.Module] = getattr(transformers, family.architecture)
    config = model_class.config_class(**fields)  # Kimi-K2's model_type is not transformers'; its class is
    with torch.device("meta"):
        model = model_class(config)
    state = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if family.text_config(config.to_dict()).get("tie_word_embeddings"):
        state.pop("lm_head.weight")  # the same tensor as the embedding; safetensors stores it once
    layers = family.text_config(config.to_dict())["num_hidden_layers"]
    # DeepSeek-V3's and GLM's patterns name their MTP layer by the real model's index (61 = num_hidden_layers)
    ignored = [re.compile(re.sub(r"\d+", str(layers), p)) for p in model._keys_to_ignore_on_load_unexpected or ()]
    return state, ignored


def as_loaded(names: Keys, model_type: str) -> Keys:
    """Our names as transformers loads them: its checkpoint conversion renames them and packs per-expert
    tensors (`experts.{e}.gate_proj` + `up_proj` → `experts.gate_up_proj` `[E, 2I, H]`)."""
    renames, merges = [], []
    for transform in get_checkpoint_conversion_mapping(model_type) or ():
        assert type(transform).__name__ in ("WeightRenaming", "PrefixChange", "WeightConverter"), transform
        patterns = [
            (re.compile(s.replace("*", r"(\d+)")), t)
            for s in transform.source_patterns
            for t in transform.target_patterns
        ]
        (merges if isinstance(transform, WeightConverter) else renames).append(patterns)
    loaded: Keys = {}
    pieces: dict[str, dict[int, dict[int, tuple[int, ...]]]] = {}  # packed name → source pattern → expert → shape
    for name, shape in names.items():
        for patterns in renames:
            name = next((p.sub(t, name) for p, t in patterns if p.search(name)), name)
        found = [(j, p.search(name), t) for patterns in merges for j, (p, t) in enumerate(patterns) if p.search(name)]
        if not found:
            loaded[name] = shape
            continue
        ((j, match, target),) = found
        packed = name[: match.start()] + target + name[match.end() :]
        pieces.setdefault(packed, {}).setdefault(j, {})[int(match.group(1))] = shape
    for packed, parts in pieces.items():
        experts = [parts[j] for j in sorted(parts)]
        assert all(sorted(part) == list(range(len(experts[0]))) for part in experts), packed  # every expert, once
        assert len({shape for part in experts for shape in part.values()}) == 1, packed  # one shape
        rest = experts[0][0][1:]
        loaded[packed] = (len(experts[0]), sum(part[0][0] for part in experts), *rest)
    return loaded


@pytest.mark.parametrize("name", sorted(CASES))
def test_table_gives_the_transformers_state_dict(name: str) -> None:
    family = FAMILIES[name]
    fields, keys = CASES[name]
    config = {"model_type": family.model_type, **fields}
    plan = build_plan(family, MetadataReader(keys), dims_of(config, family), BF16, 10**12)
    loaded_as = getattr(transformers, family.architecture).config_class.model_type  # Kimi-K2: deepseek_v3
    ours = as_loaded({t.name: t.shape for t in plan.targets()}, loaded_as)
    theirs, ignored = hf_state(family, fields)
    missing = sorted(set(theirs) - set(ours) - {n for n in theirs if n.startswith("model.visual.")})
    extra = sorted(n for n in set(ours) - set(theirs) if not any(p.search(n) for p in ignored))
    assert not missing and not extra, (missing, extra)
    wrong = {n: (ours[n], theirs[n]) for n in set(ours) & set(theirs) if ours[n] != theirs[n]}
    assert not wrong, wrong
    if family.mtp_layers(dims_of(config, family).config):
        assert set(ours) - set(theirs), "the MTP layer is written, and transformers skips it on load"


def test_every_registered_family_is_checked() -> None:
    assert set(CASES) == set(FAMILIES)
