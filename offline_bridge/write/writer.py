"""Carry out a plan: each tensor's bytes streamed into its place, then the index.

The files go into the staging directory `offline_bridge.write.staging` makes beside OUT_DIR.

Every tensor has a planned file and offset, so steps run in any order and on several threads with the same
bytes as the result. Steps go in the order their bytes lie in the checkpoint's files. A step that only
moves bytes is copied file to file (`transfer.plan_runs`, `os.copy_file_range`: no pass through memory);
one whose rows interleave across chunks is gathered into a buffer with one scattered read per chunk; the
rest (merges, casts, other rules) are computed in memory (`transform.compute`). Threads work within a
budget of bytes held at once (`scheduler`), so memory stays a few tensors whatever the model size; the
files themselves (headers, offsets, hashes, fsync) are `output_files`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

import numpy as np

from ..errors import InternalError
from ..files.handles import HandleCache
from ..files.posix_io import open_readonly, pread_all
from ..plan.extent_index import ExtentIndex
from ..plan.rules import Dims
from ..plan.schema import Plan, Step, Target
from ..plan.transfer import Run, plan_runs
from ..readers.base import CheckpointReader
from ..transform.compute import computed
from .json_file import write_json
from .output_files import MAX_OPEN_FILES, OutputFiles
from .progress import progress as progress_of
from .scheduler import TorchThreads, default_workers, run_bounded

__all__ = ["INDEX_FILE", "write_index", "write_weights"]

INDEX_FILE = "model.safetensors.index.json"


def write_weights(
    plan: Plan,
    reader: CheckpointReader,
    out_dir: Path,
    *,
    files: Collection[str] | None = None,
    kept: Mapping[str, Mapping[str, str]] | None = None,
    resumable: bool = False,
    progress: bool = True,
    device: str = "auto",
    workers: int | None = None,
) -> dict[str, dict[str, str]]:
    """Write the safetensors files of ``plan`` into ``out_dir``: all of them (plus the index when sharded), or
    those named in ``files`` (a part). Files in ``kept`` (complete from a killed run) are not written again;
    ``resumable`` records each file once complete (`completed`), for a later `--resume`.

    ``workers`` threads (default `default_workers`) run the steps.
    Returns the sha256 of every tensor of the files, by file name and tensor name (``kept``'s included).
    """
    chosen = {f.name for f in plan.files} if files is None else set(files)
    kept = {name: kept[name] for name in chosen & set(kept or {})}
    todo = chosen - set(kept)
    steps = [i for i, step in enumerate(plan.steps) if any(t.file in todo for t in step.targets)]
    merges = TorchThreads() if any(plan.steps[i].delta is not None for i in steps) else None
    extents = ExtentIndex(reader)
    runs = {i: plan_runs(plan.steps[i], extents, plan.dims) for i in steps}
    # in checkpoint order, merges last: torch loads meanwhile
    order = sorted(steps, key=lambda i: (plan.steps[i].delta is not None, _position(plan.steps[i], runs[i], reader)))
    sources: HandleCache[str, int] = HandleCache(open_readonly, os.close, MAX_OPEN_FILES)
    outputs = OutputFiles(out_dir, plan, todo, resumable, MAX_OPEN_FILES)
    scratch = threading.local()
    lock = threading.Lock()
    try:
        with progress_of(plan, progress, todo) as bar:

            def write_step(index: int) -> None:
                step, step_runs = plan.steps[index], runs[index]
                if step_runs is None:
                    _compute(step, reader, outputs, plan.dims, device, merges, todo)
                else:
                    for target, target_runs in zip(step.targets, step_runs):
                        if target.file not in todo:
                            continue
                        if _file_to_file(target_runs):
                            outputs.copy(target, target_runs, sources)
                            continue
                        data = _gather(target, target_runs, sources, scratch)
                        outputs.write(target, [data])
                with lock:
                    bar.update(t for t in step.targets if t.file in todo)

            def cost(index: int) -> int:
                return _footprint(plan.steps[index], runs[index])

            run_bounded(write_step, order, workers or default_workers(), cost)
    finally:
        outputs.close()
        sources.close()
        if merges is not None:
            merges.restore()
    if files is None:
        write_index(plan, out_dir)
    return {**kept, **outputs.digests}


def write_index(plan: Plan, out_dir: Path) -> bool:
    """`model.safetensors.index.json`, as transformers writes it for a sharded model (none for one file);
    whether it was written."""
    if len(plan.files) > 1:
        targets = list(plan.targets())
        write_json(
            out_dir / INDEX_FILE,
            {
                "metadata": {"total_parameters": sum(t.numel for t in targets), "total_size": plan.total_size},
                "weight_map": {t.name: t.file for t in targets},
            },
        )
    return len(plan.files) > 1


def _position(step: Step, runs: list[list[Run]] | None, reader: CheckpointReader) -> tuple[str, int]:
    """Where the step's first bytes lie in the checkpoint (file, offset): steps are run in this order."""
    if runs:
        return min((run.path, run.src) for target_runs in runs for run in target_runs)
    extents = reader.extents(step.source.key)
    return min((e.path, e.offset) for e in extents) if extents else ("", 0)


def _file_to_file(runs: Sequence[Run]) -> bool:
    """Whether a target's bytes go file to file: whole runs, no rows to gather."""
    return all(run.count == 1 for run in runs)


def _footprint(step: Step, runs: list[list[Run]] | None) -> int:
    """Bytes a step holds in memory while it runs (file-to-file copies hold none)."""
    if runs is not None:
        gathered = [t.nbytes for t, r in zip(step.targets, runs) if not _file_to_file(r)]
        return max(gathered, default=0)
    numel = int(np.prod(step.source.shape, dtype=np.int64))
    merged = 4 * numel if step.delta is not None and step.delta.layout != "plain" else 0  # a fused fp32 delta
    return numel * step.source.dtype.itemsize + sum(t.nbytes for t in step.targets) + merged


def _compute(
    step: Step,
    reader: CheckpointReader,
    outputs: OutputFiles,
    dims: Dims,
    device: str,
    merges: TorchThreads | None,
    todo: Collection[str],
) -> None:
    """Read the step's source, merge its adapter, cast and apply its rule, in memory; write the targets in
    ``todo``'s files (a rule computes all of them)."""
    before_merge = None if merges is None else merges.limit
    for target, blocks in zip(step.targets, computed(reader, step, device, dims, before_merge), strict=True):
        if sum(len(block) for block in blocks) != target.nbytes:
            raise InternalError(f"internal error: {target.name} came out in other than its {target.nbytes} bytes")
        if target.file in todo:
            outputs.write(target, blocks)


def _gather(
    target: Target, runs: Sequence[Run], sources: HandleCache[str, int], scratch: threading.local
) -> memoryview:
    """``target``'s bytes read into this thread's reusable buffer, one scattered read per run."""
    buffer = getattr(scratch, "buffer", None)
    if buffer is None or len(buffer) < target.nbytes:
        buffer = scratch.buffer = bytearray(target.nbytes)
    data = memoryview(buffer)[: target.nbytes]
    for run in runs:
        ends = run.dst + run.count * run.stride
        places = [data[at : at + run.length] for at in range(run.dst, ends, run.stride)] if run.count > 1 else []
        places = places or [data[run.dst : run.dst + run.length]]
        with sources.use(run.path) as fd:
            pread_all(fd, places, run.src, run.path)
    return data
