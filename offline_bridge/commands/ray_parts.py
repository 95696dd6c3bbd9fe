"""`convert --ray [ADDRESS]`: the parts of `convert --part I/N` run as Ray tasks on a cluster, then `finalize`.

Ray (the engine miles runs the same job on) schedules, places and retries: each part is a task asking for its
threads (`--workers`), memory by the plan's largest tensor, and a GPU when merges run on `--device cuda`; a task
whose worker dies is run again with `--resume`, keeping the files the dead one completed. Ray is an optional
dependency (`pip install offline-bridge[ray]`), imported only here and only when asked for.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import BridgeError, OptionError
from ..plan.parts import split_files
from ..plan.schema import Plan, Target
from ..write.progress import progress as progress_of
from ..write.scheduler import MIN_BUDGET, default_workers

__all__ = ["RETRIES", "run_parts_on_ray"]

RETRIES = 3  # attempts after a worker dies (a node lost, a pod evicted); a bad input fails at once
_BASELINE = 512 << 20  # a worker's interpreter, numpy and our modules
_TORCH = 1 << 30  # torch, for merges

log = logging.getLogger(__name__)


def _part(arguments: Mapping[str, Any], part: str) -> None:
    """One Ray task: one part, keeping what an earlier attempt completed."""
    from .convert import convert

    logging.basicConfig(level=logging.WARNING)
    convert(**arguments, part=part, resume=True, progress=False)


def _resources(plan: Plan, workers: int | None, device: str, merges: bool) -> dict[str, Any]:
    largest = max((t.nbytes for t in plan.targets()), default=0)
    memory = _BASELINE + max(MIN_BUDGET, 3 * largest) + (_TORCH if merges else 0)
    gpus = 1 if merges and device.startswith("cuda") else 0
    return {"num_cpus": workers or default_workers(), "memory": memory, "num_gpus": gpus}


def run_parts_on_ray(address: str, plan: Plan, arguments: Mapping[str, Any], *, progress: bool, merges: bool) -> None:
    """Run every part of ``plan`` (one per output file) as a Ray task of ``convert(**arguments, part=...)``;
    one progress bar for the whole job. Connects to ``address`` ("" for Ray's default: RAY_ADDRESS or a new
    local instance) unless this process is connected already."""
    try:
        import ray
    except ImportError:
        raise OptionError("--ray needs Ray: pip install 'offline-bridge[ray]'") from None
    if not ray.is_initialized():
        ray.init(address=address or None, logging_level=logging.WARNING, log_to_driver=False)
    count = len(plan.files)
    part_of = {name: i for i, names in enumerate(split_files(plan, count)) for name in names}
    targets: list[list[Target]] = [[] for _ in range(count)]
    for target in plan.targets():
        targets[part_of[target.file]].append(target)
    resources = _resources(plan, arguments.get("workers"), arguments.get("device", "auto"), merges)
    task = ray.remote(max_retries=RETRIES, retry_exceptions=False, **resources)(_part)
    paths = ("ckpt_dir", "out_dir", "hf_config", "adapter", "base")  # workers may run in another directory
    absolute = {k: str(Path(v).absolute()) if k in paths and v is not None else v for k, v in arguments.items()}
    pending = {task.remote(absolute, f"{i}/{count}"): i for i in range(count)}
    log.info("%d parts on Ray, each with %s", count, resources)
    with progress_of(plan, progress) as bar:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            try:
                ray.get(done[0])
            except ray.exceptions.RayTaskError as exc:
                for ref in pending:
                    ray.cancel(ref)
                cause = exc.cause
                raise cause if isinstance(cause, BridgeError) else exc from None
            bar.update(targets[pending.pop(done[0])])
