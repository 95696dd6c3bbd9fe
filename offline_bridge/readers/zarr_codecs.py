"""The compressors a zarr chunk may be encoded with, each decoded with its output bounded by the chunk's size:
our own code around the libraries' bindings, because numcodecs' codecs decode whatever the stream claims.

A `.zarray`'s `compressor` and `filters` are attacker input: numcodecs' registry builds whatever codec an id
names, and some decode by unpickling (`pickle`) or into object arrays (`json2`, `msgpack2`, `vlen-*`,
`categorize`, `object`), which runs code or crashes the interpreter. Megatron writes `compressor: null` and
`filters: null`; beyond that we accept the data-only compressors zarr users pick (`zlib`, `gzip`, `zstd`,
`blosc`) and no filter at all. Everything else is refused by id when the `.zarray` is read, before any chunk.

A check after decoding comes too late (numcodecs' `decode` allocates first), so the output is bounded before
decompression starts:

- zlib, gzip: the standard library's `zlib.decompressobj().decompress(data, max_length)`;
- zstd: the frame header must state a content size equal to the chunk's; numcodecs' `zstd.decompress` then
  fills a buffer of exactly that size and fails on any stream that would write more;
- blosc: its 16-byte header's `nbytes` must equal the chunk's size, `cbytes` the file's and `blocksize` at most
  `nbytes`; numcodecs' `blosc.decompress` (c-blosc, which validates the header again) allocates `nbytes`.
"""

from __future__ import annotations

import struct
import zlib
from typing import Any

from ..files.small_files import quote

__all__ = ["COMPRESSORS", "codec_problem", "decode", "encoded_limit"]

COMPRESSORS = ("blosc", "gzip", "zlib", "zstd")
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_BLOSC_HEADER = struct.Struct("<BBBBIII")  # version, versionlz, flags, typesize, nbytes, blocksize, cbytes


def codec_problem(compressor: Any, filters: Any) -> str | None:
    """What is wrong with a `.zarray`'s `compressor` and `filters`, or None; nothing is built from them."""
    if filters not in (None, []):
        return f"filters {quote(filters)} are refused: offline-bridge decodes no zarr filter (Megatron writes none)"
    if compressor is None:
        return None
    codec_id = compressor.get("id") if isinstance(compressor, dict) else None
    if codec_id not in COMPRESSORS:
        return (
            f"compressor {quote(codec_id if isinstance(codec_id, str) else compressor)} is refused: "
            f"only {', '.join(COMPRESSORS)} or null are decoded (Megatron writes null)"
        )
    return None


def encoded_limit(expected: int) -> int:
    """The most bytes an encoded chunk of ``expected`` bytes can take: incompressible data grows a little
    (zstd by 1/256 and a header, blosc by 16 bytes, zlib and gzip by under 1/1000 and a header)."""
    return expected + expected // 128 + 4096


def decode(data: bytes, codec_id: str, expected: int) -> bytes | bytearray:
    """The ``expected`` bytes ``data`` decodes to; ValueError if it decodes to anything else."""
    if codec_id == "zlib":
        return _inflate(data, expected, zlib.MAX_WBITS)
    if codec_id == "gzip":
        return _inflate(data, expected, 16 + zlib.MAX_WBITS)
    if codec_id == "zstd":
        return _unzstd(data, expected)
    if codec_id == "blosc":
        return _unblosc(data, expected)
    raise ValueError(f"compressor {codec_id!r} is not decoded")


def _inflate(data: bytes, expected: int, wbits: int) -> bytes:
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(data, expected + 1)
    except zlib.error as exc:
        raise ValueError(f"corrupt stream ({exc})") from exc
    if len(out) > expected:
        raise ValueError(f"inflates to more than the chunk's {expected} bytes")
    if not inflater.eof:
        raise ValueError("the compressed stream is truncated")
    if inflater.unused_data:
        raise ValueError(f"{len(inflater.unused_data)} bytes follow the compressed stream")
    if len(out) != expected:
        raise ValueError(f"inflates to {len(out)} bytes, the chunk has {expected}")
    return out


def _zstd_content_size(data: bytes) -> int | None:
    """The Frame_Content_Size of a zstd frame header (RFC 8878 §3.1.1.1), None when the frame omits it."""
    if len(data) < 6 or data[:4] != _ZSTD_MAGIC:
        raise ValueError("not a zstd frame")
    descriptor = data[4]
    fcs_flag, single_segment, dict_flag = descriptor >> 6, (descriptor >> 5) & 1, descriptor & 3
    start = 5 + (0 if single_segment else 1) + (0, 1, 2, 4)[dict_flag]
    width = (single_segment, 2, 4, 8)[fcs_flag]
    if width == 0:
        return None
    if len(data) < start + width:
        raise ValueError("the zstd frame header is truncated")
    value = int.from_bytes(data[start : start + width], "little")
    return value + 256 if width == 2 else value


def _unzstd(data: bytes, expected: int) -> bytearray:
    size = _zstd_content_size(data)
    if size != expected:
        said = "no content size" if size is None else f"content size {size}"
        raise ValueError(f"the zstd frame states {said}, the chunk has {expected} bytes")
    from numcodecs import zstd  # the compressors zarr writes with (a declared dependency, imported when needed)

    try:
        return zstd.decompress(data, bytearray(expected))
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"corrupt zstd stream ({exc})") from exc


def _unblosc(data: bytes, expected: int) -> bytes:
    if len(data) < _BLOSC_HEADER.size:
        raise ValueError("shorter than a blosc header")
    _, _, _, _, nbytes, blocksize, cbytes = _BLOSC_HEADER.unpack_from(data)
    if nbytes != expected or cbytes != len(data) or not 0 < blocksize <= nbytes:
        raise ValueError(
            f"the blosc header says {nbytes} bytes in {cbytes} (blocks of {blocksize}); "
            f"the chunk has {expected} bytes, the file {len(data)}"
        )
    from numcodecs import blosc

    try:
        out = blosc.decompress(data)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"corrupt blosc stream ({exc})") from exc
    if len(out) != expected:
        raise ValueError(f"decodes to {len(out)} bytes, the chunk has {expected}")
    return out
