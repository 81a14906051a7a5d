"""Speculative decoding in the mesh, in one process: the scheduler drafts, real Stage objects with real
torch shards verify (a two-stage ring wired by in-process links, the real Origin in front), and every
stage rolls back past rejected drafts. Multi-process rings are in test_spec_ring.py."""

from __future__ import annotations

import asyncio
import itertools

import numpy as np
import pytest

from backends.sampling import SamplingParams
from backends.shard import load_shard
from backends.speculation import Drafter, PromptLookup
from backends.weights import Checkpoint
from mesh.batching import Request, pick
from mesh.drafting import Drafting, landed
from mesh.metrics import PeerMetrics
from mesh.origin import Origin
from mesh.scheduler import Scheduler
from mesh.stage import Stage
from mesh.tasks import TaskSet
from mesh.view import PlanView
from protos import together_pb2 as pb

API = "127.0.0.1:4000"


class Wire:
    """In-process links: a Forward send hands the frame (its payload as `data`, as a receiver parses it)
    to the stage listening at that address; a Deliver send hands a Result to the API peer's origin."""

    def __init__(self) -> None:
        self.stages: dict[str, Stage] = {}
        self.origin: Origin | None = None
        self.frames: list[tuple[str, pb.Frame]] = []  # (address, frame) of every hop

    def stream(self, address: str, kind: str) -> "Wire.Link":
        return Wire.Link(self, address, kind)

    async def before(self, address: str, kind: str) -> None:
        """Called before each send (a hook for faults)."""

    class Link:
        def __init__(self, wire: "Wire", address: str, kind: str) -> None:
            self.wire, self.address, self.kind = wire, address, kind

        async def send(self, msg, payload=b"") -> None:
            await self.wire.before(self.address, self.kind)
            if len(payload):
                msg = type(msg).FromString(msg.SerializeToString() + pb.Frame(data=bytes(payload)).SerializeToString())
            if self.kind == "Forward":
                self.wire.frames.append((self.address, msg))
                await self.wire.stages[self.address].receive(msg)
            else:
                assert self.wire.origin is not None
                self.wire.origin.deliver(msg)


class LocalRing:
    """What the scheduler needs of a peer (mesh.scheduler.Ring), over stages of real shards in this
    process: layers split at `cuts`, float32, one compute thread each."""

    def __init__(self, ck: Checkpoint, cuts: tuple[int, ...]) -> None:
        n = ck.config.num_hidden_layers
        bounds = [0, *cuts, n]
        self.ck, self.metrics, self.node_id = ck, PeerMetrics(), "a" * 32
        peers = [pb.PeerInfo(node_id=f"s{i}", address=f"127.0.0.1:{5000 + i}") for i in range(len(bounds) - 1)]
        self.plan = pb.Plan(epoch=3, complete=True, num_layers=n, peers=peers,
                            stages=[pb.Assignment(node_id=f"s{i}", start=a, end=b)
                                    for i, (a, b) in enumerate(zip(bounds, bounds[1:]))])
        self.wire = Wire()
        self.shards = []
        for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
            st = Stage(self._view(f"s{i}", 5000 + i), self.wire, PeerMetrics(), deliver=lambda r: None,  # type: ignore[arg-type]
                       group_failed=lambda why: None)
            st.shard = load_shard("torch", ck, a, b, dtype="float32", threads=1)
            self.wire.stages[st.view.address] = st
            self.shards.append(st.shard)
        api_view = self._view(self.node_id, 4000)
        self.api_stage = Stage(api_view, self.wire, PeerMetrics(), deliver=lambda r: None,  # type: ignore[arg-type]
                               group_failed=lambda why: None)
        self.origin = self.wire.origin = Origin(api_view, self.api_stage, self.wire, TaskSet())  # type: ignore[arg-type]
        self._ids = itertools.count(1)
        self.released: list[str] = []

    def _view(self, node_id: str, port: int) -> PlanView:
        v = PlanView(node_id, node_id, "127.0.0.1", self.plan.num_layers)
        v.port, v.plan = port, self.plan
        v.known = {p.node_id: p for p in self.plan.peers}
        return v

    def new_frame_id(self) -> int:
        return next(self._ids)

    async def run_frame(self, frame: pb.Frame, timeout: float = 120.0) -> pb.Result:
        return await self.origin.run_frame(frame, timeout)

    async def release(self, seq_ids: list[str]) -> int:
        out = 0
        for st in self.wire.stages.values():
            out += await st.release(seq_ids)
        self.released += seq_ids
        return out

    def close(self) -> None:
        for st in [*self.wire.stages.values(), self.api_stage]:
            st.close()


@pytest.fixture(scope="module")
def tiny_ck(tmp_path_factory):
    from backends.weights import open_checkpoint
    from tests.backends.test_tp import tiny_dir

    return open_checkpoint(tiny_dir(tmp_path_factory.mktemp("drafting") / "tiny-llama"))


def generate(ring: LocalRing, tokenizer, jobs: list[tuple[list[int], SamplingParams] | tuple[list[int], SamplingParams, str]],
             draft: str | Drafter, k_max: int = 6) -> tuple[list[list[int]], Scheduler]:
    """Every job submitted at once through a scheduler on `ring`; each one's tokens."""

    async def main() -> tuple[list[list[int]], Scheduler]:
        drafter = draft if not isinstance(draft, str) else PromptLookup() if draft == "lookup" else None
        ring.metrics = PeerMetrics()  # this run's counts
        drafting = Drafting(drafter, ring.metrics, k_max)
        sched = Scheduler(ring, tokenizer, drafting=drafting)
        await sched.start()
        before = len(ring.released)
        try:
            reqs = [sched.submit(*job) for job in jobs]  # (prompt, parameters[, adapter])
            outs = []
            for r in reqs:
                while (item := await asyncio.wait_for(r.queue.get(), 60)) is not None:
                    assert not isinstance(item, Exception), item
                outs.append(list(r.gen.tokens))
            for _ in range(200):  # releases run in the background
                if len(ring.released) >= before + len(reqs):
                    break
                await asyncio.sleep(0.01)
            return outs, sched
        finally:
            await sched.stop()

    return asyncio.run(main())


def params(n: int, **kw) -> SamplingParams:
    return SamplingParams(**{"temperature": 0.0, "max_tokens": n, "ignore_eos": True, **kw})


REPEAT = [5] * 10  # the tiny model answers it with a run of one token: lookup drafts it (and overshoots)
PLAIN = [3, 141, 59, 26, 5, 35, 89, 79, 32, 38, 46, 26]  # nothing repeats: lookup finds little


def drafted_frames(ring: LocalRing) -> list[pb.SeqEntry]:
    """Entries with drafts that reached stage 0."""
    return [e for addr, f in ring.wire.frames if addr.endswith(":5000") for e in f.seqs if e.drafts]


def with_adapter(ring: LocalRing, path) -> LocalRing:
    """Every shard of the ring serves a random LoRA adapter "rnd" of q_proj (it changes the answers)."""
    import json

    from safetensors.numpy import save_file

    from backends.lora import open_adapter

    if not path.exists():
        rng = np.random.default_rng(5)
        path.mkdir(parents=True)
        save_file({f"model.layers.{n}.self_attn.q_proj.{ab}": rng.standard_normal(shape).astype(np.float32)
                   for n in range(3) for ab, shape in (("lora_a", (128, 4)), ("lora_b", (4, 128)))},
                  str(path / "adapters.safetensors"))
        (path / "adapter_config.json").write_text(json.dumps(
            {"fine_tune_type": "lora", "num_layers": 3, "lora_parameters": {"rank": 4, "scale": 2.0}}))
    for sh in ring.shards:
        sh.load_adapter(open_adapter(f"rnd={path}"))
    return ring


def test_greedy_and_seeded_answers_are_the_same_with_and_without_drafts(tiny_ck, tokenizer, tmp_path) -> None:
    """A two-stage ring; a batch of a repetitive prompt (drafted), one that drafts little, a seeded
    sampled one and one on a LoRA adapter, in the same frames: each answer equals its answer without
    speculation, token for token, and drafts were sent, accepted and rejected on the way (every stage
    rolled back)."""
    jobs = [(REPEAT, params(40)), (PLAIN, params(24)),
            ([217] * 8, params(30, temperature=0.8, top_p=0.9, seed=11)), (REPEAT, params(30), "rnd")]
    plain_ring = with_adapter(LocalRing(tiny_ck, (2,)), tmp_path / "rnd")
    try:
        plain, _ = generate(plain_ring, tokenizer, jobs, "off")
    finally:
        plain_ring.close()
    assert not drafted_frames(plain_ring)
    ring = with_adapter(LocalRing(tiny_ck, (2,)), tmp_path / "rnd")
    try:
        spec, sched = generate(ring, tokenizer, jobs, "lookup")
        hops = list(ring.wire.frames)
        solo, _ = generate(ring, tokenizer, jobs[1:2], "lookup")  # alone in its frames
    finally:
        ring.close()
    assert spec == plain and solo == plain[1:2]
    assert plain[3] != plain[0][:30]  # the adapter changes the answer
    assert [len(t) for t in spec] == [40, 24, 30, 30]  # max_tokens cuts a trip's tokens mid-way
    m = sched.metrics
    drafted, accepted = m.count(m.spec_drafted), m.count(m.spec_accepted)
    assert 0 < accepted < drafted, (accepted, drafted)  # some drafts held, some were rolled back
    entries = [e for addr, f in hops if addr.endswith(":5000") for e in f.seqs if not e.start]
    drafted_entries = [e for e in entries if e.drafts]
    assert drafted_entries and all(e.length == e.drafts + 1 and len(e.draft_ids) == e.drafts
                                   for e in drafted_entries)
    assert any(e.trim for e in entries)  # rejected drafts were dropped on the next trip
    assert len(entries) < sum(len(t) for t in spec) - len(jobs)  # some trips brought several tokens
    assert all(sh.num_sequences == 0 for sh in ring.shards)  # every cache released
    assert sched.drafting is not None and sched.drafting.view()["drafted_tokens"] == drafted


def test_pick_carries_drafts_and_trims_where_the_last_trip_rejected(tokenizer) -> None:
    from backends.generation import Generation

    def running(seq: str, tokens: list[int], sent: int, trim: bool = False) -> Request:
        g = Generation(seq, tokens, params(10), tokenizer, 2048)
        return Request(g, sent=sent, fed=sent, trim=trim)

    dec = running("d", [1, 2, 3, 4], 3, trim=True)
    new = running("n", [5, 6, 7], 0)
    seqs, tokens, fed, bad = pick([dec, new], 4, 1 << 20, 512, 100, {"d": [9, 8, 7], "n": [1]})
    d, n = seqs
    assert (d.offset, d.length, d.drafts, list(d.draft_ids), d.trim) == (3, 4, 3, [9, 8, 7], True)
    assert (n.start, n.drafts, n.length) == (True, 0, 3)  # a start never drafts
    assert tokens == [4, 9, 8, 7, 5, 6, 7] and [k for _, k in fed] == [1, 3] and not bad
    # the frame's byte budget counts the drafts: what does not fit is cut
    seqs, tokens, _, _ = pick([dec], 4, 64 + 2 * 100, 512, 100, {"d": [9, 8, 7]})
    assert (seqs[0].length, seqs[0].drafts, tokens) == (2, 1, [4, 9])


def test_an_answer_that_cannot_be_the_trips_is_refused() -> None:
    assert landed(None, None, [], [5]) == 0  # type: ignore[arg-type]
    assert landed(None, None, [], [5, 6]) is None  # type: ignore[arg-type]  # tokens for drafts never sent
    assert landed(None, None, [1, 2], [1, 2, 3]) == 2  # type: ignore[arg-type]
    assert landed(None, None, [1, 2], [1, 7]) == 1  # type: ignore[arg-type]
    assert landed(None, None, [1, 2], [7, 2]) is None  # type: ignore[arg-type]  # "accepted" a token not drafted
    assert landed(None, None, [1, 2], []) is None  # type: ignore[arg-type]


def test_stages_roll_back_rejected_drafts_before_the_next_chunk(tiny_ck) -> None:
    """Rollback at every stage: a drafted chunk runs k + 1 positions everywhere; the last stage keeps
    offset + 1 + accepted; the stage before it holds the rejected positions until the sequence's next
    chunk, which drops them (trim) before it runs, while a chunk out of step without trim is refused."""
    ring = LocalRing(tiny_ck, (2,))
    first, last = ring.shards

    async def main() -> None:
        got: list[pb.Result] = []
        ring.origin.deliver = got.append  # type: ignore[method-assign]
        s0 = ring.wire.stages["127.0.0.1:5000"]

        async def trip(fid: int, tokens: list[int], e: pb.SeqEntry) -> pb.Result:
            await s0.receive(pb.Frame(frame_id=fid, epoch=3, origin=API, tokens=tokens, seqs=[e]))
            for _ in range(500):
                if got and got[-1].frame_id == fid:
                    return got[-1]
                await asyncio.sleep(0.01)
            raise AssertionError(f"frame {fid} did not come back")

        prompt = [11, 12, 13, 14]
        res = await trip(1, prompt, pb.SeqEntry(seq_id="q", offset=0, length=4, start=True, history=prompt,
                                                sampling=pb.SamplingParams(temperature=0.0, logprobs=-1)))
        tok = res.results[0].token
        wrong = [(tok + 1 + i) % 256 for i in range(3)]  # drafts the model does not draw
        res = await trip(2, [tok, *wrong], pb.SeqEntry(seq_id="q", offset=4, length=4, drafts=3, draft_ids=wrong))
        assert len(res.results) == 1  # the first draft is rejected: the correction alone comes back
        assert last.position("q") == 5 and first.position("q") == 8
        nxt = res.results[0].token
        # out of step without trim: refused, the caches untouched
        res = await trip(3, [nxt], pb.SeqEntry(seq_id="q", offset=5, length=1))
        assert list(res.failed_seqs) == ["q"] and "holds 8 tokens" in res.error and first.position("q") == 8
        res = await trip(4, [nxt], pb.SeqEntry(seq_id="q", offset=5, length=1, trim=True))
        assert not res.error and first.position("q") == last.position("q") == 6

    try:
        asyncio.run(main())
    finally:
        ring.close()


def permuted_copy(ck: Checkpoint, path) -> Checkpoint:
    """The tiny model with its output rows shuffled: a draft model whose greedy drafts are wrong."""
    import shutil

    from safetensors.numpy import load_file, save_file

    from backends.weights import open_checkpoint

    shutil.copytree(ck.path, path)
    w = load_file(str(path / "model.safetensors"))
    w["lm_head.weight"] = np.ascontiguousarray(w["lm_head.weight"][np.random.default_rng(1).permutation(256)])
    save_file(w, str(path / "model.safetensors"), metadata={"format": "pt"})
    return open_checkpoint(path)


def test_a_draft_model_drafts_off_the_loop_and_k_follows_its_acceptance(tiny_ck, tokenizer, tmp_path) -> None:
    """The target model drafting for itself: every draft holds, a trip brings k + 1 tokens. A draft
    model that is always wrong: its sequence soon drafts nothing (k -> 0, a probe now and then), so
    drafting stops costing; both answers are the plain ones."""
    from backends.speculation import DraftModel

    job = [([5] * 10, params(40))]
    ring = LocalRing(tiny_ck, (2,))
    try:
        plain, _ = generate(ring, tokenizer, job, "off")
        for name, ck in (("self", tiny_ck), ("wrong", permuted_copy(tiny_ck, tmp_path / "wrong"))):
            ring.wire.frames.clear()
            model = DraftModel(load_shard("torch", ck, 0, 3, dtype="float32", threads=1))
            out, sched = generate(ring, tokenizer, job, model)
            assert out == plain, name
            entries = [e for addr, f in ring.wire.frames if addr.endswith(":5000") for e in f.seqs if not e.start]
            m = sched.metrics
            drafted, accepted = m.count(m.spec_drafted), m.count(m.spec_accepted)
            if name == "self":
                # every draft held, so trips brought several tokens (until the draft model's own time,
                # as slow as the ring here, made drafting not pay: then k fell to 0)
                assert accepted == drafted > 0 and len(entries) < 39
                assert not model.fed  # the draft model freed the sequence with the ring
            else:
                assert accepted <= 2 and sum(1 for e in entries[-20:] if e.drafts) <= 2, entries
                assert drafted < 40  # far from drafting k = 6 on every trip
    finally:
        ring.close()


class Cut(Wire):
    """In-process links where stage 1 loses every sequence's cache once, before the `at`-th frame to it
    (freed on its compute thread, between frames, as a lease sweep would)."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at, self.count = at, 0

    async def before(self, address: str, kind: str) -> None:
        if kind == "Forward" and address.endswith(":5001"):
            self.count += 1
            if self.count == self.at:
                st = self.stages[address]
                assert st.shard is not None
                await st.release(list(st.shard.seqs))


def test_a_replay_in_the_middle_of_drafting_gives_the_same_answer(tiny_ck, tokenizer) -> None:
    """A stage loses a drafted sequence's cache: the sequence stalls, its drafting state resets, the
    ring replays its history from the start, and it drafts on to the same answer."""
    job = [([5] * 10, params(40)), ([217] * 8, params(30, temperature=0.8, seed=3))]
    ring = LocalRing(tiny_ck, (2,))
    try:
        plain, _ = generate(ring, tokenizer, job, "off")
        ring.wire.__class__ = Cut  # the same stages, links that lose stage 1's caches once
        ring.wire.at, ring.wire.count = 6, 0  # type: ignore[attr-defined]
        out, sched = generate(ring, tokenizer, job, "lookup")
    finally:
        ring.close()
    assert out == plain
    starts = [e for addr, f in ring.wire.frames if addr.endswith(":5000") for e in f.seqs if e.start]
    assert len(starts) >= 2 + 2 + 1  # the plain run's, this run's, and at least one replay
    assert sched.metrics.count(sched.metrics.spec_accepted) > 0


def test_what_a_drafted_token_costs_is_measured_on_one_streams_trips(tiny_ck, tokenizer) -> None:
    """A slow link makes a drafted position cheap against the trip; compute-bound verification makes it
    dear; a draft model adds its own time per draft: AdaptiveK is told the measured share (from a line
    through one stream's trips alone in the ring; frames of several sequences do not count)."""
    from backends.generation import Generation
    from backends.speculation import DraftModel
    from mesh.batching import Flight

    d = Drafting(PromptLookup(), PeerMetrics(), 8)
    r = Request(Generation("s", [1, 2, 3], params(10), tokenizer, 2048))
    plain = Flight(pb.Frame(), [(r, 0, 1)], 1, True, 1)
    drafted = Flight(pb.Frame(), [(r, 0, 1)], 1, True, 1, drafts={"s": [4] * 8})
    assert d.cost == 0.1  # a guess until trips are timed
    d.timed(drafted, 0.060)  # trips of one length alone: no line yet
    d.timed(Flight(pb.Frame(), [(r, 0, 1), (r, 0, 1)], 2, True, 1), 0.5)  # two sequences: not a trip's time
    assert d.cost == 0.1
    d.timed(plain, 0.020)  # 8 drafted positions added 40 ms: 5 ms each, a quarter of a trip
    assert d.cost == pytest.approx(0.25)
    for _ in range(16):
        d.timed(plain, 0.200)  # a slow link: the same positions are cheap against the trip
        d.timed(drafted, 0.240)
    assert d.cost == pytest.approx(0.025)
    r.sent = r.fed = 2  # its last token is the next decode
    d.drafts([r], group=4)
    # each sequence's k weighs the measured cost, times the sequences its drafts slow down in a frame
    assert d._k["s"].cost == pytest.approx(4 * d.cost)
    # a draft model's time per draft counts too
    m = Drafting(DraftModel(load_shard("torch", tiny_ck, 0, 3, dtype="float32", threads=1)), PeerMetrics(), 8)
    m._trips.extend([(1, 0.2), (9, 0.24)])
    asyncio.run(m.prepare([r]))
    assert m._made["s"][1] and m.cost > 0.025


def test_a_request_turns_drafting_off_for_itself(tokenizer) -> None:
    from apps.openai_schema import ChatBody, InvalidRequest, parse
    from backends.generation import Generation

    body = {"model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}]}
    assert parse(ChatBody, body).draft is True and parse(ChatBody, {**body, "draft": False}).draft is False
    with pytest.raises(InvalidRequest, match="draft"):
        parse(ChatBody, {**body, "draft": "no"})
    d = Drafting(PromptLookup(), PeerMetrics(), 8)
    on, off = (Request(Generation(s, [1, 2, 1, 2, 1], params(10), tokenizer, 2048), sent=4, fed=4, draft=f)
               for s, f in (("on", True), ("off", False)))
    assert d.drafts([on, off]) == {"on": [2, 1]}  # lookup drafts from the repeats; "off" decodes plainly


def test_a_sliding_window_model_gets_no_more_drafts_than_its_rotating_caches_can_take_back(tiny_ck, tokenizer) -> None:
    """An MLX stage keeps sliding-window layers in rotating caches, which can drop drafted positions only
    while they have not wrapped: the API peer drafts no further than the window allows, then not at all."""
    import dataclasses

    from backends.generation import Generation

    raw = {**tiny_ck.config.raw, "sliding_window": 12, "layer_types": ["sliding_attention", "full_attention"]}
    windowed = dataclasses.replace(tiny_ck.config, raw=raw)
    reqs = [Request(Generation(s, [1, 2, 3] * n, params(40), tokenizer, 2048), sent=3 * n - 1, fed=3 * n - 1)
            for s, n in (("short", 2), ("near", 3), ("past", 4))]
    free = Drafting(PromptLookup(), PeerMetrics(), 8, config=tiny_ck.config).drafts(reqs)
    capped = Drafting(PromptLookup(), PeerMetrics(), 8, config=windowed).drafts(reqs)
    assert all(len(free[s]) > 2 for s in ("short", "near", "past"))  # lookup finds the repeats
    # the caches hold 5, 8 and 11 positions: window 12 - held - 2 drafts fit
    assert capped["short"] == free["short"] and capped["near"] == free["near"][:2] and "past" not in capped
