"""`convert`: reader → plan → transform → writer, the whole pipeline behind `offline-bridge convert`."""

from __future__ import annotations

import logging
import sys
from collections import Counter
from pathlib import Path

from .dtypes import DType, by_option
from .families import family_by_name, family_for_args, family_for_config
from .hf_config import copy_side_files, derive_config, dims_of, finalize_config, load_config
from .inputs import open_checkpoint
from .plan import Plan, build_plan, parse_size
from .readers import CheckpointReader
from .readers.base import is_model_key
from .writer import staged_output, write_json, write_weights

__all__ = ["convert", "describe"]

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
    workers: int | None = None,
    dry_run: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Convert a Megatron-Core checkpoint into a Hugging Face model directory.

    Args:
        ckpt_dir: a Megatron save root (with `latest_checkpointed_iteration.txt`) or an iteration directory.
        out_dir: where the HF checkpoint goes; must be empty or absent unless ``overwrite``.
        hf_config: a `config.json` or an HF model directory (its tokenizer files are copied too);
            without it the config is derived from the checkpoint's Megatron args.
        model_type: family name (see `offline_bridge.families.FAMILIES`); inferred when omitted.
        iteration: which saved iteration (an int or "release"); default the latest.
        dtype: "auto" (as stored), "bf16", "fp16" or "fp32".
        max_shard_size: largest safetensors file, decimal units as transformers ("5GB").
        vocab_size: the true vocabulary size, to trim Megatron's padding when args lack it.
        adapter: a Megatron-Bridge LoRA checkpoint to merge into ``ckpt_dir`` (the base).
        base: the base checkpoint when ``ckpt_dir`` is adapter-only (default: from its run_config.yaml).
        lora_alpha, lora_dim: override the run_config.yaml `peft:` values (needed when there is none).
        device: where LoRA merges run: "auto" (GPU if present), "cpu" or "cuda[:N]".
        workers: threads overlapping reads, merges and writes (default: up to 4, by the CPU count).
        dry_run: print the plan (tensors, files, bytes) on stdout and stop, without reading tensor data or
            touching ``out_dir``.
        overwrite: replace a non-empty ``out_dir``.
        progress: show a progress bar on stderr.

    Returns:
        The output directory.

    Example:
        >>> convert("examples/tiny-llama", "/tmp/tiny-llama-hf")  # doctest: +SKIP
    """
    shard_limit = parse_size(max_shard_size)
    target_dtype = None if dtype == "auto" else by_option(dtype)
    reader, lora = open_checkpoint(
        ckpt_dir, iteration=iteration, adapter=adapter, base=base, lora_alpha=lora_alpha, lora_dim=lora_dim
    )
    log.info("reading %s", reader.path)
    with reader:
        model_dir = None
        if hf_config is not None:
            config, model_dir = load_config(hf_config)
            family = family_by_name(model_type) if model_type else family_for_config(config)
        else:
            family = family_by_name(model_type) if model_type else family_for_args(reader.args)
            config = derive_config(reader.args, family, vocab_size=vocab_size)
        target_dtype = target_dtype or _auto_dtype(reader)
        config = finalize_config(config, target_dtype, vocab_size=vocab_size)
        plan: Plan = build_plan(family, reader, dims_of(config, family), target_dtype, shard_limit, lora)
        log.info(
            "%s: %d tensors, %d files, %d bytes",
            family.name,
            len(list(plan.targets())),
            len(plan.files),
            plan.total_size,
        )
        if dry_run:
            sys.stdout.write(describe(plan))
            return Path(out_dir)
        with staged_output(out_dir, overwrite=overwrite) as staging:
            write_weights(plan, reader, staging, progress=progress, device=device, workers=workers)
            write_json(staging / "config.json", config)
            if model_dir is not None:
                copy_side_files(model_dir, staging)
    return Path(out_dir)


def describe(plan: Plan) -> str:
    """The plan as text: every tensor (file, offset, bytes, where it comes from), then every file and the total."""
    lines = []
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
