"""Megatron-Bridge's `run_config.yaml`: the model provider, the PEFT settings and the base checkpoint of a
save.

Read with YAML's safe loader (PyYAML, under the size limit of `small_files`): `!!set` is data, `_target_`
is a string that is never imported, and any tag that would build an object is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from ..files.small_files import JSON_LIMIT, read_small_text
from .args_schema import checked_value

__all__ = ["RUN_CONFIG", "RunConfig", "find_run_config", "load_run_config"]

RUN_CONFIG = "run_config.yaml"


@dataclass(frozen=True)
class RunConfig:
    file: Path
    peft: dict[str, Any] | None  # the peft: section (alpha, dim, target_modules, _target_, ...)
    pretrained_checkpoint: str | None  # checkpoint.pretrained_checkpoint: the base save root or iter dir
    tensor_parallel: int  # model.tensor_model_parallel_size of the run that saved it
    model: dict[str, Any] | None = None  # the model: section, a provider dataclass dump (see provider_args)
    tokenizer: dict[str, Any] | None = None  # the tokenizer: section (tokenizer_model: an HF model id or path)


def find_run_config(iteration_dir: Path) -> Path | None:
    """`run_config.yaml` in the iteration directory or its parent (where Bridge saves it); one that is not a
    regular file (a FIFO, a directory) is found too, and refused when read."""
    return next((d / RUN_CONFIG for d in (iteration_dir, iteration_dir.parent) if (d / RUN_CONFIG).exists()), None)


def _section(data: dict[str, Any], name: str) -> dict[str, Any] | None:
    section = data.get(name)
    return section if isinstance(section, dict) else None


def load_run_config(iteration_dir: Path) -> RunConfig | None:
    """The run config saved in (or beside) an iteration directory, if there is one."""
    import yaml

    file = find_run_config(iteration_dir)
    if file is None:
        return None
    text = read_small_text(file, JSON_LIMIT, "run config")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:  # e.g. !!python/object tags: refused, never constructed
        problem = str(exc).splitlines()[0]
        raise CheckpointError(f"{file}: not a plain YAML document ({problem}); nothing in it was executed") from exc
    except RecursionError:
        raise CheckpointError(f"{file}: the YAML nests too deeply") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a mapping at the top level")
    checkpoint = _section(data, "checkpoint") or {}
    model = _section(data, "model")
    tp = checked_value("tensor_model_parallel_size", (model or {}).get("tensor_model_parallel_size"), str(file))
    pretrained = checkpoint.get("pretrained_checkpoint")
    if pretrained is not None and not isinstance(pretrained, str):
        raise CheckpointError(
            f"{file}: checkpoint.pretrained_checkpoint must be a path, got {type(pretrained).__name__}"
        )
    return RunConfig(file, _section(data, "peft"), pretrained, tp or 1, model, _section(data, "tokenizer"))
