"""Several models in one mesh. In process: the coordinator's layer map per model, each split and healed
by its own model's shape and peers, the plans that carry the other rings, a takeover (by a peer of
either model) that rebuilds every ring, another model under a ring's name refused. Then (slow) four real `together join` processes,
two rings under one coordinator, of two models of different shapes (the embedded model: 30 layers,
hidden 576; a tiny random Llama: 4 layers, hidden 64), every request through ONE API peer, including the
model it holds no layers of (apps/routing.py passes it on to that ring's API peer), driven through the
official openai and anthropic clients."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest

from mesh.coordination import CoordinatorRole
from mesh.local import http_json
from mesh.protocol import check_plan
from mesh.rings import CLASH
from mesh.tasks import TaskSet
from mesh.view import PlanView, all_peers
from protos import together_pb2 as pb
from tests.mesh.cluster import Cluster
from tests.mesh.test_ring import reference
from tests.mesh.test_roles import FakeLinks, peer

A, B = "smollm2-135m", "tiny-llama"  # B: a directory's name is its model's label (backends/models.py)
QUESTION = "What is the capital of France?"
# room for a 15-layer float32 slice of the embedded model, not for all 30: a survivor cannot cover a lost peer
MEMORY = "480MB"
TINY_MEMORY = "60MB"  # the same for the tiny Llama: its head (12.6 MB) and 3 of its 4 layers (13.6 MB each)


def _coordinator(view: PlanView, links: FakeLinks) -> CoordinatorRole:
    return CoordinatorRole(view, links, TaskSet(), "m", 4, kv_reserve=0, claim_window_s=0.01, rejoin=lambda: None)


def _other(node_id: str, address: str, started_at: float, start: int = -1, end: int = -1) -> pb.PeerInfo:
    """A peer of model 'n' (6 layers), which the coordinator (of 'm', 4 layers) does not have."""
    info = peer(node_id, address, started_at, start, end, num_layers=6, hidden_size=64)
    info.model = "n"
    return info


def _set(info: pb.PeerInfo, **fields: int) -> pb.PeerInfo:
    for k, v in fields.items():
        setattr(info, k, v)
    return info


def test_one_coordinator_keeps_a_ring_per_model_and_every_plan_carries_the_others():
    view = PlanView("me", "me", "127.0.0.1", 4, "m")
    view.port = 5000
    view.known["me"] = me = peer("me", "127.0.0.1:5000", 1.0)
    links = FakeLinks()
    coord = _coordinator(view, links)
    coord.become(epoch=0)

    async def go() -> tuple[pb.JoinReply, ...]:
        mine = await coord.join(pb.JoinRequest(peer=me, want_start=0, want_end=4))
        x = await coord.join(pb.JoinRequest(peer=_other("x", "10.0.0.2:1", 2.0), want_start=0, want_end=3))
        y = await coord.join(pb.JoinRequest(peer=_other("y", "10.0.0.3:1", 3.0), want_start=3, want_end=6))
        old = pb.PeerInfo()
        old.CopyFrom(_other("z", "10.0.0.4:1", 4.0))
        old.model, old.num_layers = "k", 0  # a third model's peer, too old to say its model's shape
        return mine, x, y, await coord.join(pb.JoinRequest(peer=old, want_start=-1, want_end=-1))

    mine, x, y, refused = asyncio.run(go())
    assert mine.ok and x.ok and y.ok and (y.start, y.end) == (3, 6)
    assert not refused.ok and "this mesh serves m, not k" in refused.reason
    assert sorted(coord.maps) == ["m", "n"] and coord.maps["n"].num_layers == 6
    plan = y.plan  # the plan of n's ring, as its peers get it: the coordinator named, m's ring among its rings
    assert plan.model == "n" and plan.num_layers == 6 and [s.node_id for s in plan.stages] == ["x", "y"]
    assert check_plan(plan, 6) and plan.coordinator == "me" and [r.model for r in plan.rings] == ["m"]
    assert {p.node_id for p in all_peers(plan)} == {"me", "x", "y"}
    assert [r.model for r in view.plan.rings] == ["n"] and [s.node_id for s in view.plan.stages] == ["me"]
    # a peer of n follows n's plan out of any plan it hears (its coordinator's is m's)
    theirs = PlanView("y", "y", "10.0.0.3", 6, "n")
    theirs.adopt(view.plan)
    assert theirs.plan.model == "n" and [s.node_id for s in theirs.plan.stages] == ["x", "y"]
    assert theirs.coordinator_address() == "127.0.0.1:5000"
    alone = PlanView("w", "w", "10.0.0.5", 8, "k")  # a model no ring serves yet: an empty plan, same coordinator
    alone.adopt(view.plan)
    assert alone.plan.model == "k" and not alone.plan.stages and alone.coordinator_address() == "127.0.0.1:5000"


def test_a_takeover_rebuilds_every_models_ring_from_the_reports():
    view = PlanView("x", "x", "10.0.0.2", 4, "m")
    view.port = 1
    old = pb.Plan(epoch=5, coordinator="dead", model="m", num_layers=4,
                  rings=[pb.Plan(epoch=9, coordinator="dead", model="n", num_layers=6)])
    view.plan = old
    coord = _coordinator(view, FakeLinks())
    reports = [peer("x", "10.0.0.2:1", 2.0, 0, 4), _other("y", "10.0.0.3:1", 3.0, 0, 3),
               _other("z", "10.0.0.4:1", 4.0, 3, 6)]
    asyncio.run(coord.take_over(reports))
    assert sorted(coord.maps) == ["m", "n"]
    assert coord.maps["m"].stages == [("x", 0, 4)] and coord.maps["n"].stages == [("y", 0, 3), ("z", 3, 6)]
    assert coord.maps["m"].epoch > 5 and coord.maps["n"].epoch > 9  # epochs go on per model, never back
    assert view.plan.coordinator == "x" and view.plan.rings[0].complete


def test_a_peer_of_the_other_model_takes_over_every_ring():
    """The survivor that takes over serves n (6 layers, hidden 64): m's ring (4 layers) is rebuilt from
    the shape its peers report, and n's peer keeps following n's plan."""
    view = PlanView("y", "y", "10.0.0.3", 6, "n")
    view.port = 1
    view.plan = pb.Plan(epoch=9, coordinator="dead", model="n", num_layers=6,
                        rings=[pb.Plan(epoch=5, coordinator="dead", model="m", num_layers=4)])
    coord = CoordinatorRole(view, FakeLinks(), TaskSet(), "n", 6, kv_reserve=7, claim_window_s=0.01,
                            rejoin=lambda: None, hidden_size=64)
    m_peer = lambda name, t, a, b: _set(peer(name, f"10.0.0.{int(t)}:1", t, a, b), num_layers=4, hidden_size=32)
    reports = [m_peer("a", 5.0, 0, 2), m_peer("b", 6.0, 2, 4), _other("y", "10.0.0.3:1", 3.0, 0, 6)]
    asyncio.run(coord.take_over(reports))
    assert coord.maps["m"].stages == [("a", 0, 2), ("b", 2, 4)] and coord.maps["n"].stages == [("y", 0, 6)]
    assert (coord.maps["m"].num_layers, coord.maps["m"].hidden_size) == (4, 32) and coord.maps["m"].epoch > 5
    assert view.plan.model == "n" and view.plan.coordinator == "y" and view.plan.epoch > 9
    m_plan = coord._plan_for("m")
    assert check_plan(m_plan, 4) and m_plan.coordinator == "y" and "y" in {p.node_id for p in m_plan.peers}


def test_each_ring_is_split_and_healed_by_its_own_models_shape_and_peers():
    """The coordinator (of 'm': 4 small layers, no KV reserve) splits 'n' (6 layers, hidden 64, a KV
    reserve as large as a layer) by n's own sizes: a peer of n offering room for 3 of n's layers gets 3,
    though 'm's sizes would fit them all. A lost peer of n is covered by n's standby, never by m's."""
    view = PlanView("me", "me", "127.0.0.1", 4, "m")
    view.port = 5000
    view.known["me"] = me = _set(peer("me", "127.0.0.1:5000", 1.0), free_memory=10**12)
    coord = _coordinator(view, FakeLinks())
    coord.become(epoch=0)
    n_peer = lambda name, t, mem: _set(_other(name, f"10.0.0.{int(t)}:1", t), layer_bytes=5000, kv_reserve=5000,
                                       free_memory=mem)

    async def go() -> tuple[pb.JoinReply, ...]:
        await coord.join(pb.JoinRequest(peer=me, want_start=0, want_end=4))
        spare_m = _set(peer("sm", "10.0.0.9:1", 9.0), free_memory=10**12)  # a standby of m with room for anything
        await coord.join(pb.JoinRequest(peer=spare_m, want_start=-1, want_end=-1))
        got = await asyncio.gather(*(coord.join(pb.JoinRequest(peer=n_peer(x, t, 30_000), want_start=-1,
                                                               want_end=-1)) for x, t in (("x", 2.0), ("y", 3.0))))
        return tuple(got)

    x, y = asyncio.run(go())
    assert x.ok and y.ok and sorted([(x.start, x.end), (y.start, y.end)]) == [(0, 3), (3, 6)], (x, y)
    lm = coord.maps["n"]
    assert (lm.num_layers, lm.kv_reserve, lm.hidden_size) == (6, 5000, 64) and not lm.missing()
    assert coord.maps["m"].stages == [("me", 0, 4)] and coord.maps["m"].kv_reserve == 0

    coord.drop({"y"})  # x (room for 3 of n's layers) cannot take y's; m's standby must not
    assert lm.missing() and all(s[0] == "x" for s in lm.stages) and "sm" not in lm.members
    asyncio.run(coord.join(pb.JoinRequest(peer=n_peer("w", 5.0, 10**9), want_start=-1, want_end=-1)))
    assert not lm.missing() and {s[0] for s in lm.stages} <= {"x", "w"}, lm.stages
    assert coord.maps["m"].stages == [("me", 0, 4)]
    assert not check_plan(coord._plan_for("n"), 4) and check_plan(coord._plan_for("n"), 6)


def test_another_model_under_a_rings_name_is_refused_not_mixed_in():
    """Two directories both called 'n', of different shapes: the second cannot join n's ring (its
    hidden states would not fit), is named the reason, and neither its heartbeats nor a takeover make
    it a member."""
    view = PlanView("me", "me", "127.0.0.1", 4, "m")
    view.port = 5000
    view.known["me"] = me = peer("me", "127.0.0.1:5000", 1.0)
    coord = _coordinator(view, FakeLinks())
    coord.become(epoch=0)
    fake = _set(_other("f", "10.0.0.7:1", 7.0), hidden_size=128)  # n's name, 6 layers, another hidden size
    deeper = _set(_other("g", "10.0.0.8:1", 8.0), num_layers=8)

    async def go() -> tuple[pb.JoinReply, ...]:
        await coord.join(pb.JoinRequest(peer=me, want_start=0, want_end=4))
        x = await coord.join(pb.JoinRequest(peer=_other("x", "10.0.0.2:1", 2.0), want_start=0, want_end=6))
        f = await coord.join(pb.JoinRequest(peer=fake, want_start=-1, want_end=-1))
        g = await coord.join(pb.JoinRequest(peer=deeper, want_start=-1, want_end=-1))
        await coord.heartbeat(pb.HeartbeatRequest(peer=fake))
        return x, f, g

    x, f, g = asyncio.run(go())
    assert x.ok and not f.ok and not g.ok and CLASH in f.reason and CLASH in g.reason
    assert "has 6 layers of hidden size 64, this peer's has 6 of 128" in f.reason, f.reason
    assert sorted(coord.maps["n"].members) == ["x"]
    asyncio.run(coord.take_over([me, _other("x", "10.0.0.2:1", 2.0, 0, 6), _set(fake, start=0, end=6)]))
    assert coord.maps["n"].stages == [("x", 0, 6)] and sorted(coord.maps["n"].members) == ["x"]


def test_a_peer_that_can_serve_several_models_picks_the_ring_that_lacks_layers():
    from apps.join import choose_model

    full = pb.Plan(model="m", num_layers=4, stages=[pb.Assignment(node_id="a", start=0, end=4)], epoch=3)
    gap = pb.Plan(model="n", num_layers=6, stages=[pb.Assignment(node_id="b", start=3, end=6)], epoch=2)
    full.rings.append(gap)
    assert choose_model(["m", "n"], [full]) == ("n", "its ring lacks layers [0, 3)")
    healed = pb.Plan(model="n", num_layers=6, epoch=5, rings=[full], stages=[
        pb.Assignment(node_id="b", start=3, end=6), pb.Assignment(node_id="c", start=0, end=3)])
    assert choose_model(["m", "n"], [full, healed])[0] == "m"  # n's newer plan has every layer
    assert choose_model(["k", "m"], [])[0] == "k"


def tiny_llama(out: Path, tokenizer) -> Path:
    """A random 4-layer Llama of hidden size 64 with the embedded model's tokenizer (and chat template)
    saved next to it. Its weights are drawn wide (std 0.3), so that its greedy answer is a varied string
    of tokens, not one token repeated: a wrong hidden size, layer or cache anywhere would change it. Its
    MLPs are wide (12.6 MB a layer), so that a memory cap can keep a peer from holding every layer."""
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tokenizer.hf), hidden_size=64, intermediate_size=16384,
                                   num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=2048, tie_word_embeddings=True,
                                   eos_token_id=sorted(tokenizer.eos_ids))
    m = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for n, w in m.named_parameters():
            w.normal_(1.0, 0.2) if "norm" in n else w.normal_(0, 0.3)
    m.save_pretrained(out, safe_serialization=True)
    tokenizer.hf.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def other(tmp_path_factory, tokenizer) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("other") / B, tokenizer)


@pytest.fixture(scope="module")
def mesh(embedded_path, other):
    """Ring A: a1 (layers 0-15, the API everything goes through, the coordinator) and a2; ring B (the
    tiny Llama): b1 (layers 0-2) and b2 (2-4, B's API peer, the oldest after a1)."""
    c = Cluster(str(embedded_path))
    common = ("--backend", "torch", "--dtype", "float32", "--no-mdns", "--max-memory", MEMORY)
    try:
        a1 = c.add("a1", *common, "--layers", "0-15", api=True)
        time.sleep(0.3)  # a1 is the oldest: it coordinates both rings
        tiny = ("--max-memory", TINY_MEMORY, "--model", str(other))
        b2 = c.add("b2", *common, "--layers", "2-4", "--peer", a1.address, *tiny, api=True)
        time.sleep(0.3)  # b2 is the next oldest: it takes over from a1 (see the last test)
        c.add("a2", *common, "--layers", "15-30", "--peer", a1.address)
        c.add("b1", *common, "--layers", "0-2", "--peer", a1.address, *tiny)
        c.wait_ready(a1, stages=2)
        c.wait_ready(b2, stages=2)
        _wait_rings(a1, lambda rings: len(rings) == 2 and all(r["complete"] for r in rings))
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def want(embedded, tokenizer, other) -> dict[str, str]:
    """Each model's one-process greedy answer."""
    from backends.pipeline import Pipeline, SliceSpec
    from backends.sampling import SamplingParams
    from backends.tokenizer import Tokenizer
    from backends.weights import open_checkpoint

    ck = open_checkpoint(other)
    tok = Tokenizer.from_checkpoint(ck)
    pipe = Pipeline.load(ck, [SliceSpec("torch", 0, 4)], dtype="float32")
    prompt = tok.apply_chat([{"role": "user", "content": QUESTION}])
    tiny = "".join(d.text for d in pipe.generate(prompt, SamplingParams(max_tokens=24), tok))
    assert len(set(tiny.split())) > 5, tiny  # a varied answer, not one token repeated
    return {A: reference(embedded, tokenizer, QUESTION, 24), B: tiny}


def _mesh(peer) -> dict:
    code, body = http_json(f"{peer.api}/v1/mesh", timeout=5)
    assert code == 200, body
    return body


def _wait_rings(peer, want, timeout: float = 60) -> list[dict]:
    deadline = time.time() + timeout
    rings: list[dict] = []
    while time.time() < deadline:
        code, body = http_json(f"{peer.api}/v1/mesh", timeout=5)
        rings = body.get("rings", []) if code == 200 else []
        if want(rings):
            return rings
        time.sleep(0.3)
    raise AssertionError(f"rings never as wanted: {rings}")


def _client(peer):
    from openai import OpenAI

    return OpenAI(base_url=f"{peer.api}/v1", api_key="unused", max_retries=0, timeout=120)


def _ask(oa, model: str) -> tuple[str, dict]:
    raw = oa.chat.completions.with_raw_response.create(
        model=model, temperature=0, max_tokens=24, messages=[{"role": "user", "content": QUESTION}])
    r = raw.parse()
    assert r.model == model
    return r.choices[0].message.content, dict(raw.headers)


@pytest.mark.slow
def test_one_api_peer_lists_routes_and_streams_both_models(mesh, want):
    a1, b2 = mesh.peers["a1"], mesh.peers["b2"]
    code, body = http_json(f"{a1.api}/v1/models")
    assert code == 200 and [m["id"] for m in body["data"]] == [A, B], body
    assert all(m["ring"] == {"complete": True, "peers": 2} for m in body["data"]), body

    rings = _mesh(a1)["rings"]
    assert [(r["model"], r["self"], r["complete"], r["num_layers"]) for r in rings] == \
        [(A, True, True, 30), (B, False, True, 4)]
    assert [s["name"] for s in rings[1]["ring"]] == ["b1", "b2"] and rings[1]["api"] == [b2.api], rings
    # what the page shows of each stage of another ring: its API, its speed, the memory it offers
    assert [s["api"] for s in rings[1]["ring"]] == ["", b2.api.removeprefix("http://")], rings
    assert all(isinstance(s["tokens_per_s"], float) and s["free_memory"] > 0 for r in rings for s in r["ring"])
    assert [s["name"] for s in rings[0]["ring"]] == ["a1", "a2"] and rings[0]["api"] == [a1.api], rings
    assert _mesh(b2)["rings"][0]["model"] == B  # every peer sees every ring, its own first

    oa = _client(a1)
    text, headers = _ask(oa, A)
    assert text == want[A] and "x-together-routed-to" not in headers
    text, headers = _ask(oa, B)  # a1 holds no layer of B: b2 answered it
    assert text == want[B] and headers["x-together-routed-to"] == b2.api.removeprefix("http://")
    chunks = list(oa.chat.completions.create(model=B, temperature=0, max_tokens=24, stream=True,
                                              messages=[{"role": "user", "content": QUESTION}]))
    assert len(chunks) > 3 and "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want[B]

    from openai import NotFoundError

    with pytest.raises(NotFoundError) as e:  # a model no ring serves: 404 listing the ones served
        oa.chat.completions.create(model="nope", max_tokens=2, messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["code"] == "model_not_found" and B in e.value.body["message"]


@pytest.mark.slow
def test_every_api_reaches_the_other_ring_as_its_own_api_peer_answers(mesh):
    """Anthropic messages (streamed too), their token count and OpenAI responses for B, through a1
    (no layer of B) and straight from b2 (B's API peer): the same answers."""
    from anthropic import Anthropic

    a1, b2 = mesh.peers["a1"], mesh.peers["b2"]
    msgs = [{"role": "user", "content": QUESTION}]
    got = {}
    for peer in (a1, b2):
        an = Anthropic(base_url=peer.api, api_key="unused", max_retries=0, timeout=120)
        # (this client has no temperature argument any more; the API still takes one)
        m = an.messages.create(model=B, max_tokens=24, messages=msgs, extra_body={"temperature": 0})
        with an.messages.stream(model=B, max_tokens=24, messages=msgs, extra_body={"temperature": 0}) as st:
            streamed = "".join(st.text_stream)
        count = an.messages.count_tokens(model=B, messages=msgs).input_tokens
        r = _client(peer).responses.create(model=B, input=QUESTION, max_output_tokens=24, temperature=0)
        got[peer.name] = (m.content[0].text, streamed, count, r.output_text)
    assert got["a1"] == got["b2"] and got["a1"][0] == got["a1"][1] and got["a1"][2] > 5, got


@pytest.mark.slow
def test_losing_a_peer_of_one_ring_leaves_the_other_answering(mesh, want, other):
    a1, b1 = mesh.peers["a1"], mesh.peers["b1"]
    b1.proc.send_signal(signal.SIGKILL)
    b1.proc.wait()
    rings = _wait_rings(a1, lambda rs: len(rs) == 2 and not rs[1]["complete"])
    assert rings[0]["complete"] and "[0, 2)" in rings[1]["missing"], rings
    code, body = http_json(f"{a1.api}/v1/models")
    assert [m["id"] for m in body["data"]] == [A], body
    oa = _client(a1)
    assert _ask(oa, A)[0] == want[A]
    from openai import APIStatusError

    with pytest.raises(APIStatusError) as e:
        _ask(oa, B)
    assert e.value.status_code == 503 and "incomplete" in e.value.message

    # a peer that can serve either model stands by for the one whose ring lacks layers: B's heals
    c = mesh.add("c", "--backend", "torch", "--dtype", "float32", "--no-mdns", "--max-memory", MEMORY,
                 "--peer", a1.address, "--model", f"{mesh.model},{other}")
    rings = _wait_rings(a1, lambda rs: len(rs) == 2 and rs[1]["complete"], timeout=90)
    assert [s["name"] for s in rings[1]["ring"]] == ["c", "b2"], rings
    assert f"serving {B} (its ring lacks layers [0, 2))" in c.log()
    assert _ask(oa, B)[0] == want[B]

    # the coordinator (of A) dies: b2, a peer of B, takes over and rebuilds A's ring from a2's report
    a1.proc.send_signal(signal.SIGKILL)
    a1.proc.wait()
    b2 = mesh.peers["b2"]
    rings = _wait_rings(b2, lambda rs: len(rs) == 2 and not rs[1]["complete"] and rs[1]["epoch"] > 0)
    assert [(r["model"], r["complete"]) for r in rings] == [(B, True), (A, False)], rings
    assert [s["name"] for s in rings[1]["ring"]] == ["a2"] and "[0, 15)" in rings[1]["missing"], rings
    assert [p["name"] for p in _mesh(b2)["peers"] if p["coordinator"]] == ["b2"]
    assert _ask(_client(b2), B)[0] == want[B]


def test_a_peer_refused_for_another_model_under_the_rings_name_stops_saying_why():
    from backends.errors import TogetherError
    from tests.mesh.test_roles import make_membership, make_view

    boss = peer("boss", "10.0.0.1:1", 1.0, 0, 3)
    view = make_view(stages=[("boss", 0, 3)], coordinator="boss", peers=[boss])
    links = FakeLinks()
    why = f"this mesh's m has 3 layers of hidden size 64, this peer's has 3 of 128: {CLASH} (give it ...)"
    links.answers[("10.0.0.1:1", "Join")] = pb.JoinReply(ok=False, reason=why, start=-1, end=-1, plan=view.plan)
    m, _, _ = make_membership(view, links)
    with pytest.raises(TogetherError, match=CLASH):
        asyncio.run(m.claim())
