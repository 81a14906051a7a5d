"""Hidden states on the wire: a small header (dtype, shape) and the raw bytes, no copies."""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

DTYPES = {"float32": 4, "float16": 2, "bfloat16": 2}
_CODES = {"float32": 0, "float16": 1, "bfloat16": 2}
_NAMES = {v: k for k, v in _CODES.items()}
_HEAD = struct.Struct("<4sBB")  # magic, dtype code, ndim; then ndim little-endian uint32 dims
MAGIC = b"TGH1"
MAX_ELEMENTS = 1 << 31


class WireError(ValueError):
    """A frame whose header and payload disagree."""


@dataclass
class Hidden:
    """Backend-neutral hidden states: raw bytes plus dtype and shape, e.g. (tokens, hidden_size)."""

    data: memoryview | bytes
    dtype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        check(self.dtype, self.shape, len(memoryview(self.data).cast("B")))

    @property
    def nbytes(self) -> int:
        return len(memoryview(self.data).cast("B"))

    def numpy(self) -> np.ndarray:
        """float32 view/copy for inspection and tests."""
        buf = np.frombuffer(self.data, dtype={"float32": np.float32, "float16": np.float16,
                                              "bfloat16": np.uint16}[self.dtype])
        if self.dtype == "bfloat16":
            buf = (buf.astype(np.uint32) << 16).view(np.float32)
        return buf.reshape(self.shape)


def check(dtype: str, shape: tuple[int, ...], nbytes: int) -> None:
    """Raise WireError unless nbytes == elements(shape) * itemsize(dtype)."""
    if dtype not in DTYPES:
        raise WireError(f"unknown dtype {dtype!r} (expected one of {', '.join(DTYPES)})")
    n = 1
    for d in shape:
        if not isinstance(d, int) or d < 0:
            raise WireError(f"bad shape {shape}")
        n *= d
    if n > MAX_ELEMENTS:
        raise WireError(f"shape {shape} is too large")
    if n * DTYPES[dtype] != nbytes:
        raise WireError(f"payload is {nbytes} bytes but {dtype}{list(shape)} needs {n * DTYPES[dtype]}")


def encode(h: Hidden) -> list[bytes | memoryview]:
    """Header and payload as separate buffers (join them only if the transport needs one)."""
    head = _HEAD.pack(MAGIC, _CODES[h.dtype], len(h.shape)) + struct.pack(f"<{len(h.shape)}I", *h.shape)
    return [head, memoryview(h.data).cast("B")]


def decode(buf: bytes | memoryview) -> Hidden:
    """Parse header + payload from one buffer; the payload is a view, not a copy."""
    mv = memoryview(buf).cast("B")
    if len(mv) < _HEAD.size:
        raise WireError("frame shorter than its header")
    magic, code, ndim = _HEAD.unpack_from(mv)
    if magic != MAGIC:
        raise WireError("bad magic: not a together hidden-state frame")
    if code not in _NAMES:
        raise WireError(f"unknown dtype code {code}")
    end = _HEAD.size + 4 * ndim
    if len(mv) < end:
        raise WireError("frame shorter than its shape")
    shape = struct.unpack_from(f"<{ndim}I", mv, _HEAD.size)
    return Hidden(mv[end:], _NAMES[code], tuple(shape))
