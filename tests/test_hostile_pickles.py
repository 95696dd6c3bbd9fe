"""Hostile pickles, forged by structure: numpy objects that crash, nesting that overflows the C stack,
objects copied over and over, payloads. Each is put in `common.pt` and in `.metadata` of a copy of
examples/tiny-llama, and the CLI must refuse it: exit 2, one line naming the file, under a memory cap and a
time limit (tests/hostile.py), the payload never run.
"""

from __future__ import annotations

import collections
import pickle
import signal
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hostile import assert_refused, run_cli
from numpy._core import multiarray
from torch_forgery import Payload, Reduce, copy_example, with_pickle

from offline_bridge.errors import CheckpointError
from offline_bridge.readers.pickles.safe_pickle import safe_loads


def _op(code: bytes, *args: int) -> bytes:
    return code + b"".join(struct.pack("<I", a) for a in args)


def deep_tuple_key(depth: int) -> bytes:
    """{((((),),),...): None}: inserting the key hashes it, recursing once per level in C."""
    return b"\x80\x02}" + b")" + b"\x85" * depth + b"Ns."


def deep_frozenset(depth: int) -> bytes:
    """frozenset({frozenset({...})}) built by the FROZENSET opcode (protocol 4)."""
    return b"\x80\x04" + b"(" * depth + b"\x91" * depth + b"."


def stale_torch_size_key(depth: int) -> bytes:
    """A torch.Size nested ``depth`` deep whose nesting the opcodes hide: each level calls torch.Size on a
    list that is filled only after the call's argument tuple was built (and memoized), then the result is
    used as a dict key (hashing it recurses through every level)."""
    out = [b"\x80\x02ctorch\nSize\n", _op(b"r", 0), b")", _op(b"r", 1)]  # memo 0: torch.Size, memo 1: ()
    previous, memo = 1, 2
    for _ in range(depth):
        items, args, result = memo, memo + 1, memo + 2
        out += [b"]", _op(b"r", items), b"\x85", _op(b"r", args), b"0"]  # L = []; A = (L,)
        out += [_op(b"j", items), _op(b"j", previous), b"a0"]  # L.append(previous)
        out += [_op(b"j", 0), _op(b"j", args), b"R", _op(b"r", result), b"0"]  # torch.Size(*A)
        previous, memo = result, memo + 3
    return b"".join([*out, b"}", _op(b"j", previous), b"Ns."])


def copies(times: int) -> bytes:
    """A 1 MB string memoized once, then handed to io.BytesIO ``times`` times (each call copies it)."""
    out = [b"\x80\x02", b"c_io\nBytesIO\n", _op(b"r", 0), b"X", struct.pack("<I", 1 << 20), b"x" * (1 << 20)]
    out += [_op(b"r", 1), b"0(", *[_op(b"j", 0) + _op(b"j", 1) + b"\x85R" for _ in range(times)], b"l."]
    return b"".join(out)


def cycle() -> bytes:
    items: list = []
    items.append(items)
    return pickle.dumps({"args": items}, protocol=2)


def hostile_pickles(marker: Path) -> dict[str, bytes]:
    """Each class of hostile pickle, by name."""
    dtype = Reduce(
        np.dtype,
        ("V16", False, True),
        (3, "|", None, ("a", "b"), {"a": (np.dtype("<f8"), 0), "b": (np.dtype("O"), 1 << 20)}, 16, 1, 27),
    )
    array = (multiarray._reconstruct, (np.ndarray, (0,), b"b"))
    cases: dict[str, object] = {
        "object array": np.array([1, Payload(marker)], dtype=object),
        "object scalar": Reduce(multiarray.scalar, (np.dtype("O"), Payload(marker))),
        "object field": np.zeros(2, dtype=[("a", "<i4"), ("b", "O")]),
        "forged field offset": Reduce(*array, (1, (4,), dtype, False, [(1.0, "x")] * 4)),
        "void scalar of 1.5 GB": Reduce(multiarray.scalar, (np.dtype("V1500000000"), b"")),
        "array of 10^10 elements": Reduce(multiarray._reconstruct, (np.ndarray, (10**10,), b"b")),
        "shape beyond its bytes": Reduce(*array, (1, (10**9,), np.dtype("<f8"), False, b"")),
        "array from a list": Reduce(*array, (1, (2,), np.dtype("<f8"), False, [1.0, 2.0])),
        "ndarray called": Reduce(np.ndarray, ((10**10,), np.dtype("u1"))),
        "bytearray of 1 TB": Reduce(bytearray, (1 << 40,)),
        "os.system": Payload(marker),
        "os.system in args": {"args": collections.OrderedDict(hidden_size=Payload(marker))},
        "eval": Reduce(eval, (f"open({str(marker)!r}, 'w')",)),
    }
    found = {name: pickle.dumps(value, protocol=2) for name, value in cases.items()}
    return found | {
        "os.system by STACK_GLOBAL": pickle.dumps(Payload(marker), protocol=4),
        "os.system by INST": b"(S'touch " + str(marker).encode() + b"'\nios\nsystem\n.",
        "tuple key 10^6 deep": deep_tuple_key(10**6),
        "frozenset 10^5 deep": deep_frozenset(10**5),
        "torch.Size key nested 1000 deep out of sight": stale_torch_size_key(1000),
        "a 1 MB string copied 100 times": copies(100),
        "list containing itself": cycle(),
        "memo index 1e9": b"\x80\x02}r\x00\xca\x9a\x3b.",
        "2 GB of bytes claimed": b"\x80\x03B\xff\xff\xff\x7f.",
        "integer of 10^5 digits": b"\x80\x02L" + b"9" * 100_000 + b"L\n.",
    }


PICKLES = sorted(hostile_pickles(Path("/marker")))
IN_METADATA = ["forged field offset", "os.system", "tuple key 10^6 deep", "a 1 MB string copied 100 times"]


@pytest.fixture(scope="module")
def marker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("payload") / "pwned"


@pytest.fixture(scope="module")
def pickles(marker: Path) -> dict[str, bytes]:
    return hostile_pickles(marker)


def common_pt(iteration: Path, data: bytes) -> None:
    file = iteration / "common.pt"
    file.write_bytes(with_pickle(file.read_bytes(), data))


def metadata(iteration: Path, data: bytes) -> None:
    (iteration / ".metadata").write_bytes(data)


PLACES: dict[str, tuple[str, Callable[[Path, bytes], None]]] = {
    "common.pt": ("common.pt", common_pt),
    ".metadata": (".metadata", metadata),
}


@pytest.mark.parametrize(
    ("case", "place"), [(case, "common.pt") for case in PICKLES] + [(case, ".metadata") for case in IN_METADATA]
)
def test_cli_refuses(case: str, place: str, pickles: dict[str, bytes], marker: Path, tmp_path: Path) -> None:
    data = pickles[case]
    iteration = copy_example(tmp_path)
    name, forge = PLACES[place]
    forge(iteration, data)
    assert_refused(run_cli("inspect", iteration, cwd=tmp_path), name)
    assert not marker.exists(), "the payload ran"


def test_a_large_metadata_is_refused_by_its_size(tmp_path: Path) -> None:
    """A .metadata larger than the shard files it describes (and than 1 MiB) is not even read."""
    iteration = copy_example(tmp_path)
    (iteration / ".metadata").write_bytes(b"\x80\x02X" + struct.pack("<I", 3 << 20) + b"x" * (3 << 20) + b".")
    line = assert_refused(run_cli("convert", iteration, tmp_path / "out", cwd=tmp_path), ".metadata")
    assert "bytes" in line and not (tmp_path / "out").exists()


def test_unguarded_unpickling_crashes_or_runs_code(pickles: dict[str, bytes], tmp_path: Path) -> None:
    """What the guards prevent: plain pickle.loads of these (and a look at the result) kills the interpreter
    or runs the payload. (A forged field offset reads whatever memory lies there: it crashes only where that
    memory is unmapped, so it is shown refused below rather than crashing here.)"""

    def plain_load(data: bytes) -> int:
        (tmp_path / "p").write_bytes(data)
        code = f"import pickle; repr(pickle.loads(open({str(tmp_path / 'p')!r}, 'rb').read()))"
        return subprocess.run([sys.executable, "-c", code], capture_output=True, check=False).returncode

    assert plain_load(pickles["tuple key 10^6 deep"]) == -signal.SIGSEGV
    ran = tmp_path / "ran"
    assert plain_load(pickle.dumps(np.array([Payload(ran)], dtype=object))) == 0 and ran.exists()


def test_numpy_arrays_and_scalars_of_numbers_load_as_numpy_does() -> None:
    """Megatron's rng state: uint32 arrays and numpy scalars, any byte order, as numpy itself reads them."""
    state = {
        "rng": np.random.RandomState(7).get_state(),
        "big": np.arange(6, dtype=">i4").reshape(2, 3),
        "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
        "scalars": [np.float64(1.5), np.int8(-3), np.bool_(True), np.complex64(1j)],
        "dtype": np.dtype("<f4"),
    }
    data = pickle.dumps(state, protocol=2)
    ours, numpy_own = safe_loads(data, "common.pt"), pickle.loads(data)
    for a, b in zip(ours["rng"], numpy_own["rng"]):
        assert np.array_equal(a, b)
    for key in ("big", "fortran"):
        assert ours[key].dtype == numpy_own[key].dtype and np.array_equal(ours[key], numpy_own[key])
        assert ours[key].flags.f_contiguous == numpy_own[key].flags.f_contiguous
    assert ours["scalars"] == numpy_own["scalars"] and [type(s) for s in ours["scalars"]] == [
        type(s) for s in numpy_own["scalars"]
    ]
    assert ours["dtype"].dtype == numpy_own["dtype"]


def test_torch_save_of_numpy_state_reads_like_torch(tmp_path: Path) -> None:
    """common.pt with numpy values, written by torch.save: the values torch.load gives."""
    from offline_bridge.readers.pickles.torch_save import load_torch_file

    state = {"rng": np.random.RandomState(3).get_state(), "x": np.float32(2.5)}
    torch.save(state, tmp_path / "common.pt")
    ours, theirs = load_torch_file(str(tmp_path / "common.pt")), torch.load(tmp_path / "common.pt", weights_only=False)
    assert np.array_equal(ours["rng"][1], theirs["rng"][1]) and ours["x"] == theirs["x"]


@pytest.mark.parametrize("case", PICKLES)
def test_safe_loads_raises_a_checkpoint_error(case: str, pickles: dict[str, bytes], marker: Path) -> None:
    """Every case through the API: a CheckpointError naming the source, never anything else."""
    with pytest.raises(CheckpointError, match=r"^f\.pkl: "):
        safe_loads(pickles[case], "f.pkl")
    assert not marker.exists()
