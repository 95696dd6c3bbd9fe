"""`convert`: reader → plan → transform → writer, the whole pipeline behind `offline-bridge convert`."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..config.args_shapes import check_args_against_tensors
from ..config.hf_config import copy_side_files, derive_config, dims_of, finalize_config, load_config
from ..config.inputs import open_checkpoint
from ..config.model_args import model_args_of
from ..dtypes import DType, by_option
from ..families import Family, family_by_name, family_for_args, family_for_config
from ..plan.planner import build_plan
from ..plan.schema import Lora, Plan
from ..readers import CheckpointReader
from ..readers.base import is_model_key
from ..readers.combined import CombinedReader
from ..transform.casting import preload_torch
from ..transform.fp8_export import fp8_plan
from ..transform.quant import Quant, find_quant
from ..write.json_file import write_json
from ..write.manifest import write_manifest
from ..write.quant_files import write_quant
from ..write.sources import ConfigFrom, describe_sources
from ..write.staging import OutputDir
from ..write.writer import write_weights
from .options import check_options
from .sizes import parse_size

__all__ = ["Conversion", "convert", "describe", "plan_conversion"]

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


def convert(
    ckpt_dir: str | Path,
    out_dir: str | Path,
    *,
    hf_config: str | Path | None = None,
    model_type: str | None = None,
    iteration: int | str | None = None,
    dtype: str = "auto",
    max_shard_size: str | int = "5GB",
    vocab_size: int | None = None,
    adapter: str | Path | None = None,
    base: str | Path | None = None,
    lora_alpha: float | None = None,
    lora_dim: int | None = None,
    device: str = "auto",
    export_fp8: bool = False,
    workers: int | None = None,
    dry_run: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    check_crc: bool = False,
    strict: bool = False,
) -> Path:
    """Convert a Megatron-Core checkpoint into a Hugging Face model directory.

    Args:
        ckpt_dir: a Megatron save root (with `latest_checkpointed_iteration.txt`) or an iteration directory.
        out_dir: where the HF checkpoint goes; must be empty or absent unless ``overwrite``.
        hf_config: a `config.json` or an HF model directory (its tokenizer files are copied too);
            without it the config is derived from the checkpoint's Megatron args, or from Megatron-Bridge's
            `run_config.yaml` `model:` section when it saved no args.
        model_type: family name (see `offline_bridge.families.FAMILIES`); inferred when omitted.
        iteration: which saved iteration (an int or "release"); default the latest.
        dtype: "auto" (as stored), "bf16", "fp16" or "fp32".
        max_shard_size: largest safetensors file, decimal units as transformers ("5GB").
        vocab_size: the true vocabulary size, to trim Megatron's padding when args lack it.
        adapter: a Megatron-Bridge LoRA checkpoint to merge into ``ckpt_dir`` (the base).
        base: the base checkpoint when ``ckpt_dir`` is adapter-only (default: from its run_config.yaml).
        lora_alpha, lora_dim: override the run_config.yaml `peft:` values (needed when there is none).
        device: where LoRA merges run: "auto" (GPU if present), "cpu" or "cuda[:N]".
        export_fp8: write linears that have ModelOpt amax as FP8-E4M3 with scales (compressed-tensors);
            without it, amax tensors only go to the `quant_amax.safetensors` side file.
        workers: threads overlapping reads, merges and writes (default: up to 4, by the CPU count).
        dry_run: print the plan (tensors, files, bytes) on stdout and stop, without reading tensor data or
            touching ``out_dir``.
        overwrite: replace a non-empty ``out_dir``.
        progress: show a progress bar on stderr.
        check_crc: compare the bytes of every record read with the CRC-32 its torch.save archive holds
            (damage a file system let through; 0.16 s of CPU per GB).
        strict: refuse a legacy (`--ckpt-format torch`) tensor that should be replicated over TP ranks but
            differs between them; without it TP rank 0's copy is taken, as Megatron does, with a warning.

    Returns:
        The output directory.

    Example:
        >>> convert("examples/tiny-llama", "/tmp/tiny-llama-hf")  # doctest: +SKIP
    """
    check_options(
        iteration=iteration,
        max_shard_size=max_shard_size,
        vocab_size=vocab_size,
        lora_alpha=lora_alpha,
        lora_dim=lora_dim,
        device=device,
        workers=workers,
        dtype=dtype,
    )
    options = {
        "model_type": model_type,
        "iteration": iteration,
        "dtype": dtype,
        "max_shard_size": max_shard_size,
        "vocab_size": vocab_size,
        "lora_alpha": lora_alpha,
        "lora_dim": lora_dim,
        "device": device,
        "export_fp8": export_fp8,
    }
    if (adapter is not None or base is not None) and not dry_run:
        preload_torch()  # merges need it; importing takes longer than planning
    # OUT_DIR is checked and locked before the checkpoint is read; a dry run leaves it alone
    output = None if dry_run else OutputDir(out_dir, overwrite=overwrite, inputs=[ckpt_dir, adapter, base, hf_config])
    with output or contextlib.nullcontext():
        reader, lora = open_checkpoint(
            ckpt_dir,
            iteration=iteration,
            adapter=adapter,
            base=base,
            lora_alpha=lora_alpha,
            lora_dim=lora_dim,
            check_crc=check_crc,
            strict=strict,
        )
        log.info("reading %s", reader.path)
        with reader:
            conversion = plan_conversion(
                reader,
                lora,
                hf_config=hf_config,
                model_type=model_type,
                dtype=dtype,
                max_shard_size=max_shard_size,
                vocab_size=vocab_size,
                export_fp8=export_fp8,
            )
            plan = conversion.plan
            if output is None:
                sys.stdout.write(describe(plan, conversion.family))
                return Path(out_dir)
            with output.staged(_read_from(reader)) as staging:
                digests = write_weights(plan, reader, staging, progress=progress, device=device, workers=workers)
                if conversion.quant is not None:
                    digests |= write_quant(conversion.quant, plan, conversion.family, reader, staging)
                write_json(staging / "config.json", conversion.config)
                if conversion.model_dir is not None:
                    copy_side_files(conversion.model_dir, staging)
                write_manifest(
                    staging, "convert", options, describe_sources(reader, hf_config, conversion.config_source), digests
                )
    return Path(out_dir)


def _read_from(reader: CheckpointReader) -> list[Path]:
    """The iteration directories ``reader`` reads (a base found through run_config.yaml too)."""
    parts = [reader.base, reader.adapter] if isinstance(reader, CombinedReader) else [reader]
    return [part.path for part in parts]


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
