"""Hardened reading: damaged or hostile checkpoint files give a correct result or a clean BridgeError.

Hypothesis mutates real files (bit flips, overwritten and oversized length fields, truncation, an
inserted `os.system` pickle) and runs what reads them: open, inspect, read every tensor; diff and verify
for safetensors headers. Every example runs under a time limit and a tracemalloc cap, and must not
create the file the injected payload would create.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
import tracemalloc
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import BASE_SPEC, LEGACY_SPECS, ROOT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from offline_bridge import convert
from offline_bridge.commands.diff import diff
from offline_bridge.commands.inspection import inspect_checkpoint
from offline_bridge.errors import BridgeError, CheckpointError
from offline_bridge.readers import open_reader
from offline_bridge.readers.pickles.safe_pickle import safe_loads
from offline_bridge.write.manifest import verify
from tools.megatron_fixtures import legacy_root

TINY = ROOT / "formats" / "vectors" / "tiny_ckpt" / "iter_0000007"
ZARR = ROOT / "tests" / "data" / "zarr" / "zarr_ckpt" / "iter_0000020"
SECONDS = 10  # per example; the unmutated inputs take milliseconds
MAX_BYTES = 256 * 2**20  # traced allocations per example (the inputs are a few hundred KB)
FUZZ = settings(
    max_examples=int(os.environ.get("OFFLINE_BRIDGE_FUZZ_EXAMPLES", "80")),  # more for a longer local hunt
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


class Hang(BaseException):
    """Raised by the timer; a BaseException so that no `except Exception` in the code under test hides it."""


@contextlib.contextmanager
def guarded() -> Iterator[None]:
    def expire(*_: object) -> None:
        raise Hang(f"no outcome within {SECONDS} s")

    previous = signal.signal(signal.SIGALRM, expire)
    tracemalloc.start()
    signal.setitimer(signal.ITIMER_REAL, SECONDS)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < MAX_BYTES, f"allocated {peak} bytes"


def payload(marker: Path) -> bytes:
    """A protocol-0 pickle that would run `touch marker` if unpickled without an allow-list."""
    return b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."


EDITS = st.lists(
    st.tuples(
        st.sampled_from(["flip", "byte", "flip_tail", "max_u32", "max_u64", "cut", "payload"]),
        st.integers(0, 2**31),
        st.integers(0, 255),
    ),
    min_size=1,
    max_size=4,
)


def mutate(data: bytes, edits: list, marker: Path, region: int | None = None) -> bytes:
    """Apply ``edits``; positions fall inside the first ``region`` bytes when given."""
    out = bytearray(data)
    for kind, position, value in edits:
        if not out:
            break
        span = min(region or len(out), len(out))
        at = position % span
        if kind == "flip":
            out[at] ^= 1 << (value % 8)
        elif kind == "byte":
            out[at] = value
        elif kind == "flip_tail":  # zip directories and records live at the end
            out[-1 - position % min(len(out), 128)] ^= 1 << (value % 8)
        elif kind == "max_u32":
            out[at : at + 4] = b"\xff\xff\xff\x7f"
        elif kind == "max_u64":
            out[at : at + 8] = (2**62 + value).to_bytes(8, "little")
        elif kind == "cut":
            del out[at:]
        else:
            out[at:at] = payload(marker)
    return bytes(out)


def outcome(action: Callable[[], object], marker: Path) -> None:
    """The action returns or raises a BridgeError; nothing else, and the payload never ran."""
    with guarded():
        try:
            action()
        except BridgeError:
            pass
    assert not marker.exists(), "code in a pickle was executed"


def read_everything(directory: Path) -> None:
    inspect_checkpoint(directory)
    with open_reader(directory) as reader:
        reader.args  # noqa: B018 - unpickles common.pt
        for key, info in reader.tensors.items():
            array = reader.read(key)
            assert array.shape == info.shape and array.dtype == info.dtype.np, key


@contextlib.contextmanager
def damaged_copy(source: Path, name: str, data: bytes) -> Iterator[tuple[Path, Path]]:
    """A copy of ``source`` (files hard-linked) with ``name`` replaced by ``data``; and a marker path."""
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / source.name
        shutil.copytree(source, copy, copy_function=lambda s, d: Path(d).hardlink_to(s))
        (copy / name).unlink()
        (copy / name).write_bytes(data)
        yield copy, Path(tmp) / "pwned"


@pytest.mark.slow  # 80 mutated checkpoints: the fuzzers run with the slow tier
@FUZZ
@given(name=st.sampled_from([".metadata", "common.pt", "__0_0.distcp", "__1_1.distcp"]), edits=EDITS)
def test_torch_dist_files(name: str, edits: list) -> None:
    original = (TINY / name).read_bytes()
    with damaged_copy(TINY, name, b"") as (copy, marker):
        (copy / name).write_bytes(mutate(original, edits, marker))
        outcome(lambda: read_everything(copy), marker)


@pytest.fixture(scope="module")
def legacy(checkpoints: dict) -> Path:
    return legacy_root(checkpoints[LEGACY_SPECS[0]]) / "iter_0000010"


@FUZZ
@given(rank=st.sampled_from(["mp_rank_00_000", "mp_rank_01_001"]), edits=EDITS)
def test_legacy_rank_files(legacy: Path, rank: str, edits: list) -> None:
    name = f"{rank}/model_optim_rng.pt"
    original = (legacy / name).read_bytes()
    with damaged_copy(legacy, name, b"") as (copy, marker):
        (copy / name).write_bytes(mutate(original, edits, marker))
        outcome(lambda: read_everything(copy), marker)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**66), 2**66) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)
FIELDS = [
    "shape",
    "chunks",
    "dtype",
    "order",
    "compressor",
    "filters",
    "fill_value",
    "zarr_format",
    "dimension_separator",
]
ARRAYS = sorted(p.parent.name for p in ZARR.glob("*/.zarray"))


@pytest.mark.slow
@FUZZ
@given(
    array=st.sampled_from(ARRAYS),
    changes=st.lists(st.tuples(st.sampled_from(FIELDS), JSON | st.lists(st.integers(0, 2**40), max_size=4))),
    edits=st.none() | EDITS,
)
def test_zarr_arrays(array: str, changes: list, edits: list | None) -> None:
    name = f"{array}/.zarray"
    meta = json.loads((ZARR / name).read_text())
    meta.update(changes)
    text = json.dumps(meta).encode()
    with damaged_copy(ZARR, name, b"") as (copy, marker):
        (copy / name).write_bytes(text if edits is None else mutate(text, edits, marker))
        outcome(lambda: read_everything(copy), marker)


@pytest.fixture(scope="module")
def converted(checkpoints: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert(checkpoints[BASE_SPEC], tmp_path_factory.mktemp("fuzz") / "hf", progress=False)


@FUZZ
@given(edits=EDITS)
def test_safetensors_headers(converted: Path, edits: list) -> None:
    file = converted / "model.safetensors"
    data = file.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    with damaged_copy(converted, file.name, mutate(data, edits, Path("/nonexistent"), region=header)) as (copy, marker):
        outcome(lambda: diff(converted, copy), marker)
        outcome(lambda: verify(copy), marker)


def test_unmutated_inputs_read_correctly(legacy: Path, converted: Path) -> None:
    """The baseline the mutations start from: every reader gives the documented values."""
    for directory in (TINY, ZARR, legacy):
        read_everything(directory)
    assert verify(converted) == [] and all(r.status == "equal" for r in diff(converted, converted))


def test_compressed_members_are_refused(tmp_path: Path) -> None:
    """A zip bomb cannot go off: torch.save never compresses, so a compressed member is refused unread."""
    copy = Path(shutil.copytree(TINY, tmp_path / TINY.name))
    with zipfile.ZipFile(TINY / "common.pt") as stored, zipfile.ZipFile(copy / "common.pt", "w") as packed:
        for info in stored.infolist():
            packed.writestr(info.filename, stored.read(info), compress_type=zipfile.ZIP_DEFLATED)
    with (
        pytest.raises(CheckpointError, match=r"common\.pt: member .*data\.pkl is compressed"),
        open_reader(copy) as reader,
    ):
        reader.args  # noqa: B018 - unpickles common.pt


@pytest.mark.parametrize(
    "pickle_bytes",
    [
        b"\x80\x02}r\x00\x00\x00\x08.",  # LONG_BINPUT 1.3e8: the C unpickler would grow its memo to 1 GB
        b"\x80\x03B\xff\xff\xff\x7f.",  # BINBYTES of 2 GB in a 9-byte pickle: it would allocate them first
    ],
    ids=["memo", "length"],
)
def test_pickles_cannot_claim_memory(pickle_bytes: bytes) -> None:
    with guarded(), pytest.raises(CheckpointError, match="cannot unpickle"):
        safe_loads(pickle_bytes, "hostile.pkl")
