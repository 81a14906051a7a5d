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
