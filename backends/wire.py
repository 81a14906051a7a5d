"""Hidden states between stages: raw bytes with their dtype and shape. A mesh Frame carries this
triple in its own fields (dtype, shape, data); a receiver rebuilds a Hidden from it, which checks
that the three agree before any backend sees the bytes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DTYPES = {"float32": 4, "float16": 2, "bfloat16": 2}
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

    def copy(self) -> "Hidden":
        """What the next stage receives: the same triple with bytes of its own, checked again (the
        in-process pipeline's hop; the sender may reuse its buffer)."""
        return Hidden(bytes(memoryview(self.data).cast("B")), self.dtype, tuple(self.shape))

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
