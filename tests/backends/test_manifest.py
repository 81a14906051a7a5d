"""Manifests (files, headers, tensors by byte range, lazily hashed) and sparse local copies that the
existing readers open."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from backends.errors import ModelError
from backends.lora import open_adapter
from backends.manifest import LocalCopy, Manifest, build_manifest, copy_dir, tensor_names
from backends.weights import open_checkpoint
from tests.helpers import fresh_cache


@pytest.fixture
def cache(tmp_path, monkeypatch, embedded_path):
    """A fresh TOGETHER_CACHE (the embedded model is resolved before it)."""
    return fresh_cache(tmp_path, monkeypatch)


def tiny_hf(path: Path) -> Path:
    from tests.backends.test_tp import tiny_dir

    d = tiny_dir(path)
    (d / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 512}))
    return d


def tiny_mlx(path: Path) -> Path:
    from tests.backends.test_torch_packed import quantized_dir

    quantized_dir(path, "Q4_1", np.random.default_rng(3))
    return path


def tiny_adapter(path: Path, layers: int = 3, h: int = 128, r: int = 4) -> Path:
    from safetensors.numpy import save_file

    rng = np.random.default_rng(5)
    arrays = {}
    for n in range(layers):
        for m in ("self_attn.q_proj", "self_attn.v_proj"):
            arrays[f"model.layers.{n}.{m}.lora_a"] = rng.standard_normal((h, r)).astype(np.float32)
            arrays[f"model.layers.{n}.{m}.lora_b"] = rng.standard_normal((r, h)).astype(np.float32)
    path.mkdir(parents=True)
    save_file(arrays, str(path / "adapters.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps(
        {"name": "tiny", "fine_tune_type": "lora", "num_layers": layers,
         "lora_parameters": {"rank": r, "scale": 2.0, "dropout": 0.0}}))
    return path


def copy_spans(m: Manifest, names: list[str], dest: LocalCopy) -> int:
    """What a transfer does, without the wire: headers and these tensors, written and verified."""
    assert m.root is not None
    dest.begin(m)
    spans = [*m.headers(), *(m.tensors[n] for n in names)]
    for s in spans:
        with open(m.root / s.file, "rb") as f:
            f.seek(s.offset)
            dest.write(s.file, s.offset, f.read(s.length))
        assert dest.verify(s.name), s.name
    dest.save()
    return sum(s.length for s in spans)


def same_tensor(a, b) -> None:
    qa, qb = a.affine(), b.affine()
    if qa is not None:
        assert qb is not None and np.array_equal(qa.packed, qb.packed)
        assert np.array_equal(qa.scales, qb.scales) and np.array_equal(qa.biases, qb.biases)
    else:
        assert np.array_equal(a.numpy(), b.numpy())


def test_gguf_manifest_covers_the_file_and_names_slices(cache, embedded_path, embedded):
    m = build_manifest(embedded_path, "smollm2-135m")
    (f,) = m.files
    assert m.kind == "gguf" and f.path == embedded_path.name and f.size == embedded_path.stat().st_size
    spans = sorted(m.tensors.values(), key=lambda t: t.offset)
    assert spans[0].offset == f.header and spans[-1].end <= f.size
    assert all(a.end <= b.offset for a, b in zip(spans, spans[1:]))  # no overlaps
    assert f.header_sha256 == hashlib.sha256(embedded_path.read_bytes()[:f.header]).hexdigest()
    assert m.num_layers == 30 and m.tied_head == embedded.tied_head
    # the stored names of a slice are exactly the HF names the slice's loader reads
    for lo, hi in ((0, 10), (10, 20), (20, 30), (0, 30)):
        names = tensor_names(m, lo, hi, 30)
        assert sorted(m.tensors[n].hf_name for n in names) == sorted(embedded.slice_names(lo, hi))
        assert all(n.startswith(("blk.", "token_embd", "output")) for n in names)
    assert tensor_names(embedded, 3, 5, 30) == embedded.slice_names(3, 5)


def test_hashes_are_lazy_and_cached(cache, embedded_path, monkeypatch):
    import backends.manifest as man

    m = build_manifest(embedded_path, "smollm2-135m")
    assert not any(t.sha256 for t in m.tensors.values())  # nothing hashed until asked
    names = tensor_names(m, 4, 6, 30)
    m.hash(names)
    t = m.tensors[names[0]]
    raw = embedded_path.read_bytes()[t.offset:t.end]
    assert t.sha256 == hashlib.sha256(raw).hexdigest()
    assert sum(bool(x.sha256) for x in m.tensors.values()) == len(names)
    assert list((cache / "manifests").glob("*.json"))  # in the cache dir, not next to the model
    assert not [p for p in embedded_path.parent.iterdir() if "manifest" in p.name]

    again = build_manifest(embedded_path, "smollm2-135m")
    monkeypatch.setattr(man, "sha256_of", lambda *a: pytest.fail("re-hashed a cached tensor"))
    again.hash(names)
    assert [again.tensors[n].sha256 for n in names] == [m.tensors[n].sha256 for n in names]


@pytest.mark.parametrize("kind", ["hf", "mlx"])
def test_sparse_copy_of_a_safetensors_dir_reads_like_the_original(cache, tmp_path, kind):
    src = tiny_hf(tmp_path / "m") if kind == "hf" else tiny_mlx(tmp_path / "m")
    ck = open_checkpoint(src)
    m = build_manifest(src, "tiny")
    assert m.kind == ck.kind == kind and {f.path for f in m.files} >= {"config.json", "model.safetensors"}
    if kind == "mlx":  # a quantized weight's scales and biases travel with it
        assert "model.layers.1.self_attn.q_proj.scales" in tensor_names(m, 1, 2, 3)
    names = tensor_names(m, 1, 3, 3)
    m.hash(names)
    copy = LocalCopy.of("tiny")
    assert copy.path == copy_dir("tiny") == cache / "mesh" / "tiny"
    copy_spans(m, names, copy)
    got = open_checkpoint(copy.path)
    assert got.config == ck.config and got.kind == ck.kind
    for n in ck.slice_names(1, 3):
        same_tensor(ck.get(n), got.get(n))
    assert copy.missing(tensor_names(m, 0, 1, 3))  # layer 0 and the embedding were not copied
    # a restart reads the sidecar: the same tensors are verified
    again = LocalCopy.of("tiny")
    assert again.manifest is not None and again.manifest.same_files(m)
    assert not again.missing(names) and again.complete(names)


def test_sparse_gguf_copy_holds_only_its_slice(cache, embedded_path, embedded):
    m = build_manifest(embedded_path, "smollm2-135m")
    names = tensor_names(m, 12, 14, 30)
    m.hash(names)
    copy = LocalCopy.of("smollm2-135m")
    n = copy_spans(m, names, copy)
    path = copy.path / embedded_path.name
    assert path.stat().st_size == embedded_path.stat().st_size
    assert path.stat().st_blocks * 512 < 4 * n  # holes elsewhere: only the header and 2 layers on disk
    a, b = embedded_path.read_bytes(), path.read_bytes()  # (the wire test opens a GGUF copy with the reader)
    for s in [*m.headers(), *(m.tensors[n] for n in names)]:
        assert a[s.offset:s.end] == b[s.offset:s.end]
    assert copy.missing(tensor_names(m, 0, 1, 30)) and copy.covered(path.name, m.tensors[names[0]].offset, 10)
    assert not copy.covered(path.name, m.tensors[tensor_names(m, 0, 1, 30)[0]].offset, 10)


def test_a_corrupt_span_is_not_verified(cache, tmp_path):
    src = tiny_hf(tmp_path / "m")
    m = build_manifest(src, "tiny")
    names = tensor_names(m, 0, 1, 3)
    m.hash(names)
    copy = LocalCopy.of("tiny")
    copy_spans(m, names, copy)
    t = m.tensors[names[0]]
    copy.write(t.file, t.offset, b"\xff")
    assert not copy.verify(t.name) and copy.missing([t.name]) == [t.name] and copy.written[t.name] == 0


def test_adapter_manifest_and_copy(cache, tmp_path):
    src = tiny_adapter(tmp_path / "ad")
    m = build_manifest(src, "tiny+ad")
    assert m.kind == "adapter" and {f.path for f in m.files} == {"adapters.safetensors", "adapter_config.json"}
    names = tensor_names(m, 1, 3, 3)
    assert sorted(names) == sorted(n for n in m.tensors if not n.startswith("model.layers.0."))
    m.hash(names)
    copy = LocalCopy.of("tiny+ad")
    copy_spans(m, names, copy)
    a, b = open_adapter(str(src)), open_adapter(str(copy.path))
    assert b.name == "tiny" and b.layers == a.layers
    for layer, mods in a.weights(1, 3).items():
        for mod, (x, y) in mods.items():
            gx, gy = b.weights(1, 3)[layer][mod]
            assert np.array_equal(x, gx) and np.array_equal(y, gy)


def test_links_out_of_the_model_dir_are_refused(tmp_path):
    src = tiny_hf(tmp_path / "m")
    secret = tmp_path / "secret.json"
    secret.write_text("{}")
    (src / "tokenizer.json").symlink_to(secret)
    with pytest.raises(ModelError, match="outside the model directory"):
        build_manifest(src, "tiny")


def test_another_model_under_the_same_name_replaces_the_copy(cache, tmp_path):
    a = build_manifest(tiny_hf(tmp_path / "a"), "tiny")
    b = build_manifest(tiny_mlx(tmp_path / "b"), "tiny")
    copy = LocalCopy.of("tiny")
    a.hash(tensor_names(a, 0, 1, 3))
    copy_spans(a, tensor_names(a, 0, 1, 3), copy)
    copy.begin(b)
    assert copy.manifest is not None and copy.manifest.same_files(b) and not copy.verified
    assert os.path.getsize(copy.path / "model.safetensors") == b.file("model.safetensors").size
