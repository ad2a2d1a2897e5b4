"""Reading and writing tensor files safely.

`SafetensorsFile` parses the header itself and checks every promise it makes (sizes, offsets, dtypes,
overlaps) before any tensor is touched, then hands out tensors that are views of a copy-on-write memory map:
loading a 7 GB file costs page cache, not a second copy in RAM. Pickle files (`.ckpt`, `.pt`, `.bin`) are
refused unless the caller opts in, and then only go through `torch.load(weights_only=True)`.
Writes are atomic (`sdxl.files.atomic_write`: a temporary file in the same folder, fsync, then rename).
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from .. import files
from ..errors import CheckpointError

DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
}
DTYPE_NAMES = {v[0]: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024
PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl"}


def _is_count(x) -> bool:
    """A non-negative JSON integer (not a bool, which Python counts as an int)."""
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _show(value, limit: int = 60) -> str:
    """repr() cut to `limit` characters: a hostile header can hold a shape list megabytes long."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_header(head: bytes, data_size: int, name: str = "file") -> tuple[dict, dict[str, str]]:
    """Validate a safetensors JSON header against the size of the data that follows it.

    Returns (entries, metadata) with entries[key] = (dtype_name, shape, begin, end). Raises CheckpointError.
    """
    try:
        header = json.loads(head.decode("utf-8"))
    # ValueError covers bad UTF-8, bad JSON and integers of more than 4300 digits; RecursionError deep nesting
    except (ValueError, RecursionError) as e:
        raise CheckpointError(
            f"{name}: safetensors header is not valid JSON ({e.__class__.__name__})"
        ) from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{name}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CheckpointError(f"{name}: __metadata__ must map strings to strings")
    entries = {}
    for key, info in header.items():
        if not isinstance(info, dict):
            raise CheckpointError(f"{name}: tensor {_show(key)} has a malformed header entry")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPES:  # (a list or dict is not even hashable)
            raise CheckpointError(f"{name}: tensor {_show(key)} has unknown dtype {_show(dtype)}")
        # JSON true/false are Python ints too; sizes must also fit torch's int64 shapes and strides, which
        # a zero-element tensor of shape [0, 10**30] would not (its byte count, 0, is otherwise fine).
        if (
            not isinstance(shape, list)
            or not all(_is_count(s) for s in shape)
            or math.prod(max(s, 1) for s in shape) * DTYPES[dtype][1] >= 2**63
        ):
            raise CheckpointError(f"{name}: tensor {_show(key)} has an invalid shape {_show(shape)}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_count(o) for o in offsets)
            or offsets[0] > offsets[1]
        ):
            raise CheckpointError(f"{name}: tensor {_show(key)} has invalid data_offsets {_show(offsets)}")
        begin, end = offsets
        if end > data_size:
            raise CheckpointError(
                f"{name}: tensor {_show(key)} ends at byte {_show(end)} but the file holds {data_size} "
                "data bytes (truncated file?)"
            )
        if end - begin != math.prod(shape) * DTYPES[dtype][1]:
            raise CheckpointError(
                f"{name}: tensor {_show(key)} claims shape {_show(shape)} {dtype} "
                f"but spans {end - begin} bytes"
            )
        entries[key] = (dtype, tuple(shape), begin, end)
    spans = sorted((b, e, k) for k, (_, _, b, e) in entries.items() if e > b)
    for (_b0, e0, k0), (b1, _e1, k1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise CheckpointError(f"{name}: tensors {_show(k0)} and {_show(k1)} overlap in the file")
    return entries, metadata


class SafetensorsFile(Mapping):
    """A validated, memory-mapped safetensors file. `f[key]` is a tensor view (copy-on-write)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        name = str(self.path)
        if not self.path.exists():
            raise CheckpointError(f"{name}: no such file")
        if self.path.is_dir():
            raise CheckpointError(f"{name}: is a folder, not a safetensors file")
        size = self.path.stat().st_size
        if size < 8:
            raise CheckpointError(f"{name}: too short to be a safetensors file ({size} bytes)")
        with open(self.path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > MAX_HEADER or n > size - 8:
                raise CheckpointError(f"{name}: not a safetensors file (header length {n} does not fit)")
            head = f.read(n)
        self.data_start = 8 + n
        self.entries, self.metadata = parse_header(head, size - self.data_start, name)
        self._mmap = None

    def _map(self):
        if self._mmap is None:
            with open(self.path, "rb") as f:
                # ACCESS_COPY: writable for torch.frombuffer, but writes never reach the file.
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if self.entries else b""
        return self._mmap

    def __getitem__(self, key: str) -> torch.Tensor:
        dtype, shape, begin, end = self.entries[key]
        tdtype = DTYPES[dtype][0]
        if end == begin:
            return torch.empty(shape, dtype=tdtype)
        count = (end - begin) // DTYPES[dtype][1]
        t = torch.frombuffer(self._map(), dtype=tdtype, count=count, offset=self.data_start + begin)
        return t.reshape(shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.entries[key][1]

    def dtype(self, key: str) -> str:
        return self.entries[key][0]


class ShapeDict(dict):
    """A plain dict of tensors that answers `.shape(key)` like SafetensorsFile (for detection)."""

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self[key].shape)

    def dtype(self, key: str) -> str:
        return DTYPE_NAMES.get(self[key].dtype, str(self[key].dtype))


def open_tensors(path: str | os.PathLike, allow_pickle: bool = False) -> Mapping:
    """Open a tensor file: safetensors (validated, mmap), or a pickle only with `allow_pickle=True`."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise CheckpointError(
                f"{path}: pickle checkpoints can run code when loaded and are refused; convert it to "
                "safetensors, or pass --allow-pickle to load it with torch.load(weights_only=True)"
            )
        if not path.is_file():
            raise CheckpointError(f"{path}: no such file")
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # noqa: BLE001 - any failure here is a bad file
            raise CheckpointError(f"{path}: could not be read as a weights-only pickle ({e})") from None
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
        if not isinstance(sd, dict):
            raise CheckpointError(f"{path}: holds no state dict")
        return ShapeDict({k: v for k, v in sd.items() if isinstance(v, torch.Tensor)})
    if path.is_file():
        with open(path, "rb") as f:
            magic = f.read(9)
        # A safetensors file starts with its header length (little-endian u64) and then '{'. The length's
        # low byte is 0x80 for one valid file in 32 (headers are padded to 8 bytes), so the pickle sniff
        # below must not run on something that is laid out like safetensors.
        header_fits = len(magic) == 9 and 8 + struct.unpack("<Q", magic[:8])[0] <= path.stat().st_size
        looks_safetensors = header_fits and magic[8:9] == b"{"
        if not looks_safetensors and (magic[:2] == b"PK" or magic[:1] == b"\x80"):
            raise CheckpointError(
                f"{path}: is a pickle/zip checkpoint, not safetensors; rename it to .ckpt and pass "
                "--allow-pickle if you trust it"
            )
    return SafetensorsFile(path)


def _tensor_bytes(tensors: Mapping[str, torch.Tensor], order: list[str]) -> Iterator[bytes]:
    """The data section of a safetensors file: each tensor's raw bytes (CPU, contiguous) in `order`."""
    for k in order:
        t = tensors[k].detach().to("cpu").contiguous()
        if t.numel():
            yield t.reshape(-1).view(torch.uint8).numpy().tobytes()


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata=None) -> Path:
    """Write a safetensors file atomically (`sdxl.files.atomic_write`), streaming tensor by tensor (no
    second copy in RAM). Tensors are stored in sorted key order."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    order = sorted(tensors)
    for k in order:
        t = tensors[k]
        if t.dtype not in DTYPE_NAMES:
            raise CheckpointError(f"{path}: cannot store tensor {k!r} of dtype {t.dtype}")
        n = t.numel() * t.element_size()
        header[k] = {
            "dtype": DTYPE_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)

    def write(f):
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for block in _tensor_bytes(tensors, order):
            f.write(block)

    files.atomic_write(path, write)  # looked up on the module, so tests can wrap the one write path
    return path


def tensor_data_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 (hex) of the data section `save_safetensors` writes for `tensors`, without writing it: the
    "addnet" hash kohya stores as `sshs_model_hash`, equal to `sdxl.metadata.addnet_hash` of the file."""
    h = hashlib.sha256()
    for block in _tensor_bytes(tensors, sorted(tensors)):  # save_safetensors' order
        h.update(block)
    return h.hexdigest()
