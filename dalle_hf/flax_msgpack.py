"""Flax checkpoints (`flax_model.msgpack`) read and written as data: no jax, no flax, nothing unpickled.

Flax's `flax.serialization.to_bytes` (what transformers' `FlaxPreTrainedModel.save_pretrained` calls) writes the
parameter tree as one msgpack map of maps whose leaves are msgpack extension objects:

- ext type 1, an ndarray: the payload is itself msgpack, `[shape, dtype name, row-major bytes]` (flax's
  `_ndarray_to_bytes`, `use_bin_type=True`); the dtype name is numpy's (`"float32"`) or `"bfloat16"`;
- ext type 2, a Python complex: the payload is msgpack `[real, imag]`;
- ext type 3, a numpy scalar: the payload is an ndarray payload of shape `[]`;
- an array of more than `MAX_CHUNK_SIZE` = 2**30 bytes is replaced by the map
  `{"__msgpack_chunked_array__": True, "shape": {"0": d0, ...}, "chunks": {"0": flat_chunk, ...}}`, each chunk a
  flat ext-1 array of at most 2**30 bytes (msgpack's objects are limited to 2**31 - 1 bytes).

DALL-E Mega's file is 10.4 GB. The `msgpack` library would hold each payload as `bytes` twice (the extension's
data, then the nested array's bytes) on top of its read buffer, so the reader here walks the msgpack headers
itself and reads each array's bytes straight into a fresh numpy buffer, one leaf at a time
(`iter_flax_msgpack`): a converter that consumes the leaves as they come never holds the file twice. Chunked
arrays are read into one preallocated array, chunk after chunk. bfloat16 arrays come back as float32 (exact: a
bfloat16 is the top half of a float32), since numpy has no bfloat16. Small values (map keys, the shapes of
chunked arrays, ext 2 and 3 payloads) are decoded with `msgpack` itself.

`write_flax_msgpack` writes flax's exact bytes (the tests compare it with `msgpack.packb` as flax calls it),
streaming: a leaf may be a zero-argument callable, so a 10 GB file of random weights is written one tensor at a
time (`benchmarks/convert_memory.py`).
"""

import os
import struct
from collections.abc import Iterator, Mapping

import msgpack
import numpy as np

MAX_CHUNK_SIZE = 2**30  # flax.serialization.MAX_CHUNK_SIZE: arrays over 1 GiB are split (msgpack's limit is 2**31 - 1)
CHUNKED_ARRAY_MARKER = "__msgpack_chunked_array__"  # flax's key for a split array
EXT_NDARRAY, EXT_COMPLEX, EXT_NPSCALAR = 1, 2, 3  # flax's `_MsgpackExtType`

# msgpack's variable-length headers: first byte -> (what, width of the big-endian length that follows)
_SIZED = {
    0xC4: ("bin", 1), 0xC5: ("bin", 2), 0xC6: ("bin", 4),
    0xC7: ("ext", 1), 0xC8: ("ext", 2), 0xC9: ("ext", 4),
    0xD9: ("str", 1), 0xDA: ("str", 2), 0xDB: ("str", 4),
    0xDC: ("array", 2), 0xDD: ("array", 4), 0xDE: ("map", 2), 0xDF: ("map", 4),
}
_FIXEXT = {0xD4: 1, 0xD5: 2, 0xD6: 4, 0xD7: 8, 0xD8: 16}
_SCALARS = {  # first byte -> struct format of the value that follows
    0xCA: ">f", 0xCB: ">d", 0xCC: ">B", 0xCD: ">H", 0xCE: ">I", 0xCF: ">Q",
    0xD0: ">b", 0xD1: ">h", 0xD2: ">i", 0xD3: ">q",
}
_UNSIGNED = {1: ">B", 2: ">H", 4: ">I"}


class _Reader:
    """A msgpack stream over a binary file, with the file name and the current key in every error."""

    def __init__(self, file, path: str, skip_data: bool = False):
        self.file, self.path, self.skip_data = file, path, skip_data
        self.size = os.fstat(file.fileno()).st_size

    def fail(self, key: str, what: str):
        raise ValueError(f"{self.path}: {what} at byte {self.file.tell()} while reading {key or 'the top level'!r}")

    def read(self, n: int, key: str) -> bytes:
        data = self.file.read(n)
        if len(data) != n:
            self.fail(key, f"file ends early (truncated? {self.size} bytes), needed {n} more bytes")
        return data

    def readinto(self, buffer: np.ndarray, key: str):
        view = memoryview(buffer).cast("B")
        done = 0
        while done < len(view):
            got = self.file.readinto(view[done:])
            if not got:
                self.fail(key, f"file ends early (truncated? {self.size} bytes), needed {len(view) - done} more bytes")
            done += got

    def header(self, key: str) -> tuple[str, int]:
        """The next object's kind and its count/length/value: ("map", n), ("str", len), ("ext", len), ("int", v)..."""
        first = self.read(1, key)[0]
        if first <= 0x7F:
            return "int", first
        if first >= 0xE0:
            return "int", first - 0x100
        if 0x80 <= first <= 0x8F:
            return "map", first & 0x0F
        if 0x90 <= first <= 0x9F:
            return "array", first & 0x0F
        if 0xA0 <= first <= 0xBF:
            return "str", first & 0x1F
        if first in _SIZED:
            kind, width = _SIZED[first]
            return kind, struct.unpack(_UNSIGNED[width], self.read(width, key))[0]
        if first in _FIXEXT:
            return "ext", _FIXEXT[first]
        if first in _SCALARS:
            fmt = _SCALARS[first]
            value = struct.unpack(fmt, self.read(struct.calcsize(fmt), key))[0]
            return ("float" if fmt in (">f", ">d") else "int"), value
        if first in (0xC0, 0xC2, 0xC3):
            return "const", {0xC0: None, 0xC2: False, 0xC3: True}[first]
        self.fail(key, f"byte 0x{first:02x} is not msgpack")

    def value(self, key: str):
        """The next object, decoded in full (maps, keys, shapes, small extension payloads)."""
        kind, n = self.header(key)
        if kind in ("int", "float", "const"):
            return n
        if kind == "str":
            return self.read(n, key).decode("utf-8")
        if kind == "bin":
            return self.read(n, key)
        if kind == "array":
            return [self.value(key) for _ in range(n)]
        if kind == "map":
            return {self.key(key): self.value(key) for _ in range(n)}
        return self.extension(n, key)

    def key(self, parent: str) -> str:
        name = self.value(parent)
        if not isinstance(name, str):
            self.fail(parent, f"expected a string key in a Flax parameter tree, got {name!r}")
        return name

    def extension(self, length: int, key: str):
        code = self.read(1, key)[0]
        if code == EXT_NDARRAY:
            return self.ndarray(length, key)
        if code == EXT_NPSCALAR:
            return self.ndarray(length, key)[()]
        if code == EXT_COMPLEX:
            real, imag = msgpack.unpackb(self.read(length, key))
            return complex(real, imag)
        self.fail(key, f"msgpack extension type {code} is not one Flax writes (1 ndarray, 2 complex, 3 scalar)")

    def ndarray(self, length: int, key: str) -> np.ndarray:
        """An ext-1 payload `[shape, dtype, bytes]`; its bytes go straight into a new array."""
        start = self.file.tell()
        kind, count = self.header(key)
        if (kind, count) != ("array", 3):
            self.fail(key, "expected an ndarray payload [shape, dtype, bytes]")
        shape = self.value(key)
        dtype_name = self.value(key)
        kind, nbytes = self.header(key)
        if kind not in ("bin", "str") or not isinstance(shape, list) or not isinstance(dtype_name, str | bytes):
            self.fail(key, "expected an ndarray payload [shape, dtype, bytes]")
        if isinstance(dtype_name, bytes):
            dtype_name = dtype_name.decode()
        if self.file.tell() - start + nbytes != length:
            self.fail(key, f"ndarray payload of {length} bytes does not hold its {nbytes} data bytes")
        bfloat16 = dtype_name == "bfloat16"
        try:
            dtype = np.dtype(np.uint16 if bfloat16 else dtype_name)
        except TypeError:
            self.fail(key, f"unknown dtype {dtype_name!r}")
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if nbytes != expected:
            self.fail(
                key, f"{dtype_name} array of shape {tuple(shape)} needs {expected} bytes, the file holds {nbytes}"
            )
        if self.skip_data:  # shapes only: a zero-stride stand-in, the data seeked over
            if self.file.seek(nbytes, os.SEEK_CUR) > self.size:
                self.fail(key, f"file ends early (truncated? {self.size} bytes), needed {nbytes} data bytes")
            return np.broadcast_to(np.zeros((), np.float32 if bfloat16 else dtype), shape)
        array = np.empty(shape, dtype)
        self.readinto(array, key)
        if bfloat16:  # the top 16 bits of a float32: widen exactly
            array = (array.astype(np.uint32) << 16).view(np.float32)
        return array

    def chunked_array(self, entries: int, key: str) -> np.ndarray:
        """The rest of a `__msgpack_chunked_array__` map (its marker already read): one array, filled chunk by chunk."""
        shape, array, filled = None, None, 0
        for _ in range(entries - 1):
            name = self.key(key)
            if name == "shape":
                shape = self.value(key)
                if not isinstance(shape, dict):
                    self.fail(key, "expected the chunked array's shape as a map")
                shape = [shape[str(i)] for i in range(len(shape))]
            elif name == "chunks" and shape is not None:
                kind, count = self.header(key)
                if kind != "map":
                    self.fail(key, "expected the chunked array's chunks as a map")
                for index in range(count):
                    if self.key(key) != str(index):
                        self.fail(key, f"expected chunk {index} of the chunked array")
                    kind, length = self.header(key)
                    if kind != "ext" or self.read(1, key)[0] != EXT_NDARRAY:
                        self.fail(key, "expected each chunk of a chunked array to be an ndarray")
                    chunk = self.ndarray(length, key)
                    if array is None:  # the first chunk tells the dtype: allocate the whole array once
                        size = int(np.prod(shape, dtype=np.int64))
                        array = np.broadcast_to(chunk.flat[0], size) if self.skip_data else np.empty(size, chunk.dtype)
                    if self.skip_data:
                        filled += chunk.size
                        continue
                    chunk = chunk.reshape(-1)
                    if filled + chunk.size > array.size:
                        self.fail(key, f"chunks hold more than the {array.size} values of shape {tuple(shape)}")
                    array[filled:filled + chunk.size] = chunk
                    filled += chunk.size
            else:
                self.fail(key, f"unexpected entry {name!r} in a chunked array (flax writes marker, shape, chunks)")
        if array is None or filled != array.size:
            self.fail(key, f"chunked array of shape {shape} has {filled} values")
        return np.broadcast_to(array[:1], shape) if self.skip_data else array.reshape(shape)


def iter_flax_msgpack(path: str | os.PathLike, skip_data: bool = False) -> Iterator[tuple[str, np.ndarray]]:
    """Yields `(key, array)` for every leaf of a Flax msgpack file, one at a time, in file order.

    Args:
        path (`str` or `os.PathLike`):
            A file written by `flax.serialization.to_bytes` / `msgpack_serialize` (`flax_model.msgpack`).
        skip_data (`bool`, *optional*, defaults to `False`):
            Seek over the array bytes and yield read-only zero-stride arrays with the right shape and dtype
            (`flax_msgpack_shapes`): the tree's layout without reading the weights.

    Yields:
        `tuple[str, np.ndarray]`: the leaf's path joined by `/` (`"model/encoder/embed_tokens/embedding"`) and its
        array (chunked arrays joined; bfloat16 widened to float32; numpy scalars as 0-d arrays).

    Raises:
        `ValueError`: naming the file, the byte offset and the key, for a truncated or malformed file.

    Example:
        >>> for key, array in iter_flax_msgpack("dalle-mini/flax_model.msgpack"):  # doctest: +SKIP
        ...     print(key, array.shape)
    """
    path = os.fspath(path)
    with open(path, "rb") as file:
        reader = _Reader(file, path, skip_data)
        kind, count = reader.header("")
        if kind != "map":
            reader.fail("", "expected a Flax parameter tree (a msgpack map)")
        stack = [("", count)]  # (prefix, entries left) of the maps being walked
        while stack:
            prefix, left = stack.pop()
            if left == 0:
                continue
            stack.append((prefix, left - 1))
            name = reader.key(prefix)
            key = f"{prefix}/{name}" if prefix else name
            kind, n = reader.header(key)
            if kind == "map":
                if n and _peek_marker(reader, key):
                    yield key, reader.chunked_array(n, key)
                else:
                    stack.append((key, n))
            elif kind == "ext":
                value = reader.extension(n, key)
                yield key, value if isinstance(value, np.ndarray) else np.asarray(value)
                del value  # a consumer that drops the leaf frees it before the next one is read
            else:
                reader.fail(key, f"expected an array or a map, found a msgpack {kind}")
        if file.read(1):
            reader.fail("", "unexpected bytes after the parameter tree")


def _peek_marker(reader: _Reader, key: str) -> bool:
    """Whether a map starts with flax's chunked-array marker; if not, rewinds to its first key."""
    start = reader.file.tell()
    kind, n = reader.header(key)
    if kind == "str" and n == len(CHUNKED_ARRAY_MARKER) and reader.read(n, key) == CHUNKED_ARRAY_MARKER.encode():
        reader.value(key)  # the marker's value (True)
        return True
    reader.file.seek(start)
    return False


def read_flax_msgpack(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All leaves of a Flax msgpack file as a flat dict `{"a/b/c": array}` (see `iter_flax_msgpack`).

    Example:
        >>> params = read_flax_msgpack("dalle-mini/flax_model.msgpack")  # doctest: +SKIP
        >>> params["lm_head/kernel"].shape  # doctest: +SKIP
        (1024, 16385)
    """
    return dict(iter_flax_msgpack(path))


def flax_msgpack_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """`{"a/b/c": shape}` for every leaf, read from the headers only (the array bytes are seeked over).

    Example:
        >>> flax_msgpack_shapes("dalle-mega/flax_model.msgpack")["lm_head/kernel"]  # doctest: +SKIP
        (2048, 16416)
    """
    return {key: array.shape for key, array in iter_flax_msgpack(path, skip_data=True)}


def unflatten(params: Mapping[str, object]) -> dict:
    """`{"a/b": x}` -> `{"a": {"b": x}}` (Flax's nested layout)."""
    tree = {}
    for key, value in params.items():
        *parents, name = key.split("/")
        node = tree
        for parent in parents:
            node = node.setdefault(parent, {})
        node[name] = value
    return tree


def write_flax_msgpack(params: Mapping, path: str | os.PathLike, max_chunk_bytes: int | None = None) -> None:
    """Writes a parameter tree exactly as `flax.serialization.to_bytes` would, one leaf at a time.

    Args:
        params (`Mapping`):
            A nested dict of arrays (Flax's layout) or a flat dict with `/`-joined keys. A leaf may also be a
            zero-argument callable returning the array, so huge files never hold all arrays at once.
        path (`str` or `os.PathLike`):
            Where to write.
        max_chunk_bytes (`int`, *optional*):
            Arrays of more bytes are split into flat chunks of at most this many bytes, as flax does with its
            `MAX_CHUNK_SIZE` (the default, 2**30; smaller values make chunked arrays in tiny test files).

    Example:
        >>> write_flax_msgpack({"dense": {"kernel": np.zeros((2, 3), np.float32)}}, "params.msgpack")  # doctest: +SKIP
    """
    if any("/" in key for key in params):
        params = unflatten(params)
    max_chunk_bytes = MAX_CHUNK_SIZE if max_chunk_bytes is None else max_chunk_bytes
    if max_chunk_bytes < 1:
        raise ValueError(f"max_chunk_bytes must be positive, got {max_chunk_bytes}")
    packer = msgpack.Packer(use_bin_type=True, strict_types=True)
    with open(path, "wb") as file:
        _write_tree(file, packer, params, max_chunk_bytes)


def _write_tree(file, packer: msgpack.Packer, tree, max_chunk_bytes: int):
    if callable(tree):
        tree = tree()
    if isinstance(tree, Mapping):
        file.write(packer.pack_map_header(len(tree)))
        for name, value in tree.items():
            file.write(packer.pack(str(name)))
            _write_tree(file, packer, value, max_chunk_bytes)
        return
    if isinstance(tree, np.generic):  # flax packs numpy scalars as ext 3 (before `float`: np.float64 is one)
        _write_ndarray(file, packer, np.asarray(tree), EXT_NPSCALAR)
        return
    if isinstance(tree, bool | int | float | str):  # the chunked-array marker and shapes
        file.write(packer.pack(tree))
        return
    array = np.asarray(tree)
    if array.nbytes > max_chunk_bytes:  # flax's `_chunk`: flat chunks of `max_chunk_bytes // itemsize` values
        per_chunk = max(1, max_chunk_bytes // array.dtype.itemsize)
        flat = array.reshape(-1)
        chunks = {str(i): flat[start:start + per_chunk] for i, start in enumerate(range(0, flat.size, per_chunk))}
        shape = {str(i): int(d) for i, d in enumerate(array.shape)}
        _write_tree(file, packer, {CHUNKED_ARRAY_MARKER: True, "shape": shape, "chunks": chunks}, max_chunk_bytes)
        return
    _write_ndarray(file, packer, array)


def _write_ndarray(file, packer: msgpack.Packer, array: np.ndarray, code: int = EXT_NDARRAY):
    """An ext-1 object; headers from `msgpack` (smallest encodings, as `packb` picks), the data written in place."""
    if not array.flags.c_contiguous:  # (np.ascontiguousarray would turn a 0-d array into 1-d)
        array = array.copy(order="C")
    head = packer.pack_array_header(3) + packer.pack([int(d) for d in array.shape]) + packer.pack(array.dtype.name)
    data_header = _bin_header(array.nbytes)
    length = len(head) + len(data_header) + array.nbytes
    file.write(_ext_header(length, code) + head + data_header)
    file.write(memoryview(array.reshape(-1)).cast("B"))


def _bin_header(n: int) -> bytes:
    if n < 2**8:
        return b"\xc4" + struct.pack(">B", n)
    if n < 2**16:
        return b"\xc5" + struct.pack(">H", n)
    return b"\xc6" + struct.pack(">I", n)


def _ext_header(n: int, code: int) -> bytes:
    fixed = {1: 0xD4, 2: 0xD5, 4: 0xD6, 8: 0xD7, 16: 0xD8}
    if n in fixed:
        return bytes([fixed[n], code])
    if n < 2**8:
        return b"\xc7" + struct.pack(">B", n) + bytes([code])
    if n < 2**16:
        return b"\xc8" + struct.pack(">H", n) + bytes([code])
    return b"\xc9" + struct.pack(">I", n) + bytes([code])
