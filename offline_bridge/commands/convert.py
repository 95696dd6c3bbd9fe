"""`convert`: reader → plan → transform → writer, the whole pipeline behind `offline-bridge convert`."""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path

from ..config.inputs import open_checkpoint
from ..errors import OptionError
from ..plan.parts import parse_part
from ..readers import CheckpointReader
from ..readers.combined import CombinedReader
from ..transform.casting import preload_torch
from ..write.completed import completed_files, keep_only
from ..write.jsonable import jsonable
from ..write.manifest import write_manifest
from ..write.parts_area import PartsArea, check_out_dir
from ..write.sources import describe_sources
from ..write.staging import OutputDir
from ..write.writer import write_weights
from .options import check_options
from .parts import finalize, write_extras, write_part
from .planning import describe, plan_conversion
from .ray_parts import run_parts_on_ray

__all__ = ["convert"]

log = logging.getLogger(__name__)


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
    part: str | None = None,
    resume: bool = False,
    ray: str | None = None,
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
        part: "I/N": write only part I (0-based) of N of the output files, into the parts area beside
            ``out_dir``; `finalize` puts the whole output in place once every part is written.
        resume: keep the output files a killed run (or part) completed, and write only the rest.
        ray: run the parts as Ray tasks, one per output file, then `finalize`: the cluster's address, or ""
            for Ray's default (RAY_ADDRESS, else a new local instance).

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
    # OUT_DIR is checked (and locked, or the part's lock taken) before the checkpoint is read; a dry run leaves
    # it alone
    inputs = [ckpt_dir, adapter, base, hf_config]
    split = parse_part(part) if part is not None else None
    if split is not None and ray is not None:
        raise OptionError("--part and --ray: give one (--ray runs every part itself)")
    output: OutputDir | PartsArea | None = None
    if ray is not None and not dry_run:
        check_out_dir(out_dir, overwrite, inputs)  # the tasks write the parts; `finalize` takes the OUT_DIR lock
    elif split is not None and not dry_run:
        output = PartsArea(out_dir, *split, overwrite=overwrite, inputs=inputs)
    elif not dry_run:
        output = OutputDir(out_dir, overwrite=overwrite, inputs=inputs)
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
            if dry_run:
                sys.stdout.write(describe(plan, conversion.family))
                return Path(out_dir)
            if ray is not None:
                arguments = {
                    **options,
                    **{
                        "ckpt_dir": ckpt_dir,
                        "out_dir": out_dir,
                        "hf_config": hf_config,
                        "adapter": adapter,
                        "base": base,
                    },
                    **{"workers": workers, "overwrite": overwrite, "check_crc": check_crc, "strict": strict},
                }
                run_parts_on_ray(ray, plan, arguments, progress=progress, merges=lora is not None)
                return finalize(out_dir, overwrite=overwrite)
            # every input file the manifest describes is read (and refused if it must be) before any output byte
            sources = describe_sources(reader, hf_config, conversion.config_source)
            writing = {"progress": progress, "device": device, "workers": workers}
            if isinstance(output, PartsArea):
                output.check_inputs(_read_from(reader))
                manifest = {"options": jsonable(options), "sources": sources}
                write_part(conversion, reader, output, manifest, resume=resume, **writing)
                return Path(out_dir)
            with output.staged(_read_from(reader), resume=resume) as staging:
                kept = (
                    keep_only(staging, completed_files(staging, plan, [f.name for f in plan.files])) if resume else None
                )
                digests = write_weights(plan, reader, staging, kept=kept, resumable=True, **writing)
                digests |= write_extras(conversion, reader, staging)[1]
                write_manifest(staging, "convert", options, sources, digests)
    return Path(out_dir)


def _read_from(reader: CheckpointReader) -> list[Path]:
    """The iteration directories ``reader`` reads (a base found through run_config.yaml too)."""
    parts = [reader.base, reader.adapter] if isinstance(reader, CombinedReader) else [reader]
    return [part.path for part in parts]
