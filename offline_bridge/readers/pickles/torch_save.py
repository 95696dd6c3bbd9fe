"""Read `torch.save` zip archives without torch: the pickle through the allow-list, storages as numpy views.
Our own reader around `zipfile`'s directory parsing, not `torch.load`: no torch import, no copy of a storage,
and no member inflated or read outside its record.

A `.distcp` chunk is such an archive embedded at (offset, length) of a memory-mapped file; `common.pt`
is one on its own. Members are stored uncompressed, so a storage's bytes are a slice of the map.

Nothing in the archive is trusted: every member's local header and bytes must lie inside the record,
compressed members are refused (nothing is ever inflated), and a tensor must fit its storage before a view
of it is made.
"""

from __future__ import annotations

import contextlib
import io
import mmap
import struct
import zipfile
import zlib
from typing import Any

import numpy as np

from ...errors import CheckpointError
from ...files.small_files import METADATA_LIMIT, read_small
from .safe_pickle import TensorRef, safe_loads
from .tensor_records import check_record

__all__ = ["TorchArchive", "is_contiguous", "load_torch_file", "release_pages", "view"]

_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")  # 30 bytes, PK\x03\x04
_END = struct.Struct("<4s12xIH")  # 22 bytes, PK\x05\x06 ... directory offset, comment length
_LOCATOR64 = struct.Struct("<4sIQI")  # 20 bytes, PK\x06\x07: disk, offset of the zip64 end record, disks
_END64 = struct.Struct("<4s44xQ")  # PK\x06\x06 ... directory offset at byte 48


class _RangeFile(io.RawIOBase):
    """A read-only file over ``buf[start:start+length]`` for zipfile, without copying the range."""

    def __init__(self, buf: mmap.mmap | memoryview, start: int, length: int) -> None:
        self._buf, self._start, self._length, self._pos = buf, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        target = {0: pos, 1: self._pos + pos, 2: self._length + pos}[whence]
        if target < 0:
            raise OSError(f"seek to {target}, before the start of the record")  # as a real file does
        self._pos = target
        return self._pos

    def readinto(self, out: Any) -> int:
        n = max(0, min(len(out), self._length - self._pos))
        begin = self._start + self._pos
        out[:n] = self._buf[begin : begin + n]
        self._pos += n
        return n


class TorchArchive:
    """One `torch.save` archive in ``buf[start:start+length]``; ``source`` names it in errors."""

    def __init__(self, buf: mmap.mmap | memoryview, start: int, length: int, source: str) -> None:
        self._buf, self._start, self._length, self.source = buf, start, length, source
        if start < 0 or length < 0 or start + length > len(buf):
            raise CheckpointError(
                f"{source}: record at [{start}, {start + length}) runs past the end of the file (truncated?)"
            )
        try:
            with zipfile.ZipFile(_RangeFile(buf, start, length)) as archive:
                members = archive.infolist()
                directory = archive.start_dir
            self._members = {info.filename: info for info in members}
            _check_bounds(buf, start, length, directory)
        except (
            _NotTorch,
            zipfile.BadZipFile,
            ValueError,
            EOFError,
            OSError,
            struct.error,
            OverflowError,
            NotImplementedError,
        ) as exc:
            raise CheckpointError(f"{source}: not a torch.save archive ({exc})") from exc
        if len(self._members) != len(members):
            raise CheckpointError(f"{source}: the archive names a member twice; torch would read another one")
        pickles = [name for name in self._members if name.endswith("/data.pkl") or name == "data.pkl"]
        if len(pickles) != 1:
            raise CheckpointError(f"{source}: expected one data.pkl in the archive, found {len(pickles)}")
        self._root = pickles[0][: -len("data.pkl")]

    def _member(self, name: str) -> memoryview:
        begin, size = self._span(name)
        return memoryview(self._buf)[begin : begin + size]

    def _span(self, name: str) -> tuple[int, int]:
        """Where member ``name``'s bytes lie in the buffer: (start, length)."""
        info = self._members.get(self._root + name)
        if info is None:
            raise CheckpointError(f"{self.source}: archive member {self._root + name} is missing")
        if info.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(f"{self.source}: member {info.filename} is compressed; torch.save never does that")
        end = self._start + self._length
        at = self._start + info.header_offset
        if info.header_offset < 0 or at + _LOCAL_HEADER.size > end:
            raise CheckpointError(f"{self.source}: member {info.filename} has its header outside the archive")
        header = _LOCAL_HEADER.unpack_from(self._buf, at)
        if header[0] != b"PK\x03\x04":
            raise CheckpointError(f"{self.source}: bad local header for {info.filename}")
        begin = at + _LOCAL_HEADER.size + header[9] + header[10]
        if info.file_size < 0 or begin + info.file_size > end:
            raise CheckpointError(
                f"{self.source}: member {info.filename} runs past the end of the archive (truncated?)"
            )
        return begin, info.file_size

    def load(self) -> Any:
        """The unpickled object; tensors in it come back as `TensorRef`s (no bytes read)."""
        pickled = self._member("data.pkl")
        if self._root + "byteorder" in self._members:  # absent in old archives: torch then reads little-endian
            order = self._member("byteorder")
            if order != b"little":
                raise CheckpointError(f"{self.source}: byteorder is {bytes(order[:16])!r}; only little-endian is read")
        return safe_loads(pickled, self.source)

    def array(self, ref: TensorRef) -> np.ndarray:
        """A read-only numpy view of a tensor's bytes (bf16 as uint16); no copy."""
        return view(self._buf, self.storage_start(ref), ref)

    def storage_start(self, ref: TensorRef) -> int:
        """Where the bytes of ``ref``'s storage begin in the buffer, once checked to hold the tensor."""
        begin, size = self._span(f"data/{ref.storage.key}")
        check_record(ref, size, self.source)
        return begin

    def check_crc(self, ref: TensorRef) -> None:
        """Compare the bytes of ``ref``'s storage with the CRC-32 the archive's directory holds for them."""
        name = f"data/{ref.storage.key}"
        if zlib.crc32(self._member(name)) != self._members[self._root + name].CRC:
            raise CheckpointError(f"{self.source}: member {self._root + name} fails its CRC-32 check (damaged file)")


def view(buf: mmap.mmap | memoryview, start: int, ref: TensorRef) -> np.ndarray:
    """The tensor ``ref`` whose storage begins at byte ``start`` of ``buf``, as a read-only numpy view."""
    dtype = ref.storage.dtype.np
    flat = np.frombuffer(buf, dtype=dtype, count=ref.storage.numel, offset=start)
    strides = [s * dtype.itemsize for s in ref.stride]
    return np.lib.stride_tricks.as_strided(flat[ref.storage_offset :], ref.shape, strides, writeable=False)


def is_contiguous(ref: TensorRef) -> bool:
    """Whether ``ref``'s elements lie in row-major order, one after the other, in its storage."""
    expected = 1
    for n, s in reversed(list(zip(ref.shape, ref.stride))):
        if n != 1 and s != expected:
            return False
        expected *= n
    return True


def release_pages(buf: mmap.mmap, start: int, length: int) -> None:
    """Unmap pages once copied: the page cache keeps them, but they no longer count in our resident set."""
    begin = start - start % mmap.PAGESIZE
    with contextlib.suppress(OSError, ValueError):
        buf.madvise(mmap.MADV_DONTNEED, begin, min(start + length, len(buf)) - begin)


class _NotTorch(ValueError):
    """The archive is not laid out as torch.save writes it."""


def _check_bounds(buf: mmap.mmap | memoryview, start: int, length: int, directory: int) -> None:
    """The archive fills its record exactly, as torch.save writes it: a local header first, the end of
    central directory record last (no comment), and the central directory where that record says. Anything
    before or after (say, a second archive appended) would make zipfile and torch read different members."""
    end = start + length
    if length < 4 + _END.size or bytes(buf[start : start + 4]) != b"PK\x03\x04":
        raise _NotTorch("it does not start with a member")
    signature, offset, comment = _END.unpack_from(buf, end - _END.size)
    if signature != b"PK\x05\x06" or comment:
        raise _NotTorch("it does not end with its directory (data after it?)")
    if offset == 0xFFFFFFFF:  # zip64: the locator before the end record points at the zip64 end record
        locator, _, record, _ = _LOCATOR64.unpack_from(buf, end - _END.size - _LOCATOR64.size)
        if locator != b"PK\x06\x07" or not 0 <= record <= length - _END64.size:
            raise _NotTorch("bad zip64 locator")
        signature, offset = _END64.unpack_from(buf, start + record)
        if signature != b"PK\x06\x06":
            raise _NotTorch("bad zip64 end record")
    if directory != offset:
        raise _NotTorch(f"its directory is at {directory}, not at {offset} where it says (data before it?)")


def load_torch_file(path: str) -> Any:
    """Unpickle a whole `torch.save` file (e.g. `common.pt`, small) through the allow-list."""
    data = read_small(path, METADATA_LIMIT, "torch.save file")
    return TorchArchive(memoryview(data), 0, len(data), str(path)).load()
