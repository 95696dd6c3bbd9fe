"""What CKPT_DIR, --adapter and --base name together: one reader over base and adapter tensors, and the
LoRA settings to merge with.

- `convert CKPT OUT`: a plain checkpoint, or one holding base and adapter keys together;
- `convert BASE OUT --adapter ADAPTER`;
- `convert ADAPTER OUT [--base BASE]`: an adapter-only Megatron-Bridge save, whose base comes from
  `run_config.yaml` → `checkpoint.pretrained_checkpoint` unless --base is given.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import CheckpointError, OptionError
from ..plan.schema import Lora
from ..readers import CheckpointReader, open_reader
from ..readers.base import is_model_key
from ..readers.combined import CombinedReader
from ..readers.discovery import find_iteration_dir
from ..readers.integrity import check_integrity
from .args_schema import checked_value
from .run_config import RunConfig, load_run_config

__all__ = ["lora_settings", "open_checkpoint"]

log = logging.getLogger(__name__)

ADAPTER_MARK = ".adapter."


def _adapter_only(reader: CheckpointReader) -> bool:
    keys = [k for k in reader.tensors if is_model_key(k)]
    return bool(keys) and all(ADAPTER_MARK in k for k in keys)


def _open(
    path: str | Path, iteration: int | str | None = None, check_crc: bool = False, strict: bool = False
) -> tuple[CheckpointReader, RunConfig | None]:
    directory = find_iteration_dir(path, iteration)
    check_integrity(directory)  # before a file of it is parsed
    return open_reader(directory, check_crc=check_crc, strict=strict), load_run_config(directory)


def lora_settings(run_config: RunConfig | None, alpha: float | None, dim: int | None, where: Path) -> Lora:
    peft = (run_config.peft if run_config else None) or {}
    if dim is not None and dim <= 0:
        raise OptionError(f"LoRA dim must be positive, got {dim}")
    if run_config is not None:  # YAML values are checked like args: a number, a positive int
        file = str(run_config.file)
        alpha = checked_value("lora_alpha", peft.get("alpha"), file, "peft.alpha") if alpha is None else alpha
        dim = checked_value("lora_dim", peft.get("dim"), file, "peft.dim") if dim is None else dim
    if alpha is None or dim is None:
        source = f"{run_config.file} has no peft: alpha / dim" if run_config else "no run_config.yaml beside it"
        raise CheckpointError(f"{where}: holds LoRA adapters but {source}; pass --lora-alpha and --lora-dim")
    tp = run_config.tensor_parallel if run_config else 1
    return Lora(float(alpha), int(dim), bool(peft.get("normalize_moe_lora", False)), tp)


def open_checkpoint(
    ckpt_dir: str | Path,
    *,
    iteration: int | str | None = None,
    adapter: str | Path | None = None,
    base: str | Path | None = None,
    lora_alpha: float | None = None,
    lora_dim: int | None = None,
    check_crc: bool = False,
    strict: bool = False,
) -> tuple[CheckpointReader, Lora | None]:
    """The reader to convert from, and the LoRA settings when it holds adapters."""
    if adapter is not None and base is not None:
        raise OptionError("give either --adapter (CKPT_DIR is the base) or --base (CKPT_DIR is the adapter), not both")
    main, run_config = _open(ckpt_dir, iteration, check_crc, strict)
    opened = [main]
    try:
        if adapter is not None:
            adapter_reader, run_config = _open(adapter, check_crc=check_crc, strict=strict)
            opened.append(adapter_reader)
            reader: CheckpointReader = CombinedReader(main, adapter_reader)
        elif _adapter_only(main):
            base = base or (run_config.pretrained_checkpoint if run_config else None)
            if base is None:
                raise CheckpointError(
                    f"{main.path}: holds only adapter tensors and no run_config.yaml names its base; pass --base BASE_CKPT"
                )
            log.info("base checkpoint: %s", base)
            base_reader, _ = _open(base, check_crc=check_crc, strict=strict)
            opened.append(base_reader)
            reader = CombinedReader(base_reader, main)
        elif base is not None:
            raise OptionError(f"--base is for adapter-only checkpoints, but {main.path} holds base weights")
        else:
            reader = main
        has_adapters = any(ADAPTER_MARK in k for k in reader.tensors)
        lora = lora_settings(run_config, lora_alpha, lora_dim, reader.path) if has_adapters else None
        return reader, lora
    except BaseException:
        for opened_reader in opened:
            opened_reader.close()
        raise
