"""Each role of a peer on its own, without gRPC servers or other processes: fake links stand in for
the other peers."""

import asyncio
import os
import subprocess

import grpc
import numpy as np
import pytest

from backends.errors import GroupError
from backends.wire import Hidden
from mesh.coordination import CoordinatorRole
from mesh.membership import Membership
from mesh.metrics import PeerMetrics
from mesh.node import FrameError, NodeConfig
from mesh.origin import Origin
from mesh.servicer import Servicer
from mesh.stage import Stage
from mesh.tasks import TaskSet
from mesh.tpgroup import TPManager
from mesh.view import PlanView
from protos import together_pb2 as pb

ME = "127.0.0.1:5000"
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


def rpc_error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=code.name)


class FakeStream:
    def __init__(self, links, address, kind):
        self.links, self.address, self.kind = links, address, kind

    async def send(self, msg, payload=b""):
        if self.address in self.links.down:
            raise ConnectionError(f"cannot reach {self.address}")
        if len(payload):  # what the receiver parses: the hidden states as the frame's data
            msg = type(msg).FromString(msg.SerializeToString() + pb.Frame(data=bytes(payload)).SerializeToString())
        self.links.sent.append((self.address, self.kind, msg))


class FakeStub:
    """Answers each RPC from `links.answers[(address, method)]`: a value, an exception, or a callable."""

    def __init__(self, links, address):
        self.links, self.address = links, address

    def __getattr__(self, method):
        async def call(request, timeout=None):
            self.links.calls.append((self.address, method, request))
            a = self.links.answers.get((self.address, method), rpc_error(UNAVAILABLE))
            if callable(a) and not isinstance(a, BaseException):
                a = a(request)
            if isinstance(a, BaseException):
                raise a
            return a
        return call


class FakeLinks:
    """Stands in for mesh.links.Peers: records what a role sends to other peers."""

    def __init__(self):
        self.sent, self.calls, self.answers, self.down = [], [], {}, set()

    def stream(self, address, kind):
        return FakeStream(self, address, kind)

    def stub(self, address):
        return FakeStub(self, address)


def peer(node_id, address, started_at=1.0, start=-1, end=-1, **kw):
    return pb.PeerInfo(node_id=node_id, name=node_id, address=address, started_at=started_at, start=start,
                       end=end, model="m", backend="torch", free_memory=10**10, layer_ms=1.0, layer_bytes=1000,
                       ready=start >= 0, **kw)


def make_view(stages=((("me", 0, 3),)), epoch=7, coordinator="me", peers=()):
    view = PlanView("me", "me", "127.0.0.1", 3)
    view.port = 5000
    view.plan = pb.Plan(epoch=epoch, num_layers=3, coordinator=coordinator, complete=True,
                        stages=[pb.Assignment(node_id=n, start=a, end=b) for n, a, b in stages],
                        peers=list(peers))
    for p in peers:
        view.known[p.node_id] = p
    return view


@pytest.fixture(scope="module")
def tiny_ck(tmp_path_factory):
    from backends.weights import open_checkpoint
    from tests.backends.test_tp import tiny_dir

    return open_checkpoint(tiny_dir(tmp_path_factory.mktemp("roles") / "tiny-llama"))


def torch_shard(ck, start, end):
    from backends.shard import load_shard

    return load_shard("torch", ck, start, end, dtype="float32", threads=1)


def make_stage(view, links=None, shard=None):
    delivered, group_errors = [], []
    st = Stage(view, links or FakeLinks(), PeerMetrics(), deliver=delivered.append, group_failed=group_errors.append)
    st.shard = shard
    return st, delivered, group_errors


def token_frame(epoch=7, seq="s1", tokens=(1, 2, 3), start=True, offset=0, origin=ME):
    return pb.Frame(frame_id=11, epoch=epoch, origin=origin, tokens=list(tokens),
                    seqs=[pb.SeqEntry(seq_id=seq, offset=offset, length=len(tokens), start=start,
                                      history=list(tokens))])


def metric(m: PeerMetrics, name: str) -> float:
    return m.registry.get_sample_value(name) or 0.0


# ---------------------------------------------------------------- Stage


def test_stage_refuses_stale_epoch_and_a_peer_without_layers(tiny_ck):
    st, _, _ = make_stage(make_view())
    with pytest.raises(FrameError) as e:
        asyncio.run(st.handle_frame(token_frame()))
    assert e.value.code == UNAVAILABLE and "holds no layers" in str(e.value)
    st.shard = torch_shard(tiny_ck, 0, 3)
    with pytest.raises(FrameError) as e:
        asyncio.run(st.handle_frame(token_frame(epoch=6)))
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and "stale plan epoch 6" in str(e.value)
    with pytest.raises(FrameError) as e:  # a newer epoch than this peer's is refused too: epochs must match
        asyncio.run(st.handle_frame(token_frame(epoch=8)))
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert st.shard.num_sequences == 0  # refused before any cache was made


def test_stage_refuses_a_peer_that_is_no_stage_and_duplicate_sequences(tiny_ck):
    st, _, _ = make_stage(make_view(stages=[("other", 0, 3)]), shard=torch_shard(tiny_ck, 0, 3))
    with pytest.raises(FrameError, match="not a stage of the plan"):
        asyncio.run(st.handle_frame(token_frame()))
    st.view.plan = make_view().plan
    f = token_frame()
    f.seqs.append(f.seqs[0])
    with pytest.raises(FrameError, match="a sequence twice") as e:
        asyncio.run(st.handle_frame(f))
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("dtype, nbytes, why", [("float32", 4 * 128 * 2 - 4, "byte"), ("float13", 4 * 128 * 2, "dtype")])
def test_stage_refuses_hidden_states_that_lie_and_keeps_other_sequences(tiny_ck, dtype, nbytes, why):
    st, delivered, _ = make_stage(make_view(stages=[("up", 0, 1), ("me", 1, 3)]), shard=torch_shard(tiny_ck, 1, 3))
    st.shard.add_sequence("kept", prompt=[1])
    f = pb.Frame(frame_id=3, epoch=7, origin="10.0.0.9:1", dtype=dtype, shape=[2, 128], data=b"\0" * nbytes,
                 seqs=[pb.SeqEntry(seq_id="new", offset=0, length=2, start=True)])
    with pytest.raises(FrameError) as e:
        asyncio.run(st.handle_frame(f))
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "corrupt frame" in str(e.value)
    assert st.shard.has_sequence("kept") and not st.shard.has_sequence("new")
    assert not delivered and metric(st.metrics, "together_stage_compute_seconds_count") == 0


def test_stage_frees_what_a_failed_frame_started_but_not_older_sequences(tiny_ck):
    st, _, _ = make_stage(make_view(), shard=torch_shard(tiny_ck, 0, 3))
    st.shard.add_sequence("old", prompt=[1])
    f = token_frame(tokens=(1, 2, 999))  # a token id out of the vocabulary: the backend refuses it
    with pytest.raises(FrameError) as e:
        asyncio.run(st.handle_frame(f))
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "vocabulary" in str(e.value)
    assert st.shard.has_sequence("old") and not st.shard.has_sequence("s1")


def test_last_stage_samples_like_the_shard_and_counts_into_metrics(tiny_ck):
    from tests.helpers import greedy

    want = greedy([torch_shard(tiny_ck, 0, 3)], [1, 2, 3], 1)
    st, delivered, _ = make_stage(make_view(), shard=torch_shard(tiny_ck, 0, 3))
    asyncio.run(st.handle_frame(token_frame()))
    (res,) = delivered
    assert res.frame_id == 11 and not res.error and [r.token for r in res.results] == want
    assert len(res.hop_ms) == 1 and len(st.hop_ms) == 1 and st.tokens_per_s() > 0
    assert metric(st.metrics, "together_stage_tokens_total") == 1
    assert metric(st.metrics, "together_stage_compute_seconds_count") == 1
    assert st.shard.has_sequence("s1") and asyncio.run(st.release(["s1", "nope"])) == 1
    assert st.shard.num_sequences == 0


def test_middle_stage_passes_hidden_states_to_the_next_stage(tiny_ck):
    nxt = peer("next", "10.0.0.2:7000")
    links = FakeLinks()
    st, delivered, _ = make_stage(make_view(stages=[("me", 0, 1), ("next", 1, 3)], peers=[nxt]), links,
                                  torch_shard(tiny_ck, 0, 1))
    asyncio.run(st.handle_frame(token_frame(tokens=(5,))))
    ((addr, kind, f),) = links.sent
    assert (addr, kind, f.origin, f.epoch, f.frame_id) == ("10.0.0.2:7000", "Forward", ME, 7, 11)
    assert tuple(f.shape) == (1, 128) and Hidden(f.data, f.dtype, tuple(f.shape)).nbytes == len(f.data)
    assert st.bytes_per_token_hop == f.ByteSize() and not delivered
    assert metric(st.metrics, "together_stage_tokens_total") == 0  # only the last stage samples


def hidden_frame(rows: int, seqs: list[pb.SeqEntry], seed: int = 0) -> pb.Frame:
    x = np.random.default_rng(seed).standard_normal((rows, 128), dtype=np.float32)
    return pb.Frame(frame_id=5, epoch=7, origin="10.0.0.9:1", dtype="float32", shape=[rows, 128],
                    data=x.tobytes(), seqs=seqs)


def test_a_sequence_unknown_at_a_stage_fails_alone_and_the_rest_of_the_frame_runs(tiny_ck):
    # the last stage of two: "a" decodes, "gone" was released here (its client left), "c" starts
    def last_stage():
        links = FakeLinks()
        st, _, _ = make_stage(make_view(stages=[("up", 0, 1), ("me", 1, 3)]), links, torch_shard(tiny_ck, 1, 3))
        st.shard.add_sequence("a", prompt=[1])
        asyncio.run(st.handle_frame(hidden_frame(1, [pb.SeqEntry(seq_id="a", offset=0, length=1)], seed=1)))
        links.sent.clear()
        return st, links

    st, links = last_stage()
    x = np.random.default_rng(2).standard_normal((4, 128), dtype=np.float32)
    with_gone = hidden_frame(4, [pb.SeqEntry(seq_id="a", offset=1, length=1),
                                 pb.SeqEntry(seq_id="gone", offset=7, length=1),
                                 pb.SeqEntry(seq_id="c", offset=0, length=2, start=True)])
    with_gone.data = x.tobytes()
    asyncio.run(st.handle_frame(with_gone))
    ((_, kind, res),) = links.sent
    assert kind == "Deliver" and list(res.failed_seqs) == ["gone"] and "unknown sequence 'gone'" in res.error
    assert res.error_code == grpc.StatusCode.FAILED_PRECONDITION.value[0]  # its API peer may replay it
    alone, links2 = last_stage()  # the same frame without the unknown row gives the same tokens
    without = hidden_frame(3, [with_gone.seqs[0], with_gone.seqs[2]])
    without.data = np.concatenate([x[:1], x[2:]]).tobytes()
    asyncio.run(alone.handle_frame(without))
    ((_, _, want),) = links2.sent
    assert [(r.seq_id, r.token) for r in res.results] == [(r.seq_id, r.token) for r in want.results]
    assert not want.error and st.shard.position("a") == 2 and st.shard.position("c") == 2


def test_a_middle_stage_drops_the_unknown_row_and_passes_the_rest_with_the_failure(tiny_ck):
    nxt = peer("next", "10.0.0.2:7000")
    links = FakeLinks()
    st, delivered, _ = make_stage(make_view(stages=[("me", 0, 1), ("next", 1, 3)], peers=[nxt]), links,
                                  torch_shard(tiny_ck, 0, 1))
    f = pb.Frame(frame_id=9, epoch=7, origin=ME, tokens=[4, 5, 6, 7], seqs=[
        pb.SeqEntry(seq_id="gone", offset=3, length=1),
        pb.SeqEntry(seq_id="b", offset=0, length=3, start=True, more=True)])
    asyncio.run(st.handle_frame(f))
    ((_, kind, out),) = links.sent
    assert kind == "Forward" and [e.seq_id for e in out.seqs] == ["b"] and out.seqs[0].more
    assert tuple(out.shape) == (3, 128) and list(out.failed_seqs) == ["gone"] and "unknown" in out.error
    # a frame whose every sequence is unknown fails whole, naming them
    with pytest.raises(FrameError) as e:
        asyncio.run(st.handle_frame(pb.Frame(frame_id=10, epoch=7, origin=ME, tokens=[1],
                                             seqs=[pb.SeqEntry(seq_id="gone", offset=3, length=1)])))
    assert e.value.seqs == ["gone"] and not delivered


def test_a_stage_frees_sequences_idle_past_their_lease(tiny_ck):
    st, _, _ = make_stage(make_view(), shard=torch_shard(tiny_ck, 0, 3))
    st.lease = 0.3

    async def main() -> list[int]:
        await st.handle_frame(token_frame(seq="orphan"))
        seen = [st.shard.num_sequences]
        await asyncio.sleep(1.0)  # no frame and no release: its API peer is gone
        return seen + [st.shard.num_sequences, len(st.seen)]

    assert asyncio.run(main()) == [1, 0, 0]


def test_the_stage_rate_counts_tokens_not_frames(tiny_ck):
    st, _, _ = make_stage(make_view(), shard=torch_shard(tiny_ck, 0, 3))
    st.hop_ms, st._hop_tokens = [100.0, 100.0], [8, 8]  # two frames of eight tokens, 0.1 s each
    assert st.tokens_per_s() == pytest.approx(80.0)


def test_send_frame_returns_failures_to_the_origin():
    links = FakeLinks()
    links.down.add("10.0.0.2:7000")
    st, delivered, _ = make_stage(make_view(), links)
    asyncio.run(st.send_frame("10.0.0.2:7000", token_frame()))  # the next stage is unreachable
    asyncio.run(st.send_frame(ME, token_frame(epoch=3)))  # this stage refuses it (stale)
    assert [(r.frame_id, r.error_code, list(r.failed_seqs)) for r in delivered] == [
        (11, UNAVAILABLE.value[0], ["s1"]), (11, grpc.StatusCode.FAILED_PRECONDITION.value[0], ["s1"])]
    links.down.clear()
    asyncio.run(st.send_frame(ME, token_frame(epoch=3, origin="10.0.0.9:1")))  # remote origin: Deliver
    ((addr, kind, res),) = links.sent
    assert (addr, kind) == ("10.0.0.9:1", "Deliver") and "stale" in res.error


class GroupShard:
    """A shard whose tensor-parallel group lost a rank."""

    is_first, is_last = True, True

    def add_sequence(self, *a, **k):
        pass

    def free_sequence(self, s):
        return True

    def position(self, s):
        return 0

    def forward(self, chunks, x):
        raise GroupError("rank 1 is gone")


def test_a_lost_rank_fails_the_frame_and_tells_the_group_manager():
    st, _, group_errors = make_stage(make_view(), shard=GroupShard())
    with pytest.raises(FrameError) as e:
        asyncio.run(st.handle_frame(token_frame()))
    assert e.value.code == UNAVAILABLE and group_errors == ["rank 1 is gone"]


# ---------------------------------------------------------------- Origin


class LoopbackStage:
    """Stage 0 and the last stage in one: answers every frame with one token, or not at all."""

    def __init__(self, answer=True):
        self.frames, self.answer, self.origin = [], answer, None

    async def send_frame(self, address, frame):
        self.frames.append((address, frame))
        if self.answer:
            await asyncio.sleep(0)
            self.origin.deliver(pb.Result(frame_id=frame.frame_id,
                                          results=[pb.TokenResult(seq_id="s1", token=42)]))

    async def release(self, seq_ids):
        return len(seq_ids)


def make_origin(view, answer=True, links=None):
    stage = LoopbackStage(answer)
    o = Origin(view, stage, links or FakeLinks(), TaskSet())
    stage.origin = o
    view.on_ring_change.append(o.ring_changed)
    return o, stage


def test_run_frame_stamps_the_frame_and_resolves_on_delivery():
    o, stage = make_origin(make_view())
    fid = o.new_frame_id()
    assert o.new_frame_id() == fid + 1
    res = asyncio.run(o.run_frame(pb.Frame(frame_id=fid, tokens=[1]), timeout=5))
    assert [r.token for r in res.results] == [42] and o.pending == {}
    ((addr, f),) = stage.frames
    assert (addr, f.epoch, f.origin) == (ME, 7, ME)


def test_run_frame_fails_fast_on_an_incomplete_ring_and_times_out_cleanly():
    view = make_view()
    view.plan.complete, view.plan.missing = False, "[1, 3)"
    o, stage = make_origin(view, answer=False)
    with pytest.raises(FrameError, match="incomplete") as e:
        asyncio.run(o.run_frame(pb.Frame(frame_id=1)))
    assert e.value.code == UNAVAILABLE and not stage.frames
    view.plan.complete = True
    with pytest.raises(FrameError) as e:
        asyncio.run(o.run_frame(pb.Frame(frame_id=2), timeout=0.05))
    assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and o.pending == {}
    o.deliver(pb.Result(frame_id=2))  # a late result for a frame nobody waits for is dropped


def test_a_ring_change_fails_frames_under_way():
    view = make_view()
    o, _ = make_origin(view, answer=False)

    async def go():
        t = asyncio.ensure_future(o.run_frame(pb.Frame(frame_id=5), timeout=5))
        await asyncio.sleep(0.01)
        same = pb.Plan(); same.CopyFrom(view.plan); same.epoch += 1
        view.set_plan(same)  # a new epoch on the same path: frames may still come back
        await asyncio.sleep(0.01)
        assert not t.done()
        moved = pb.Plan(); moved.CopyFrom(same)
        moved.stages[0].end, moved.complete = 2, False
        view.set_plan(moved)
        return await t

    res = asyncio.run(go())
    assert res.frame_id == 5 and res.error_code == UNAVAILABLE.value[0] and "ring changed" in res.error


def test_release_asks_every_stage_and_sums_what_answers():
    links = FakeLinks()
    b, c = peer("b", "10.0.0.2:1"), peer("c", "10.0.0.3:1")
    links.answers[("10.0.0.2:1", "Release")] = pb.ReleaseReply(freed=2)
    view = make_view(stages=[("me", 0, 1), ("b", 1, 2), ("c", 2, 3)], peers=[b, c])
    o, _ = make_origin(view, links=links)
    assert asyncio.run(o.release(["x", "y"])) == 2 + 2  # c does not answer: not counted, no error
    assert {(a, m) for a, m, _ in links.calls} == {("10.0.0.2:1", "Release"), ("10.0.0.3:1", "Release")}


def test_a_release_is_asked_again_until_the_stage_acknowledges():
    links = FakeLinks()
    c = peer("c", "10.0.0.3:1")
    view = make_view(stages=[("me", 0, 1), ("c", 1, 3)], peers=[c])
    o, _ = make_origin(view, links=links)

    async def main() -> None:
        await o.release(["x"])  # c's first answer is lost
        links.answers[("10.0.0.3:1", "Release")] = pb.ReleaseReply(freed=1)
        await asyncio.sleep(1.2)

    asyncio.run(main())
    asks = [m for a, m, _ in links.calls if a == "10.0.0.3:1"]
    assert asks == ["Release", "Release"]  # asked again, then acknowledged: no more asks


# ---------------------------------------------------------------- coordinator and membership


class FakeStage:
    shard = None


class FakeTP:
    group, group_name, members = None, "", []

    async def tick(self):
        pass


def make_membership(view, links, info=None):
    tasks = TaskSet()
    rejoined = []
    coord = CoordinatorRole(view, links, tasks, "m", 3, kv_reserve=0, claim_window_s=0.01,
                            rejoin=lambda: rejoined.append(True))
    cfg = NodeConfig(model="m", model_path="/nowhere", backend="torch")
    me = info or peer("me", ME, started_at=2.0)
    m = Membership(cfg, view, coord, FakeStage(), FakeTP(), links, tasks, info=lambda: me,
                   make_shard=lambda a, b: None)
    return m, coord, rejoined


def mesh_of_three():
    """'boss' coordinated; 'me' is the oldest survivor, 'b' the other one."""
    boss, me, b = (peer("boss", "10.0.0.1:1", 1.0, 0, 1), peer("me", ME, 2.0, 1, 2),
                   peer("b", "10.0.0.2:1", 3.0, 2, 3))
    view = make_view(stages=[("boss", 0, 1), ("me", 1, 2), ("b", 2, 3)], coordinator="boss", peers=[boss, me, b])
    return view, boss, me, b


def test_the_oldest_survivor_takes_over_when_the_coordinator_is_gone():
    view, boss, me, b = mesh_of_three()
    links = FakeLinks()
    links.answers[("10.0.0.2:1", "Status")] = pb.StatusReply(peer=b, plan=view.plan)
    m, coord, _ = make_membership(view, links, me)

    async def go():
        await m.coordinator_lost()
        await asyncio.sleep(0.01)  # the pushes

    asyncio.run(go())
    assert coord.active and view.plan.coordinator == "me" and view.plan.epoch > 7
    assert {p.node_id for p in view.plan.peers} == {"me", "b"}
    assert "boss" not in {s.node_id for s in view.plan.stages}  # its layers went to a survivor
    assert [s.start for s in view.plan.stages][0] == 0 and view.plan.stages[-1].end == 3
    assert ("10.0.0.2:1", "PushPlan") in {(a, k) for a, k, _ in links.calls}


def test_no_takeover_by_a_younger_peer_a_cut_off_peer_or_while_the_coordinator_answers():
    view, boss, me, b = mesh_of_three()
    links = FakeLinks()
    m, coord, _ = make_membership(view, links, b)
    view.node_id = "b"  # not the heir: 'me' is older
    asyncio.run(m.coordinator_lost())
    assert not coord.active and links.calls == []

    view, *_ = mesh_of_three()
    m, coord, _ = make_membership(view, links)
    asyncio.run(m.coordinator_lost())  # nobody answers: this peer is the one cut off
    assert not coord.active and view.plan.coordinator == "boss" and m._cut_off

    view, *_ = mesh_of_three()
    links.answers[("10.0.0.1:1", "Status")] = pb.StatusReply()
    m, coord, _ = make_membership(view, links)
    asyncio.run(m.coordinator_lost())  # heartbeats failed but it answers: not dead
    assert not coord.active and view.plan.coordinator == "boss"


def test_a_peer_the_coordinator_moved_on_without_follows_it_instead_of_taking_over(monkeypatch):
    view, boss, me, b = mesh_of_three()
    newer = pb.Plan()
    newer.CopyFrom(view.plan)
    newer.epoch = 12
    links = FakeLinks()
    links.answers[("10.0.0.2:1", "Status")] = pb.StatusReply(peer=b, plan=newer)
    m, coord, _ = make_membership(view, links, me)
    claims = []

    async def claim(rejoin=False):
        claims.append(rejoin)

    monkeypatch.setattr(m, "claim", claim)

    async def go():
        await m.coordinator_lost()
        await asyncio.sleep(0.01)

    asyncio.run(go())
    assert not coord.active and view.plan.epoch == 12 and view.plan.coordinator == "boss" and claims == [True]


def test_the_older_of_two_coordinators_wins_when_they_meet():
    view = make_view(peers=[peer("me", ME, 2.0, 0, 3)])
    links = FakeLinks()
    m, coord, rejoined = make_membership(view, links)
    coord.become(epoch=0)
    assert coord.active and view.plan.coordinator == "me"
    younger = pb.Plan(epoch=9, num_layers=3, coordinator="y", peers=[peer("y", "10.0.0.5:1", 5.0)])

    async def meet(plan):
        await m.on_push(plan, started_at=2.0)
        await asyncio.sleep(0.01)

    asyncio.run(meet(younger))
    assert coord.active and not rejoined and view.plan.coordinator == "me"
    assert ("10.0.0.5:1", "PushPlan") in {(a, k) for a, k, _ in links.calls}  # told it who coordinates
    older = pb.Plan(epoch=1, num_layers=3, coordinator="o", peers=[peer("o", "10.0.0.6:1", 0.5)])
    asyncio.run(meet(older))
    assert not coord.active and rejoined == [True] and view.plan.coordinator == "o"


def test_a_silent_member_is_dropped_only_if_it_does_not_answer():
    view = make_view(stages=[], peers=[])
    links = FakeLinks()
    m, coord, _ = make_membership(view, links)
    view.known = {"me": peer("me", ME, 2.0), "a": peer("a", "10.0.0.2:1", 3.0, 0, 3),
                  "busy": peer("busy", "10.0.0.3:1", 4.0)}
    coord.become(epoch=0)
    lm = coord.layer_map
    assert ("a", 0, 3) in lm.stages
    for n in ("a", "busy"):
        lm.members[n].last_seen = 0.0
    links.answers[("10.0.0.3:1", "Status")] = pb.StatusReply(plan=view.plan)

    async def go():
        await coord.expire_peers()
        await asyncio.sleep(0.01)

    asyncio.run(go())
    assert set(lm.members) == {"me", "busy"} and "a" not in view.known
    assert all(s[0] != "a" for s in lm.stages) and not lm.missing()  # its layers went to a standby
    assert view.plan.epoch == lm.epoch > 0


# ---------------------------------------------------------------- tensor-parallel manager


class FakeWorker:
    def __init__(self, code=None):
        self.returncode, self.killed = code, False

    def poll(self):
        return self.returncode

    def kill(self):
        self.killed, self.returncode = True, -9

    def wait(self):
        return self.returncode


def make_tp(view, links=None, key="k"):
    reports, rejoins = [], []

    async def report():
        reports.append(True)
        return True

    async def rejoin():
        rejoins.append(True)

    cfg = NodeConfig(model="m", model_path="/models/m", backend="torch", mesh_key=key, tp_group="g", tp_size=2,
                     dtype="float32", threads=2)
    stage = FakeStage()
    tp = TPManager(cfg, None, view, stage, links or FakeLinks(), TaskSet(), report, rejoin)
    return tp, stage, reports, rejoins


def test_tp_key_is_shared_by_the_mesh_and_differs_per_leader_and_key():
    view = make_view()
    a, b = make_tp(view)[0], make_tp(view)[0]
    assert a.key("L") == b.key("L") != a.key("M")
    assert make_tp(view, key="other")[0].key("L") != a.key("L")


def test_tp_worker_that_exits_ends_the_group_and_the_peer_rejoins_alone():
    tp, _, reports, rejoins = make_tp(make_view())
    tp.worker, tp.worker_stage = FakeWorker(code=3), ("L", 0, 3)

    async def go():
        await tp.tick()
        await asyncio.sleep(0.01)

    asyncio.run(go())
    assert tp.worker is None and tp.group_name == "" and tp.size == 0
    assert reports == [True] and rejoins == [True]
    tp.lost("again")  # no group any more: nothing to tell
    tp.group_failed("again")
    assert reports == [True]


def test_tp_worker_starts_with_the_plan_and_stops_when_the_stage_moves(monkeypatch):
    import backends.tp

    leader = peer("L", "10.0.0.7:9000", 1.0)
    view = make_view(stages=[], peers=[leader])
    view.plan.stages.append(pb.Assignment(node_id="L", start=0, end=3, tp_members=["L", "me"]))
    links = FakeLinks()
    links.answers[("10.0.0.7:9000", "Status")] = pb.StatusReply(
        peer=pb.PeerInfo(name="L", start=-1, end=-1, tp_address="0.0.0.0:9100"))
    spawned = []
    monkeypatch.setattr(backends.tp, "spawn_worker", lambda spec, key: spawned.append((spec, key)) or FakeWorker())
    tp, *_ = make_tp(view, links)
    asyncio.run(tp.tick())
    ((spec, key),) = spawned
    assert (spec.rank, spec.world, spec.connect, spec.model, spec.layers) == (1, 2, "10.0.0.7:9100", "/models/m", (0, 3))
    assert (spec.backend, spec.dtype, spec.threads, spec.parent) == ("torch", "float32", 2, os.getpid())
    assert key == tp.key("L") and tp.worker_stage == ("L", 0, 3)
    w = tp.worker
    asyncio.run(tp.tick())  # running, same stage: nothing new
    assert len(spawned) == 1 and not w.killed
    view.plan.stages[0].end = 2  # the group's stage moved: this worker is stale
    asyncio.run(tp.tick())
    assert w.killed and tp.worker is None


def test_tp_dissolve_drops_the_groups_shard_only():
    class Group:
        closed = False

        def __init__(self):
            self.shard = object()

        def close(self):
            Group.closed = True

    tp, stage, *_ = make_tp(make_view())
    other = object()
    tp.group, stage.shard = Group(), other
    tp.dissolve("test")
    assert stage.shard is other and tp.group is None and tp.group_name == ""
    tp.group_name, tp.group = "g", Group()
    stage.shard = tp.group.shard
    tp.dissolve("test")
    assert stage.shard is None


# ---------------------------------------------------------------- servicer


class Aborted(Exception):
    pass


class FakeContext:
    def __init__(self, caller=None):
        self.caller, self.aborts = caller, []

    def invocation_metadata(self):
        from mesh.auth import NODE_KEY

        return [(NODE_KEY, self.caller)] if self.caller else []

    def peer(self):
        return "ipv4:10.0.0.9:1"

    async def abort(self, code, details):
        self.aborts.append((code, details))
        raise Aborted(details)


async def frames(*fs):
    for f in fs:
        yield f


def make_servicer(view, key="k"):
    links = FakeLinks()
    m, coord, _ = make_membership(view, links)
    st, delivered, _ = make_stage(view, links)
    o = Origin(view, st, links, TaskSet())
    return Servicer(key, 3, 2.0, view, m, coord, st, o, status=lambda: pb.StatusReply()), delivered, links


def test_forward_returns_errors_to_the_origin_or_aborts_without_one():
    svc, delivered, links = make_servicer(make_view())
    ctx = FakeContext()
    asyncio.run(svc.Forward(frames(token_frame(epoch=1), token_frame(epoch=2)), ctx))  # the stream stays up
    assert len(delivered) == 2 and ctx.aborts == []
    with pytest.raises(Aborted):
        asyncio.run(svc.Forward(frames(token_frame(origin="")), ctx))
    assert ctx.aborts[0][0] == UNAVAILABLE


def test_servicer_refuses_spoofed_reports_and_misfit_plans():
    view = make_view()
    svc, *_ = make_servicer(view)
    hb = pb.HeartbeatRequest(peer=peer("x", "10.0.0.4:1"))
    ctx = FakeContext(caller="y")
    with pytest.raises(Aborted):
        asyncio.run(svc.Heartbeat(hb, ctx))
    assert ctx.aborts[-1][0] == grpc.StatusCode.PERMISSION_DENIED
    bad = pb.HeartbeatRequest(peer=peer("x", "nowhere"))
    with pytest.raises(Aborted):
        asyncio.run(svc.Heartbeat(bad, FakeContext(caller="x")))
    misfit = pb.Plan(epoch=99, num_layers=4, coordinator="me", peers=[peer("me", ME)])
    ctx = FakeContext(caller="me")
    with pytest.raises(Aborted):
        asyncio.run(svc.PushPlan(misfit, ctx))
    assert ctx.aborts[-1][0] == grpc.StatusCode.INVALID_ARGUMENT and view.plan.epoch == 7
    with pytest.raises(Aborted):  # this peer does not coordinate
        asyncio.run(svc.Join(pb.JoinRequest(peer=peer("x", "10.0.0.4:1")), FakeContext(caller="x")))
