"""`inspect`: what a checkpoint holds and how it was saved, from its metadata alone (no tensor byte read).

The parallel layout comes from `readers.parallel_layout` (read off the files, not the args); the args' own
values are reported beside (`layout_args`), so a disagreement shows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..config.inputs import ADAPTER_MARK
from ..config.model_args import ModelArgs, find_model_args
from ..config.run_config import load_run_config
from ..dtypes import DType
from ..errors import BridgeError
from ..families import family_for_args
from ..readers import CheckpointReader, open_reader
from ..readers.base import is_model_key
from ..readers.discovery import find_iteration_dir, iterations_present
from ..readers.marker import read_marker
from ..readers.parallel_layout import ARGS_LAYOUT, Stages, parallel_layout, pipeline_stages
from ..write.jsonable import jsonable

__all__ = ["format_report", "inspect_checkpoint"]

_CANONICAL_PIECES = {
    "adapter_q": "linear_q",
    "adapter_k": "linear_k",
    "adapter_v": "linear_v",
    "adapter_gate": "linear_fc1_gate",
    "adapter_up": "linear_fc1_up",
}
_ARGS_SUMMARY = (
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "kv_channels",
    "vocab_size",
    "padded_vocab_size",
    "seq_length",
    "max_position_embeddings",
    "normalization",
    "swiglu",
    "qk_layernorm",
    "add_qkv_bias",
    "untie_embeddings_and_output_weights",
    "position_embedding_type",
    "rotary_base",
    "multi_latent_attention",
    "q_lora_rank",
    "kv_lora_rank",
    "num_experts",
    "moe_router_topk",
    "moe_ffn_hidden_size",
    "moe_shared_expert_intermediate_size",
    "mtp_num_layers",
    "params_dtype",
    "tensor_model_parallel_size",
    "pipeline_model_parallel_size",
    "virtual_pipeline_model_parallel_size",
    "expert_model_parallel_size",
    "expert_tensor_parallel_size",
)


def _adapter(reader: CheckpointReader, directory: Path) -> dict[str, Any] | None:
    keys = [k for k in reader.tensors if ADAPTER_MARK in k]
    if not keys:
        return None
    targets = set()
    for key in keys:
        module, piece = key.split(ADAPTER_MARK, 1)
        name = piece.split(".", 1)[0]
        targets.add(_CANONICAL_PIECES.get(name, module.rsplit(".", 1)[-1]))
    if any(k.endswith("weight_magnitude") for k in keys):
        kind = "dora"
    elif any(f"{ADAPTER_MARK}adapter_" in k for k in keys):
        kind = "canonical_lora"
    else:
        kind = "lora"
    run_config = load_run_config(directory)
    peft = (run_config.peft if run_config else None) or {}
    return {
        "type": kind,
        "targets": sorted(targets),
        "adapter_only": all(ADAPTER_MARK in k for k in reader.tensors if is_model_key(k)),
        "alpha": peft.get("alpha"),
        "dim": peft.get("dim"),
        "base": run_config.pretrained_checkpoint if run_config else None,
    }


def _model_args(reader: CheckpointReader, adapter: dict[str, Any] | None) -> ModelArgs | None:
    """The model's args as `convert` finds them: an adapter-only save's base is asked first."""
    if adapter and adapter["adapter_only"] and adapter["base"]:
        try:
            with open_reader(find_iteration_dir(adapter["base"])) as base:
                found = find_model_args(base)
        except BridgeError:
            found = None
        if found is not None:
            return found
    return find_model_args(reader)


def _family(found: ModelArgs | None) -> str | None:
    try:
        return family_for_args(found.args).name if found is not None else None
    except BridgeError:
        return None


def _shown_arg(value: Any) -> Any:
    """An arg as `inspect` shows it: a dtype (torch's, unpickled as our `DType`, or numpy's) by its name."""
    if isinstance(value, DType):
        return value.torch_name
    if isinstance(value, np.dtype):
        return str(value)
    return jsonable(value)


def _version(reader: CheckpointReader) -> dict[str, Any]:
    backend = read_marker(reader.path) or {}  # bounded, regular files only: refused like `convert` refuses it
    return {
        "sharded_backend_version": jsonable(backend.get("sharded_backend_version")),
        "checkpoint_version": jsonable(reader.common_state.get("checkpoint_version")),
    }


def inspect_checkpoint(ckpt_dir: str | Path, iteration: int | str | None = None) -> dict[str, Any]:
    """A JSON-able description of the checkpoint; reads metadata, never tensor bytes."""
    directory = find_iteration_dir(ckpt_dir, iteration)
    with open_reader(directory, inspecting=True) as reader:
        errors = reader.validate()  # what `convert` would refuse
        args = reader.args
        adapter = _adapter(reader, directory)
        found = _model_args(reader, adapter)
        layout, layout_source = parallel_layout(reader)
        stages, stages_source = pipeline_stages(reader, layout)
        tensors = []
        model_bytes = optimizer_bytes = 0
        for key, info in sorted(reader.tensors.items()):
            nbytes = info.dtype.itemsize
            for n in info.shape:
                nbytes *= n
            if is_model_key(key):
                model_bytes += nbytes
            elif key.startswith("optimizer."):
                optimizer_bytes += nbytes
            tensors.append(
                {
                    "key": key,
                    "shape": list(info.shape),
                    "dtype": info.dtype.torch_name,
                    "bytes": nbytes,
                    "chunks": len(reader.chunk_boxes(key)),
                }
            )
        return {
            "path": str(directory),
            "format": reader.format,
            "version": _version(reader),
            "iteration": iterations_present(directory)[0],
            "iterations": iterations_present(ckpt_dir),
            "layout": layout,
            "layout_source": layout_source,
            "layout_args": None if args is None else {k: getattr(args, name, None) for k, name in ARGS_LAYOUT.items()},
            "pipeline": None if stages is None else {"stages": stages, "source": stages_source},
            "args": None
            if args is None
            else {k: _shown_arg(getattr(args, k)) for k in _ARGS_SUMMARY if hasattr(args, k)},
            "family": _family(found),
            "config_source": found.describe() if found is not None else None,
            "adapter": adapter,
            "tensors": tensors,
            "errors": errors,
            "bytes": {
                "total": sum(p.stat().st_size for p in directory.rglob("*") if p.is_file()),
                "model": model_bytes,
                "optimizer": optimizer_bytes,
            },
        }


def _stages_line(stages: Stages) -> str:
    """`PP0 0-1 | 4-5, PP1 2-3 | 6-7`: each stage's layers, its virtual stages apart."""
    shown = (
        " | ".join("-" if c is None else f"{c[0]}" if c[0] == c[1] else f"{c[0]}-{c[1]}" for c in s) for s in stages
    )
    return ", ".join(f"PP{p} {chunks}" for p, chunks in enumerate(shown))


def format_report(report: dict[str, Any]) -> str:
    """The report as text for a terminal."""
    layout = report["layout"]
    lines = [
        f"checkpoint  {report['path']}",
        f"format      {report['format']} {json.dumps(report['version'])}",
        f"iteration   {report['iteration']} (present: {', '.join(report['iterations'])})",
        "layout      "
        + " ".join(f"{k.upper()}{'-' if v is None else v}" for k, v in layout.items())
        + f"  ({', '.join(f'{k}: {v}' for k, v in report['layout_source'].items())})",
        f"family      {report['family'] or 'unknown (pass --model-type to convert)'}",
        f"config      {report['config_source'] or 'none in the checkpoint (pass --hf-config to convert)'}",
    ]
    pipeline = report["pipeline"]
    if pipeline is not None:
        lines.insert(4, f"pipeline    layers {_stages_line(pipeline['stages'])}  ({pipeline['source']})")
    claimed = report["layout_args"]
    disagree = {k: v for k, v in (claimed or {}).items() if v is not None and layout[k] not in (None, v)}
    if disagree:
        lines.insert(4, f"            the args say {', '.join(f'{k.upper()}{v}' for k, v in disagree.items())}")
    adapter = report["adapter"]
    if adapter:
        lines.append(
            f"adapter     {adapter['type']} on {', '.join(adapter['targets'])}"
            f" (alpha {adapter['alpha']}, dim {adapter['dim']}{', adapter only' if adapter['adapter_only'] else ''})"
        )
    else:
        lines.append("adapter     none")
    if report["args"]:
        lines.append("args        " + ", ".join(f"{k}={v}" for k, v in report["args"].items()))
    else:
        lines.append("args        none saved")
    lines += [f"error       {error}" for error in report["errors"]]
    size = report["bytes"]
    lines.append(f"bytes       total {size['total']}, model {size['model']}, optimizer {size['optimizer']}")
    rows = [
        (t["key"], "x".join(map(str, t["shape"])) or "scalar", t["dtype"], str(t["bytes"]), str(t["chunks"]))
        for t in report["tensors"]
    ]
    header = ("key", "shape", "dtype", "bytes", "chunks")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines.append("")
    for row in [header, *rows]:
        lines.append(
            "  ".join(cell.ljust(w) if i < 3 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        )
    return "\n".join(lines)
