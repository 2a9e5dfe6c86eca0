"""The Flax msgpack reader and writer against `msgpack.packb` called the way flax's `msgpack_serialize` calls it."""

import msgpack
import numpy as np
import pytest

from dalle_hf.flax_msgpack import (
    flax_msgpack_shapes,
    iter_flax_msgpack,
    read_flax_msgpack,
    unflatten,
    write_flax_msgpack,
)


def flax_ext_pack(value):
    """flax.serialization._msgpack_ext_pack, re-stated for the test (flax itself needs jax)."""
    if isinstance(value, np.ndarray):
        return msgpack.ExtType(1, msgpack.packb((value.shape, value.dtype.name, value.tobytes("C")), use_bin_type=True))
    if isinstance(value, np.generic):
        array = np.asarray(value)
        return msgpack.ExtType(3, msgpack.packb((array.shape, array.dtype.name, array.tobytes("C")), use_bin_type=True))
    raise TypeError(value)


def flax_chunk(array, max_chunk_bytes):
    """flax.serialization._chunk with MAX_CHUNK_SIZE = max_chunk_bytes."""
    per_chunk = max(1, int(max_chunk_bytes / array.dtype.itemsize))
    flat = array.reshape(-1)
    chunks = [flat[i:i + per_chunk] for i in range(0, flat.size, per_chunk)]
    return {
        "__msgpack_chunked_array__": True,
        "shape": {str(i): d for i, d in enumerate(array.shape)},
        "chunks": {str(i): c for i, c in enumerate(chunks)},
    }


@pytest.fixture
def tree():
    rng = np.random.default_rng(0)
    return {
        "model": {
            "encoder": {
                "embed_tokens": {"embedding": rng.standard_normal((40, 8)).astype(np.float32)},
                "layers": {"FlaxBartEncoderLayers": {"GLU_0": {"Dense_0": {
                    "kernel": rng.standard_normal((2, 8, 12)).astype(np.float16),
                }}}},
            },
            "step": np.int32(7),
        },
        "lm_head": {"kernel": rng.standard_normal((8, 300)).astype(np.float32)},  # 9600 bytes: a bin16 payload
        "counts": np.arange(5, dtype=np.int64),
    }


def test_writer_matches_flax_bytes_and_reader_round_trips(tree, tmp_path):
    path = tmp_path / "flax_model.msgpack"
    write_flax_msgpack(tree, path)
    expected = msgpack.packb(tree, default=flax_ext_pack, strict_types=True)
    assert path.read_bytes() == expected
    params = read_flax_msgpack(path)
    assert list(params) == [
        "model/encoder/embed_tokens/embedding", "model/encoder/layers/FlaxBartEncoderLayers/GLU_0/Dense_0/kernel",
        "model/step", "lm_head/kernel", "counts",
    ]
    embedding = tree["model"]["encoder"]["embed_tokens"]["embedding"]
    np.testing.assert_array_equal(params["model/encoder/embed_tokens/embedding"], embedding)
    kernel = params["model/encoder/layers/FlaxBartEncoderLayers/GLU_0/Dense_0/kernel"]
    assert kernel.dtype == np.float16 and kernel.shape == (2, 8, 12)
    assert params["model/step"].shape == () and params["model/step"] == 7
    np.testing.assert_array_equal(params["lm_head/kernel"], tree["lm_head"]["kernel"])


def test_chunked_array_is_joined(tree, tmp_path):
    """Arrays over the chunk size are written as flax's `__msgpack_chunked_array__` maps and read back whole."""
    path = tmp_path / "chunked.msgpack"
    write_flax_msgpack(tree, path, max_chunk_bytes=1000)
    expected_tree = {
        "model": {
            "encoder": {
                "embed_tokens": {"embedding": flax_chunk(tree["model"]["encoder"]["embed_tokens"]["embedding"], 1000)},
                "layers": tree["model"]["encoder"]["layers"],  # 384 bytes: not chunked
            },
            "step": tree["model"]["step"],
        },
        "lm_head": {"kernel": flax_chunk(tree["lm_head"]["kernel"], 1000)},
        "counts": tree["counts"],
    }
    assert path.read_bytes() == msgpack.packb(expected_tree, default=flax_ext_pack, strict_types=True)
    params = read_flax_msgpack(path)
    np.testing.assert_array_equal(params["lm_head/kernel"], tree["lm_head"]["kernel"])  # 10 chunks of 250 floats
    shapes = flax_msgpack_shapes(path)  # headers only, chunked arrays included
    assert shapes == {key: value.shape for key, value in params.items()}
    embedding = tree["model"]["encoder"]["embed_tokens"]["embedding"]
    np.testing.assert_array_equal(params["model/encoder/embed_tokens/embedding"], embedding)


def test_bfloat16_is_widened_exactly(tmp_path):
    values = np.array([1.0, -2.5, 3.140625, 65280.0], np.float32)  # all exact in bfloat16
    bits = (values.view(np.uint32) >> 16).astype(np.uint16)
    payload = msgpack.packb(((2, 2), "bfloat16", bits.tobytes()), use_bin_type=True)
    path = tmp_path / "bf16.msgpack"
    path.write_bytes(msgpack.packb({"w": msgpack.ExtType(1, payload)}))
    array = read_flax_msgpack(path)["w"]
    assert array.dtype == np.float32
    np.testing.assert_array_equal(array, values.reshape(2, 2))


def test_leaves_stream_one_at_a_time(tree, tmp_path):
    """Callables as leaves are called while writing; the reader is a generator (nothing read ahead)."""
    path = tmp_path / "lazy.msgpack"
    calls = []
    lazy = {"a": lambda: calls.append("a") or np.ones(3, np.float32), "b": {"c": np.zeros(2, np.float32)}}
    write_flax_msgpack(lazy, path)
    assert calls == ["a"]
    leaves = iter_flax_msgpack(path)
    key, value = next(leaves)
    assert key == "a" and value.tolist() == [1.0, 1.0, 1.0]


def test_flat_keys_are_unflattened(tmp_path):
    flat = {"a/b": np.ones(2, np.float32), "a/c/d": np.zeros(1, np.float32)}
    assert unflatten(flat) == {"a": {"b": flat["a/b"], "c": {"d": flat["a/c/d"]}}}
    write_flax_msgpack(flat, tmp_path / "flat.msgpack")
    assert list(read_flax_msgpack(tmp_path / "flat.msgpack")) == ["a/b", "a/c/d"]


def test_truncated_file_names_file_and_tensor(tree, tmp_path):
    path = tmp_path / "flax_model.msgpack"
    write_flax_msgpack(tree, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])  # cuts into the data of `counts`... and of lm_head's last bytes
    with pytest.raises(ValueError, match=r"flax_model\.msgpack: file ends early.*'(counts|lm_head/kernel)'"):
        read_flax_msgpack(path)
    path.write_bytes(data[:5000])  # inside lm_head's kernel
    with pytest.raises(ValueError, match=r"flax_model\.msgpack: file ends early.*'lm_head/kernel'"):
        read_flax_msgpack(path)
    with pytest.raises(ValueError, match=r"flax_model\.msgpack: file ends early.*'lm_head/kernel'"):
        flax_msgpack_shapes(path)  # seeking past the end is caught too


def test_malformed_files_are_refused(tmp_path):
    path = tmp_path / "bad.msgpack"
    path.write_bytes(msgpack.packb([1, 2]))
    with pytest.raises(ValueError, match="expected a Flax parameter tree"):
        read_flax_msgpack(path)
    path.write_bytes(msgpack.packb({"w": msgpack.ExtType(1, msgpack.packb(((3,), "float32", b"\0" * 8)))}))
    with pytest.raises(ValueError, match=r"float32 array of shape \(3,\) needs 12 bytes, the file holds 8.*'w'"):
        read_flax_msgpack(path)
    path.write_bytes(msgpack.packb({"w": msgpack.ExtType(9, b"x")}))
    with pytest.raises(ValueError, match="extension type 9"):
        read_flax_msgpack(path)
    path.write_bytes(msgpack.packb({"w": 3}))
    with pytest.raises(ValueError, match="expected an array or a map.*'w'"):
        read_flax_msgpack(path)
    path.write_bytes(msgpack.packb({"w": {}}) + b"\x00")
    with pytest.raises(ValueError, match="unexpected bytes after"):
        read_flax_msgpack(path)
