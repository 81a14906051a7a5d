import numpy as np
import pytest

from backends.wire import Hidden, WireError, decode, encode


@pytest.mark.parametrize("dtype,np_dtype", [("float32", np.float32), ("float16", np.float16),
                                            ("bfloat16", np.uint16)])
def test_roundtrip_is_exact_and_zero_copy(dtype, np_dtype):
    a = (np.arange(3 * 8) % 251).astype(np_dtype).reshape(3, 8)
    h = Hidden(memoryview(a), dtype, (3, 8))
    head, payload = encode(h)
    assert len(head) < 32  # a small header
    assert payload.obj is a or payload.nbytes == a.nbytes
    buf = bytearray(b"".join((head, payload)))
    back = decode(buf)
    assert back.shape == (3, 8) and back.dtype == dtype
    assert bytes(back.data) == a.tobytes()
    buf[-1] ^= 0xFF  # decode gives a view into the frame, not a copy
    assert bytes(back.data) != a.tobytes()


def test_bfloat16_numpy_view():
    f = np.array([[1.5, -2.25]], np.float32)
    bf = (f.view(np.uint32) >> 16).astype(np.uint16)
    assert np.array_equal(Hidden(bf.tobytes(), "bfloat16", (1, 2)).numpy(), f)


@pytest.mark.parametrize("mutate,msg", [
    (lambda b: b[:-2], "payload"),
    (lambda b: b"XXXX" + b[4:], "magic"),
    (lambda b: b[:4] + bytes([9]) + b[5:], "dtype"),
    (lambda b: b[:5], "shorter"),
    (lambda b: b[:6] + (2**31).to_bytes(4, "little") * 2 + b[14:], "large"),
])
def test_corrupt_frames_are_rejected(mutate, msg):
    a = np.zeros((2, 4), np.float32)
    frame = b"".join(encode(Hidden(a.tobytes(), "float32", (2, 4))))
    with pytest.raises(WireError, match=msg):
        decode(mutate(frame))


def test_lying_length_rejected_on_construction():
    with pytest.raises(WireError, match="needs 32"):
        Hidden(b"\0" * 31, "float32", (2, 4))
    with pytest.raises(WireError, match="unknown dtype"):
        Hidden(b"\0" * 8, "int8", (8,))
