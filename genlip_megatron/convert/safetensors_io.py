"""Streaming safetensors I/O: one tensor in memory at a time, no memory map kept open.

``safetensors.torch.save_file`` needs every tensor in memory at once, and ``safe_open`` keeps
the whole file mapped (touched pages count towards RSS until it closes). A g/16 checkpoint is
~3 GB in bf16, so the converter writes the header first (all names, dtypes and shapes are known
from the mapping) and then appends tensors one by one, and reads tensors with plain file reads.
The files are ordinary safetensors (checked against the ``safetensors`` library in the tests).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Optional

import torch

__all__ = ["SafetensorsReader", "SafetensorsStreamWriter", "DTYPES", "dtype_from_name"]

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
_NAMES = {v: k for k, v in DTYPES.items()}

_USER_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32,
                "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16}


def dtype_from_name(name: str) -> torch.dtype:
    """``"bf16" | "fp32" | "fp16"`` (or the long names) → torch dtype."""
    if name not in _USER_DTYPES:
        raise ValueError(f"--dtype {name!r} is not one of bf16, fp32, fp16.")
    return _USER_DTYPES[name]


class SafetensorsReader:
    """Reads tensors of one or more safetensors files (``model.safetensors`` or an index).

    Args:
        path: a ``.safetensors`` file, or a directory with ``model.safetensors`` or
            ``model.safetensors.index.json``.
    """

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        files: list[Path]
        if path.is_dir():
            index = path / "model.safetensors.index.json"
            if (path / "model.safetensors").is_file():
                files = [path / "model.safetensors"]
            elif index.is_file():
                names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
                files = [path / n for n in names]
            else:
                raise FileNotFoundError(f"{path} has no model.safetensors (or "
                                        "model.safetensors.index.json); is it an HF export?")
        else:
            files = [path]
        self.entries: dict[str, tuple[Path, str, tuple[int, ...], int, int]] = {}
        self.metadata: dict[str, str] = {}
        for f in files:
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
            self.metadata.update(header.pop("__metadata__", None) or {})
            for name, info in header.items():
                begin, end = info["data_offsets"]
                self.entries[name] = (f, info["dtype"], tuple(info["shape"]), 8 + n + begin,
                                      end - begin)

    def keys(self) -> list[str]:
        """Tensor names in file order."""
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of ``name`` (from the header, no data read)."""
        return self.entries[name][2]

    def dtype(self, name: str) -> torch.dtype:
        """Stored dtype of ``name``."""
        return DTYPES[self.entries[name][1]]

    def nbytes(self) -> int:
        """Total tensor bytes."""
        return sum(e[4] for e in self.entries.values())

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor (a fresh CPU tensor owning its memory)."""
        if name not in self.entries:
            raise KeyError(f"{name} is not in the safetensors file(s).")
        f, dt, shape, offset, length = self.entries[name]
        buf = bytearray(length)
        with open(f, "rb") as fh:
            fh.seek(offset)
            if fh.readinto(buf) != length:
                raise OSError(f"{f} is truncated (tensor {name}).")
        if length == 0:
            return torch.empty(shape, dtype=DTYPES[dt])
        return torch.frombuffer(buf, dtype=DTYPES[dt]).reshape(shape)


class SafetensorsStreamWriter:
    """Writes a safetensors file whose tensor list is declared up front.

    Usage::

        with SafetensorsStreamWriter(path, [(name, shape, dtype), ...]) as w:
            for name, tensor in produce():   # in the declared order
                w.write(name, tensor)
    """

    def __init__(self, path: str | Path, layout: list[tuple[str, tuple[int, ...], torch.dtype]],
                 metadata: Optional[dict[str, str]] = None) -> None:
        self.path = Path(path)
        self.layout = layout
        header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        for name, shape, dtype in layout:
            nbytes = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": _NAMES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # 8-byte aligned data, as the safetensors library writes
        self._header = raw
        self._next = 0
        self._fh = None

    def __enter__(self) -> "SafetensorsStreamWriter":
        self._fh = open(self.path, "wb")
        self._fh.write(struct.pack("<Q", len(self._header)))
        self._fh.write(self._header)
        return self

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor; it must match the declared name, shape and dtype."""
        if self._next >= len(self.layout):
            raise AssertionError(f"{name}: more tensors written than declared")
        want, shape, dtype = self.layout[self._next]
        if name != want or tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise AssertionError(f"expected {want} {tuple(shape)} {dtype}, got {name} "
                                 f"{tuple(tensor.shape)} {tensor.dtype}")
        t = tensor.detach().contiguous().cpu()
        if t.numel():
            self._fh.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        self._next += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        self._fh.close()
        if exc_type is None and self._next != len(self.layout):
            raise AssertionError(f"only {self._next} of {len(self.layout)} declared tensors "
                                 f"were written to {self.path}")
