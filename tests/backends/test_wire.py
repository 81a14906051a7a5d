"""Hidden states between stages: the (dtype, shape, bytes) triple a Frame carries is checked
before any backend sees it."""

import numpy as np
import pytest

from backends.wire import Hidden, WireError


@pytest.mark.parametrize("dtype,np_dtype", [("float32", np.float32), ("float16", np.float16),
                                            ("bfloat16", np.uint16)])
def test_copy_is_exact_and_owns_its_bytes(dtype, np_dtype):
    a = (np.arange(3 * 8) % 251).astype(np_dtype).reshape(3, 8)
    h = Hidden(memoryview(a), dtype, (3, 8))
    assert h.nbytes == a.nbytes
    back = h.copy()
    assert back.shape == (3, 8) and back.dtype == dtype
    assert bytes(back.data) == a.tobytes()
    a[0, 0] += 1  # the sender may reuse its buffer: the copy must not change with it
    assert bytes(back.data) != a.tobytes() and bytes(h.data) == a.tobytes()


def test_bfloat16_numpy_view():
    f = np.array([[1.5, -2.25]], np.float32)
    bf = (f.view(np.uint32) >> 16).astype(np.uint16)
    assert np.array_equal(Hidden(bf.tobytes(), "bfloat16", (1, 2)).numpy(), f)


@pytest.mark.parametrize("data,dtype,shape,msg", [
    (b"\0" * 31, "float32", (2, 4), "payload is 31 bytes but float32\\[2, 4\\] needs 32"),
    (b"\0" * 33, "float32", (2, 4), "needs 32"),
    (b"\0" * 32, "float16", (2, 4), "needs 16"),  # the right count for float32, not for float16
    (b"", "float32", (2, 4), "needs 32"),
    (b"\0" * 8, "int8", (8,), "unknown dtype 'int8'"),
    (b"\0" * 8, "", (2,), "unknown dtype"),
    (b"\0" * 8, "float32", (-2, -1), "bad shape"),
    (b"\0" * 8, "float32", (2.0,), "bad shape"),
    (b"", "float32", (2**31, 2**31), "too large"),
    (b"", "float32", (2**16,) * 4, "too large"),
])
def test_inconsistent_triples_are_rejected(data, dtype, shape, msg):
    with pytest.raises(WireError, match=msg):
        Hidden(data, dtype, shape)


def test_a_frame_triple_is_checked_like_a_local_one():
    """The mesh rebuilds Hidden from a Frame's fields (bytes and a repeated uint32 shape)."""
    from protos import together_pb2 as pb

    a = np.ones((2, 4), np.float16)
    f = pb.Frame(dtype="float16", shape=[2, 4], data=a.tobytes())
    assert np.array_equal(Hidden(f.data, f.dtype, tuple(f.shape)).numpy(), a)
    f.data = f.data[:-1]
    with pytest.raises(WireError, match="15 bytes"):
        Hidden(f.data, f.dtype, tuple(f.shape))
