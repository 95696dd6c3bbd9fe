"""Megatron's legacy `--ckpt-format torch`: one `model_optim_rng.pt` per model-parallel rank.

Each file holds TP-local tensors under local layer (and expert) indices. This reader rebuilds the global
tensors the torch_dist format would hold, under the same keys (per-layer form), so everything downstream
is shared:

- layers: chunks are laid out in (virtual stage, pipeline rank) order, so a chunk's first global layer is
  the number of layers in the chunks before it — uneven first/last stages included;
- experts: global index = ep_rank · E/EP + local index, from `local_experts.{j}.` or TE's `weight{j}`;
- tensor parallel: see `legacy_keys.TP_RULES`; replicated tensors must agree across ranks.

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
from .base import Box, CheckpointReader, Extent, TensorInfo, full_box, is_model_key
from .legacy_keys import LAYER, global_key, models_of, tp_join
from .legacy_ranks import RANK_DIR, parallel_size, rank_layout
from .pickles.safe_pickle import TensorRef
from .pickles.torch_save import TorchArchive, is_contiguous, release_pages, view

__all__ = ["LegacyReader"]

FILE = "model_optim_rng.pt"


@dataclass(frozen=True)
class _Shard:
    file: int  # index into the reader's archives
    name: str  # key inside that file's model dict
    model: str  # "model" or "model<vp>"
    tp: int


class LegacyReader(CheckpointReader):
    """Reader of an iteration directory of `mp_rank_*/model_optim_rng.pt` files."""

    format = "torch"

    def __init__(self, path: Path, *, check_crc: bool = False) -> None:
        self.path = Path(path)
        self._check_crc = check_crc
        self._crc_checked: set[_Shard] = set()
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
        coords, tp_size, pp_size, ep_size = rank_layout(self.path, ranks, self._args)
        etp = parallel_size(self._args, "expert_tensor_parallel", len(ranks), ranks[0] / FILE, tp_size)
        if etp not in (1, tp_size):
            raise CheckpointError(f"{self.path}: expert_tensor_parallel_size={etp} with TP={tp_size} is not supported")
        self._gated = bool(getattr(self._args, "swiglu", False))
        self._experts_replicated = etp == 1 and tp_size > 1
        self.ranks = coords  # (tp, pp, ep) -> index of its rank directory, for `inspect`
        self._shards = self._catalog(states, coords, tp_size, pp_size, ep_size)
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

    def _catalog(
        self, states: list[dict], coords: dict, tp_size: int, pp_size: int, ep_size: int
    ) -> dict[str, list[_Shard]]:
        """Global key → its TP shards (ordered by tp rank), from every file's model dicts."""
        num_experts = int(getattr(self._args, "num_experts", None) or 0)
        per_ep = num_experts // ep_size if num_experts else 0
        chunk_sizes: dict[tuple[int, int], int] = {}  # (vp, pp) → number of layers
        for (_, pp, _), index in coords.items():
            for model, state in models_of(states[index], self._archives[index].source):
                vp = int(model[5:] or 0)
                layers = {int(m.group(2)) for name in state if (m := LAYER.match(name))}
                count = max(layers) + 1 if layers else 0
                if chunk_sizes.setdefault((vp, pp), count) != count:
                    raise CheckpointError(
                        f"{self._archives[index].source}: {count} layers in {model}, other ranks of stage {pp} have {chunk_sizes[(vp, pp)]}"
                    )
        offsets, total = {}, 0
        for vp, pp in sorted(chunk_sizes):
            offsets[(vp, pp)] = total
            total += chunk_sizes[(vp, pp)]
        num_layers = int(getattr(self._args, "num_layers", total) or total)
        if total != num_layers:
            raise CheckpointError(f"{self.path}: the rank files hold {total} layers but args.num_layers={num_layers}")
        shards: dict[str, list[_Shard]] = defaultdict(list)
        for (tp, pp, ep), index in sorted(coords.items()):
            for model, state in models_of(states[index], self._archives[index].source):
                vp = int(model[5:] or 0)
                for name, value in state.items():
                    if not isinstance(value, TensorRef) or not is_model_key(name):
                        continue
                    key, is_expert = global_key(name, offsets[(vp, pp)], ep, per_ep)
                    if ep and not is_expert:
                        continue  # replicated over expert-parallel ranks: ep 0 holds the copy we use
                    shards[key].append(_Shard(index, name, model, tp))
        for key, found in shards.items():
            if sorted(s.tp for s in found) != list(range(tp_size)):
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
        return [((0,) * len(shape), tuple(self._ref(s).shape)) for s in self._shards[key]]

    def _ref(self, shard: _Shard) -> TensorRef:
        return self._states[shard.file][shard.model][shard.name]

    def _start(self, shard: _Shard) -> int:
        """Where the shard's storage begins in its file; its CRC-32 checked on first use if asked."""
        archive, ref = self._archives[shard.file], self._ref(shard)
        start = archive.storage_start(ref)
        if self._check_crc and shard not in self._crc_checked:
            archive.check_crc(ref)
            self._crc_checked.add(shard)
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
        for shard, ref in zip(shards, refs):  # Megatron splits evenly: every TP shard has one shape
            if ref.shape != refs[0].shape or ref.storage.dtype != refs[0].storage.dtype:
                raise CheckpointError(
                    f"{self._archives[shard.file].source}: {shard.name} is {ref.storage.dtype}{list(ref.shape)} "
                    f"but {self._archives[shards[0].file].source} has {refs[0].storage.dtype}{list(refs[0].shape)}"
                )
        dtype: DType = refs[0].storage.dtype
        shape = list(refs[0].shape)
        rule = self._tp_rule(key, len(refs[0].shape))
        if rule is not None and len(refs) > 1:
            axis = 0 if rule == "gated" else rule
            shape[axis] = sum(r.shape[axis] for r in refs)
        return TensorInfo(key, tuple(shape), dtype)

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
        parts = [view(self._maps[s.file], start, self._ref(s)) for s, start in zip(shards, starts)]
        rule = self._tp_rule(key, parts[0].ndim)
        if rule is None or len(parts) == 1:
            for shard, other in zip(shards[1:], parts[1:]):
                if not np.array_equal(parts[0], other):
                    raise CheckpointError(
                        f"{self._archives[shard.file].source}: {shard.name} differs between TP ranks but should be replicated"
                    )
            whole = parts[0]
        elif rule == "gated":
            halves = [np.split(p, 2) for p in parts]
            whole = np.concatenate([h[0] for h in halves] + [h[1] for h in halves])
        else:
            whole = np.concatenate(parts, axis=rule)
        box = box or full_box(whole.shape)
        result = np.array(whole[tuple(slice(a, b) for a, b in box)])
        del whole, parts
        for shard, start in zip(shards, starts):
            storage = self._ref(shard).storage
            release_pages(self._maps[shard.file], start, storage.numel * storage.dtype.itemsize)
        return result

    def extents(self, key: str) -> list[Extent] | None:
        """The TP shards where they lie in the rank files; None for a replicated tensor (`read` checks that
        the ranks agree) or a shard that is not contiguous in its storage."""
        shards = self._shards.get(key)
        rule = self._tp_rule(key, len(self._tensors[key].shape)) if shards and len(shards) > 1 else "whole"
        if shards is None or rule is None:
            return None
        info = self._tensors[key]
        found = []
        for shard in sorted(shards, key=lambda s: s.tp):
            ref = self._ref(shard)
            if not is_contiguous(ref):
                return None
            start = self._start(shard) + ref.storage_offset * info.dtype.itemsize
            shape = tuple(ref.shape)
            if rule == "gated":  # [gate_t; up_t] halves land in the gate and up halves of the global rows
                half = (shape[0] // 2, *shape[1:])
                rows = [shard.tp * half[0], info.shape[0] // 2 + shard.tp * half[0]]
                found += [
                    Extent(self._files[shard.file], start + i * int(np.prod(half)) * info.dtype.itemsize, half, box)
                    for i, box in enumerate(((row, row + half[0]), *full_box(half[1:])) for row in rows)
                ]
            else:
                box = list(full_box(info.shape))
                if isinstance(rule, int):
                    box[rule] = (shard.tp * shape[rule], (shard.tp + 1) * shape[rule])
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
