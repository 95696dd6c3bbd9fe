"""Megatron-Bridge's `run_config.yaml`: the PEFT settings and the base checkpoint of an adapter save.

Read with YAML's safe loader: `!!set` is data, `_target_` is a string that is never imported, and any tag
that would build an object is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CheckpointError

__all__ = ["RUN_CONFIG", "RunConfig", "load_run_config"]

RUN_CONFIG = "run_config.yaml"


@dataclass(frozen=True)
class RunConfig:
    file: Path
    peft: dict[str, Any] | None  # the peft: section (alpha, dim, target_modules, _target_, ...)
    pretrained_checkpoint: str | None  # checkpoint.pretrained_checkpoint: the base save root or iter dir
    tensor_parallel: int  # model.tensor_model_parallel_size of the run that saved it


def load_run_config(iteration_dir: Path) -> RunConfig | None:
    """The run config saved in (or beside) an iteration directory, if there is one."""
    import yaml

    file = next((d / RUN_CONFIG for d in (iteration_dir, iteration_dir.parent) if (d / RUN_CONFIG).is_file()), None)
    if file is None:
        return None
    try:
        data = yaml.safe_load(file.read_text())
    except yaml.YAMLError as exc:  # e.g. !!python/object tags: refused, never constructed
        problem = str(exc).splitlines()[0]
        raise CheckpointError(f"{file}: not a plain YAML document ({problem}); nothing in it was executed") from exc
    except OSError as exc:
        raise CheckpointError(f"{file}: cannot read ({exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a mapping at the top level")
    checkpoint = data.get("checkpoint") if isinstance(data.get("checkpoint"), dict) else {}
    peft = data.get("peft") if isinstance(data.get("peft"), dict) else None
    model = data.get("model") if isinstance(data.get("model"), dict) else {}
    return RunConfig(
        file, peft, checkpoint.get("pretrained_checkpoint"), int(model.get("tensor_model_parallel_size") or 1)
    )
