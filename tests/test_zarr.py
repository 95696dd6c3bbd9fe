"""zarr checkpoints (megatron-core 0.9 to 0.15): the committed fixture in tests/data/zarr/ was written by real
megatron-core 0.15 (see its README.md and tools/make_zarr_fixture.py); here only the normal test environment."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numcodecs
import numpy as np
import pytest
import torch
import zarr
from judge import assert_matches_megatron, assert_same_output, convert_fails

import offline_bridge
from offline_bridge.errors import CheckpointError
from offline_bridge.readers import ZarrReader, open_reader, zarr_array
from offline_bridge.write.manifest import MANIFEST

DATA = Path(__file__).resolve().parent / "data" / "zarr"
ZARR_CKPT = DATA / "zarr_ckpt"
TWIN_CKPT = DATA / "torch_dist_ckpt"
ITER = "iter_0000020"
QKV = "decoder.layers.self_attention.linear_qkv.weight"
SPEC = SimpleNamespace(vocab_size=256)  # all assert_matches_megatron needs of a fixture spec


def files(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("zarr") / "hf"
    offline_bridge.convert(ZARR_CKPT, out, progress=False)
    return out


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    """A private copy of the zarr save root that a test may damage."""
    return Path(shutil.copytree(ZARR_CKPT, tmp_path / "ckpt"))


def test_fixture_is_what_megatron_015_wrote() -> None:
    """The layout formats/zarr.md describes: metadata.json, array dirs with bf16 .zarray, object dirs."""
    iter_dir = ZARR_CKPT / ITER
    assert json.loads((iter_dir / "metadata.json").read_text())["sharded_backend"] == "zarr"
    meta = json.loads((iter_dir / QKV / ".zarray").read_text())
    assert meta == {
        "chunks": [1, 48, 64],
        "compressor": None,
        "dtype": "bfloat16",
        "fill_value": None,
        "filters": None,
        "order": "C",
        "shape": [2, 96, 64],
        "zarr_format": 2,
    }
    assert sorted(p.name for p in (iter_dir / QKV).iterdir()) == [".zarray", "0.0.0", "0.1.0", "1.0.0", "1.1.0"]
    assert sorted(p.name for p in (iter_dir / "rng_state").iterdir())[0] == "shard_0.0_2.2.pt"
    with open_reader(iter_dir) as reader:
        assert isinstance(reader, ZarrReader)
        assert len(reader.tensors) == 11 and {i.dtype.torch_name for i in reader.tensors.values()} == {"bfloat16"}
        assert "rng_state" in reader.objects and not any(k.startswith("rng_state") for k in reader.tensors)
        assert reader.args.ckpt_format == "zarr" and reader.args.qk_layernorm


def test_same_bytes_as_the_torch_dist_twin(converted: Path, tmp_path: Path) -> None:
    """Same weights, two formats: the HF outputs are byte-identical, file for file."""
    twin = offline_bridge.convert(TWIN_CKPT, tmp_path / "twin", progress=False)
    assert sorted(p.name for p in twin.iterdir()) == ["config.json", "model.safetensors", MANIFEST]
    assert_same_output(converted, twin)


def test_every_tensor_equals_the_twin() -> None:
    """Reader level: each global tensor, and boxes of it, equal the torch_dist reader's."""
    with open_reader(ZARR_CKPT / ITER) as zr, open_reader(TWIN_CKPT / ITER) as tr:
        model_keys = {k for k in tr.tensors if "_extra_state" not in k}
        assert set(zr.tensors) == model_keys
        for key, info in zr.tensors.items():
            assert (info.shape, info.dtype) == (tr.tensors[key].shape, tr.tensors[key].dtype), key
            whole = zr.read(key)
            assert whole.dtype == np.uint16 and np.array_equal(whole, tr.read(key)), key
        box = ((1, 2), (40, 90), (3, 7))
        assert np.array_equal(zr.read(QKV, box), tr.read(QKV)[1:2, 40:90, 3:7])


def test_transformers_reproduces_megatron(converted: Path) -> None:
    """Qwen3 in transformers, loaded cleanly, gives Megatron 0.15's logits of the zarr checkpoint."""
    config = json.loads((converted / "config.json").read_text())
    assert (config["model_type"], config["torch_dtype"]) == ("qwen3", "bfloat16")
    assert_matches_megatron(converted, SPEC, ZARR_CKPT, atol=1e-5)


def test_reads_only_the_chunks_a_box_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[int, ...]] = []
    original = zarr_array.ZarrArray.chunk

    def spy(self, index):
        seen.append(index)
        return original(self, index)

    monkeypatch.setattr(zarr_array.ZarrArray, "chunk", spy)
    with open_reader(ZARR_CKPT / ITER) as reader:
        reader.read(QKV, ((1, 2), (50, 60), (0, 64)))  # layer 1, rows inside the second 48-row chunk
    assert seen == [(1, 1, 0)]


# --------------------------------------------------------------------------- bad input


def test_missing_chunk_file(ckpt: Path, tmp_path: Path) -> None:
    """zarr would fill a missing chunk with fill_value; we refuse, naming the array and the chunk."""
    (ckpt / ITER / QKV / "1.1.0").unlink()
    line = convert_fails(ckpt, tmp_path / "out")
    assert f"{ITER}/{QKV}" in line and "chunk file 1.1.0" in line and "missing" in line


def test_truncated_chunk_file(ckpt: Path, tmp_path: Path) -> None:
    chunk = ckpt / ITER / QKV / "0.1.0"
    chunk.write_bytes(chunk.read_bytes()[:-2])
    line = convert_fails(ckpt, tmp_path / "out")
    assert f"{QKV}/0.1.0" in line and "6142 bytes, expected 6144" in line


def test_chunk_outside_the_grid(ckpt: Path, tmp_path: Path) -> None:
    array = ckpt / ITER / QKV
    shutil.copy(array / "1.1.0", array / "2.0.0")
    line = convert_fails(ckpt, tmp_path / "out")
    assert "chunk file 2.0.0 lies outside" in line and QKV in line


def test_array_without_zarray(ckpt: Path, tmp_path: Path) -> None:
    (ckpt / ITER / QKV / ".zarray").unlink()
    line = convert_fails(ckpt, tmp_path / "out")
    assert QKV in line and "no .zarray" in line


def test_unsupported_dtype(ckpt: Path, tmp_path: Path) -> None:
    zarray = ckpt / ITER / QKV / ".zarray"
    zarray.write_text(zarray.read_text().replace('"bfloat16"', '"<c8"'))
    line = convert_fails(ckpt, tmp_path / "out")
    assert f"{QKV}/.zarray" in line and "unsupported dtype '<c8'" in line


def test_sync_and_object_directories_are_skipped(ckpt: Path, tmp_path: Path) -> None:
    """`<key>.sync` lock directories and ShardedObject directories are not tensors and are never opened."""
    (ckpt / ITER / f"{QKV}.sync").mkdir()
    (ckpt / ITER / f"{QKV}.sync" / "0.0.0").write_bytes(b"lock")
    (ckpt / ITER / "rng_state" / "shard_0.0_2.2.pt").write_bytes(b"not a pickle")  # never read
    out = offline_bridge.convert(ckpt, tmp_path / "out", progress=False)
    assert (out / "model.safetensors").is_file()


# --------------------------------------------------------------------------- arrays written by the zarr library


def _zarr_array(path: Path, data: np.ndarray, chunks: tuple[int, ...], **options: object) -> None:
    """A zarr v2 array written by the installed zarr package (2.x or 3.x)."""
    if int(zarr.__version__.split(".")[0]) >= 3:
        options["zarr_format"] = 2
    array = zarr.create(shape=data.shape, chunks=chunks, dtype=data.dtype, store=str(path), **options)
    array[...] = data


def _iteration_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "metadata.json").write_text(json.dumps({"sharded_backend": "zarr", "sharded_backend_version": 1}))
    return path


@pytest.mark.parametrize(
    "options",
    [
        {"compressor": None, "fill_value": None},
        {"compressor": numcodecs.Zlib(level=1), "order": "F"},
        {"compressor": numcodecs.Blosc(cname="lz4", shuffle=numcodecs.Blosc.SHUFFLE)},
        {"compressor": numcodecs.Blosc(cname="zstd", shuffle=numcodecs.Blosc.BITSHUFFLE)},
        {"compressor": numcodecs.Zstd(level=3)},
        {"compressor": numcodecs.GZip(level=5), "order": "F"},
    ],
    ids=["raw", "zlib-fortran", "blosc-lz4", "blosc-zstd", "zstd", "gzip-fortran"],
)
@pytest.mark.parametrize("dtype", ["<f4", ">f4", "<f2", "<i8"])
def test_agrees_with_the_zarr_library(options: dict, dtype: str, tmp_path: Path) -> None:
    """Edge chunks, Fortran order, big-endian data and each compressor we decode: read as zarr reads them."""
    iter_dir = _iteration_dir(tmp_path / "iter")
    data = (np.arange(7 * 5 * 3) * 0.5 - 20).reshape(7, 5, 3).astype(dtype)
    _zarr_array(iter_dir / "t", data, (3, 2, 3), **options)
    expected = zarr.open_array(str(iter_dir / "t"), mode="r")[...]
    assert np.array_equal(expected, data)
    with ZarrReader(iter_dir) as reader:
        info = reader.tensors["t"]
        assert info.shape == (7, 5, 3) and info.dtype.np == np.dtype(dtype).newbyteorder("<")
        assert np.array_equal(reader.read("t"), expected)
        assert np.array_equal(reader.read("t", ((2, 7), (1, 4), (0, 2))), expected[2:7, 1:4, 0:2])


def test_bfloat16_bits_round_trip(tmp_path: Path) -> None:
    """A hand-written bf16 array: the chunk bytes are raw little-endian bf16 bits, returned as uint16."""
    values = torch.linspace(-3, 3, 24, dtype=torch.bfloat16).reshape(4, 6)
    iter_dir = _iteration_dir(tmp_path / "iter")
    array = iter_dir / "w"
    array.mkdir()
    meta = {"chunks": [2, 6], "compressor": None, "dtype": "bfloat16", "fill_value": None, "filters": None}
    (array / ".zarray").write_text(json.dumps({**meta, "order": "C", "shape": [4, 6], "zarr_format": 2}))
    bits = values.view(torch.int16).numpy().astype("<u2")
    for i in range(2):
        (array / f"{i}.0").write_bytes(bits[2 * i : 2 * i + 2].tobytes())
    with ZarrReader(iter_dir) as reader:
        assert reader.tensors["w"].dtype.torch_name == "bfloat16"
        out = reader.read("w")
    assert np.array_equal(out, bits)
    assert torch.equal(torch.from_numpy(out.view(np.int16)).view(torch.bfloat16), values)


def test_scalar_and_empty_arrays(tmp_path: Path) -> None:
    iter_dir = _iteration_dir(tmp_path / "iter")
    _zarr_array(iter_dir / "scalar", np.array(5, dtype="<i8"), (), compressor=None)
    _zarr_array(iter_dir / "empty", np.zeros((0, 4), dtype="<f4"), (2, 4), compressor=None)
    with ZarrReader(iter_dir) as reader:
        assert reader.read("scalar").tolist() == 5
        assert reader.read("empty").shape == (0, 4)


def test_wrong_backend_is_refused(tmp_path: Path) -> None:
    iter_dir = tmp_path / "iter"
    iter_dir.mkdir()
    (iter_dir / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist"}))
    with pytest.raises(CheckpointError, match="not zarr"):
        ZarrReader(iter_dir)
