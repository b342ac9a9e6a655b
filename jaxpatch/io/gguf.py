"""A strict reader of the GGUF format (llama.cpp's single-file checkpoints), no memory copies of
the file, every count and offset checked before it is used.

The format (version 2 and 3, little-endian): the magic `GGUF`, a uint32 version, uint64 tensor
and key-value counts; the key-value metadata (a key string, a uint32 value type, the value;
strings are a uint64 length and UTF-8 bytes, arrays a uint32 item type, a uint64 count and the
items); one entry per tensor (name, uint32 number of dimensions, uint64 dimensions innermost
first, uint32 ggml type, uint64 offset into the data section); then, aligned to
`general.alignment` (32 by default), the data section.

GGUF files are untrusted input: a count that could not fit in the rest of the file, a string
that is not UTF-8, a tensor whose extent lies past the end of the file or overlaps another, a
dimension that does not fill whole quantization blocks: each is refused in one line naming the
file and the entry at fault, before anything is allocated from it. Quantized tensors are
dequantized with the `gguf` package (llama.cpp's own Python port of its kernels), an optional
extra: `pip install "jaxpatch[gguf]"`.
"""

from __future__ import annotations

import dataclasses
import math
import mmap
import os
import struct
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from jaxpatch.errors import CorruptCheckpointError, UnsupportedConfigError

__all__ = ["GGML_TYPES", "SUPPORTED_TYPES", "GGUFTensor", "GGUFFile", "read_gguf", "read_gguf_tensor"]

# ggml type id -> (name, elements per block, bytes per block), from ggml.h.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292), 16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4),
    27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2),
}
# The types jaxpatch dequantizes (float and the llama.cpp block quantizations in common use).
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K",
                   "Q4_K", "Q5_K", "Q6_K")

_MAGIC = b"GGUF"
_MAX_DIMS = 4
_MAX_ELEMENTS = 1 << 40
# value type id -> struct format of a scalar (8: string, 9: array are handled apart).
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
            11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclasses.dataclass(frozen=True)
class GGUFTensor:
    """Where one tensor lies in a GGUF file.

    Attributes:
        name: its GGUF name (`blk.3.attn_q.weight`).
        shape: numpy order (outermost first: a torch Linear's `[out, in]`).
        type: the ggml type name (`Q4_K`, `F32`, ...).
        offset: absolute byte offset of its data in the file.
        nbytes: its size in bytes.
    """

    name: str
    shape: tuple[int, ...]
    type: str
    offset: int
    nbytes: int


@dataclasses.dataclass(frozen=True)
class GGUFFile:
    """A parsed GGUF header.

    Attributes:
        path: the file.
        version: the GGUF version (2 or 3).
        metadata: key -> value (str, int, float, bool, or a list of them).
        tensors: name -> `GGUFTensor`, in file order.
    """

    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensor]


class _Cursor:
    """Reads little-endian values from a buffer, refusing to read past its end."""

    def __init__(self, buffer: Any, path: Path) -> None:
        self.buffer = buffer
        self.size = len(buffer)
        self.pos = 0
        self.path = path

    def fail(self, what: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{self.path}: {what} (not a valid GGUF file)")

    def take(self, n: int, what: str) -> int:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"{what} runs past the end of the file at byte {self.pos}")
        start = self.pos
        self.pos += n
        return start

    def scalar(self, fmt: str, what: str) -> Any:
        start = self.take(struct.calcsize(fmt), what)
        return struct.unpack_from(fmt, self.buffer, start)[0]

    def string(self, what: str) -> str:
        n = self.scalar("<Q", what)
        start = self.take(n, what)
        try:
            return bytes(self.buffer[start:start + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8") from None

    def count(self, what: str, smallest_item: int) -> int:
        n = self.scalar("<Q", what)
        if n * smallest_item > self.size - self.pos:
            raise self.fail(f"{what} claims {n} entries, more than the rest of the file holds")
        return n

    def value(self, kind: int, what: str, nested: bool = False) -> Any:
        if kind in _SCALARS:
            return self.scalar(_SCALARS[kind], what)
        if kind == _STRING:
            return self.string(what)
        if kind == _ARRAY and not nested:
            item = self.scalar("<I", what)
            if item == _ARRAY or (item != _STRING and item not in _SCALARS):
                raise self.fail(f"{what} is an array of unsupported value type {item}")
            if item == _STRING:
                return [self.string(what) for _ in range(self.count(what, 8))]
            fmt = _SCALARS[item]
            n = self.count(what, struct.calcsize(fmt))
            start = self.take(n * struct.calcsize(fmt), what)
            values = np.frombuffer(self.buffer, np.dtype(fmt), n, start)
            return values.tolist()
        raise self.fail(f"{what} has unknown value type {kind}")


def read_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Parses and checks a GGUF file's header (metadata and tensor table); reads no tensor data.

    Arguments:
        path: the `.gguf` file.

    Returns:
        A `GGUFFile`.

    Raises:
        CorruptCheckpointError: the header is malformed or lies about the file.
        UnsupportedConfigError: the GGUF version is not 2 or 3.

    Example:
        >>> header = read_gguf(fixtures / "gemma3.gguf")
        >>> header.metadata["general.architecture"], header.tensors["output_norm.weight"].type
        ('gemma3', 'F32')
    """
    file = Path(path)
    with open(file, "rb") as handle, _mapped(handle) as buffer:
        cursor = _Cursor(buffer, file)
        if cursor.size < 24 or bytes(buffer[:4]) != _MAGIC:
            raise cursor.fail("the file does not start with the GGUF magic")
        cursor.take(4, "magic")
        version = cursor.scalar("<I", "version")
        if version not in (2, 3):
            raise UnsupportedConfigError(f"{file}: GGUF version {version} is not supported "
                                         "(supported: 2, 3)")
        n_tensors = cursor.count("the tensor count", 24)
        n_values = cursor.count("the metadata count", 13)
        metadata: dict[str, Any] = {}
        for _ in range(n_values):
            key = cursor.string("a metadata key")
            if key in metadata:
                raise cursor.fail(f"metadata key {key!r} appears twice")
            metadata[key] = cursor.value(cursor.scalar("<I", key), f"metadata {key!r}")
        entries = [_tensor_entry(cursor) for _ in range(n_tensors)]
        alignment = metadata.get("general.alignment", 32)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise cursor.fail(f"general.alignment={alignment!r} is not a power of two")
        data_start = -(-cursor.pos // alignment) * alignment
        tensors = _place(file, entries, data_start, cursor.size, alignment)
    return GGUFFile(file, version, metadata, tensors)


def _mapped(handle: Any) -> Any:
    """A read-only memory map of an open file (an empty bytes object for an empty file)."""
    if os.fstat(handle.fileno()).st_size == 0:
        return memoryview(b"")
    return mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)


def _tensor_entry(cursor: _Cursor) -> tuple[str, tuple[int, ...], int, int]:
    name = cursor.string("a tensor name")
    n_dims = cursor.scalar("<I", f"tensor {name!r}")
    if not 1 <= n_dims <= _MAX_DIMS:
        raise cursor.fail(f"tensor {name!r} has {n_dims} dimensions (1 to {_MAX_DIMS} allowed)")
    dims = tuple(cursor.scalar("<Q", f"tensor {name!r}") for _ in range(n_dims))
    kind = cursor.scalar("<I", f"tensor {name!r}")
    offset = cursor.scalar("<Q", f"tensor {name!r}")
    return name, dims, kind, offset


def _place(file: Path, entries: list[tuple[str, tuple[int, ...], int, int]], data_start: int,
           size: int, alignment: int) -> dict[str, GGUFTensor]:
    """Checks every tensor's type, shape and extent, and that no two overlap."""
    tensors: dict[str, GGUFTensor] = {}
    for name, dims, kind, offset in entries:
        where = f"{file}: tensor {name!r}"
        if name in tensors:
            raise CorruptCheckpointError(f"{where} appears twice")
        if kind not in GGML_TYPES:
            raise CorruptCheckpointError(f"{where} has unknown ggml type {kind}")
        type_name, block, block_bytes = GGML_TYPES[kind]
        if min(dims) < 1 or math.prod(dims) > _MAX_ELEMENTS:
            raise CorruptCheckpointError(f"{where} has an absurd shape {list(dims)}")
        if dims[0] % block:
            raise CorruptCheckpointError(
                f"{where}: its rows of {dims[0]} do not fill whole {type_name} blocks of {block}")
        nbytes = math.prod(dims) // block * block_bytes
        if offset % alignment:
            raise CorruptCheckpointError(f"{where} starts at an unaligned offset {offset}")
        start = data_start + offset
        if start + nbytes > size:
            raise CorruptCheckpointError(
                f"{where} ({nbytes} bytes at offset {offset}) lies past the end of the file")
        tensors[name] = GGUFTensor(name, tuple(reversed(dims)), type_name, start, nbytes)
    ordered = sorted(tensors.values(), key=lambda t: t.offset)
    for a, b in zip(ordered, ordered[1:]):
        if a.offset + a.nbytes > b.offset:
            raise CorruptCheckpointError(f"{file}: tensors {a.name!r} and {b.name!r} overlap")
    return tensors


def read_gguf_tensor(header: GGUFFile, name: str, dtype: np.dtype | None = None) -> np.ndarray:
    """One tensor of a GGUF file, dequantized.

    Arguments:
        header: from `read_gguf`.
        name: the tensor's GGUF name.
        dtype: the result's dtype (default float32).

    Returns:
        A fresh array of shape `header.tensors[name].shape`.

    Raises:
        UnsupportedConfigError: the tensor's type is not in `SUPPORTED_TYPES` (named), or a
            quantized tensor is read without the `gguf` package installed.

    Example:
        >>> header = read_gguf(fixtures / "gemma3.gguf")
        >>> read_gguf_tensor(header, "blk.0.attn_v.weight").shape  # Q8_0, dequantized
        (256, 256)
    """
    info = header.tensors[name]
    if info.type not in SUPPORTED_TYPES:
        raise UnsupportedConfigError(
            f"{header.path}: tensor {name!r} is stored as {info.type}, which jaxpatch does not "
            f"dequantize (supported: {', '.join(SUPPORTED_TYPES)})")
    with open(header.path, "rb") as handle:
        handle.seek(info.offset)
        raw = np.frombuffer(handle.read(info.nbytes), np.uint8)
    if len(raw) != info.nbytes:
        raise CorruptCheckpointError(f"{header.path}: tensor {name!r} is truncated")
    if info.type in ("F32", "F16", "BF16"):
        plain = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}[info.type]
        values = raw.view(plain).astype(np.float32)
    else:
        values = _dequantize(raw.reshape(-1, _row_bytes(info)), info.type)
    out = values.reshape(info.shape)
    return out if dtype is None or out.dtype == dtype else out.astype(dtype)


_BY_NAME = {name: (block, block_bytes) for name, block, block_bytes in GGML_TYPES.values()}


def _row_bytes(info: GGUFTensor) -> int:
    block, block_bytes = _BY_NAME[info.type]
    return info.shape[-1] // block * block_bytes


def _dequantize(rows: np.ndarray, type_name: str) -> np.ndarray:
    try:
        from gguf import GGMLQuantizationType, quants
    except ImportError:
        raise UnsupportedConfigError(
            f"dequantizing {type_name} tensors needs the gguf package: "
            "pip install 'jaxpatch[gguf]'") from None
    return np.asarray(quants.dequantize(rows, GGMLQuantizationType[type_name]), np.float32)
