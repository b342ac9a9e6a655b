"""A strict reader and writer of the safetensors format, with no torch and no extra copy.

The format: 8 bytes little-endian header length N, N bytes of JSON
(`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`), then the
raw little-endian tensor bytes. Every header field is checked against the file before any
data is read, so a truncated or corrupt file is refused with the tensor at fault named.
Tensors are read one at a time into a fresh buffer (no memory map), so loading never holds
more than the params plus one tensor.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from pathlib import Path
from typing import Mapping

import ml_dtypes
import numpy as np

from jaxpatch.errors import CorruptCheckpointError

__all__ = ["SAFETENSORS_DTYPES", "TensorInfo", "read_header", "read_tensor", "map_tensor",
           "write_file"]

SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024

if sys.byteorder != "little":  # pragma: no cover
    raise ImportError("jaxpatch reads safetensors on little-endian machines only")


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies in a safetensors file.

    Attributes:
        file: the file.
        name: the tensor's name.
        dtype: its numpy dtype.
        shape: its shape.
        offset: absolute byte offset of its data in the file.
        nbytes: its size in bytes.
    """

    file: Path
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def read_header(path: str | os.PathLike[str]) -> dict[str, TensorInfo]:
    """Reads and validates the header of a safetensors file.

    Arguments:
        path: the file.

    Returns:
        The tensors it holds, by name, in file order.

    Raises:
        CorruptCheckpointError: the file is too short, its header is malformed, a tensor's
            extent is inconsistent with its shape or lies past the end of the file, or two
            tensors overlap.

    Example:
        >>> import tempfile, numpy as np
        >>> f = Path(tempfile.mkdtemp()) / "x.safetensors"
        >>> write_file(f, {"w": np.zeros((2, 3), np.float32)})
        >>> read_header(f)["w"].shape
        (2, 3)
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CorruptCheckpointError(f"{path}: {size} bytes is too short for a safetensors file")
        header_len = int.from_bytes(prefix, "little")
        if header_len > min(size - 8, _MAX_HEADER):
            raise CorruptCheckpointError(
                f"{path}: header length {header_len} exceeds the file size {size}: "
                "the file is truncated or not safetensors")
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCheckpointError(f"{path}: the header is not valid JSON ({e})") from None
    except RecursionError:
        raise CorruptCheckpointError(f"{path}: the header nests too deeply") from None
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{path}: the header is not a JSON object")
    data_start = 8 + header_len
    infos = sorted((_tensor_info(path, name, entry, data_start, size)
                    for name, entry in header.items() if name != "__metadata__"),
                   key=lambda i: (i.offset, i.nbytes))
    for before, after in zip(infos, infos[1:]):
        if after.offset < before.offset + before.nbytes:
            raise CorruptCheckpointError(
                f"{path}: tensors {before.name!r} and {after.name!r} overlap in the file")
    return {info.name: info for info in infos}


def _tensor_info(path: Path, name: str, entry: object, data_start: int, size: int) -> TensorInfo:
    def corrupt(why: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{path}: tensor {name!r} {why}")

    if not isinstance(entry, dict):
        raise corrupt("has a malformed header entry")
    dtype = SAFETENSORS_DTYPES.get(entry.get("dtype"))  # type: ignore[arg-type]
    if dtype is None:
        raise corrupt(f"has unsupported dtype {entry.get('dtype')!r} "
                      f"(supported: {', '.join(SAFETENSORS_DTYPES)})")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not (isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)):
        raise corrupt(f"has a malformed shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(isinstance(o, int) for o in offsets) and 0 <= offsets[0] <= offsets[1]):
        raise corrupt(f"has malformed data_offsets {offsets!r}")
    nbytes = offsets[1] - offsets[0]
    if nbytes != math.prod(shape) * dtype.itemsize:
        raise corrupt(f"of shape {tuple(shape)} and dtype {entry['dtype']} needs "
                      f"{math.prod(shape) * dtype.itemsize} bytes but its extent holds {nbytes}")
    if data_start + offsets[1] > size:
        raise corrupt(f"ends at byte {data_start + offsets[1]} but the file has only {size} bytes: "
                      "the file is truncated")
    return TensorInfo(path, name, dtype, tuple(shape), data_start + offsets[0], nbytes)


def read_tensor(info: TensorInfo) -> np.ndarray:
    """Reads one tensor into a new numpy array of its stored dtype.

    Example:
        >>> import tempfile, numpy as np
        >>> f = Path(tempfile.mkdtemp()) / "x.safetensors"
        >>> write_file(f, {"w": np.arange(3, dtype=np.float32)})
        >>> read_tensor(read_header(f)["w"]).tolist()
        [0.0, 1.0, 2.0]
    """
    out = np.empty(info.shape, info.dtype)
    with open(info.file, "rb") as f:
        f.seek(info.offset)
        got = f.readinto(out.reshape(-1).view(np.uint8).data) if info.nbytes else 0
    if got != info.nbytes:
        raise CorruptCheckpointError(
            f"{info.file}: tensor {info.name!r} could be read only {got} of {info.nbytes} bytes")
    return out


def map_tensor(info: TensorInfo) -> np.ndarray:
    """One tensor as a read-only memory map of the file: slicing it reads only the bytes of the
    slice (what a loader that places shards on devices needs).

    Example:
        >>> import tempfile, numpy as np
        >>> f = Path(tempfile.mkdtemp()) / "x.safetensors"
        >>> write_file(f, {"w": np.arange(6, dtype=np.float32).reshape(2, 3)})
        >>> np.array(map_tensor(read_header(f)["w"])[:, 1]).tolist()
        [1.0, 4.0]
    """
    if not info.nbytes:
        return np.empty(info.shape, info.dtype)
    return np.memmap(info.file, dtype=info.dtype, mode="r", offset=info.offset, shape=info.shape)


def write_file(path: str | os.PathLike[str], tensors: Mapping[str, np.ndarray],
               metadata: Mapping[str, str] | None = None) -> None:
    """Writes tensors to one safetensors file (readable by the safetensors library and torch).

    Arguments:
        path: the file to write (written in place: callers write into a temporary folder).
        tensors: arrays by name, written in name order.
        metadata: optional string-to-string metadata (`{"format": "pt"}` for transformers).

    Example:
        >>> import tempfile, numpy as np
        >>> f = Path(tempfile.mkdtemp()) / "x.safetensors"
        >>> write_file(f, {"b": np.ones(2, np.float16)}, {"format": "pt"})
        >>> read_header(f)["b"].dtype
        dtype('float16')
    """
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    arrays = {name: np.ascontiguousarray(tensors[name]) for name in sorted(tensors)}
    offset = 0
    for name, array in arrays.items():
        if array.dtype not in _NAMES:
            raise ValueError(f"tensor {name!r} has dtype {array.dtype}, which safetensors cannot hold")
        header[name] = {"dtype": _NAMES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for array in arrays.values():
            f.write(array.reshape(-1).view(np.uint8).data)
