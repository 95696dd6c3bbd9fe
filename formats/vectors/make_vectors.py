"""Regenerate the test vectors in this directory (see README.md here for what each one is).

Deterministic: the same torch, safetensors and Python versions give the same bytes. The hashes in
README.md were made with Python 3.11.7, torch 2.13.0+cpu, safetensors 0.8.0, huggingface_hub 2.4.0.

    python formats/vectors/make_vectors.py            # rewrite the vectors in place
    python formats/vectors/make_vectors.py --check    # rebuild in a temp dir, compare, self-test
    python formats/vectors/make_vectors.py --sha256   # print the hash table used in README.md

The malicious vectors are built from raw pickle opcodes or by pickling objects whose __reduce__
names a dangerous callable. Pickling never calls it, and this script never unpickles them: it only
lists their globals with pickletools.
"""

from __future__ import annotations

import argparse
import contextlib
import filecmp
import hashlib
import io
import json
import pathlib
import pickle
import pickletools
import struct
import sys
import tempfile
import types
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import save_file
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

HERE = pathlib.Path(__file__).resolve().parent
PICKLE_PROTOCOL = 4  # what `pickle.dump(metadata, f)` in DCP uses on Python 3.8-3.13
HARMLESS = "echo offline-bridge-test-vector-must-not-run"


# --------------------------------------------------------------------------- chunk records


def torch_save_bytes(obj: Any) -> bytes:
    """Bytes of `torch.save(obj)` into a stream, as DCP's `_write_item` does (archive root `archive/`)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def chunk_bf16() -> torch.Tensor:
    # shape (1, 2, 3): a chunk of a stacked `decoder.layers.*` tensor has a leading 1
    return ((torch.arange(6, dtype=torch.float32) - 2) * 0.5).reshape(1, 2, 3).to(torch.bfloat16)


def chunk_fp32() -> torch.Tensor:
    return torch.tensor([[1.0, -2.0, 0.25], [3.5, 0.0, -0.125]], dtype=torch.float32)


# --------------------------------------------------------------------------- safetensors


def tiny_safetensors_tensors() -> dict[str, torch.Tensor]:
    return {
        "model.embed_tokens.weight": torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], dtype=torch.bfloat16),
        "model.norm.weight": torch.tensor([1.0, -2.5], dtype=torch.float32),
        "a.half": torch.tensor([0.5, -1.0, 2.0], dtype=torch.float16),
    }


def sharded_tensors() -> dict[str, torch.Tensor]:
    """Four tensors whose greedy 1KB sharding shows numeric key order and the oversize rule."""

    def ramp(n: int, dtype: torch.dtype) -> torch.Tensor:
        return (torch.arange(n, dtype=torch.float32) % 16).to(dtype)

    return {
        "model.layers.2.mlp.up_proj.weight": ramp(300, torch.bfloat16).reshape(15, 20),  # 600 B
        "model.layers.5.mlp.up_proj.weight": ramp(600, torch.bfloat16).reshape(30, 20),  # 1200 B > 1KB
        "model.layers.10.mlp.up_proj.weight": ramp(300, torch.bfloat16).reshape(15, 20),  # 600 B
        "model.norm.weight": ramp(75, torch.float32),  # 300 B
    }


def dot_natural_key(name: str) -> list[tuple]:
    """Same ordering as transformers 5.23 `core_model_loading.dot_natural_key` (written independently)."""
    parts: list[tuple] = []
    for part in name.split("."):
        if part.isdigit():
            parts.append((0, int(part)))
        else:
            text = part.rstrip("0123456789")
            digits = part[len(text) :]
            parts.append((1, text, int(digits)) if digits else (1, text))
    return parts


def write_sharded(out: pathlib.Path) -> None:
    from huggingface_hub import split_torch_state_dict_into_shards

    tensors = sharded_tensors()
    ordered = {k: tensors[k] for k in sorted(tensors, key=dot_natural_key)}
    split = split_torch_state_dict_into_shards(
        ordered, filename_pattern="model{suffix}.safetensors", max_shard_size="1KB"
    )
    out.mkdir(parents=True, exist_ok=True)
    for filename, names in split.filename_to_tensors.items():
        save_file({n: ordered[n] for n in names}, str(out / filename), metadata={"format": "pt"})
    index = {
        "metadata": {
            "total_parameters": sum(t.numel() for t in ordered.values()),
            **split.metadata,
        },
        "weight_map": split.tensor_to_filename,
    }
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------- malicious pickles


def _short_unicode(s: str) -> bytes:
    b = s.encode()
    assert len(b) < 256
    return b"\x8c" + bytes([len(b)]) + b


def malicious_global_os_system() -> bytes:
    # PROTO 2, GLOBAL 'os system', (HARMLESS,), REDUCE, STOP
    arg = HARMLESS.encode()
    return b"\x80\x02" + b"cos\nsystem\n" + b"X" + struct.pack("<I", len(arg)) + arg + b"\x85" + b"R" + b"."


def malicious_stack_global_eval() -> bytes:
    # PROTO 4, STACK_GLOBAL 'builtins' 'eval', (expr,), REDUCE, STOP (no FRAME: optional)
    expr = "print('offline-bridge-test-vector-must-not-run')"
    return (
        b"\x80\x04"
        + _short_unicode("builtins")
        + _short_unicode("eval")
        + b"\x93"
        + _short_unicode(expr)
        + b"\x85"
        + b"R"
        + b"."
    )


class _Payload:
    """Pickles as `subprocess.check_output([...])`; pickling does not run it."""

    def __reduce__(self):
        import subprocess

        return (subprocess.check_output, (["echo", "offline-bridge-test-vector-must-not-run"],))


def malicious_nested_metadata() -> bytes:
    """A well-formed DCP Metadata whose `planner_data` hides a subprocess call."""
    md = Metadata(state_dict_metadata={}, planner_data={"x": _Payload()}, storage_data={}, version="1.0.0")
    return pickle.dumps(md, protocol=PICKLE_PROTOCOL)


def _zip_stored(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as z:
        for name, data in members:
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            z.writestr(info, data)
    return buf.getvalue()


def malicious_chunk() -> bytes:
    """A torch.save-shaped zip whose data.pkl calls os.system instead of _rebuild_tensor_v2."""
    return _zip_stored(
        [
            ("archive/data.pkl", malicious_global_os_system()),
            ("archive/.format_version", b"1"),
            ("archive/byteorder", b"little"),
            ("archive/data/0", b"\x00" * 8),
            ("archive/version", b"3\n"),
        ]
    )


def pickle_globals(data: bytes) -> list[str]:
    """`module.name` of every GLOBAL / STACK_GLOBAL, without executing anything."""
    found: list[str] = []
    strings: list[str] = []  # strings pushed so far (directly or from the memo)
    memo: dict[int, str | None] = {}
    last: str | None = None  # the object just pushed, if it is a string
    for op, arg, _ in pickletools.genops(data):
        name = op.name
        if name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
            strings.append(arg)
            last = arg
            continue
        if name == "MEMOIZE":
            memo[len(memo)] = last
            continue
        if name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = last
            continue
        if name in ("GET", "BINGET", "LONG_BINGET"):
            last = memo.get(arg)
            if last is not None:
                strings.append(last)
            continue
        if name == "GLOBAL":
            found.append(arg.replace(" ", "."))
        elif name == "STACK_GLOBAL":
            found.append(f"{strings[-2]}.{strings[-1]}")
        last = None
    return found


# --------------------------------------------------------------------------- tiny torch_dist checkpoint

BF16, FP32 = torch.bfloat16, torch.float32


@dataclass(frozen=True)
class _Chunk:
    key: str
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str


def tiny_globals() -> dict[str, torch.Tensor]:
    """Global tensors of the tiny checkpoint (what a reader must reassemble)."""
    return {
        "embedding.word_embeddings.weight": torch.arange(32, dtype=FP32).reshape(8, 4).to(BF16),
        "decoder.layers.mlp.linear_fc1.weight": torch.arange(96, dtype=FP32).reshape(2, 12, 4).to(BF16),
        "decoder.layers.self_attention.linear_qkv.layer_norm_weight": 1 + torch.arange(8, dtype=FP32).reshape(2, 4) / 8,
        "decoder.final_layernorm.weight": torch.tensor([0.5, 1.0, 1.5, 2.0], dtype=FP32),
        "optimizer.state.exp_avg.decoder.final_layernorm.weight": torch.full((4,), 7.0, dtype=FP32),
    }


TINY_BYTES_KEY = "decoder.layers.self_attention.linear_qkv._extra_state/shard_0_2"


def tiny_chunks() -> list[_Chunk]:
    """TP=2, thread_count=2: files __<rank>_<k>.distcp. fc1 is gated: per rank r, gate rows [3r, 3r+3)
    and up rows [6+3r, 6+3r+3) of each layer; replicated tensors are stored by rank 0 only."""
    emb, fc1 = "embedding.word_embeddings.weight", "decoder.layers.mlp.linear_fc1.weight"
    ln = "decoder.layers.self_attention.linear_qkv.layer_norm_weight"
    out = [
        _Chunk(emb, (0, 0), (4, 4), "__0_0.distcp"),
        _Chunk(emb, (4, 0), (4, 4), "__1_0.distcp"),
    ]
    for rank in (0, 1):
        for layer in (0, 1):
            f = f"__{rank}_{layer}.distcp"
            out.append(_Chunk(fc1, (layer, 3 * rank, 0), (1, 3, 4), f))
            out.append(_Chunk(fc1, (layer, 6 + 3 * rank, 0), (1, 3, 4), f))
    out += [
        _Chunk(ln, (0, 0), (1, 4), "__0_0.distcp"),
        _Chunk(ln, (1, 0), (1, 4), "__0_1.distcp"),
        _Chunk("decoder.final_layernorm.weight", (0,), (4,), "__0_1.distcp"),
        _Chunk("optimizer.state.exp_avg.decoder.final_layernorm.weight", (0,), (4,), "__0_1.distcp"),
    ]
    return out


def tiny_args() -> argparse.Namespace:
    """A Megatron-LM 0.16-style args Namespace consistent with the tensors above."""
    return argparse.Namespace(
        num_layers=2,
        hidden_size=4,
        ffn_hidden_size=6,
        num_attention_heads=2,
        group_query_attention=True,
        num_query_groups=1,
        kv_channels=2,
        swiglu=True,
        normalization="RMSNorm",
        layernorm_epsilon=1e-5,
        position_embedding_type="rope",
        rotary_base=10000,
        rotary_percent=1.0,
        use_rope_scaling=False,
        max_position_embeddings=16,
        seq_length=16,
        untie_embeddings_and_output_weights=False,
        add_bias_linear=False,
        add_qkv_bias=False,
        qk_layernorm=False,
        make_vocab_size_divisible_by=4,
        padded_vocab_size=8,
        tensor_model_parallel_size=2,
        pipeline_model_parallel_size=1,
        bf16=True,
        params_dtype=torch.bfloat16,
        ckpt_format="torch_dist",
    )


def _slice(t: torch.Tensor, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> torch.Tensor:
    return t[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))]


def build_tiny_metadata(checkpoint_id: Any) -> tuple[Metadata, dict[str, bytes]]:
    """Returns the DCP Metadata and the bytes of each .distcp file (same writing order as DCP:
    BYTE_IO items first, then tensors)."""
    glob = tiny_globals()
    files: dict[str, bytearray] = {}
    storage: dict[MetadataIndex, _StorageInfo] = {}
    items: dict[int, list[WriteItem]] = {0: [], 1: []}

    def put(fname: str, fqn: str, offset: torch.Size | None, blob: bytes) -> None:
        buf = files.setdefault(fname, bytearray())
        storage[MetadataIndex(fqn, offset)] = _StorageInfo(fname, len(buf), len(blob))
        buf += blob

    put("__0_0.distcp", TINY_BYTES_KEY, None, torch_save_bytes([None]))
    items[0].append(WriteItem(index=MetadataIndex(TINY_BYTES_KEY), type=WriteItemType.BYTE_IO))

    sdm: dict[str, Any] = {}
    for c in tiny_chunks():
        t = glob[c.key]
        # Megatron: .contiguous(), then .clone() when the tensor is a view of a larger storage
        data = _slice(t, c.offsets, c.sizes).contiguous().clone()
        put(c.file, c.key, torch.Size(c.offsets), torch_save_bytes(data))
        chunk = ChunkStorageMetadata(offsets=torch.Size(c.offsets), sizes=torch.Size(c.sizes))
        props = TensorProperties(dtype=t.dtype)
        md = sdm.setdefault(c.key, TensorStorageMetadata(properties=props, size=torch.Size(t.shape), chunks=[]))
        md.chunks.append(chunk)
        rank = int(c.file[2])
        items[rank].append(
            WriteItem(
                index=MetadataIndex(c.key, c.offsets),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(chunk=chunk, properties=props, size=torch.Size(t.shape)),
            )
        )
    sdm[TINY_BYTES_KEY] = BytesStorageMetadata()
    md = Metadata(
        state_dict_metadata=sdm,
        planner_data=None,
        storage_data=storage,
        storage_meta=StorageMeta(checkpoint_id=checkpoint_id, save_id="00000000-0000-0000-0000-000000000000"),
        version="1.0.0",
    )
    md.all_local_plans = [SavePlan(items=items[r], planner_data={}) for r in (0, 1)]  # Megatron attaches this
    return md, {k: bytes(v) for k, v in files.items()}


def write_tiny_ckpt(root: pathlib.Path) -> None:
    it = root / "iter_0000007"
    it.mkdir(parents=True, exist_ok=True)
    (root / "latest_checkpointed_iteration.txt").write_text("7")
    # exactly what megatron-core <= 0.18 writes: json.dump(asdict(CheckpointingConfig(...)), f)
    (it / "metadata.json").write_text(
        json.dumps(
            {
                "sharded_backend": "torch_dist",
                "sharded_backend_version": 1,
                "common_backend": "torch",
                "common_backend_version": 1,
            }
        )
    )
    torch.save({"args": tiny_args(), "checkpoint_version": 3.0, "iteration": 7}, str(it / "common.pt"))
    md, files = build_tiny_metadata(checkpoint_id="/ckpt/iter_0000007")
    for name, blob in files.items():
        (it / name).write_bytes(blob)
    (it / ".metadata").write_bytes(pickle.dumps(md, protocol=PICKLE_PROTOCOL))


@contextlib.contextmanager
def _fake_megatron_015() -> Iterator[types.ModuleType]:
    """Temporarily register module objects named like megatron-core 0.15's strategies.torch so that
    pickle records those class paths. Real megatron is never imported."""
    names = [
        "megatron",
        "megatron.core",
        "megatron.core.dist_checkpointing",
        "megatron.core.dist_checkpointing.strategies",
        "megatron.core.dist_checkpointing.strategies.torch",
    ]
    saved = {n: sys.modules.get(n) for n in names}
    mods = {n: types.ModuleType(n) for n in names}
    leaf = mods[names[-1]]

    from dataclasses import dataclass as _dc

    @_dc
    class MCoreMetadata(Metadata):
        mcore_data: Any = None

    @_dc(frozen=True)
    class MCoreSavePlan(SavePlan):
        mcore_data: Any = None

    for cls in (MCoreMetadata, MCoreSavePlan):
        cls.__module__ = leaf.__name__
        cls.__qualname__ = cls.__name__
        setattr(leaf, cls.__name__, cls)
    try:
        sys.modules.update(mods)
        yield leaf
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


def mcore015_metadata() -> bytes:
    """Synthetic: the tiny checkpoint's metadata re-wrapped in core-0.15 class names."""
    md, _ = build_tiny_metadata(checkpoint_id="/ckpt/iter_0000007")
    with _fake_megatron_015() as leaf:
        fields = {
            k: getattr(md, k)
            for k in ("state_dict_metadata", "planner_data", "storage_data", "storage_meta", "version")
        }
        new = leaf.MCoreMetadata(
            mcore_data={k: {} for k, v in md.state_dict_metadata.items() if not isinstance(v, BytesStorageMetadata)},
            **fields,
        )
        new.all_local_plans = [
            leaf.MCoreSavePlan(items=p.items, planner_data={}, mcore_data={}) for p in md.all_local_plans
        ]
        return pickle.dumps(new, protocol=PICKLE_PROTOCOL)


def posixpath_metadata() -> bytes:
    """The tiny metadata with `storage_meta.checkpoint_id` a PosixPath, as torch's own
    FileSystemWriter (and megatron-core <= 0.12) leaves it."""
    md, _ = build_tiny_metadata(checkpoint_id=pathlib.PosixPath("/ckpt/iter_0000007"))
    return pickle.dumps(md, protocol=PICKLE_PROTOCOL)


def posixpath_py313() -> bytes:
    """Verbatim output of Python 3.13.0 `pickle.dumps(pathlib.PosixPath("/ckpt/iter_0000007"), protocol=4)`:
    Python >= 3.13 names the class `pathlib._local.PosixPath` (3.11/3.12: `pathlib.PosixPath`)."""
    return bytes.fromhex(
        "80049539000000000000008c0e706174686c69622e5f6c6f63616c948c09506f73697850617468"
        "9493948c122f636b70742f697465725f3030303030303794859452942e"
    )


# --------------------------------------------------------------------------- driver


def build(out: pathlib.Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "chunk_bf16.pt").write_bytes(torch_save_bytes(chunk_bf16()))
    (out / "chunk_fp32.pt").write_bytes(torch_save_bytes(chunk_fp32()))
    save_file(tiny_safetensors_tensors(), str(out / "tiny.safetensors"), metadata={"format": "pt"})
    write_sharded(out / "sharded")
    (out / "malicious_metadata.pkl").write_bytes(malicious_global_os_system())
    (out / "malicious_stack_global.pkl").write_bytes(malicious_stack_global_eval())
    (out / "malicious_nested_metadata.pkl").write_bytes(malicious_nested_metadata())
    (out / "malicious_chunk.pt").write_bytes(malicious_chunk())
    write_tiny_ckpt(out / "tiny_ckpt")
    (out / "mcore015_metadata.pkl").write_bytes(mcore015_metadata())
    (out / "metadata_posixpath.pkl").write_bytes(posixpath_metadata())
    (out / "posixpath_py313.pkl").write_bytes(posixpath_py313())


def vector_files(root: pathlib.Path) -> list[pathlib.Path]:
    skip = {"make_vectors.py", "README.md"}
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name not in skip and "__pycache__" not in p.parts)


def self_test(root: pathlib.Path) -> list[str]:
    problems = []
    # 1. the tiny checkpoint is a valid DCP checkpoint (our own bytes: safe to load with torch)
    import torch.distributed.checkpoint as dcp

    it = root / "tiny_ckpt" / "iter_0000007"
    glob = tiny_globals()
    state: dict[str, Any] = {k: torch.empty_like(v) for k, v in glob.items()}
    state[TINY_BYTES_KEY] = io.BytesIO()
    dcp.load(state, checkpoint_id=str(it), no_dist=True)
    for k, v in glob.items():
        if not torch.equal(state[k], v):
            problems.append(f"tiny_ckpt: {k} differs after dcp.load")
    # 2. every chunk record equals torch.save of the chunk; chunks tile each tensor exactly once
    md = pickle.loads((it / ".metadata").read_bytes())
    for key, tmd in md.state_dict_metadata.items():
        if isinstance(tmd, BytesStorageMetadata):
            continue
        cover = torch.zeros(tuple(tmd.size), dtype=torch.int32)
        for ch in tmd.chunks:
            cover[tuple(slice(o, o + s) for o, s in zip(ch.offsets, ch.sizes))] += 1
        if not bool((cover == 1).all()):
            problems.append(f"tiny_ckpt: chunks of {key} do not tile it exactly once")
    # 3. malicious vectors name what they should (inspected, never loaded)
    expect = {
        "malicious_metadata.pkl": "os.system",
        "malicious_stack_global.pkl": "builtins.eval",
        "malicious_nested_metadata.pkl": "subprocess.check_output",
    }
    for name, bad in expect.items():
        if bad not in pickle_globals((root / name).read_bytes()):
            problems.append(f"{name}: {bad} not found")
    if pickle_globals((root / "posixpath_py313.pkl").read_bytes()) != ["pathlib._local.PosixPath"]:
        problems.append("posixpath_py313.pkl: unexpected globals")
    with zipfile.ZipFile(root / "malicious_chunk.pt") as z:
        if "os.system" not in pickle_globals(z.read("archive/data.pkl")):
            problems.append("malicious_chunk.pt: os.system not found")
    # 4. size budget
    for p in vector_files(root):
        if p.stat().st_size >= 10_000:
            problems.append(f"{p.relative_to(root)} is {p.stat().st_size} bytes (limit 10 KB)")
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="rebuild in a temp dir and compare with the files here")
    ap.add_argument("--sha256", action="store_true", help="print sha256 of every vector")
    ns = ap.parse_args()
    if ns.sha256:
        for p in vector_files(HERE):
            print(
                f"| `{p.relative_to(HERE)}` | {p.stat().st_size} | `{hashlib.sha256(p.read_bytes()).hexdigest()[:16]}` |"
            )
        return 0
    if not ns.check:
        build(HERE)
        problems = self_test(HERE)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            fresh = pathlib.Path(tmp)
            build(fresh)
            problems = self_test(fresh)
            mine = {p.relative_to(HERE) for p in vector_files(HERE)}
            theirs = {p.relative_to(fresh) for p in vector_files(fresh)}
            for rel in sorted(mine ^ theirs):
                problems.append(f"{rel}: present on one side only")
            for rel in sorted(mine & theirs):
                if not filecmp.cmp(HERE / rel, fresh / rel, shallow=False):
                    problems.append(f"{rel}: differs from a fresh build")
    for p in problems:
        print("PROBLEM:", p)
    print("ok" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
