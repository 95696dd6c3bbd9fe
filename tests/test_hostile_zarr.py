"""Hostile zarr checkpoints, forged in structure: codec ids that unpickle or build object arrays, dtypes,
shapes and chunk grids, real compression bombs, special and giant files. Each runs `offline-bridge convert`
in a subprocess under a memory cap and a time limit; each must end in one line naming the file, exit 2,
bounded memory, and no marker file from any payload."""

from __future__ import annotations

import json
import pickle
import shutil
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hostile import assert_refused, make_special, run_cli, zstd_rle_frame

from offline_bridge.readers.zarr_codecs import decode

DATA = Path(__file__).resolve().parent / "data" / "zarr" / "zarr_ckpt"
ITER = "iter_0000020"
KEY = "decoder.final_layernorm.weight"  # shape [64], one bf16 chunk file "0" of 128 bytes
BOMB_CHUNK = 4 << 20  # elements of a forged chunk: 8 MiB of bf16, under the 16 MiB any chunk may claim
MEMORY = 512 << 20  # peak resident memory allowed to a refused conversion (it needs about 40 MiB)


class _Payload:
    """Unpickling this creates the marker file: proof that a codec ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return open, (str(self.marker), "w")


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    return Path(shutil.copytree(DATA, tmp_path / "ckpt"))


def _array(ckpt: Path) -> Path:
    return ckpt / ITER / KEY


def _forge(ckpt: Path, **fields: Any) -> Path:
    """Rewrite the array's `.zarray` with ``fields`` changed; its path."""
    zarray = _array(ckpt) / ".zarray"
    zarray.write_text(json.dumps({**json.loads(zarray.read_text()), **fields}))
    return zarray


def _refused(ckpt: Path, tmp_path: Path, *needles: str) -> str:
    outcome = run_cli("convert", ckpt, tmp_path / "out", "--quiet", cwd=tmp_path)
    assert outcome.maxrss < MEMORY, f"peak memory {outcome.maxrss >> 20} MiB"
    line = assert_refused(outcome, *needles)
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "marker").exists(), "a payload ran"
    return line


# --------------------------------------------------------------------------- codecs


_PICKLING = ["pickle", "json2", "msgpack2", "vlen-utf8", "vlen-array", "categorize"]
_OTHER = ["delta", "lz4", "bz2", "?"]


@pytest.mark.parametrize("codec_id", _PICKLING + _OTHER)
def test_compressor_outside_the_allow_list(codec_id: str, ckpt: Path, tmp_path: Path) -> None:
    """The chunk is a pickle that would create the marker: refused by id, before a chunk byte is read."""
    _forge(ckpt, compressor={"id": codec_id})
    (_array(ckpt) / "0").write_bytes(pickle.dumps(_Payload(tmp_path / "marker")))
    _refused(ckpt, tmp_path, f"{KEY}/.zarray", "compressor", repr(codec_id))


@pytest.mark.parametrize("filters", [[{"id": "pickle"}], [{"id": "delta", "dtype": "<u2"}], {"id": "pickle"}])
def test_any_filter(filters: Any, ckpt: Path, tmp_path: Path) -> None:
    _forge(ckpt, filters=filters)
    (_array(ckpt) / "0").write_bytes(pickle.dumps(_Payload(tmp_path / "marker")))
    _refused(ckpt, tmp_path, f"{KEY}/.zarray", "filters")


@pytest.mark.parametrize("compressor", ["zstd", {"level": 1}, {"id": ["zstd"]}])
def test_malformed_compressor(compressor: Any, ckpt: Path, tmp_path: Path) -> None:
    _forge(ckpt, compressor=compressor)
    _refused(ckpt, tmp_path, f"{KEY}/.zarray", "compressor")


# --------------------------------------------------------------------------- dtypes, shapes, grids


@pytest.mark.parametrize(
    "dtype",
    ["|O", "<U8", "<M8[s]", "|V2", "i4,O", "[('a', '<f4')]", "<f4\n", "<f16", None],
)
def test_dtype_outside_plain_numbers(dtype: Any, ckpt: Path, tmp_path: Path) -> None:
    _forge(ckpt, dtype=dtype)
    _refused(ckpt, tmp_path, f"{KEY}/.zarray", "unsupported dtype")


@pytest.mark.parametrize(
    ("shape", "chunks", "needle"),
    [
        ([2**63], [64], "larger than numpy can index"),
        ([0, 2**63], [1, 1], "larger than numpy can index"),
        ([10**4000], [64], "larger than numpy can index"),
        ([1] * 65, [1] * 65, "65 dimensions"),
        ([64.0], [64], "lists of equal length"),
        ([True], [1], "lists of equal length"),
        ([64], [0], "lists of equal length"),
        ([2**40], [64], "chunk files"),  # a grid of 2**34 cells: refused before it is enumerated
        ([64], [2**40], "expected"),  # one raw chunk claiming 2 TiB
    ],
)
def test_forged_shape_or_grid(shape: list, chunks: list, needle: str, ckpt: Path, tmp_path: Path) -> None:
    _forge(ckpt, shape=shape, chunks=chunks)
    _refused(ckpt, tmp_path, KEY, needle)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (b"[" * 50_000, "nests too deeply"),
        (b'{"zarr_format": 2, "shape": [' + b"9" * 5000 + b"]}", "not JSON"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b"[]", "not a JSON object"),
    ],
    ids=["deep", "5000-digits", "not-utf8", "list"],
)
def test_unparsable_zarray(text: bytes, needle: str, ckpt: Path, tmp_path: Path) -> None:
    (_array(ckpt) / ".zarray").write_bytes(text)
    _refused(ckpt, tmp_path, f"{KEY}/.zarray", needle)


# --------------------------------------------------------------------------- compression bombs


def _bomb(ckpt: Path, compressor: str, chunk: bytes) -> None:
    """The array claims one 8 MiB bf16 chunk (edge chunk of a 64-element array), encoded as ``chunk``."""
    _forge(ckpt, chunks=[BOMB_CHUNK], compressor={"id": compressor})
    (_array(ckpt) / "0").write_bytes(chunk)


@pytest.mark.parametrize(
    ("content_size", "needle"),
    [(2 << 30, "content size 2147483648"), (None, "no content size"), (2 * BOMB_CHUNK, "Destination buffer")],
    ids=["states-2GiB", "states-nothing", "states-the-chunk-size"],
)
def test_zstd_bomb(content_size: int | None, needle: str, ckpt: Path, tmp_path: Path) -> None:
    """A real zstd frame (64 KiB) that inflates to 2 GiB of zeros; its header states 2 GiB, nothing, or the
    chunk's own size (a lie): never inflated past the chunk's 8 MiB."""
    _bomb(ckpt, "zstd", zstd_rle_frame(2 << 30, content_size))
    _refused(ckpt, tmp_path, f"{KEY}/0", "zstd", needle)


def test_gzip_bomb(ckpt: Path, tmp_path: Path) -> None:
    """1 GiB of zeros in a 4.6 MB gzip stream: inflated at most one byte past the chunk's size."""
    deflate = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zero = bytes(1 << 20)
    stream = b"".join(deflate.compress(zero) for _ in range(1024)) + deflate.flush()
    _bomb(ckpt, "gzip", stream)
    _refused(ckpt, tmp_path, f"{KEY}/0", "inflates to more than the chunk's 8388608 bytes")


@pytest.mark.parametrize(
    ("nbytes", "blocksize", "needle"),
    [
        (2**31 - 17, 1 << 16, "says 2147483631 bytes"),
        (4 * BOMB_CHUNK, 1 << 16, "says 16777216 bytes"),
        (2 * BOMB_CHUNK, 2**31, "blocks of 2147483648"),
    ],
)
def test_blosc_header_that_lies(nbytes: int, blocksize: int, needle: str, ckpt: Path, tmp_path: Path) -> None:
    """A real blosc stream of the chunk's 8 MiB whose header claims more bytes, or bigger blocks, than the
    chunk has: refused before c-blosc allocates what it says."""
    from numcodecs import blosc

    stream = bytearray(blosc.compress(bytes(2 * BOMB_CHUNK), b"lz4", 5, 1))
    struct.pack_into("<II", stream, 4, nbytes, blocksize)
    _bomb(ckpt, "blosc", bytes(stream))
    _refused(ckpt, tmp_path, f"{KEY}/0", "blosc", needle)


def test_chunk_claiming_more_than_the_files_hold(ckpt: Path, tmp_path: Path) -> None:
    """A 2 GiB chunk in a 64 KiB file: refused by the expansion bound before it is opened."""
    _forge(ckpt, chunks=[1 << 30], compressor={"id": "zstd"})
    (_array(ckpt) / "0").write_bytes(zstd_rle_frame(2 << 30, 2 << 30))
    _refused(ckpt, tmp_path, f"{KEY}/0", "expansion is refused")


# --------------------------------------------------------------------------- special and giant files


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "directory", "sparse"])
def test_special_zarray(kind: str, ckpt: Path, tmp_path: Path) -> None:
    make_special(_array(ckpt) / ".zarray", kind)
    needle = "more than" if kind == "sparse" else "not a regular file"
    _refused(ckpt, tmp_path, f"{KEY}/.zarray", needle)


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "sparse"])
def test_special_raw_chunk(kind: str, ckpt: Path, tmp_path: Path) -> None:
    """A chunk file that is not a regular file counts as missing; a sparse one has the wrong size."""
    make_special(_array(ckpt) / "0", kind)
    _refused(ckpt, tmp_path, KEY, "expected 128" if kind == "sparse" else "chunk file 0 of")


def test_sparse_encoded_chunk(ckpt: Path, tmp_path: Path) -> None:
    _forge(ckpt, compressor={"id": "zstd"})
    make_special(_array(ckpt) / "0", "sparse")
    _refused(ckpt, tmp_path, f"{KEY}/0", "more than a zstd stream")


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "directory", "sparse"])
def test_special_marker(kind: str, ckpt: Path, tmp_path: Path) -> None:
    make_special(ckpt / ITER / "metadata.json", kind)
    _refused(ckpt, tmp_path, "metadata.json")


def test_allowed_codecs_still_convert(ckpt: Path, tmp_path: Path) -> None:
    """The same array re-encoded with each accepted compressor converts to the same bytes as the original."""
    from numcodecs import GZip, Zlib, Zstd, blosc

    raw = (_array(ckpt) / "0").read_bytes()
    baseline = run_cli("convert", ckpt, tmp_path / "base", "--quiet", cwd=tmp_path)
    assert baseline.code == 0, baseline.stderr
    expected = (tmp_path / "base" / "model.safetensors").read_bytes()
    encoders = {
        "zlib": Zlib(1).encode,
        "gzip": GZip(1).encode,
        "zstd": Zstd(3).encode,
        "blosc": lambda b: blosc.compress(b, b"zstd", 5, 2),
    }
    for codec_id, encode in encoders.items():
        _forge(ckpt, compressor={"id": codec_id})
        (_array(ckpt) / "0").write_bytes(bytes(encode(np.frombuffer(raw, np.uint8))))
        outcome = run_cli("convert", ckpt, tmp_path / codec_id, "--quiet", cwd=tmp_path)
        assert outcome.code == 0, (codec_id, outcome.stderr)
        assert (tmp_path / codec_id / "model.safetensors").read_bytes() == expected, codec_id


# --------------------------------------------------------------------------- the bounded decoders themselves


@pytest.mark.parametrize("size", [1, 200, 1000, 70_000, 5_000_000])
def test_decoders_round_trip_every_header_width(size: int) -> None:
    """zstd frames state their size in 1, 2, 4 or 8 bytes depending on it; each is read right."""
    from numcodecs import GZip, Zlib, Zstd, blosc

    raw = (np.arange(size) % 251).astype(np.uint8).tobytes()
    encoded = {
        "zstd": Zstd(1).encode(raw),
        "zlib": Zlib(1).encode(raw),
        "gzip": GZip(1).encode(raw),
        "blosc": blosc.compress(raw, b"lz4", 5, 1),
    }
    for codec_id, data in encoded.items():
        assert bytes(decode(bytes(data), codec_id, size)) == raw, codec_id


@pytest.mark.parametrize(
    ("codec_id", "forge", "needle"),
    [
        ("zlib", lambda d: d + b"tail", "follow the compressed stream"),
        ("zlib", lambda d: d[:-6], "truncated"),
        ("gzip", lambda d: d + d, "follow the compressed stream"),
        ("zstd", lambda d: d[:-3], "corrupt zstd stream"),
        ("zstd", lambda d: b"\x50\x2a\x4d\x18" + d, "not a zstd frame"),  # a skippable frame first
        ("blosc", lambda d: d[:10], "shorter than a blosc header"),
    ],
)
def test_decoders_refuse_damaged_streams(codec_id: str, forge: Any, needle: str) -> None:
    from numcodecs import GZip, Zlib, Zstd, blosc

    raw = bytes(range(256)) * 64
    encoders = {"zlib": Zlib(1).encode, "gzip": GZip(1).encode, "zstd": Zstd(1).encode}
    encoders["blosc"] = lambda b: blosc.compress(b, b"lz4", 5, 1)
    with pytest.raises(ValueError, match=needle):
        decode(forge(bytes(encoders[codec_id](raw))), codec_id, len(raw))
