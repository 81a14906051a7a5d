"""Trainable slices (backends/train.py): a chain of MLX and torch slices computes the loss, the
adapter's gradients and Adam's update of mlx-lm's tuner on one whole model (tiny random weights)."""

import numpy as np
import pytest

from backends.errors import RequestError
from backends.lora import MODULES
from backends.train import LoraSpec, MicroBatch, init_lora, load_train_slice
from tests.backends.test_tp import tiny_dir

pytest.importorskip("mlx.core")
pytest.importorskip("torch")

RANK, SCALE, LR = 4, 20.0, 1e-2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from backends.weights import open_checkpoint

    return open_checkpoint(tiny_dir(tmp_path_factory.mktemp("train") / "tiny-llama"))


def batch(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two rows of 9 tokens (8 inputs), the second padded after 6 and prompt-masked before step 3."""
    rng = np.random.default_rng(seed)
    toks = rng.integers(1, 256, size=(2, 9)).astype(np.int32)
    toks[1, 6:] = 0
    return toks, np.array([[1, 8], [3, 6]], np.int32)  # (offset, length) per row, as mlx-lm's batches


def reference(tiny, lo: int, steps: list[tuple[np.ndarray, np.ndarray]]):
    """mlx-lm's tuner on the whole model: LoRA on layers [lo, 3), `init_lora`'s start, default_loss,
    Adam; the loss of each step and the final adapter."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.trainer import default_loss
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model

    model, _ = load_model(tiny.path)
    model.freeze()
    linear_to_lora_layers(model, 3 - lo, {"rank": RANK, "scale": SCALE, "dropout": 0.0})
    params = dict(tree_flatten(model.trainable_parameters()))
    model.load_weights([(n, mx.array(init_lora(n, v.shape[0], RANK, 7))) for n, v in params.items()
                        if n.endswith("lora_a")], strict=False)
    opt = optim.Adam(learning_rate=LR)
    step = nn.value_and_grad(model, default_loss)
    losses = []
    for toks, lengths in steps:
        (loss, _), grads = step(model, mx.array(toks), mx.array(lengths))
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)
        losses.append(loss.item())
    return losses, {n: np.array(v) for n, v in tree_flatten(model.trainable_parameters())}


def ring_step(slices, mb: MicroBatch, micro: int = 0) -> float:
    """One micro-batch through a chain of slices: forwards, the loss, backwards (a stage's input
    gradient only where a stage before it trains)."""
    x, outs = None, []
    for i, sl in enumerate(slices[:-1]):
        x = sl.forward((0, micro), mb, x, keep=sl.trains or any(s.trains for s in slices[:i]))
        outs.append(x)
    wants = [any(s.trains for s in slices[:i]) for i in range(len(slices))]
    loss, _, g = slices[-1].loss((0, micro), mb, x, train=True, want_grad=wants[-1])
    for i in range(len(slices) - 2, -1, -1):
        if g is None:
            break
        g = slices[i].backward((0, micro), g, wants[i]) if slices[i].trains or wants[i] else None
    return loss


@pytest.mark.parametrize("backends,split,lo", [(("mlx", "torch"), 2, 1), (("torch", "mlx"), 1, 0),
                                               (("mlx", "mlx"), 2, 0)])
def test_a_split_trains_as_mlx_lm_on_one_model(tiny, backends, split, lo):
    data = [batch(0), batch(1), batch(2)]
    want_losses, want = reference(tiny, lo, data)
    spec = LoraSpec(RANK, SCALE, lo, 3, seed=7, learning_rate=LR)
    slices = [load_train_slice(backends[0], tiny, 0, split, spec), load_train_slice(backends[1], tiny, split, 3, spec)]
    losses = []
    for toks, lengths in data:
        # two micro-batches of one row each, the loss over the batch's count: gradients add up to the batch's
        full = MicroBatch(toks, lengths[:, 0], lengths[:, 1], 1.0)
        norm = float(full.ntokens)
        loss = sum(ring_step(slices, MicroBatch(toks[r:r + 1], lengths[r:r + 1, 0], lengths[r:r + 1, 1], norm), r)
                   for r in range(2))
        for sl in slices:
            sl.step()
        losses.append(loss)
    np.testing.assert_allclose(losses, want_losses, rtol=1e-4)
    got = {**slices[0].state(), **slices[1].state()}
    assert {n for n in got if n.endswith(("lora_a", "lora_b"))} == set(want)
    init = {**slices[0].initial(), **slices[1].initial()}
    for n, v in want.items():  # what training moved each weight by, within 2% (Adam's steps are ~lr wherever
        # a gradient is tiny, so a few elements of lora_a may differ by more)
        moved = np.linalg.norm(v - init[n])
        assert moved > 0 and np.linalg.norm(got[n] - v) <= 0.02 * moved, n
    assert all(got[n + ".m"].shape == v.shape and np.abs(got[n + ".v"]).sum() > 0 for n, v in want.items())
    assert slices[1].trainable() == sum(v.size for n, v in want.items() if int(n.split(".")[2]) >= split)


def test_state_moves_between_backends_and_resumes_the_same(tiny):
    spec = LoraSpec(RANK, SCALE, 0, 3, seed=3, learning_rate=LR)
    a = [load_train_slice("mlx", tiny, 0, 3, spec)]
    toks, lengths = batch(5)
    mb = MicroBatch(toks, lengths[:, 0], lengths[:, 1], 10.0)
    ring_step(a, mb)
    a[0].step()
    b = [load_train_slice("torch", tiny, 0, 3, spec)]
    b[0].load_state(a[0].state(), 1)
    assert b[0].adam.step == 1
    la, lb = ring_step(a, mb), ring_step(b, mb)
    a[0].step(), b[0].step()
    assert la == pytest.approx(lb, rel=1e-4)
    sa, sb = a[0].state(), b[0].state()
    for n in sa:  # the moments came along: the second update is the same
        np.testing.assert_allclose(sb[n], sa[n], rtol=2e-3, atol=1e-6, err_msg=n)


def test_bad_input_and_state_are_clear_errors(tiny):
    spec = LoraSpec(RANK, SCALE, 0, 3)
    sl = load_train_slice("torch", tiny, 1, 3, spec)
    toks, lengths = batch()
    mb = MicroBatch(toks, lengths[:, 0], lengths[:, 1], 1.0)
    with pytest.raises(RequestError, match="expected hidden states of shape"):
        sl.loss((0, 0), mb, None, train=True, want_grad=False)
    with pytest.raises(RequestError, match="no kept input"):
        sl.backward((0, 9), _zeros(mb), False)
    with pytest.raises(RequestError, match="lacks"):
        sl.load_state({}, 1)
    bad = {n: np.zeros((v[0], v[1] + 1), np.float32) for n, v in sl.initial_shapes().items()}
    with pytest.raises(RequestError, match="another --rank"):
        sl.load_state(bad, 1)
    with pytest.raises(RequestError, match="a ring trains"):
        LoraSpec(RANK, SCALE, 0, 3, keys=("mlp.nope",)).check(tiny.config)
    with pytest.raises(RequestError, match="int32 tokens"):
        MicroBatch(toks.astype(np.int64), lengths[:, 0], lengths[:, 1], 1.0)
    assert set(MODULES) == {k.split(".", 3)[3].rsplit(".", 1)[0] for k in sl.initial()}


def _zeros(mb: MicroBatch):
    from backends.wire import Hidden

    rows, width = mb.shape
    return Hidden(bytes(rows * width * 128 * 4), "float32", (rows, width, 128))


def test_initial_weights_depend_on_name_and_seed_only():
    a = init_lora("model.layers.3.mlp.up_proj.lora_a", 64, 8, 0)
    assert a.shape == (64, 8) and a.dtype == np.float32 and np.abs(a).max() <= 1 / 8
    np.testing.assert_array_equal(a, init_lora("model.layers.3.mlp.up_proj.lora_a", 64, 8, 0))
    assert not np.array_equal(a, init_lora("model.layers.4.mlp.up_proj.lora_a", 64, 8, 0))
    assert not np.array_equal(a, init_lora("model.layers.3.mlp.up_proj.lora_a", 64, 8, 1))


@pytest.mark.slow  # MLX's quantized matmuls and their gradients are slow on a CPU (~15 s)
def test_qlora_on_the_embedded_model_mlx_packed_equals_torch_dequantized(embedded):
    from backends.wire import Hidden

    spec = LoraSpec(4, 20.0, 28, 30, learning_rate=1e-3)
    rng = np.random.default_rng(0)
    mb = MicroBatch(rng.integers(1, 49000, size=(2, 17)).astype(np.int32), np.array([1, 3]), np.array([16, 12]), 24.0)
    x = Hidden(rng.standard_normal((2, 16, 576)).astype(np.float32).tobytes(), "float32", (2, 16, 576))
    got = {}
    for backend in ("mlx", "torch"):  # MLX keeps the Q4_1 layers packed (QLoRA), torch dequantizes them
        sl = load_train_slice(backend, embedded, 28, 30, spec)
        first, n, grad = sl.loss((0, 0), mb, x, train=True, want_grad=True)
        sl.step()
        got[backend] = first, sl.loss((1, 0), mb, x, train=False, want_grad=False)[0], grad.numpy()
        assert n == 16 + 10
    (m1, m2, mg), (t1, t2, tg) = got["mlx"], got["torch"]
    assert m1 == pytest.approx(t1, rel=1e-5) and m2 == pytest.approx(t2, rel=1e-5) and m2 < m1
    assert np.abs(mg - tg).max() <= 1e-3 * np.abs(mg).max()
