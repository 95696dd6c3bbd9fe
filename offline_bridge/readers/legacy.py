"""Megatron's legacy `--ckpt-format torch`: one `model_optim_rng.pt` per model-parallel rank.

Each file holds TP-local tensors under local layer (and expert) indices. This reader rebuilds the global
tensors the torch_dist format would hold, under the same keys (per-layer form), so everything downstream
is shared:

- layers: each (virtual stage, pipeline rank) chunk's first global layer as Megatron places it
  (`pipeline_split`: even, uneven first / last stages, embedding / loss stages, `pipeline_model_parallel_layout`),
  checked against the layers the chunk's file holds;
- experts: global index = ep_rank · E/EP + local index, from `local_experts.{j}.`, TE's `weight{j}`, or the
  old `GroupedMLP`'s `weight1` / `weight2` (`legacy_grouped`);
- tensor parallel: see `legacy_keys.TP_RULES`. A gated fc1 keeps its rank-major rows (`[gate_0; up_0; gate_1;
  ...]`, reported as `TensorInfo.row_order`: the plan undoes it with every other TP order); a replicated
  tensor whose copies differ is TP rank 0's (`legacy_replicas`).

Files are memory-mapped and unpickled through the allow-list; optimizer entries are never read.
"""

from __future__ import annotations

import argparse
import mmap
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config.args_schema import checked_args
from ..dtypes import DType
from ..errors import CheckpointError
from ..files.small_files import map_regular
from .base import Box, CheckpointReader, Extent, RowOrder, TensorInfo, full_box, is_model_key
from .legacy_grouped import expert_shape, expert_view, grouped_experts
from .legacy_keys import chunk_layers, global_key, models_of, tp_join
from .legacy_ranks import RANK_DIR, rank_layout
from .legacy_replicas import ReplicaCheck
from .pickles.safe_pickle import TensorRef
from .pickles.torch_save import TorchArchive, is_contiguous, release_pages, view
from .pipeline_split import checked_split

__all__ = ["LegacyReader"]

FILE = "model_optim_rng.pt"


@dataclass(frozen=True)
class _Shard:
    file: int  # index into the reader's archives
    name: str  # key inside that file's model dict
    model: str  # "model" or "model<vp>"
    tp: int
    grouped: int = 0  # GroupedMLP: 1 for weight1, 2 for weight2 (the shard is one expert's view of it)
    expert: int = 0  # GroupedMLP: the local expert


class LegacyReader(CheckpointReader):
    """Reader of an iteration directory of `mp_rank_*/model_optim_rng.pt` files."""

    format = "torch"

    def __init__(self, path: Path, *, check_crc: bool = False, strict: bool = False) -> None:
        self.path = Path(path)
        self._check_crc = check_crc
        self._replicas = ReplicaCheck(strict)
        self._crc_checked: set[tuple[int, str, str]] = set()  # records (file, model, name) checked
        ranks = sorted(p for p in self.path.iterdir() if p.is_dir() and RANK_DIR.match(p.name))
        if not ranks:
            raise CheckpointError(f"{self.path}: no mp_rank_* directories")
        self._archives: list[TorchArchive] = []
        self._files: list[str] = []
        self._maps: list[mmap.mmap | bytes] = []  # b"" for an empty file
        self._states = states = [self._open(rank / FILE) for rank in ranks]
        if not isinstance(args := states[0].get("args"), argparse.Namespace):
            raise CheckpointError(f"{ranks[0] / FILE}: no Megatron args")
        self._args = checked_args(args, str(ranks[0] / FILE))  # sizes below are read from checked values
        coords, tp_size, pp_size, ep_size, etp = rank_layout(self.path, ranks, self._args)
        self._gated = bool(getattr(self._args, "swiglu", False))
        self._experts_replicated = etp == 1 and tp_size > 1
        self._sparse = self._experts_replicated and ep_size > 1  # files are not a grid (`legacy_ranks`)
        self.ranks = coords  # (tp, pp, ep) -> index of its rank directory, for `inspect`
        num_experts = int(getattr(self._args, "num_experts", None) or 0)
        self._local_experts = num_experts // ep_size if num_experts else 0
        self._shards = self._catalog(states, coords, tp_size, pp_size)
        self._tensors = {key: self._info(key, shards) for key, shards in self._shards.items()}

    def _open(self, file: Path) -> dict:
        buf = map_regular(file, "rank file")
        self._maps.append(buf)
        self._files.append(str(file))
        archive = TorchArchive(buf, 0, len(buf), str(file))
        self._archives.append(archive)
        state = archive.load()
        if not isinstance(state, dict):
            raise CheckpointError(f"{file}: holds a {type(state).__name__}, not a checkpoint dict")
        return state

    def _catalog(self, states: list[dict], coords: dict, tp_size: int, pp_size: int) -> dict[str, list[_Shard]]:
        """Global key → its TP shards (ordered by tp rank), from every file's model dicts."""
        layers = chunk_layers([(self._archives[i].source, pp, states[i]) for (_, pp, _), i in coords.items()])
        self.split = checked_split(self._args, layers, pp_size, self._files[0])  # (vp, pp) → (first, layers)
        per_ep = self._local_experts
        dense: dict[tuple[int, int], int] = {}  # (tp, pp) → the lowest EP rank holding it
        whole: dict[tuple[int, int], int] = {}  # (ep, pp) → the lowest TP rank holding it
        for tp, pp, ep in coords:
            dense[(tp, pp)] = min(dense.get((tp, pp), ep), ep)
            whole[(ep, pp)] = min(whole.get((ep, pp), tp), tp)
        shards: dict[str, list[_Shard]] = defaultdict(list)
        for (tp, pp, ep), index in sorted(coords.items()):
            for model, state in models_of(states[index], self._archives[index].source):
                first = self.split[(int(model[5:] or 0), pp)][0]
                for name, value in state.items():
                    if not isinstance(value, TensorRef) or not is_model_key(name):
                        continue
                    for local, grouped, expert in grouped_experts(name, per_ep) or [(name, 0, 0)]:
                        key, is_expert = global_key(local, first, ep, per_ep)
                        if not is_expert and ep != dense[(tp, pp)]:
                            continue  # replicated over expert-parallel ranks: the lowest one's copy is used
                        if is_expert and self._sparse and tp != whole[(ep, pp)]:
                            continue  # whole experts, replicated over the TP ranks holding this EP rank
                        rank = 0 if is_expert and self._sparse else tp
                        shards[key].append(_Shard(index, name, model, rank, grouped, expert))
        for key, found in shards.items():
            expected = [0] if self._sparse and ".mlp.experts." in key else list(range(tp_size))
            if sorted(s.tp for s in found) != expected:
                files = ", ".join(self._archives[s.file].source for s in found)
                raise CheckpointError(
                    f"{key}: expected one shard per TP rank 0..{tp_size - 1}, found ranks {[s.tp for s in found]} in {files}"
                )
        return dict(shards)

    @property
    def virtual_stages(self) -> int:
        """Model chunks per rank file (`model0`, `model1`, ...): the virtual pipeline size."""
        return max(len(models_of(state, archive.source)) for state, archive in zip(self._states, self._archives))

    def chunk_boxes(self, key: str) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        """One piece per TP shard (their placement in the global tensor depends on the TP rule)."""
        shape = self._tensors[key].shape
        return [((0,) * len(shape), self._shape(s)) for s in self._shards[key]]

    def _ref(self, shard: _Shard) -> TensorRef:
        return self._states[shard.file][shard.model][shard.name]

    def _shape(self, shard: _Shard) -> tuple[int, ...]:
        shape = tuple(self._ref(shard).shape)
        if not shard.grouped:
            return shape
        return expert_shape(shape, shard.grouped, self._local_experts, self._files[shard.file], shard.name)

    def _array(self, shard: _Shard, start: int) -> np.ndarray:
        array = view(self._maps[shard.file], start, self._ref(shard))
        return expert_view(array, shard.grouped, shard.expert, self._local_experts) if shard.grouped else array

    def _start(self, shard: _Shard) -> int:
        """Where the shard's storage begins in its file; its CRC-32 checked on first use if asked."""
        archive, ref = self._archives[shard.file], self._ref(shard)
        start = archive.storage_start(ref)
        record = (shard.file, shard.model, shard.name)  # a GroupedMLP tensor is one record for all its experts
        if self._check_crc and record not in self._crc_checked:
            archive.check_crc(ref)
            self._crc_checked.add(record)
        return start

    def _tp_rule(self, key: str, ndim: int) -> int | str | None:
        """How this tensor's TP shards join (see `legacy_keys.TP_RULES`); None when replicated (always for scalars)."""
        if ndim == 0 or (self._experts_replicated and ".mlp.experts." in key):
            return None
        rule = tp_join(key)
        return 0 if rule == "gated" and not self._gated else rule

    def _info(self, key: str, shards: list[_Shard]) -> TensorInfo:
        refs = [self._ref(s) for s in shards]
        for shard, ref in zip(shards, refs):
            self._archives[shard.file].storage_start(ref)  # the one record validation, before any shape is used
        shapes = [self._shape(s) for s in shards]
        for shard, ref, found in zip(shards, refs, shapes):  # Megatron splits evenly: every TP shard has one shape
            if found != shapes[0] or ref.storage.dtype != refs[0].storage.dtype:
                raise CheckpointError(
                    f"{self._archives[shard.file].source}: {shard.name} is {ref.storage.dtype}{list(ref.shape)} "
                    f"but {self._archives[shards[0].file].source} has {refs[0].storage.dtype}{list(refs[0].shape)}"
                )
        dtype: DType = refs[0].storage.dtype
        shape = list(shapes[0])
        rule = self._tp_rule(key, len(shape))
        if rule is None or len(refs) == 1:
            return TensorInfo(key, tuple(shape), dtype)
        axis = 0 if rule == "gated" else rule
        shape[axis] *= len(refs)
        order = RowOrder("rank_major_gated", len(refs)) if rule == "gated" else None
        return TensorInfo(key, tuple(shape), dtype, order)

    @property
    def tensors(self) -> Mapping[str, TensorInfo]:
        return self._tensors

    @property
    def args(self) -> argparse.Namespace | None:
        return self._args

    @property
    def common_state(self) -> dict:
        """The first rank file's non-model entries that say what was saved (args, version, iteration)."""
        return {k: self._states[0][k] for k in ("args", "checkpoint_version", "iteration") if k in self._states[0]}

    def read(self, key: str, box: Box | None = None) -> np.ndarray:
        shards = self._shards.get(key)
        if shards is None:
            raise CheckpointError(f"{self.path}: no tensor {key!r} in the checkpoint")
        shards = sorted(shards, key=lambda s: s.tp)
        starts = [self._start(s) for s in shards]
        parts = [self._array(s, start) for s, start in zip(shards, starts)]
        rule = self._tp_rule(key, parts[0].ndim)
        if rule is None or len(parts) == 1:
            where = [f"{self._archives[s.file].source}: {s.name}" for s in shards]
            whole = self._replicas.pick(key, parts, where, self._tensors[key].dtype)
        else:  # a gated fc1 stays rank-major (`TensorInfo.row_order`)
            whole = np.concatenate(parts, axis=0 if rule == "gated" else rule)
        box = box or full_box(whole.shape)
        result = np.array(whole[tuple(slice(a, b) for a, b in box)])
        del whole, parts
        for shard, start in zip(shards, starts):
            storage = self._ref(shard).storage
            release_pages(self._maps[shard.file], start, storage.numel * storage.dtype.itemsize)
        return result

    def extents(self, key: str) -> list[Extent] | None:
        """The TP shards where they lie in the rank files (a gated fc1's rows as stored: rank-major); None for a
        replicated tensor (`read` compares the copies), a GroupedMLP expert (a transposed view) or a shard that
        is not contiguous in its storage."""
        shards = self._shards.get(key)
        rule = self._tp_rule(key, len(self._tensors[key].shape)) if shards and len(shards) > 1 else "whole"
        if shards is None or rule is None or any(s.grouped for s in shards):
            return None
        info = self._tensors[key]
        found = []
        for shard in sorted(shards, key=lambda s: s.tp):
            ref = self._ref(shard)
            if not is_contiguous(ref):
                return None
            start = self._start(shard) + ref.storage_offset * info.dtype.itemsize
            shape, axis = tuple(ref.shape), 0 if rule == "gated" else rule
            box = list(full_box(info.shape))
            if isinstance(axis, int):
                box[axis] = (shard.tp * shape[axis], (shard.tp + 1) * shape[axis])
            found.append(Extent(self._files[shard.file], start, shape, tuple(box)))
        return found

    def close(self) -> None:
        self._archives.clear()
        for buf in self._maps:
            try:
                if isinstance(buf, mmap.mmap):
                    buf.close()
            except BufferError:  # a view is still referenced (say, by a traceback); collected later
                pass
        self._maps.clear()
