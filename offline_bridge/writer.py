"""Carry out a plan: headers first, then each tensor's bytes streamed into its place; index and config.

Output goes to a hidden temporary directory beside OUT_DIR, renamed into place only when complete, so
an interrupted or failed run never leaves something that looks like a finished checkpoint. A killed run
leaves its `.<OUT_DIR>.partial-<pid>` behind; the next run into the same OUT_DIR removes it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from .casting import cast
from .dtypes import DType, by_option
from .errors import BridgeError, OptionError
from .lora_merge import merge
from .plan import Plan, Source, Step, Target
from .readers.base import CheckpointReader
from .rules import Dims

__all__ = ["INDEX_FILE", "staged_output", "step_outputs", "write_json", "write_weights"]

INDEX_FILE = "model.safetensors.index.json"
FLOAT32 = by_option("fp32")


@contextlib.contextmanager
def staged_output(out_dir: str | Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``out_dir`` if the block succeeds, else vanishes."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OptionError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OptionError(f"{out}: output directory is not empty; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(out)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            staging.rename(out)
            shutil.rmtree(old)
        else:
            staging.rename(out)
    except OSError as exc:  # disk full, permissions, ...: the staging directory goes, the error stays one line
        raise BridgeError(f"{out}: writing the output failed ({exc}); nothing was left behind") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _remove_abandoned(out: Path) -> None:
    """Delete staging / old directories of earlier runs into ``out`` whose process is gone (killed)."""
    prefix = f".{out.name}."
    for leftover in [p for p in out.parent.iterdir() if p.name.startswith(prefix)]:
        kind, _, pid = leftover.name[len(prefix) :].rpartition("-")
        if kind not in ("partial", "old") or not pid.isdigit() or _alive(int(pid)):
            continue
        if kind == "old" and not out.exists():  # killed between the two renames: the old output is the output
            leftover.rename(out)
        else:
            shutil.rmtree(leftover, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _pwrite(fd: int, array: np.ndarray, offset: int) -> None:
    view = memoryview(np.ascontiguousarray(array)).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _merged(reader: CheckpointReader, step: Step, device: str, dims: Dims) -> tuple[np.ndarray, DType]:
    """The step's source array and its dtype; with an adapter, merged in fp32."""
    array = _read(reader, step.source)
    delta = step.delta
    if delta is None:
        return array, step.source.dtype
    pieces = [None if p is None else (_read(reader, p[0]), _read(reader, p[1])) for p in delta.pieces]
    merged = merge(
        array,
        step.source.dtype,
        pieces,
        delta.sources()[0].dtype,
        layout=delta.layout,
        scale=delta.scale,
        dims=dims,
        tp=delta.tp,
        magnitude=None if delta.magnitude is None else _read(reader, delta.magnitude),
        gated_rows=delta.gated_rows,
        device=device,
    )
    return merged, FLOAT32


def _read(reader: CheckpointReader, source: Source) -> np.ndarray:
    """A source's tensor, its parts joined along the first kept axis."""
    tail = source.shape[1:]
    arrays = [
        reader.read(key, box).reshape(-1, *tail) if source.shape else reader.read(key, box) for key, box in source.parts
    ]
    return (arrays[0] if len(arrays) == 1 else np.concatenate(arrays)).reshape(source.shape)


def step_outputs(
    plan: Plan, reader: CheckpointReader, step: Step, device: str = "auto"
) -> list[tuple[Target, np.ndarray]]:
    """A step's HF tensors, each as the bytes written for it (cast to its target dtype)."""
    array, dtype = _merged(reader, step, device, plan.dims)
    outputs = []
    for target, out in zip(step.targets, step.rule.apply(array, plan.dims), strict=True):
        if out.shape != target.shape:
            raise BridgeError(f"internal error: {target.name} came out {out.shape}, planned {target.shape}")
        outputs.append((target, cast(out, step.rule.output_dtype(dtype), target.dtype)))
    return outputs


def write_weights(
    plan: Plan,
    reader: CheckpointReader,
    out_dir: Path,
    *,
    progress: bool = True,
    device: str = "auto",
    on_written: Callable[[Target, np.ndarray], None] | None = None,
) -> None:
    """Write every safetensors file of ``plan`` into ``out_dir`` (plus the index when sharded).

    ``on_written(target, data)`` sees each tensor's bytes as written (the manifest hashes them).
    """
    fds = {}
    try:
        for file in plan.files:
            fd = os.open(out_dir / file.name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            fds[file.name] = fd
            os.pwrite(fd, file.header, 0)
            os.ftruncate(fd, file.size)
        with tqdm(total=plan.total_size, unit="B", unit_scale=True, desc="converting", disable=not progress) as bar:
            for step in plan.steps:
                for target, data in step_outputs(plan, reader, step, device):
                    _pwrite(fds[target.file], data, target.offset)
                    if on_written is not None:
                        on_written(target, data)
                    bar.update(target.nbytes)
    finally:
        for fd in fds.values():
            os.close(fd)
    if len(plan.files) > 1:
        targets = list(plan.targets())
        write_json(
            out_dir / INDEX_FILE,
            {
                "metadata": {"total_parameters": sum(t.numel for t in targets), "total_size": plan.total_size},
                "weight_map": {t.name: t.file for t in targets},
            },
        )


def write_json(path: Path, data: Any) -> None:
    """JSON as transformers writes it: sorted keys, two-space indent, trailing newline."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
