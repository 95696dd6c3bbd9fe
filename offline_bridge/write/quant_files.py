"""The quantizer outputs of a conversion: `quant_amax.safetensors` (HF amax names) and `hf_quant_config.json`
(how the weights are stored, and the calibration found). See formats/quant.md."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..dtypes import FLOAT32
from ..families import Family
from ..plan.layout import layout
from ..plan.rules.registry import rule_ref
from ..plan.schema import Plan
from ..readers.base import CheckpointReader
from ..transform.quant import AMAX_FILE, CONFIG_FILE, Quant
from ..transform.quant_rules import FP8
from ..transform.quant_rules import module_of as _module
from .json_file import write_json
from .jsonable import jsonable
from .writer import write_weights

__all__ = ["write_quant"]


def _linears(plan: Plan, family: Family) -> list[str]:
    """HF modules holding a 2-D weight, embeddings aside: the linear layers a quantizer could sit on."""
    embeddings = {rule_ref(rule) for rule in family.head}
    return [
        _module(t.name)
        for step in plan.steps
        if step.rule not in embeddings
        for t in step.targets
        if t.name.endswith(".weight") and len(t.shape) == 2
    ]


def _modes(state: Mapping[str, Any] | None) -> dict[str, Any]:
    """ModelOpt's modes (`quantize`, `max_calibrate`, ...) with their configs."""
    entries = (state or {}).get("modelopt_state_dict") or []
    return {mode: jsonable(body.get("config")) for mode, body in entries if isinstance(body, Mapping)}


def _weight_bits(modes: Mapping[str, Any]) -> Any:
    """`num_bits` of the `*weight_quantizer` entry of the quantize config (list or dict form)."""
    cfg = (modes.get("quantize") or {}).get("quant_cfg") or []
    entries = cfg if isinstance(cfg, list) else [{"quantizer_name": k, "cfg": v} for k, v in cfg.items()]
    for entry in entries:
        if isinstance(entry, Mapping) and entry.get("quantizer_name") == "*weight_quantizer":
            return (entry.get("cfg") or {}).get("num_bits")
    return None


def _stored_algo(plan: Plan) -> str | None:
    """ "FP8" when this directory's weights are ModelOpt's FP8 layout (per-tensor `weight_scale`, an
    `input_scale` each), else None: consumers that read `hf_quant_config.json` must not take the
    unquantized (or per-channel) weights of this directory for ModelOpt FP8."""
    names = {t.name: t for t in plan.targets()}
    scales = [t for n, t in names.items() if n.endswith(".weight_scale")]
    plain = all(t.shape == (1,) and _module(t.name) + ".input_scale" in names for t in scales)
    return "FP8" if scales and plain else None


def write_quant(
    quant: Quant, plan: Plan, family: Family, reader: CheckpointReader, out_dir: Path
) -> dict[str, dict[str, str]]:
    """`quant_amax.safetensors` (HF amax names) and `hf_quant_config.json`: how this directory's weights are
    stored (`quantization`, ModelOpt's schema) and the calibration found in the checkpoint (`calibration`).
    Returns the amax tensors' sha256 (as `write_weights`)."""
    steps, files = layout(list(quant.steps), 2**62, stem=Path(AMAX_FILE).stem)
    digests = write_weights(Plan(tuple(steps), tuple(files), FLOAT32, plan.dims), reader, out_dir, progress=False)
    names = [t.name for step in quant.steps for t in step.targets]
    calibrated = {_module(_module(n)) for n in names if n.endswith(".weight_quantizer._amax")}
    stored = {_module(t.name) for t in plan.targets() if t.dtype == FP8}
    linears = _linears(plan, family)
    modes = _modes(quant.state)
    args = vars(quant.args) if quant.args is not None else {}
    write_json(
        out_dir / CONFIG_FILE,
        {
            "producer": {"name": "modelopt", "version": (quant.state or {}).get("modelopt_version")},
            "quantization": {
                "quant_algo": _stored_algo(plan),
                "kv_cache_quant_algo": None,
                "exclude_modules": sorted(m for m in linears if m not in stored),
            },
            "calibration": {
                "quant_algo": "FP8" if _weight_bits(modes) == [4, 3] else None,
                "exclude_modules": sorted(m for m in linears if m not in calibrated),
                "amax_file": AMAX_FILE,
                "amax_tensors": len(names),
            },
            "modelopt_state": modes,
            "megatron_args": {k: jsonable(v) for k, v in sorted(args.items()) if "quant" in k or k.startswith("fp8")},
        },
    )
    return digests
