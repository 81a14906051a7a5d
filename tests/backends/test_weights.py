import json

import numpy as np
import pytest

from backends.config import ModelConfig
from backends.errors import ModelError
from backends.weights import Affine, _gguf_affine, _unpermute_rows, open_checkpoint


def test_embedded_gguf_config(embedded):
    c = embedded.config
    assert (c.model_type, c.num_hidden_layers, c.hidden_size) == ("llama", 30, 576)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (9, 3, 64)
    assert c.tie_word_embeddings and embedded.tied_head


def test_gguf_affine_matches_gguf_dequantize(embedded_path):
    import gguf

    r = gguf.GGUFReader(str(embedded_path))
    by = {t.name: t for t in r.tensors}
    ck = open_checkpoint(embedded_path)
    for g, hf in [("blk.3.ffn_down.weight", "model.layers.3.mlp.down_proj.weight"),
                  ("token_embd.weight", "model.embed_tokens.weight")]:
        ref = gguf.quants.dequantize(by[g].data, by[g].tensor_type)
        ours = ck.get(hf)
        assert ours.quantized and ours.affine().bits in (4, 8)
        np.testing.assert_array_equal(ours.numpy(), ref)


@pytest.mark.parametrize("kind,block", [("Q4_0", 18), ("Q8_0", 34), ("Q4_1", 20)])
def test_affine_repacking_of_every_gguf_kind(kind, block):
    import gguf

    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 64)).astype(np.float32)
    qt = getattr(gguf.GGMLQuantizationType, kind)
    raw = gguf.quants.quantize(w, qt)
    assert raw.shape == (4, 2 * block)
    np.testing.assert_allclose(_gguf_affine(kind, raw).dequantize(), gguf.quants.dequantize(raw, qt),
                               rtol=0, atol=1e-6)


def test_unpermute_inverts_llama_cpp_permutation():
    n_head, rows = 3, 12
    w = np.arange(rows)
    # llama.cpp's convert: reshape(n_head, 2, rows//n_head//2).swapaxes(1, 2)
    permuted = w.reshape(n_head, 2, rows // n_head // 2).swapaxes(1, 2).reshape(-1)
    assert np.array_equal(permuted[_unpermute_rows(rows, n_head)], w)


def test_slice_names_are_only_the_slice(embedded):
    mid = embedded.slice_names(10, 20)
    assert all(".layers.1" in n for n in mid) and len(mid) == 10 * 9
    first = embedded.slice_names(0, 5)
    assert "model.embed_tokens.weight" in first and "model.norm.weight" not in first
    last = embedded.slice_names(25, 30)
    assert "model.norm.weight" in last and "model.embed_tokens.weight" in last  # tied head


def test_missing_model_and_bad_files(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        open_checkpoint(tmp_path / "nope.gguf")
    bad = tmp_path / "corrupt.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)
    with pytest.raises(ModelError, match="not a valid GGUF"):
        open_checkpoint(bad)
    d = tmp_path / "hf"
    d.mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        open_checkpoint(d)
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10}))
    with pytest.raises(ModelError, match="unsupported architecture 'gpt2'"):
        open_checkpoint(d)


def test_config_ignores_unknown_keys_and_names_missing():
    c = ModelConfig.from_dict({"model_type": "qwen2", "vocab_size": 8, "hidden_size": 4,
                               "intermediate_size": 8, "num_hidden_layers": 2,
                               "num_attention_heads": 2, "whatever": 1})
    assert c.qkv_bias and not c.o_bias and c.num_key_value_heads == 2
    with pytest.raises(ModelError, match="missing config key 'num_attention_heads'"):
        ModelConfig.from_dict({"model_type": "llama", "vocab_size": 8})


def test_affine_dequantize_layout():
    q = np.array([[1, 2, 3, 4, 5, 6, 7, 8]], np.uint32)
    packed = np.bitwise_or.reduce(q << (np.arange(8, dtype=np.uint32) * 4), axis=1)[:, None]
    a = Affine(packed, np.array([[2.0]], np.float16), np.array([[0.5]], np.float16), 4, 8)
    np.testing.assert_array_equal(a.dequantize(), 2 * q + 0.5)


def _st_dir(tmp_path, arrays, bf16=()):
    """A one-layer llama directory whose safetensors holds `arrays`; names in bf16 are stored as
    BF16 (their uint16 arrays are the raw bits)."""
    import struct

    from safetensors.numpy import save_file

    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": 8, "hidden_size": 4, "intermediate_size": 8,
        "num_hidden_layers": 1, "num_attention_heads": 2}))
    f = tmp_path / "model.safetensors"
    save_file(arrays, str(f))
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    for name in bf16:
        header[name]["dtype"] = "BF16"
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    f.write_bytes(struct.pack("<Q", len(head)) + head + raw[8 + n:])
    return f


def test_safetensors_reads_only_slices_and_bf16(tmp_path):
    w = np.arange(32, dtype=np.float32).reshape(8, 4)
    f32 = np.array([[1.5, -2.25, 3.0, 0.5]] * 3, np.float32)
    bits = (f32.view(np.uint32) >> 16).astype(np.uint16)
    _st_dir(tmp_path, {"model.layers.0.mlp.up_proj.weight": w, "model.norm.weight": bits}, bf16=["model.norm.weight"])
    ck = open_checkpoint(tmp_path)
    up, norm = ck.get("model.layers.0.mlp.up_proj.weight"), ck.get("model.norm.weight")
    assert up.shape == (8, 4) and norm.shape == (3, 4)
    np.testing.assert_array_equal(up.numpy(), w)
    np.testing.assert_array_equal(up.part(rows=(2, 5), cols=(1, 3)).numpy(), w[2:5, 1:3])
    np.testing.assert_array_equal(norm.numpy(), f32)
    np.testing.assert_array_equal(norm.part(rows=(1, 3), cols=(0, 2)).numpy(), f32[1:3, 0:2])


@pytest.mark.parametrize("mutate,msg", [
    (lambda b: b[:-4], "incomplete metadata"),  # truncated: the data ends early
    (lambda b: b[:5], "header too small"),
    (lambda b: b[:8] + b"{not json" + b[17:], "invalid JSON"),
    (lambda b: (1 << 40).to_bytes(8, "little") + b[8:], "header too large"),
])
def test_corrupt_safetensors_is_a_clear_error(tmp_path, mutate, msg):
    f = _st_dir(tmp_path, {"model.norm.weight": np.ones(4, np.float32)})
    f.write_bytes(mutate(f.read_bytes()))
    with pytest.raises(ModelError, match=f"model.safetensors: not a readable safetensors file .*{msg}"):
        open_checkpoint(tmp_path)
