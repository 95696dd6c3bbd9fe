"""Carry out a plan: headers first, then each tensor's bytes streamed into its place; index and config.

The files go into the staging directory `offline_bridge.write.staging` makes beside OUT_DIR.

Every tensor has a planned file and offset, so steps run in any order and on several threads with the same
bytes as the result. Steps go in the order their bytes lie in the checkpoint's files. A step that only
moves bytes is copied file to file (`transfer.plan_runs`, `os.copy_file_range`: no pass through memory);
one whose rows interleave across chunks is gathered into a buffer with one scattered read per chunk; the
rest (merges, casts, other rules) are read, computed and written from memory. Threads work within a
budget of bytes held at once, so memory stays a few tensors whatever the model size.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from tqdm import tqdm

from ..errors import BridgeError, CheckpointError
from ..files.handles import HandleCache
from ..plan.planner import Plan, Source, Step, Target
from ..plan.rules import Dims
from ..plan.transfer import Run, plan_runs, selected_rows
from ..readers.base import CheckpointReader
from ..transform.casting import as_numpy, cast, preload_torch
from ..transform.lora_merge import merge_tensor

__all__ = [
    "INDEX_FILE",
    "OutputFiles",
    "default_workers",
    "read_source",
    "step_outputs",
    "write_json",
    "write_weights",
]

INDEX_FILE = "model.safetensors.index.json"
MAX_OPEN_FILES = 32  # output files and checkpoint files each kept open at once
MIN_BUDGET = 256 * 2**20  # bytes of tensors in flight, at least (more if one step needs more)
_HASH_BLOCK = 16 * 2**20  # bytes read back at a time to hash a written tensor (per thread)
# bytes per write call: writing tens of MB into a file's page cache in one call took 4x the CPU of 1 MB calls
# (measured on Linux 6.18, ext4, in a VM; copy_file_range and reads showed no such effect)
_WRITE_CHUNK = 2**20
_IOV_MAX = 1024  # buffers per readv/writev call (POSIX minimum of IOV_MAX)


def default_workers() -> int:
    """Threads that pay off: reads, writes and merges overlap; more than 4 only contend for the disk."""
    return max(1, min(4, os.cpu_count() or 1))


class OutputFiles:
    """The plan's safetensors files: headers written first, tensors put at their offsets by any thread; each
    file is flushed to disk (fsync) and closed as soon as its last tensor is in.

    Every tensor is hashed as it is put in place, on the thread that writes it, so hashing overlaps the other
    threads' copies and the disk's writeback: from memory when written from memory, else read back from the
    page cache. ``digests`` holds the sha256 of the bytes `verify` will read."""

    def __init__(self, out_dir: Path, plan: Plan, limit: int = MAX_OPEN_FILES) -> None:
        self._dir = out_dir
        self._fds: HandleCache[str, int] = HandleCache(self._open, os.close, limit)
        self._left = Counter(t.file for t in plan.targets())
        self._lock = threading.Lock()
        self._scratch = threading.local()
        self.digests: dict[tuple[str, str], str] = {}  # (file, tensor) -> sha256 hex
        for file in plan.files:
            fd = os.open(out_dir / file.name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                _pwrite_all(fd, [memoryview(file.header)], 0)
                os.ftruncate(fd, file.size)
            finally:
                os.close(fd)
            if not self._left[file.name]:
                self._flush(file.name)

    def _open(self, name: str) -> int:
        return os.open(self._dir / name, os.O_RDWR)  # read too: tensors are hashed from the file

    def write(self, target: Target, blocks: Sequence[memoryview]) -> None:
        """Put ``target``'s bytes (the concatenation of ``blocks``) in place."""
        with self._fds.use(target.file) as fd:
            _pwrite_all(fd, blocks, target.offset)
            digest = hashlib.sha256()
            for block in blocks:
                digest.update(block)
            _start_writeback(fd, target)
        self._done(target, digest.hexdigest())

    def copy(self, target: Target, runs: Sequence[Run], sources: HandleCache[str, int]) -> None:
        """Put ``target``'s bytes in place straight from the checkpoint files (contiguous runs only)."""
        with self._fds.use(target.file) as fd:
            for run in runs:
                with sources.use(run.path) as source:
                    _copy_range(source, fd, run.length, run.src, target.offset + run.dst, run.path)
            digest = self._read_back_hash(fd, target)
            _start_writeback(fd, target)
        self._done(target, digest)

    def _read_back_hash(self, fd: int, target: Target) -> str:
        """The sha256 of a tensor copied file to file, read back (from the page cache) on this thread."""
        buffer = getattr(self._scratch, "buffer", None)
        if buffer is None:
            buffer = self._scratch.buffer = memoryview(bytearray(_HASH_BLOCK))
        digest = hashlib.sha256()
        for start in range(target.offset, target.offset + target.nbytes, _HASH_BLOCK):
            block = buffer[: min(_HASH_BLOCK, target.offset + target.nbytes - start)]
            _pread_all(fd, [block], start, str(self._dir / target.file))
            digest.update(block)
        return digest.hexdigest()

    def _done(self, target: Target, digest: str) -> None:
        with self._lock:
            self.digests[target.file, target.name] = digest
            self._left[target.file] -= 1
            complete = not self._left[target.file]
        if complete:
            self._flush(target.file)

    def _flush(self, name: str) -> None:
        fd = self._fds.pop(name)
        fd = self._open(name) if fd is None else fd
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        self._fds.close()


def write_weights(
    plan: Plan,
    reader: CheckpointReader,
    out_dir: Path,
    *,
    progress: bool = True,
    device: str = "auto",
    workers: int | None = None,
) -> dict[tuple[str, str], str]:
    """Write every safetensors file of ``plan`` into ``out_dir`` (plus the index when sharded).

    ``workers`` threads (default `default_workers`) run the steps.
    Returns the sha256 of every tensor as written, by (file name, tensor name).
    """
    merges = _TorchThreads() if any(step.delta is not None for step in plan.steps) else None
    runs = {id(step): plan_runs(step, reader, plan.dims) for step in plan.steps}
    # in checkpoint order, merges last: torch loads meanwhile
    steps = sorted(plan.steps, key=lambda step: (step.delta is not None, _position(step, runs[id(step)], reader)))
    sources: HandleCache[str, int] = HandleCache(_open_source, os.close, MAX_OPEN_FILES)
    outputs = OutputFiles(out_dir, plan, MAX_OPEN_FILES)
    scratch = threading.local()
    lock = threading.Lock()
    try:
        with tqdm(total=plan.total_size, unit="B", unit_scale=True, desc="converting", disable=not progress) as bar:

            def write_step(step: Step) -> None:
                step_runs = runs[id(step)]
                if step_runs is None:
                    _compute(step, reader, outputs, plan.dims, device, merges)
                else:
                    for target, target_runs in zip(step.targets, step_runs):
                        if _file_to_file(target_runs):
                            outputs.copy(target, target_runs, sources)
                            continue
                        data = _gather(target, target_runs, sources, scratch)
                        outputs.write(target, [data])
                with lock:
                    bar.update(sum(t.nbytes for t in step.targets))

            def cost(step: Step) -> int:
                return _footprint(step, runs[id(step)])

            run_bounded(write_step, steps, workers or default_workers(), cost)
    finally:
        outputs.close()
        sources.close()
        if merges is not None:
            merges.restore()
    if len(plan.files) > 1:
        targets = list(plan.targets())
        write_json(
            out_dir / INDEX_FILE,
            {
                "metadata": {"total_parameters": sum(t.numel for t in targets), "total_size": plan.total_size},
                "weight_map": {t.name: t.file for t in targets},
            },
        )
    return outputs.digests


T = TypeVar("T")


class _TorchThreads:
    """Merges run on the writer's threads; torch's own thread pool on top of them only makes the threads wait
    for each other (5-8x slower merges on a busy 2-core machine). torch (a second to import) starts loading
    in the background (if not yet); the first merge limits it to one thread, `restore` undoes that."""

    def __init__(self) -> None:
        preload_torch()
        self._lock = threading.Lock()
        self._before: int | None = None

    def limit(self) -> None:
        with self._lock:
            if self._before is None:
                import torch

                self._before = torch.get_num_threads()
                torch.set_num_threads(1)

    def restore(self) -> None:
        if self._before is not None:
            import torch

            torch.set_num_threads(self._before)


def run_bounded(work: Callable[[T], None], items: Iterable[T], workers: int, cost: Callable[[T], int]) -> None:
    """``work(item)`` for every item on ``workers`` threads, started in order, with the ``cost`` (bytes) of
    the items in flight kept within a budget: the costliest item, or `MIN_BUDGET` if more. The first error
    stops the submissions and is raised once the running items are done."""
    items = list(items)
    if workers <= 1:
        for item in items:
            work(item)
        return
    budget = _Budget(max([MIN_BUDGET, *(cost(item) for item in items)]))
    errors: list[BaseException] = []

    def task(item: T, need: int) -> None:
        try:
            if not errors:  # after a failure, queued items are dropped
                work(item)
        except BaseException as exc:
            errors.append(exc)
        finally:
            budget.give(need)

    with ThreadPoolExecutor(workers, thread_name_prefix="offline-bridge") as pool:
        try:
            for item in items:
                need = cost(item)
                if not budget.take(need, stop=lambda: bool(errors)):
                    break
                pool.submit(task, item, need)
        except BaseException as exc:  # an interrupt (SIGINT) in this thread: queued items are dropped too
            errors.append(exc)
            raise
    if errors:
        raise errors[0]


class _Budget:
    """Bytes in flight: `take` waits until ``need`` more fit (one item always fits), `give` returns them."""

    def __init__(self, limit: int) -> None:
        self._limit, self._used = limit, 0
        self._changed = threading.Condition()

    def take(self, need: int, stop: Callable[[], bool]) -> bool:
        with self._changed:
            self._changed.wait_for(lambda: stop() or not self._used or self._used + need <= self._limit)
            if stop():
                return False
            self._used += need
            return True

    def give(self, need: int) -> None:
        with self._changed:
            self._used -= need
            self._changed.notify_all()


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
    step: Step, reader: CheckpointReader, outputs: OutputFiles, dims: Dims, device: str, merges: _TorchThreads | None
) -> None:
    """Read the step's source, merge its adapter, cast and apply its rule, in memory."""
    before_merge = None if merges is None else merges.limit
    for target, blocks in zip(step.targets, _computed(reader, step, device, dims, before_merge), strict=True):
        if sum(len(block) for block in blocks) != target.nbytes:
            raise BridgeError(f"internal error: {target.name} came out in other than its {target.nbytes} bytes")
        outputs.write(target, blocks)


def step_outputs(
    plan: Plan, reader: CheckpointReader, step: Step, device: str = "auto"
) -> list[tuple[Target, np.ndarray]]:
    """A step's HF tensors as arrays of the bytes `write_weights` writes for them (for `diff`)."""
    outputs = []
    for target, blocks in zip(step.targets, _computed(reader, step, device, plan.dims), strict=True):
        data = b"".join(blocks) if len(blocks) != 1 else blocks[0]
        outputs.append((target, np.frombuffer(data, dtype=target.dtype.np).reshape(target.shape)))
    return outputs


def _computed(
    reader: CheckpointReader, step: Step, device: str, dims: Dims, before_merge: Callable[[], None] | None = None
) -> list[list[memoryview]]:
    """The bytes of the step's HF tensors. The source is cast (or merged and rounded once, on the merge
    device) as a whole; a rule that only picks rows then takes them as views, any other rule is applied.
    On a GPU the merged weight is split there too (`offline_bridge.transform.gpu`). ``before_merge`` is called once the
    merge's inputs are read (torch may still be loading meanwhile)."""
    array = read_source(reader, step.source)
    (dtype,) = {t.dtype for t in step.targets}
    delta = step.delta
    if step.rule.computes is not None:  # new values (FP8 export): apply the rule, then cast its outputs
        return [[_bytes(cast(out, step.rule.computes, dtype))] for out in _applied(step, array, dims)]
    if delta is None:
        whole = cast(array, step.source.dtype, dtype)
    else:
        pieces = [None if p is None else (read_source(reader, p[0]), read_source(reader, p[1])) for p in delta.pieces]
        if before_merge is not None:
            before_merge()
        merged = merge_tensor(
            array,
            step.source.dtype,
            pieces,
            delta.sources()[0].dtype,
            layout=delta.layout,
            scale=delta.scale,
            dims=dims,
            tp=delta.tp,
            magnitude=None if delta.magnitude is None else read_source(reader, delta.magnitude),
            gated_rows=delta.gated_rows,
            device=device,
            out_dtype=dtype,
        )
        if merged.device.type == "cuda":
            from ..transform.gpu import split_rows

            split = split_rows(merged, step, dims, dtype)
            if split is not None:
                return [[_bytes(out)] for out in split]
        whole = as_numpy(merged.cpu(), dtype)
    rows = selected_rows(step, dims)
    if rows is None:
        return [[_bytes(out)] for out in _applied(step, whole, dims)]
    return [[_bytes(whole[start:stop]) for start, stop in ranges] for ranges in rows]


def _applied(step: Step, array: np.ndarray, dims: Dims) -> list[np.ndarray]:
    """The step's rule applied to ``array``, each output checked against its planned shape."""
    outs = step.rule.apply(array, dims)
    for target, out in zip(step.targets, outs, strict=True):
        if out.shape != target.shape:
            raise BridgeError(f"internal error: {target.name} came out {out.shape}, planned {target.shape}")
    return outs


def _bytes(array: np.ndarray) -> memoryview:
    return memoryview(np.ascontiguousarray(array)).cast("B")


def read_source(reader: CheckpointReader, source: Source) -> np.ndarray:
    """A source's tensor, its parts joined along the first kept axis."""
    tail = source.shape[1:]
    arrays = [
        reader.read(key, box).reshape(-1, *tail) if source.shape else reader.read(key, box) for key, box in source.parts
    ]
    return (arrays[0] if len(arrays) == 1 else np.concatenate(arrays)).reshape(source.shape)


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
            _pread_all(fd, places, run.src, run.path)
    return data


def _open_source(path: str) -> int:
    try:
        return os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot open shard file ({exc})") from exc


def _copy_range(source: int, out: int, length: int, src: int, dst: int, path: str) -> None:
    """``length`` bytes from ``src`` in ``source`` to ``dst`` in ``out``, in the kernel when it can."""
    while length:
        try:
            done = os.copy_file_range(source, out, length, src, dst)
        except (AttributeError, OSError) as exc:  # no copy_file_range here, or not between these files
            if isinstance(exc, OSError) and exc.errno not in (
                errno.EXDEV,
                errno.ENOSYS,
                errno.EINVAL,
                errno.EOPNOTSUPP,
            ):
                raise
            data = memoryview(bytearray(min(length, 64 * 2**20)))
            _pread_all(source, [data], src, path)
            _pwrite_all(out, [data], dst)
            done = len(data)
        if not done:
            raise CheckpointError(f"{path}: ends before byte {src + length} (truncated?)")
        length, src, dst = length - done, src + done, dst + done


def _pread_all(fd: int, views: list[memoryview], offset: int, path: str) -> None:
    """Fill ``views`` from consecutive bytes of ``fd`` at ``offset`` (scattered read, retried when short)."""
    for first in range(0, len(views), _IOV_MAX):
        batch = views[first : first + _IOV_MAX]
        while batch:
            got = os.preadv(fd, batch, offset)
            if not got:
                raise CheckpointError(f"{path}: ends before byte {offset + sum(len(v) for v in batch)} (truncated?)")
            offset += got
            batch = _advance(batch, got)


def _pwrite_all(fd: int, views: Sequence[memoryview], offset: int) -> None:
    """Write ``views`` one after the other at ``offset`` (gathered writes, retried when short), at most
    `_WRITE_CHUNK` bytes a call."""
    pieces = [view[at : at + _WRITE_CHUNK] for view in views for at in range(0, len(view), _WRITE_CHUNK)]
    first = 0
    while first < len(pieces):
        size, stop = len(pieces[first]), first + 1
        while stop < len(pieces) and stop - first < _IOV_MAX and size + len(pieces[stop]) <= _WRITE_CHUNK:
            size += len(pieces[stop])
            stop += 1
        batch, first = pieces[first:stop], stop
        while batch:
            done = os.pwritev(fd, batch, offset)
            offset += done
            batch = _advance(batch, done)


def _advance(views: list[memoryview], done: int) -> list[memoryview]:
    """What is left of ``views`` once their first ``done`` bytes went through."""
    first = 0
    while first < len(views) and done >= len(views[first]):
        done -= len(views[first])
        first += 1
    rest = views[first:]
    if rest and done:
        rest[0] = rest[0][done:]
    return rest


def _start_writeback(fd: int, target: Target) -> None:
    """Start writing the tensor to disk now, so the fsync at the end of the file has little left to wait for
    (and a converted checkpoint does not crowd the page cache)."""
    if hasattr(os, "posix_fadvise") and target.nbytes:
        os.posix_fadvise(fd, target.offset, target.nbytes, os.POSIX_FADV_DONTNEED)


def write_json(path: Path, data: Any) -> None:
    """JSON as transformers writes it: sorted keys, two-space indent, trailing newline."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
