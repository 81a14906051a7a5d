"""Tensor parallelism inside one stage (backends/tp.py): the partition, the clear errors, and TP=2
groups of real processes on 127.0.0.1 giving the same greedy tokens as one unsplit process.

MLX keeps one ring per process (mx.distributed), so each MLX group runs in a driver subprocess
(this file run as a script) while the unsplit reference runs here.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from backends.errors import GroupError, ModelError, RequestError  # noqa: E402
from backends.shard import SeqChunk  # noqa: E402
from backends.weights import Checkpoint, TensorRef, open_checkpoint  # noqa: E402
from tests.helpers import greedy, random_llama  # noqa: E402

PROMPT = [1, 9690, 28, 1178, 314, 253, 1345, 282, 1148, 30, 198, 2]
TINY_PROMPT = [5, 77, 200, 3, 9, 141, 60, 18]


def batched(shard, prompts: dict[str, list[int]], n: int) -> dict[str, list[int]]:
    """Two prompts prefill together, a third joins while they decode, then all decode batched."""
    a, b, c = prompts
    for k, p in prompts.items():
        shard.add_sequence(k, prompt=p)
    try:
        out = shard.forward([SeqChunk(a, 0, len(prompts[a])), SeqChunk(b, 0, len(prompts[b]))],
                            np.array(prompts[a] + prompts[b], np.int32))
        got = {s.seq_id: [s.token] for s in out}
        chunks = [SeqChunk(a, len(prompts[a]), 1), SeqChunk(b, len(prompts[b]), 1), SeqChunk(c, 0, len(prompts[c]))]
        out = shard.forward(chunks, np.array([got[a][-1], got[b][-1]] + prompts[c], np.int32))
        got[c] = []
        for s in out:
            got[s.seq_id].append(s.token)
        while any(len(v) < n for v in got.values()):
            ids = [k for k in prompts if len(got[k]) < n]
            chunks = [SeqChunk(k, shard.seqs[k].length, 1) for k in ids]
            for s in shard.forward(chunks, np.array([got[k][-1] for k in ids], np.int32)):
                got[s.seq_id].append(s.token)
        return got
    finally:
        for k in prompts:
            shard.free_sequence(k)


def tiny_dir(path: Path) -> Path:
    """A random Llama with 8 heads in 4 KV groups and biases everywhere (q/k/v/o and the MLP)."""
    return random_llama(path, hidden=128, intermediate=256, heads=8, kv_heads=4, head_dim=16, layers=3, vocab=256,
                        tied=False, biases=True, scale=0.15, rms_norm_eps=1e-6, rope_theta=10000.0,
                        max_position_embeddings=512, attention_bias=True, mlp_bias=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_dir(tmp_path_factory.mktemp("tp") / "tiny-llama")


# ---------------------------------------------------------------- partition and clear errors


def test_smollm_splits_by_whole_kv_groups(embedded):
    from backends.tp import plan

    r0, r1 = plan(embedded, 0, 30, 2, "mlx")
    assert (r0.kv_heads, r0.q_heads, r0.ffn) == ((0, 2), (0, 6), (0, 768))
    assert (r1.kv_heads, r1.q_heads, r1.ffn) == ((2, 3), (6, 9), (768, 1536))
    assert r0.edges and not r1.edges and r1.q_rows == (384, 576) and r1.kv_rows == (128, 192)


def test_each_rank_reads_only_its_part(embedded):
    from backends.tp import plan, rank_checkpoint

    parts = plan(embedded, 0, 30, 2, "torch")
    views = [rank_checkpoint(embedded, 0, 30, p) for p in parts]
    q, o, down = ("model.layers.7." + n for n in ("self_attn.q_proj.weight", "self_attn.o_proj.weight",
                                                  "mlp.down_proj.weight"))
    v1 = views[1]
    assert (v1.get(q).shape, v1.get(o).shape, v1.get(down).shape) == ((192, 576), (576, 192), (576, 768))
    assert v1.config.num_attention_heads == 3 and v1.config.num_key_value_heads == 1
    # GGUF stores Q permuted for interleaved RoPE: the rank's rows are read through the permutation
    assert np.array_equal(v1.get(q).numpy(), embedded.get(q).numpy()[384:576])
    assert np.array_equal(v1.get(o).affine().dequantize(), embedded.get(o).numpy()[:, 384:576])
    assert "model.embed_tokens.weight" in views[0].slice_names(0, 30)
    assert all(n.startswith("model.layers.") for n in v1.slice_names(0, 30))  # no embedding, norm or head


@pytest.mark.parametrize("world,err,msg", [
    (1, RequestError, "at least 2 ranks"),
    (4, RequestError, "3 KV heads cannot be split across 4 ranks"),
])
def test_bad_groups_are_clear(embedded, world, err, msg):
    from backends.tp import TPGroup

    with pytest.raises(err, match=msg):
        TPGroup(embedded, 0, 30, "torch", world)


def test_quantization_group_boundaries(embedded):
    from backends.config import ModelConfig
    from backends.tp import plan

    down = embedded.get("model.layers.3.mlp.down_proj.weight")
    with pytest.raises(ModelError, match="cannot be cut at input columns 10-700: its quantization groups are 32 wide"):
        down.part(cols=(10, 700)).affine()
    # torch dequantizes, so any cut reads fine; packed groups are sliced as they are
    assert np.array_equal(down.part(cols=(10, 700)).numpy(), down.numpy()[:, 10:700])
    assert np.array_equal(down.part(cols=(64, 704)).affine().dequantize(), down.numpy()[:, 64:704])
    # 6 heads of 24 in 3 KV groups: rank 0's o_proj columns end at 96, inside a 64-wide group
    cfg = ModelConfig.from_dict({"model_type": "llama", "vocab_size": 10, "hidden_size": 64,
                                 "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 6,
                                 "num_key_value_heads": 3, "head_dim": 24})
    q = TensorRef("model.layers.0.self_attn.o_proj.weight", (64, 144), "fake", read_affine=lambda: None, block=64)
    d = TensorRef("model.layers.0.mlp.down_proj.weight", (64, 128), "fake", read_affine=lambda: None, block=64)
    ck = Checkpoint(Path("fake"), cfg, {q.name: q, d.name: d}, "mlx")
    with pytest.raises(ModelError, match=r"input columns 0-96 of .*o_proj.* 64-wide quantization groups"):
        plan(ck, 0, 1, 2, "mlx")
    assert [p.ffn for p in plan(ck, 0, 1, 2, "torch")] == [(0, 64), (64, 128)]


@pytest.mark.parametrize("device,gpus,msg", [
    ("cuda", 1, r"NCCL needs a GPU per rank: 2 ranks but 1 GPU\(s\) here"),
    ("cuda:1", 4, "every rank needs a GPU of its own: pass device 'cuda'"),
])
def test_nccl_wants_a_gpu_per_rank(embedded, monkeypatch, device, gpus, msg):
    torch = pytest.importorskip("torch")
    from backends.tp import TPGroup

    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    g = TPGroup(embedded, 0, 30, "torch", 2, device=device)
    with pytest.raises(RequestError, match=msg):
        g.start()
    with TPGroup(embedded, 0, 30, "torch", 2, device="cuda") as g:
        assert [g.rank_device(r) for r in (0, 1)] == ["cuda:0", "cuda:1"]


def test_worker_command_and_spawn(tmp_path):
    """One way to start a worker, for TPGroup and the mesh: its command line, key and environment."""
    from backends.tp import KEY_ENV, WorkerSpec, spawn_worker, worker_command

    spec = WorkerSpec(rank=1, world=2, connect="127.0.0.1:5000", model="m.gguf", layers=(3, 9),
                      backend="torch", dtype="float32", parent=42)
    cmd = worker_command(spec)
    assert cmd[1:3] == ["-m", "backends.tp"]
    args = dict(zip(cmd[3::2], cmd[4::2]))
    assert args == {"--rank": "1", "--world": "2", "--connect": "127.0.0.1:5000", "--model": "m.gguf",
                    "--layers": "3-9", "--backend": "torch", "--dtype": "float32", "--parent": "42"}
    full = worker_command(WorkerSpec(1, 2, "h:1", "m", (0, 1), "mlx", "float16", threads=2, device="gpu",
                                     timeout=7.5))
    assert full[-6:] == ["--timeout", "7.5", "--device", "gpu", "--threads", "2"]
    # a worker without a rank 0 to reach: spawned from the repo root with the key in its environment
    out = tmp_path / "out"
    with open(out, "wb") as f:
        p = spawn_worker(WorkerSpec(1, 2, "127.0.0.1:1", "m", (0, 1), "torch", "float32", timeout=0.2),
                         bytes(range(4)), stdout=f, stderr=f)
        assert p.wait(60) == 1
    # exit 1, not 2: it read its key (from the environment) and then found no rank 0
    assert b"no tensor-parallel rank 0 at 127.0.0.1:1" in out.read_bytes()
    assert KEY_ENV not in os.environ and bytes(range(4)).hex() not in " ".join(cmd + full)


@pytest.mark.slow
def test_mixed_backends_refused(embedded):
    from backends.tp import KEY_ENV, TPGroup, worker_command

    g = TPGroup(embedded, 0, 30, "torch", 2, dtype="float32")
    cmd = worker_command(g.worker_spec(1))
    cmd[cmd.index("--backend") + 1] = "mlx"
    p = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, **{KEY_ENV: g.key.hex()}),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        with pytest.raises(RequestError, match="cannot mix backends: rank 0 runs torch, rank 1 runs mlx"):
            g.start(spawn=False, form_timeout=30)
        assert p.wait(10) == 2 and b"refused" in p.stderr.read()
    finally:
        p.kill()
        g.close()


# ---------------------------------------------------------------- torch groups (rank 0 in this process)


@pytest.fixture(scope="module")
def one_thread():
    torch = pytest.importorskip("torch")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def torch_full(embedded, one_thread):
    from backends.torch.shard import TorchShard

    return TorchShard(embedded, 0, 30, "float32")


@pytest.fixture(scope="module")
def torch_tp(embedded, one_thread):
    from backends.tp import load_tp_shard

    sh = load_tp_shard("torch", embedded, 0, 30, 2, dtype="float32", threads=1)
    yield sh
    sh.close()


@pytest.mark.slow
def test_torch_tp_matches_one_process(torch_tp, torch_full):
    want = greedy([torch_full], PROMPT, 16)
    assert greedy([torch_tp], PROMPT, 16) == want
    assert torch_tp.cache_nbytes() == 0 and all(s["cache_nbytes"] == 0 for s in torch_tp.rank_stats())


@pytest.mark.slow
def test_torch_tp_batch_matches_alone(torch_tp):
    prompts = {"a": PROMPT[:3], "b": PROMPT, "c": PROMPT[2:9]}
    alone = {k: greedy([torch_tp], p, 6, seq="alone") for k, p in prompts.items()}
    assert batched(torch_tp, prompts, 6) == alone


@pytest.fixture(scope="module")
def tiny_tp(tiny, one_thread):
    from backends.tp import TPGroup

    g = TPGroup(tiny, 0, 3, "torch", 2, dtype="float32", threads=1, timeout=10)
    g.start()
    yield g
    g.close()


@pytest.mark.slow
def test_torch_tp_tiny_with_biases(tiny, tiny_tp):
    from backends.torch.shard import TorchShard

    ref, sh = TorchShard(open_checkpoint(tiny), 0, 3, "float32"), tiny_tp.shard
    assert greedy([sh], TINY_PROMPT, 24) == greedy([ref], TINY_PROMPT, 24)
    ref.add_sequence("l"), sh.add_sequence("l")
    x = np.array(TINY_PROMPT, np.int32)
    np.testing.assert_allclose(sh.logits([SeqChunk("l", 0, 8)], x), ref.logits([SeqChunk("l", 0, 8)], x),
                               atol=1e-4, rtol=1e-4)
    sh.free_sequence("l")
    prompts = {"a": TINY_PROMPT[:2], "b": TINY_PROMPT, "c": TINY_PROMPT[3:]}
    assert batched(sh, prompts, 5) == {k: greedy([ref], p, 5, seq="alone") for k, p in prompts.items()}


@pytest.mark.slow
def test_tp_slice_in_a_mixed_pipeline(embedded, torch_full):
    """mlx:0-10, torch TP=2 10-20, mlx:20-30 == one process; each rank holds about half the layers."""
    pytest.importorskip("mlx.core")
    from backends.pipeline import Pipeline, parse_shards

    specs = parse_shards("mlx:0-10,torch:10-20*2,mlx:20-30", 30, "torch")
    pipe = Pipeline.load(embedded, specs, dtype="float32", wire_dtype="float32", threads=1)
    try:
        assert greedy(pipe.shards, PROMPT, 10) == greedy([torch_full], PROMPT, 10)
        whole = sum(p.nbytes for p in torch_full.model.layers[10:20].parameters())
        ranks = [s["weight_nbytes"] for s in pipe.shards[1].rank_stats()]
        assert len(ranks) == 2 and sum(ranks) == pytest.approx(whole, rel=0.01)
        assert all(0.4 * whole < r < 0.6 * whole for r in ranks), (ranks, whole)
    finally:
        pipe.close()


@pytest.mark.slow
def test_dead_rank_fails_fast(tiny_tp):
    """(Runs last on the tiny group: it kills the group's worker.)"""
    sh = tiny_tp.shard
    sh.add_sequence("k", prompt=TINY_PROMPT)
    sh.forward([SeqChunk("k", 0, 8)], np.array(TINY_PROMPT, np.int32))
    os.kill(tiny_tp.links.procs[1].pid, signal.SIGKILL)
    t = time.monotonic()
    with pytest.raises(GroupError, match=r"rank 1 of layers \[0, 3\) .* is gone \(pid \d+ exited with signal 9"):
        sh.forward([SeqChunk("k", 8, 1)], np.array([3], np.int32))
    assert time.monotonic() - t < 5
    with pytest.raises(GroupError, match="is gone"):
        sh.add_sequence("next")
    sh.free_sequence("k")  # cleanup never raises


# ---------------------------------------------------------------- MLX groups (rank 0 in a driver process)


def run_mlx_driver(model: Path, layers: str, n: int, prompt: list[int], batch: bool) -> dict:
    args = [sys.executable, __file__, "mlx-driver", str(model), layers, str(n), json.dumps(prompt)]
    p = subprocess.run(args + (["--batch"] if batch else []), cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def mlx_driver(model: str, layers: str, n: int, prompt: list[int], batch: bool) -> dict:
    from backends.tp import TPGroup

    start, end = map(int, layers.split("-"))
    g = TPGroup(model, start, end, "mlx", 2, dtype="float32", threads=1, timeout=20)
    sh = g.start()
    out = {"tokens": greedy([sh], prompt, n), "stats": sh.rank_stats()}
    if batch:
        prompts = {"a": prompt[:2], "b": prompt, "c": prompt[3:]}
        out["alone"] = {k: greedy([sh], p, 5, seq="alone") for k, p in prompts.items()}
        out["batch"] = batched(sh, prompts, 5)
    sh.add_sequence("k", prompt=prompt)
    os.kill(g.links.procs[1].pid, signal.SIGKILL)  # no wait: the forward may meet it in a collective
    t = time.monotonic()
    try:
        sh.forward([SeqChunk("k", 0, len(prompt))], np.array(prompt, np.int32))
        out["kill"] = {"error": None}
    except GroupError as e:
        out["kill"] = {"error": str(e), "seconds": time.monotonic() - t}
    sh.free_sequence("k")
    g.close()
    return out


@pytest.fixture(scope="module")
def mlx_full(embedded):
    pytest.importorskip("mlx.core")
    from backends.mlx.shard import MLXShard

    return MLXShard(embedded, 0, 30, "float32")


@pytest.mark.slow
def test_mlx_tp_matches_one_process(embedded_path, mlx_full):
    # MLX's ring busy-polls its sockets, so a collective costs milliseconds on a 2-core machine: 8 tokens
    got = run_mlx_driver(embedded_path, "0-30", 8, PROMPT, batch=False)
    assert got["tokens"] == greedy([mlx_full], PROMPT, 8)
    from mlx.utils import tree_flatten

    layers = sum(v.nbytes for layer in mlx_full.model.layers for _, v in tree_flatten(layer.parameters()))
    ranks = [s["layer_nbytes"] for s in got["stats"]]
    assert sum(ranks) == pytest.approx(layers, rel=0.01) and all(0.4 * layers < r < 0.6 * layers for r in ranks)
    assert got["stats"][1]["weight_nbytes"] == ranks[1]  # no embedding or head on rank 1
    assert got["kill"]["error"] and "rank 1" in got["kill"]["error"] and got["kill"]["seconds"] < 5


@pytest.mark.slow
def test_mlx_tp_tiny_with_biases_and_batch(tiny):
    pytest.importorskip("mlx.core")
    from backends.mlx.shard import MLXShard

    got = run_mlx_driver(tiny, "0-3", 16, TINY_PROMPT, batch=True)
    assert got["tokens"] == greedy([MLXShard(open_checkpoint(tiny), 0, 3, "float32")], TINY_PROMPT, 16)
    assert got["batch"] == got["alone"]
    assert got["kill"]["error"] and "rank 1" in got["kill"]["error"] and got["kill"]["seconds"] < 5


if __name__ == "__main__" and sys.argv[1:2] == ["mlx-driver"]:
    model, layers, n, prompt = sys.argv[2], sys.argv[3], int(sys.argv[4]), json.loads(sys.argv[5])
    print(json.dumps(mlx_driver(model, layers, n, prompt, "--batch" in sys.argv)))


# ---------------------------------------------------------------- the command channel: JSON, never pickle


class _RunsCode:
    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):  # unpickling this creates a file: proof that received bytes ran code
        return (Path.touch, (self.path,))


def test_the_channel_refuses_garbage_and_keeps_forming(embedded, tmp_path, capfd):
    """Test 6, second half: rank 0 accepting its workers meets raw garbage, a bogus length, a wrong
    key, a pickle that would run code, bytes that are not JSON and a command that is not a hello: it
    refuses each (a pickle is never unpickled), keeps listening, and forms with the real worker."""
    import pickle
    import socket
    import threading
    from multiprocessing import AuthenticationError
    from multiprocessing.connection import Client

    from backends.tp import PROTO, TPGroup, _fingerprint, recv_msg, send_msg

    g = TPGroup(embedded, 0, 30, "torch", 2, dtype="float32")
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(hellos=g._accept(time.monotonic() + 60)), daemon=True)
    t.start()
    addr = g.address
    marker = tmp_path / "pwned"
    try:
        for junk in (os.urandom(300), b"\xff\xff\xff\xff" + b"x" * 64, b"\x00\x00\x00\x05#CHAL"):
            with socket.create_connection(addr) as s:
                s.sendall(junk)
                s.settimeout(2)
                try:
                    s.recv(100)
                except OSError:
                    pass
        with pytest.raises((AuthenticationError, EOFError, OSError)):
            Client(addr, authkey=b"wrong key").close()
        for payload in (pickle.dumps(("hello", _RunsCode(marker))), b"not json \xff", b'{"op": "hello"}', b"[]"):
            c = Client(addr, authkey=g.key)
            c.send_bytes(payload)
            time.sleep(0.2)
            c.close()
        assert t.is_alive() and not marker.exists()
        worker = Client(addr, authkey=g.key)
        hello = {"proto": PROTO, "rank": 1, "world": 2, "backend": "torch", "dtype": g.dtype, "layers": [0, 30],
                 "model": _fingerprint(g.ck.config), "host": "127.0.0.1", "port": 1}
        send_msg(worker, "hello", hello)
        t.join(30)
        assert result["hellos"] == {1: hello} and not marker.exists()
        assert "garbage on the tensor-parallel channel" in capfd.readouterr().err
        # rank 0 answers in JSON too: the worker reads it with recv_msg
        send_msg(g.links.conns[1], "close")
        assert recv_msg(worker) == ["close"]
        worker.close()
    finally:
        g.close()


class _Untouched:
    def __getattr__(self, name):
        return lambda *a: pytest.fail(f"a refused command reached the shard ({name})")


def test_a_worker_refuses_garbage_from_rank_0(tmp_path):
    """A worker's loop meets bytes that are not a command, or a malformed one: a clear GroupError
    (worker_main reports it to rank 0 and exits), never an unpickled object."""
    import pickle
    from multiprocessing import Pipe

    from backends.tp import serve

    marker = tmp_path / "pwned"
    for raw, msg in ((pickle.dumps(("fwd", _RunsCode(marker))), "garbage on the tensor-parallel channel"),
                     (b"\x00" * 40, "garbage"), (b'"fwd"', "garbage"), (b'["fwd", 5]', "malformed 'fwd' command"),
                     (b'["launch", 1]', "unknown command 'launch'")):
        a, b = Pipe()
        a.send_bytes(raw)
        with pytest.raises(GroupError, match=msg):
            serve(b, _Untouched())  # type: ignore[arg-type]
        a.close()
        b.close()
    assert not marker.exists()
