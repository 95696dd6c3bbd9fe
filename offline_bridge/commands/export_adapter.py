"""`export-adapter`: a Megatron-Bridge adapter as a Hugging Face PEFT adapter, without reading the base.

The mapping is planned by `plan.peft_adapter`; this command finds the inputs and writes the directory.
"""

from __future__ import annotations

from pathlib import Path

from ..config.hf_config import derive_config, dims_of, load_config
from ..config.inputs import lora_settings
from ..config.model_args import model_args_of
from ..config.run_config import load_run_config
from ..errors import CheckpointError
from ..families import family_by_name, family_for_args, family_for_config
from ..plan.peft_adapter import adapter_config, build_adapter_plan
from ..readers import open_reader
from ..readers.discovery import find_iteration_dir
from ..readers.integrity import check_integrity
from ..write.json_file import write_json
from ..write.manifest import write_manifest
from ..write.sources import describe_sources, fingerprint
from ..write.staging import OutputDir
from ..write.writer import write_weights
from .options import check_options

__all__ = ["export_adapter"]


def export_adapter(
    adapter_ckpt: str | Path,
    out_dir: str | Path,
    *,
    hf_config: str | Path | None = None,
    base: str | Path | None = None,
    base_model_name_or_path: str | None = None,
    model_type: str | None = None,
    iteration: int | str | None = None,
    dtype: str = "auto",
    lora_alpha: float | None = None,
    lora_dim: int | None = None,
    expert_format: str = "paramwrapper",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` for PEFT from a Bridge adapter save.

    The HF model's shapes come from ``hf_config``, or from the base checkpoint's Megatron args (``base``,
    else run_config.yaml's pretrained_checkpoint) — its tensors are never read.
    """
    check_options(
        iteration=iteration, lora_alpha=lora_alpha, lora_dim=lora_dim, dtype=dtype, expert_format=expert_format
    )
    named = family_by_name(model_type) if model_type else None  # an unknown family before anything is read
    options = {
        "base_model_name_or_path": base_model_name_or_path,
        "model_type": model_type,
        "iteration": iteration,
        "dtype": dtype,
        "lora_alpha": lora_alpha,
        "lora_dim": lora_dim,
        "expert_format": expert_format,
    }
    # OUT_DIR is checked and locked before the checkpoint is read
    with OutputDir(out_dir, overwrite=overwrite, inputs=[adapter_ckpt, hf_config, base]) as output:
        directory = find_iteration_dir(adapter_ckpt, iteration)
        check_integrity(directory)
        run_config = load_run_config(directory)
        with open_reader(directory) as reader:
            sources = describe_sources(reader, hf_config)
            if hf_config is not None:
                config, _ = load_config(hf_config)
                family = named or family_for_config(config)
            else:
                base = base or (run_config.pretrained_checkpoint if run_config else None)
                if base is None:
                    raise CheckpointError(f"{directory}: pass --hf-config (or --base) to describe the target model")
                with open_reader(find_iteration_dir(base)) as base_reader:  # for its args only
                    found = model_args_of(base_reader)  # its args, or its run_config.yaml model: section
                    sources.append(fingerprint(base_reader, "base (args only)", (found.source, found.file)))
                family = named or family_for_args(found.args)
                config = derive_config(found.args, family, vocab_size=None)
            lora = lora_settings(run_config, lora_alpha, lora_dim, directory)
            plan = build_adapter_plan(family, reader, dims_of(config, family), lora, dtype, expert_format)
            with output.staged([directory, base]) as staging:
                digests = write_weights(plan, reader, staging, progress=progress)
                write_json(staging / "adapter_config.json", adapter_config(plan, lora, base_model_name_or_path))
                write_manifest(staging, "export-adapter", options, sources, digests)
    return Path(out_dir)
