"""The prefix cache across a ring: the API peer sends only what the stages do not hold, reports the
cached tokens, keeps a finished chat turn's blocks, and sends a sequence whole again when a stage lacks
its prefix. First in process (the scheduler and the stages' frame handling on real shards, no
processes), then on real two-peer rings."""

from __future__ import annotations

import asyncio
import itertools

import grpc
import numpy as np
import pytest

from backends.prefix import BLOCK
from backends.sampling import SamplingParams
from backends.shard import LayerShard, load_shard
from backends.weights import open_checkpoint
from backends.wire import Hidden
from mesh.metrics import PeerMetrics
from mesh.prefixes import PrefixMirror
from mesh.protocol import FrameError
from mesh.scheduler import Scheduler
from mesh.stage import _run
from protos import together_pb2 as pb
from tests.backends.test_tp import tiny_dir

RNG = np.random.default_rng(11)
SYSTEM = RNG.integers(3, 256, 3 * BLOCK + 5).tolist()  # a system prompt: 3 complete blocks and a bit
ASK_A, ASK_B, ASK_C = (RNG.integers(3, 256, n).tolist() for n in (20, 40, 9))


class ShardRing:
    """Two stages of real shards in this process, each frame through the stages' own frame handling
    (`mesh.stage._run`: prefix checks, dropped sequences) and releases with `keep`."""

    def __init__(self, ck, shards: list[LayerShard]) -> None:
        self.node_id, self.ck, self.metrics, self.shards = "f" * 32, ck, PeerMetrics(), shards
        n = ck.config.num_hidden_layers
        self.plan = pb.Plan(epoch=1, complete=True, num_layers=n,
                            stages=[pb.Assignment(node_id=str(i) * 32, start=s.start, end=s.end)
                                    for i, s in enumerate(shards)])
        self.frames: list[pb.Frame] = []
        self.mirror = PrefixMirror("tiny")  # the API peer's, across its requests
        self.lose: tuple[int, LayerShard] | None = None  # (at frame n, the peer that takes the last stage)
        self._ids = itertools.count(1)

    def new_frame_id(self) -> int:
        return next(self._ids)

    async def run_frame(self, frame: pb.Frame, timeout: float = 120.0) -> pb.Result:
        self.frames.append(frame)
        await asyncio.sleep(0)
        if self.lose is not None and len(self.frames) == self.lose[0]:  # the last stage's peer is gone
            self.shards[-1], self.lose = self.lose[1], None
            asyncio.get_running_loop().call_later(0.01, self._new_plan)  # after the scheduler stalls it
            return pb.Result(frame_id=frame.frame_id, error="the ring changed",
                             error_code=grpc.StatusCode.UNAVAILABLE.value[0])
        entries, x = list(frame.seqs), np.asarray(frame.tokens, np.int32)
        failed, why = [], []
        for sh in self.shards:
            try:
                entries, dropped, out = _run(sh, entries, x)
            except FrameError as e:
                return pb.Result(frame_id=frame.frame_id, error=str(e), error_code=e.code.value[0],
                                 failed_seqs=e.seqs + failed)
            failed += [s for s, _ in dropped]
            why += [w for _, w in dropped]
            x = out.copy() if isinstance(out, Hidden) else out
        code = grpc.StatusCode.FAILED_PRECONDITION.value[0] if failed else 0
        return pb.Result(frame_id=frame.frame_id, failed_seqs=failed, error="; ".join(why), error_code=code,
                         results=[pb.TokenResult(seq_id=s.seq_id, token=s.token) for s in x])

    def _new_plan(self) -> None:
        self.plan.epoch += 1

    async def release(self, seq_ids: list[str], keep: list[pb.KeepSeq] = ()) -> int:  # type: ignore[assignment]
        for sh in self.shards:
            for k in keep:
                sh.keep(k.seq_id, list(k.tokens))
            for s in seq_ids:
                sh.free_sequence(s)
        return len(seq_ids)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return open_checkpoint(tiny_dir(tmp_path_factory.mktemp("prefix-ring") / "tiny-llama"))


def ring_of(ck, budget: int = 64 << 20) -> ShardRing:
    shards = [load_shard("torch", ck, a, b, dtype="float32", threads=1) for a, b in ((0, 1), (1, 3))]
    for s in shards:
        s.enable_prefix_cache(budget, "tiny")
    return ShardRing(ck, shards)


def answer(ring: ShardRing, tok, prompts: list[list[int]], prefixes: bool = True, n: int = 12
           ) -> list[tuple[list[int], int]]:
    """Each prompt's greedy tokens and its cached tokens, one request after the other."""
    async def main() -> list[tuple[list[int], int]]:
        sched = Scheduler(ring, tok, prefixes=ring.mirror if prefixes else None)
        await sched.start()
        out = []
        try:
            for p in prompts:
                r = sched.submit(p, SamplingParams(temperature=0, max_tokens=n))
                toks = []
                while (item := await asyncio.wait_for(r.queue.get(), 20)) is not None:
                    assert not isinstance(item, Exception), item
                    toks.append(item.token)
                out.append((toks, r.cached))
                await asyncio.sleep(0.01)  # its release (and keep) runs in the background
        finally:
            await sched.stop()
        return out

    return asyncio.run(main())


def test_the_api_peer_sends_only_what_the_stages_lack(tiny, tokenizer):
    turn1 = SYSTEM + ASK_A
    prompts = [turn1, SYSTEM + ASK_B]
    cold = [t for t, _ in answer(ring_of(tiny), tokenizer, prompts, prefixes=False)]
    ring = ring_of(tiny)
    (t1, c1), (t2, c2) = answer(ring, tokenizer, prompts)
    assert [t1, t2] == cold[:2] and (c1, c2) == (0, 3 * BLOCK)
    start = [e for f in ring.frames for e in f.seqs if e.start]
    assert [(e.prefix, e.offset) for e in start] == [(0, 0), (3 * BLOCK, 3 * BLOCK)]
    assert sum(len(f.tokens) for f in ring.frames if f.seqs[0].start and f.seqs[0].prefix) == len(ASK_B) + 5
    # turn 2 of a chat: turn 1's prompt and answer came back as its release's `keep`
    turn2 = turn1 + t1 + ASK_C
    ((t3, c3),) = answer(ring, tokenizer, [turn2])
    assert c3 == (len(turn1) + len(t1) - 1) // BLOCK * BLOCK > 3 * BLOCK
    ((ref, _),) = answer(ring_of(tiny), tokenizer, [turn2], prefixes=False)
    assert t3 == ref


def test_a_stage_that_lost_the_prefix_costs_a_retry_not_an_error(tiny, tokenizer):
    ring = ring_of(tiny)
    ((first, _),) = answer(ring, tokenizer, [SYSTEM + ASK_A])
    store = ring.shards[1].prefix.store  # type: ignore[union-attr]
    store.shrink(2 * store.bytes // len(store))  # the last stage evicted all but the first 2 blocks
    ring.frames.clear()
    ((again, cached),) = answer(ring, tokenizer, [SYSTEM + ASK_A])
    assert again == first and cached == 0
    starts = [e.prefix for f in ring.frames for e in f.seqs if e.start]
    assert starts == [3 * BLOCK, 0]  # refused at stage 1, then sent whole at once
    assert ring.mirror.retries == 1
    # it forgot what the stage lacked, and relearnt it from the whole run: the next one hits
    ((third, cached),) = answer(ring, tokenizer, [SYSTEM + ASK_A])
    assert third == first and cached == 3 * BLOCK


def test_a_replay_after_a_peer_loss_tries_what_the_survivors_hold(tiny, tokenizer):
    ring = ring_of(tiny)
    ((undisturbed, _),) = answer(ring, tokenizer, [SYSTEM + ASK_A])
    standby = load_shard("torch", tiny, 1, 3, dtype="float32", threads=1)
    standby.enable_prefix_cache(64 << 20, "tiny")  # a new peer: its store is empty
    ring.frames.clear()
    ring.lose = (4, standby)  # after the start and two decode steps: its history has 3 new tokens
    ((replayed, cached),) = answer(ring, tokenizer, [SYSTEM + ASK_A])
    assert replayed == undisturbed and cached == 3 * BLOCK  # the answer's own start had its prefix
    starts = [(e.prefix, len(e.history)) for f in ring.frames for e in f.seqs if e.start]
    n = len(SYSTEM + ASK_A)
    assert starts == [(3 * BLOCK, n), (3 * BLOCK, n + 3), (0, n + 3)]  # the replay tried it, then whole
    assert ring.mirror.retries == 1


def test_a_stage_without_a_prefix_cache_pauses_the_offers(tiny, tokenizer):
    ring = ring_of(tiny)
    ring.shards[1].enable_prefix_cache(0, "tiny")  # that peer runs with --prefix-cache-memory 0
    out = answer(ring, tokenizer, [SYSTEM + ASK_A] * 3)
    assert [t for t, _ in out] == [out[0][0]] * 3 and [c for _, c in out] == [0, 0, 0]
    starts = [e.prefix for f in ring.frames for e in f.seqs if e.start]
    assert starts == [0, 3 * BLOCK, 0, 0]  # refused once, then no more offers for a while
    assert ring.mirror.retries == 1


def test_off_sends_no_prefix_and_keeps_nothing(tiny, tokenizer):
    ring = ring_of(tiny, budget=0)
    answer(ring, tokenizer, [SYSTEM + ASK_A, SYSTEM + ASK_A], prefixes=False)
    assert all(e.prefix == 0 for f in ring.frames for e in f.seqs)
    assert all(s.prefix_stats()["blocks"] == 0 for s in ring.shards)


# ---------------------------------------------------------------- real rings (slow)

WORDS = ("river stone lantern orchard copper meadow signal harbor violet engine quiet summit ledger "
         "cobalt pepper window garden falcon marble thunder circuit willow anchor saddle").split()
BLOCKS = 54  # each stage's budget in blocks: ~1,700 tokens, enough for the system prompt and a turn


def text(seed: int, words: int) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(WORDS, words)) + "."


def chat(peer, messages: list[dict[str, str]], max_tokens: int = 16) -> tuple[str, int, int]:
    """The answer, its prompt tokens and its cached tokens."""
    from tests.mesh.test_ring import client

    r = client(peer).chat.completions.create(model="smollm2-135m", temperature=0, max_tokens=max_tokens,
                                             messages=messages)
    details = r.usage.prompt_tokens_details
    return r.choices[0].message.content or "", r.usage.prompt_tokens, (details.cached_tokens if details else 0)


def metric(peer, name: str) -> float:
    import urllib.request

    body = urllib.request.urlopen(f"{peer.api}/metrics", timeout=5).read().decode()
    return sum(float(line.split()[-1]) for line in body.splitlines() if line.startswith(name + " "))


@pytest.mark.slow
def test_a_shared_1500_token_prefix_on_a_two_peer_ring(embedded_path, embedded):
    """Two torch peers; requests share a ~1,500-token system prompt, then a chat's history; then a
    distinct prompt overflows the stores, and a request whose prefix they evicted runs cold: its text
    is the warm run's."""
    from tests.mesh.cluster import Cluster

    budget = BLOCKS * BLOCK * embedded.config.kv_bytes_per_token(4) * 15  # float32 KV of 15 layers
    system = {"role": "system", "content": "Remember this list. " + text(0, 1500)}
    ask = [{"role": "user", "content": q} for q in ("Write a poem about the sea.", "Name a color.",
                                                     "Why is the sky blue?")]
    c = Cluster(str(embedded_path))
    try:
        mem = ["--backend", "torch", "--dtype", "float32", "--no-mdns", "--prefix-cache-memory", str(budget)]
        a = c.add("a", *mem, "--layers", "0-15", api=True)
        b = c.add("b", *mem, "--layers", "15-30", "--peer", a.address)
        c.wait_ready(a, stages=2)
        first, n1, cached1 = chat(a, [system, ask[0]], max_tokens=24)
        assert n1 > 1500 and cached1 == 0
        second, n2, cached2 = chat(a, [system, ask[1]])
        assert cached2 >= 1400 and cached2 % BLOCK == 0 and cached2 < n2
        # turn 2 of the first chat: turn 1's prompt and answer were kept as its sequence was released
        turn2 = [system, ask[0], {"role": "assistant", "content": first}, ask[2]]
        assert chat(a, turn2)[2] >= (n1 // BLOCK + 1) * BLOCK  # past turn 1's prompt: its answer too
        # load: a distinct long prompt overflows the stores, which stay in budget, evicting leaves first
        chat(a, [{"role": "user", "content": text(1, 600)}], max_tokens=2)
        for p in (a, b):
            st = c.status(p)
            assert 0 < st.prefix_cache_bytes <= budget and st.prefix_blocks > 0
        assert metric(a, "together_prefix_cache_evictions") > 0
        # a's mirror still offers the system prompt's evicted end: refused, sent whole (a cold run),
        # and the text is the warm run's
        cold, _, none = chat(a, [system, ask[1]])
        assert (cold, none) == (second, 0)
        assert metric(a, "together_prefix_retries") == 1
        assert metric(a, "together_prefix_cached_tokens") >= cached2
    finally:
        c.stop()


@pytest.mark.slow
def test_a_prefix_across_an_mlx_and_a_torch_stage(embedded_path):
    """A short MLX stage (MLX computes float32 on a CPU, slowly) before a torch one; b serves the API
    too, and its mirror starts empty: its answer is a cold run to compare with."""
    pytest.importorskip("mlx.core")
    from tests.mesh.cluster import two_peer_ring

    system = {"role": "system", "content": text(5, 70)}
    ask = [system, {"role": "user", "content": "What is the capital of France?"}]
    with two_peer_ring(str(embedded_path), backends=("mlx", "torch"), api_both=True, split=2) as c:
        a, b = c.peers["a"], c.peers["b"]
        c.wait_ready(b, stages=2)
        chat(a, [system, {"role": "user", "content": "Hi"}], max_tokens=2)
        warm, _, cached = chat(a, ask)
        assert cached >= 2 * BLOCK
        cold, _, none = chat(b, ask)
        assert (cold, none) == (warm, 0)
