"""A tensor-parallel group as one stage of a real mesh: `together join --tp-group` peers, real gRPC,
the official openai client; greedy text must equal one process's, also when a rank dies mid-stream."""

from __future__ import annotations

import pytest

from mesh.local import http_json
from tests.mesh.cluster import Cluster, wait_log
from tests.mesh.test_recovery import kill_at, stream_text
from tests.mesh.test_ring import client, reference

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m"
QUESTION = "What is the capital of France?"
TOKENS = 12
KEY = "tp mesh key"  # a TP group's command channel is keyed by the mesh key: no group without one


def torch_peer(c, name, *args, api=False):
    return c.add(name, "--backend", "torch", "--dtype", "float32", "--no-mdns", *args, api=api)


@pytest.fixture(scope="module")
def want(embedded, tokenizer) -> str:
    return reference(embedded, tokenizer, QUESTION, TOKENS)


@pytest.fixture(scope="module")
def ring(embedded_path):
    """Layers 0-15 on a torch TP=2 group of g0 and g1 (the older leads), 15-30 on b (the API). Both
    group peers ask for 0-15: the leader's claim counts, a rank > 0 holds no range of its own."""
    c = Cluster(str(embedded_path), mesh_key=KEY)
    try:
        g0 = torch_peer(c, "g0", "--layers", "0-15", "--tp-group", "g", "--tp-size", "2")
        torch_peer(c, "b", "--layers", "15-30", "--peer", g0.address, api=True)
        torch_peer(c, "g1", "--layers", "0-15", "--tp-group", "g", "--peer", g0.address)
        c.wait_ready(c.peers["b"], stages=2, timeout=120)
        torch_peer(c, "spare", "--peer", g0.address)  # a standby, for the last test (not waited for here)
        yield c
    finally:
        c.stop()


def test_a_tp_group_is_one_stage_and_answers_like_one_process(ring, want):
    b = ring.peers["b"]
    _, mesh = http_json(f"{b.api}/v1/mesh")
    stages = sorted(mesh["ring"], key=lambda s: s["start"])
    lead = stages[0]["name"]
    other = {"g0": "g1", "g1": "g0"}[lead]
    assert [(s["name"], s["start"], s["end"], s["tp_members"]) for s in stages] == [
        (lead, 0, 15, [lead, other]), ("b", 15, 30, [])]
    assert "serves rank 1 of tensor-parallel group 'g'" in ring.peers[other].log()
    from apps.join import render_plan

    table = render_plan(ring.status(b).plan)
    assert "tp g rank 0/2" in table and "tp g rank 1/2" in table

    r = client(b).chat.completions.create(model=MODEL, temperature=0, max_tokens=TOKENS,
                                          messages=[{"role": "user", "content": QUESTION}])
    assert r.choices[0].message.content == want


def test_an_mlx_tp_group_is_a_stage_of_a_ring_with_torch(embedded_path, want):
    """torch 0-25 (the API) and an MLX TP=2 group on 25-30 (MLX is slow on these CPUs: few layers,
    few tokens): the same greedy text as one torch process, in float32."""
    pytest.importorskip("mlx.core")
    c = Cluster(str(embedded_path), mesh_key=KEY)
    try:
        t = torch_peer(c, "t", "--layers", "0-25", api=True)
        for name in ("m0", "m1"):
            c.add(name, "--backend", "mlx", "--dtype", "float32", "--no-mdns", "--layers", "25-30",
                  "--tp-group", "m", "--peer", t.address)
        body = c.wait_ready(t, stages=2, timeout=120)
        last = body["ring"][-1]
        assert (last["backend"], last["start"], last["end"], sorted(last["tp_members"])) == (
            "mlx", 25, 30, ["m0", "m1"])
        r = client(t).chat.completions.create(model=MODEL, temperature=0, max_tokens=TOKENS,
                                              messages=[{"role": "user", "content": QUESTION}])
        assert r.choices[0].message.content == want
    finally:
        c.stop()


def test_invalid_groupings_are_clear_errors(ring, embedded_path, capsys):
    from apps.cli import main

    assert main(["join", "--tp-group", "g", "--tp-size", "1"]) == 2
    assert "needs at least 2 peers" in capsys.readouterr().err
    assert main(["join", "--tp-size", "2"]) == 2
    assert "--tp-size needs --tp-group" in capsys.readouterr().err
    assert main(["join", "--tp-group", "g", "--adapter", "x", "--model", str(embedded_path)]) == 2
    assert "LoRA adapters are not supported on a tensor-parallel stage" in capsys.readouterr().err
    # SmolLM2 has 3 KV heads: 4 ranks cannot each hold whole ones
    assert main(["join", "--tp-group", "g", "--backend", "torch", "--no-mdns", "--model", str(embedded_path)]) == 2
    assert "a tensor-parallel group needs a mesh key" in capsys.readouterr().err
    assert main(["join", "--tp-group", "g", "--tp-size", "4", "--backend", "torch", "--no-mdns",
                 "--mesh-key", KEY, "--model", str(embedded_path)]) == 2
    assert "3 KV heads cannot be split across 4 ranks" in capsys.readouterr().err
    # a peer of another backend cannot join the (torch) group: it is refused and exits
    bad = ring.add("bad", "--backend", "mlx", "--dtype", "float32", "--no-mdns", "--tp-group", "g",
                   "--peer", ring.peers["g0"].address)
    assert bad.proc.wait(60) == 2
    assert "cannot mix backends" in bad.log()


def test_kill_a_rank_mid_stream_the_stage_moves_and_the_text_is_unchanged(ring):
    """SIGKILL rank 1 halfway through a greedy stream: the group's stage is lost like any stage (a
    standby takes its layers), the API peer replays, the text is the same. Runs last: it breaks the group."""
    b = ring.peers["b"]
    _, mesh = http_json(f"{b.api}/v1/mesh")
    lead, member = next(s["tp_members"] for s in mesh["ring"] if s["tp_members"])
    wait_log(ring.peers["spare"], "standing by|holds no layers")
    whole, _ = stream_text(b, 80)
    cb, st = kill_at(ring.peers[member], 20)
    got, finish = stream_text(b, 80, cb)
    assert "t" in st and got == whole and finish == "length"
    wait_log(ring.peers[lead], "leaves tensor-parallel group", timeout=20)
    m = wait_log(b, r"resumed after ([0-9.]+) s", timeout=20)
    assert float(m.group(1)) < 20
    body = ring.wait_ready(b, stages=2, timeout=60)
    assert all(not s["tp_members"] for s in body["ring"])
    assert "leaves tensor-parallel group 'g'" in ring.peers[lead].log()
