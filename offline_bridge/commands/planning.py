"""Everything a conversion knows before any tensor byte is read: the family, the HF config, the plan and the
side files (`plan_conversion`), and the plan as text for `--dry-run` (`describe`)."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..config.args_shapes import check_args_against_tensors
from ..config.hf_config import derive_config, dims_of, finalize_config, load_config
from ..config.model_args import model_args_of
from ..dtypes import DType, by_option
from ..families import Family, family_by_name, family_for_args, family_for_config
from ..plan.planner import build_plan
from ..plan.schema import Lora, Plan
from ..readers import CheckpointReader
from ..readers.base import is_model_key
from ..transform.fp8_export import fp8_plan
from ..transform.quant import Quant, find_quant
from ..write.sources import ConfigFrom
from .sizes import parse_size

__all__ = ["Conversion", "describe", "plan_conversion"]

log = logging.getLogger(__name__)


def _auto_dtype(reader: CheckpointReader) -> DType:
    """The dtype most model parameters are stored in (by element count)."""
    counts: Counter = Counter()
    for info in reader.tensors.values():
        if is_model_key(info.key) and info.dtype.torch_name.startswith(("float", "bfloat")):
            numel = 1
            for n in info.shape:
                numel *= n
            counts[info.dtype] += numel
    return counts.most_common(1)[0][0] if counts else by_option("fp32")


@dataclass(frozen=True)
class Conversion:
    """Everything known before any tensor byte is read: what to write, and the side files."""

    plan: Plan
    config: dict
    family: Family
    model_dir: Path | None  # the HF model directory ``hf_config`` named, for its tokenizer files
    quant: Quant | None  # ModelOpt amax mapped to HF names, when the checkpoint has any
    config_source: ConfigFrom | None = None  # the checkpoint's args / run config it came from; None: --hf-config


def plan_conversion(
    reader: CheckpointReader,
    lora: Lora | None,
    *,
    hf_config: str | Path | None = None,
    model_type: str | None = None,
    dtype: str = "auto",
    max_shard_size: str | int = "5GB",
    vocab_size: int | None = None,
    export_fp8: bool = False,
) -> Conversion:
    """The plan, the HF config and the side files for ``reader``, from metadata only."""
    shard_limit = parse_size(max_shard_size)
    target_dtype = None if dtype == "auto" else by_option(dtype)
    model_dir, source = None, None
    if hf_config is not None:
        config, model_dir = load_config(hf_config)
        family = family_by_name(model_type) if model_type else family_for_config(config)
    else:
        found = model_args_of(reader)
        check_args_against_tensors(found.args, reader.tensors, str(found.file))
        family = family_by_name(model_type) if model_type else family_for_args(found.args)
        config = derive_config(found.args, family, vocab_size=vocab_size)
        source = (found.source, found.file)
    target_dtype = target_dtype or _auto_dtype(reader)
    config = finalize_config(config, target_dtype, vocab_size=vocab_size)
    plan = build_plan(family, reader, dims_of(config, family), target_dtype, shard_limit, lora)
    quant = find_quant(family, reader, plan.dims)
    if export_fp8:
        plan, config["quantization_config"] = fp8_plan(plan, quant, reader, shard_limit)
    log.info(
        "%s: %d tensors, %d files, %d bytes", family.name, len(list(plan.targets())), len(plan.files), plan.total_size
    )
    return Conversion(plan, config, family, model_dir, quant, source)


def describe(plan: Plan, family: Family) -> str:
    """The plan as text: the family's mapping table (`Family.describe`), every tensor (file, offset, bytes,
    where it comes from), then every file and the total."""
    lines = [f"family {family.name}: {family.architecture}"]
    for row in family.describe():
        when = f" [{row.condition}]" if row.condition else ""
        lines.append(f"rule {row.table}: {', '.join(row.hf)} <- {' or '.join(row.megatron)} ({row.kind}){when}")
    for step in plan.steps:
        source = " + ".join(key for key, _ in step.source.parts)
        merged = " (+ adapter)" if step.delta is not None else ""
        for t in step.targets:
            lines.append(
                f"{t.name}\t{t.dtype.safetensors}{list(t.shape)}\t{t.file}@{t.offset}\t{t.nbytes}\t<- {source}{merged}"
            )
    counts = Counter(t.file for t in plan.targets())
    for file in plan.files:
        lines.append(f"file {file.name}: {counts[file.name]} tensors, {file.size} bytes")
    lines.append(f"total: {len(list(plan.targets()))} tensors, {len(plan.files)} files, {plan.total_size} bytes")
    return "\n".join(lines) + "\n"
