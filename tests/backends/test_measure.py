"""A peer's own speed, measured on its real backend, dtype and weights (backends/measure.py)."""

from __future__ import annotations

import gc
import json
import math

import pytest

from backends.measure import head_layers, measure_speed
from backends.shard import LayerShard, available_backends, default_dtype, load_shard

BACKENDS = [pytest.param(b, marks=pytest.mark.skipif(b not in available_backends(), reason=f"no {b}"))
            for b in ("torch", "mlx")]


def shards_alive() -> int:
    gc.collect()
    return sum(issubclass(type(o), LayerShard) for o in gc.get_objects())


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_middle_layer_of_the_embedded_model_is_timed_and_freed(embedded, backend):
    before = shards_alive()
    sp = measure_speed(backend, embedded, threads=1)
    assert shards_alive() == before  # the measured layer is not kept
    assert 0 < sp.layer_ms < 1000 and 0 < sp.prefill_ms < 1000
    # the head is timed on nothing here: estimated from the layer by multiply-adds (~8 layers' worth)
    assert sp.head_ms == pytest.approx(sp.layer_ms * head_layers(embedded)) and 7 < head_layers(embedded) < 9
    # what it ran is what a shard of this peer runs: its resolved dtype and that dtype's weight format
    device = "cpu" if backend == "torch" else None
    assert sp.dtype == default_dtype(backend, embedded, device)
    ref = load_shard(backend, embedded, 14, 15, threads=1)
    assert (sp.dtype, sp.weight_format) == (ref.dtype, ref.weight_format)


def test_a_dtype_override_is_what_gets_measured(embedded):
    pytest.importorskip("torch")
    sp = measure_speed("torch", embedded, dtype="float32", threads=1)
    assert (sp.dtype, sp.weight_format) == ("float32", "float32") and sp.layer_ms > 0


@pytest.mark.slow
def test_the_head_timed_on_the_last_layer_costs_several_layers(embedded):
    pytest.importorskip("torch")
    before = shards_alive()
    sp = measure_speed("torch", embedded, threads=1, head=True)
    assert shards_alive() == before
    # SmolLM2's head is 8 layers' multiply-adds; timed, it is at least a few layers' worth
    assert sp.head_ms > 2 * sp.layer_ms > 0


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_models_without_a_middle_layer(tmp_path, layers):
    """3 layers: the middle one; 2: the first (its embedding is a lookup); 1: the whole model, one
    stage whose head is already in its time."""
    pytest.importorskip("torch")
    from backends.weights import open_checkpoint
    from tests.backends.test_tp import tiny_dir

    d = tiny_dir(tmp_path / "tiny")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": layers}))
    sp = measure_speed("torch", open_checkpoint(d), dtype="float32", threads=1)
    assert sp.layer_ms > 0 and math.isfinite(sp.layer_ms)
    assert (sp.head_ms == 0) == (layers == 1)
