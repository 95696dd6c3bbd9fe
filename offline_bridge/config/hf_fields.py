"""HF `config.json` fields read through one alias table: transformers renamed several across 4.x and 5.x,
and families name the same thing differently, so a config saved by any version gives the same plan.

Every read of a config field in offline-bridge goes through `hf_value` (or the view `normalized` builds for
the mapping tables). Our own code because transformers maps names only on its config classes
(`attribute_map`, `convert_rope_params_to_dict`), which we do not instantiate for a plain dict.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import OptionError

__all__ = ["ALIASES", "VALUE_ALIASES", "hf_value", "normalized"]

# name we read -> other names of the same field, tried in order (a dot reads inside a nested mapping)
ALIASES: dict[str, tuple[str, ...]] = {
    # Mixtral (all versions) and Qwen3-MoE (transformers 5.x) write num_local_experts; DeepSeek-V3 writes
    # n_routed_experts; Qwen2/3-MoE (4.x), Qwen3-Next and Qwen3.5-MoE write num_experts
    "num_experts": ("num_local_experts", "n_routed_experts"),
    "num_experts_per_tok": ("moe_topk",),  # HunYuan-style configs
    # multi-token prediction depth: DeepSeek-V3 num_nextn_predict_layers (5.x maps num_mtp_layers to it),
    # Qwen3-Next / Qwen3.5 mtp_num_hidden_layers
    "num_nextn_predict_layers": ("num_mtp_layers", "mtp_num_hidden_layers"),
    # transformers 5.x folds rope_theta, rope_scaling and partial_rotary_factor into rope_parameters
    "rope_parameters": ("rope_scaling",),
    "rope_theta": ("rope_parameters.rope_theta", "rope_scaling.rope_theta"),
    "partial_rotary_factor": ("rope_parameters.partial_rotary_factor",),
    "dtype": ("torch_dtype",),  # torch_dtype before transformers 4.56
    "rms_norm_eps": ("layer_norm_epsilon", "layer_norm_eps"),
    "n_groups": ("mamba_n_groups",),  # NemotronH configs' older names (transformers maps them on load)
    "conv_kernel": ("mamba_d_conv",),
}

# old value -> new value, per field (transformers 5.x `remap_legacy_layer_types`)
VALUE_ALIASES: dict[str, dict[str, str]] = {"layer_types": {"attention": "full_attention", "mamba": "linear_attention"}}

_MISSING = object()


def _lookup(config: Mapping[str, Any], path: str) -> Any:
    value: Any = config
    for part in path.split("."):
        if not isinstance(value, Mapping) or value.get(part) is None:
            return _MISSING
        value = value[part]
    return value


def _names(name: str) -> tuple[str, ...]:
    """All names of the field ``name`` is one name of, the one we read first."""
    canonical = next((c for c, aliases in ALIASES.items() if name in aliases), name)
    return (canonical, *ALIASES.get(canonical, ()))


def _found(config: Mapping[str, Any], name: str) -> list[tuple[str, Any]]:
    return [(n, v) for n in _names(name) if (v := _lookup(config, n)) is not _MISSING]


def hf_value(config: Mapping[str, Any], name: str, default: Any = _MISSING) -> Any:
    """Field ``name`` (any of its names) under whichever name the config uses; ``default`` (or KeyError) when
    it has none.

    Two names of one field with different values are an error: which one transformers reads depends on
    its version."""
    found = _found(config, name)
    scalars = [(n, v) for n, v in found if not isinstance(v, (Mapping, list))]
    if any(v != scalars[0][1] for _, v in scalars):
        shown = ", ".join(f"{n}={v!r}" for n, v in scalars)
        raise OptionError(f"HF config: {shown} name one field with different values")
    if not found:
        if default is _MISSING:
            raise KeyError(name)
        return default
    value = found[0][1]
    remap = VALUE_ALIASES.get(name)
    if remap and isinstance(value, list):
        return [remap.get(v, v) if isinstance(v, str) else v for v in value]
    return value


def normalized(config: Mapping[str, Any]) -> dict[str, Any]:
    """A view of ``config`` with every aliased field under all its plain names, for the mapping tables; the
    config written out is never this view."""
    view = dict(config)
    for name in (*ALIASES, *VALUE_ALIASES):
        value = hf_value(config, name, None)
        if value is not None:
            view.update((n, value) for n in _names(name) if "." not in n)
    return view
