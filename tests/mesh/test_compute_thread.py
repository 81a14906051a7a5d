"""The stage's compute thread (issue 13, cheaper hops): a plain thread fed by a queue instead of an
executor, and a frame's compute queued as the frame comes off its stream, before any task runs."""

import asyncio
import os
import threading

import pytest

from mesh.stage import ComputeThread
from protos import together_pb2 as pb
from tests.mesh.test_hop import two_stage_view
from tests.mesh.test_roles import FakeLinks, make_stage, tiny_ck, torch_shard  # noqa: F401

WAIT_S = 10.0  # a generous bound for a thread to be scheduled, not a timing


def test_calls_run_in_order_on_one_thread_and_settle_their_futures():
    async def go():
        ct = ComputeThread()
        names, order = [], []

        def job(i):
            def run():
                names.append(threading.current_thread().name)
                order.append(i)
                if i == 3:
                    raise ValueError("three")
                return i * 10
            return run

        futs = [ct.submit(job(i)) for i in range(6)]
        got = await asyncio.gather(*futs, return_exceptions=True)
        ct.close()
        return names, order, got

    names, order, got = asyncio.run(go())
    assert order == list(range(6)) and set(names) == {"compute"}
    assert got[:3] == [0, 10, 20] and got[4:] == [40, 50]
    assert isinstance(got[3], ValueError) and str(got[3]) == "three"


def test_close_cancels_the_calls_still_queued_and_refuses_new_ones():
    async def go():
        ct, gate = ComputeThread(), threading.Event()
        first = ct.submit(lambda: gate.wait(WAIT_S))  # holds the thread
        queued = ct.submit(lambda: "never")
        ct.close()
        gate.set()
        await asyncio.wait([first, queued], timeout=WAIT_S)
        with pytest.raises(RuntimeError):
            ct.submit(int)
        return first, queued

    first, queued = asyncio.run(go())
    assert first.result() is True and queued.cancelled()


class GatedShard:
    """A first-and-last shard whose forward says it started, then waits for a gate."""

    is_first, is_last = True, False

    def __init__(self, inner):
        self.inner, self.started, self.gate = inner, threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def forward(self, chunks, x):
        self.started.set()
        self.gate.wait(WAIT_S)
        return self.inner.forward(chunks, x)


def test_a_frame_is_queued_for_compute_as_it_comes_off_the_stream(tiny_ck):
    """receive() hands the frame to the compute thread itself: the compute starts while the event
    loop is still busy (here: blocked), before the frame's task has run once. Before issue 13's hop
    work the frame waited for its task's first step, one more pass of the loop."""
    async def go():
        links = FakeLinks()
        sh = GatedShard(torch_shard(tiny_ck, 0, 2))
        st, delivered, _ = make_stage(two_stage_view(), links, sh)
        f = pb.Frame(frame_id=1, epoch=7, origin=st.view.address, tokens=[5, 9, 2],
                     seqs=[pb.SeqEntry(seq_id="a", offset=0, length=3, start=True, history=[5, 9, 2])])
        await st.receive(f)
        started = sh.started.wait(WAIT_S)  # the loop is blocked here: only the compute thread can run
        sh.gate.set()
        await asyncio.gather(*st._received)
        st.close()
        return started, links.sent, delivered

    started, sent, delivered = asyncio.run(go())
    assert started and not delivered
    assert [(a, m.frame_id, m.shape[0]) for a, _, m in sent] == [("127.0.0.1:6000", 1, 3)]


def test_a_frame_sent_to_this_stage_is_queued_for_compute_before_its_task_runs(tiny_ck):
    """send_frame to this peer's own address (an API peer's stage 0, as Origin.run_frame sends) queues the
    compute as it is called: the compute runs while the loop is still busy, before the task that passes
    its output on has run once."""
    async def go():
        links = FakeLinks()
        sh = GatedShard(torch_shard(tiny_ck, 0, 2))
        st, delivered, _ = make_stage(two_stage_view(), links, sh)
        f = pb.Frame(frame_id=1, epoch=7, origin=st.view.address, tokens=[5, 9, 2],
                     seqs=[pb.SeqEntry(seq_id="a", offset=0, length=3, start=True, history=[5, 9, 2])])
        pending = st.send_frame(st.view.address, f)
        started = sh.started.wait(WAIT_S)  # the loop is blocked here: only the compute thread can run
        sh.gate.set()
        await pending
        st.close()
        return started, links.sent, delivered

    started, sent, delivered = asyncio.run(go())
    assert started and not delivered
    assert [(a, m.frame_id, m.shape[0]) for a, _, m in sent] == [("127.0.0.1:6000", 1, 3)]


def test_the_next_message_is_made_while_the_compute_runs_and_the_records_after_it_left(tiny_ck, monkeypatch):
    """After a compute the caches are cold and Python is slow: the Frame to the next stage is made
    while the compute thread runs, and the stage's own records (compute time, lease) are kept once
    the output is on its way, not before."""
    import mesh.stage as stage_mod
    from tests.mesh.test_hop import HeldLinks

    made_during_compute = []
    real = stage_mod._next_message

    def spy(frame, entries, last):
        made_during_compute.append(not sh.gate.is_set())  # the compute cannot have ended
        return real(frame, entries, last)

    monkeypatch.setattr(stage_mod, "_next_message", spy)

    async def go():
        links = HeldLinks()
        st, delivered, _ = make_stage(two_stage_view(), links, sh)
        f = pb.Frame(frame_id=1, epoch=7, origin=st.view.address, tokens=[5, 9], hop_ms=[0.5],
                     seqs=[pb.SeqEntry(seq_id="a", offset=0, length=2, start=True, history=[5, 9])])
        await st.receive(f)
        while not made_during_compute:
            await asyncio.sleep(0.01)
        sh.gate.set()  # the compute ends; the write is held at the door
        for _ in range(500):
            if st.shard.position("a") == 2:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        records_before_sent = list(st.hop_ms)
        links.gate.set()
        await asyncio.gather(*st._received)
        st.close()
        return records_before_sent, st.hop_ms, links.sent, delivered

    sh = GatedShard(torch_shard(tiny_ck, 0, 2))
    records_before_sent, records, sent, delivered = asyncio.run(go())
    assert made_during_compute == [True] and not delivered
    assert records_before_sent == [] and len(records) == 1
    (_, _, m), = sent
    assert m.hop_ms[0] == 0.5 and m.hop_ms[1] == pytest.approx(records[0]) and m.shape[0] == 2
    assert [(e.seq_id, e.offset, e.length) for e in m.seqs] == [("a", 0, 2)]


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="thread affinity is Linux's")
def test_a_pinned_compute_thread_runs_on_its_cpus_and_the_caller_keeps_its_own():
    """--cpus: the compute thread (and what its backend starts from it) runs on the given cores; the event
    loop's thread, which submits, is not pinned."""
    have = os.sched_getaffinity(0)
    one = frozenset({max(have)})

    async def go():
        ct = ComputeThread(cpus=one)
        inside = await ct.submit(lambda: os.sched_getaffinity(0))
        ct.close()
        return inside

    assert asyncio.run(go()) == one
    assert os.sched_getaffinity(0) == have


def test_cpus_parse_and_refuse_what_this_process_cannot_run_on():
    from apps.join import format_cpus, parse_cpus
    from backends.errors import TogetherError

    have = os.sched_getaffinity(0)
    assert parse_cpus(format_cpus(have)) == have
    assert parse_cpus(f"{min(have)}") == {min(have)}
    assert format_cpus({0, 1, 2, 5, 7, 8}) == "0-2,5,7-8"
    for bad, why in (("x", "expected CPU numbers"), ("1-", "expected CPU numbers"),
                     (str(max(have) + 1), f"CPUs {format_cpus(have)} only")):
        with pytest.raises(TogetherError, match=why):
            parse_cpus(bad)
