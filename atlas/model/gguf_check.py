"""Say what is wrong with a GGUF file that failed to load: not GGUF, or cut short.

A truncated download fails deep inside the loader with a message such as "cannot reshape
array of size 375744 into shape (1536,360)". This walks the file's header (key/value
metadata and tensor table, without reading the data), computes where the last tensor's
bytes must end, and compares that with the file's size, so the error can say "truncated".
It runs only after a load has failed, so a good file costs nothing.
"""

from __future__ import annotations

import struct
from pathlib import Path

_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}   # GGUF value type -> bytes
_STRING, _ARRAY = 8, 9


class _Short(Exception):
    """The header ends before the file does."""


class _Reader:
    def __init__(self, data: memoryview):
        self.data, self.pos = data, 0

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.data):
            raise _Short
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack("<Q", self.take(8))[0]

    def string(self) -> bytes:
        return bytes(self.take(self.u64()))

    def skip_value(self, kind: int) -> None:
        if kind in _SCALARS:
            self.take(_SCALARS[kind])
        elif kind == _STRING:
            self.take(self.u64())
        elif kind == _ARRAY:
            item, n = self.u32(), self.u64()
            if item in _SCALARS:
                self.take(_SCALARS[item] * n)
            else:
                for _ in range(n):
                    self.skip_value(item)
        else:
            raise ValueError(f"unknown metadata value type {kind}")


def gguf_problem(path: str | Path) -> str | None:
    """A one-line description of why ``path`` is not a whole GGUF file, or None if it looks whole."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    raw = path.read_bytes()
    size = len(raw)
    if raw[:4] != b"GGUF":
        return f"{path.name} is not a GGUF file (it does not start with 'GGUF')"
    r = _Reader(memoryview(raw))
    try:
        r.take(4)
        version, n_tensors, n_kv = r.u32(), r.u64(), r.u64()
        alignment = 32
        for _ in range(n_kv):
            key, kind = r.string(), r.u32()
            if key == b"general.alignment" and kind == 4:
                alignment = r.u32()
            else:
                r.skip_value(kind)
        end = 0
        for _ in range(n_tensors):
            r.string()
            dims = [r.u64() for _ in range(r.u32())]
            kind, offset = r.u32(), r.u64()
            block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
            elements = 1
            for d in dims:
                elements *= d
            end = max(end, offset + elements // block * block_bytes)
    except _Short:
        return f"GGUF file {path.name} is truncated: {size:,} bytes end inside its header"
    except (ValueError, KeyError) as e:
        return f"GGUF file {path.name} (version {version}) has a damaged header ({e})"
    data_start = -(-r.pos // alignment) * alignment
    if data_start + end > size:
        return (f"GGUF file {path.name} is truncated: {size:,} bytes, but its {n_tensors} tensors "
                f"need {data_start + end:,}")
    return None
