"""Measured links: this peer's round-trip time and throughput to each other peer it knows, from small
`Probe` calls on the peers' normal (authenticated) channels, apart from the ring's streams.

RTT is the least of a few tiny probes; throughput is timed with hidden-state-sized messages (the
model's hidden size x 4 bytes x a prefill chunk of CHUNK_TOKENS tokens, the size frames really
have): Mbit/s = bits / (time - RTT). A peer measures every known peer at join, before its claim (so
its Join carries its links), a newly known peer as soon as it is known, and all of them again every
INTERVAL_S in the background (not while a stream to that peer carried frames within the last BUSY_S
seconds: it would measure the load, not the link; the first time RECHECK_S after joining, as peers
that start together load each other's CPUs). It reports them in `PeerInfo.links`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time

import grpc

from mesh.links import Peers
from mesh.view import PlanView
from protos import together_pb2 as pb

log = logging.getLogger(__name__)

CHUNK_TOKENS = 128        # tokens per throughput probe: a typical prefill chunk's frame
RTT_PROBES = 4
THROUGHPUT_PROBES = 2
INTERVAL_S = 30.0         # background re-measurement of every link
RECHECK_S = 5.0           # the first one comes sooner: peers that start together load their CPUs at first
NEW_PEER_CHECK_S = 1.0    # how often the background loop looks for peers not measured yet
BUSY_S = 1.0              # a link that carried frames this recently is busy: measure it later
PROBE_TIMEOUT_S = 5.0
MAX_REPLY_BYTES = 64 << 20  # what a Probe may ask the callee to send back
MIN_TRANSFER_S = 1e-5     # floor of (time - rtt): a loopback transfer can hide inside the RTT's noise


class LinkProber:
    """Measures and keeps this peer's links; answers the other peers' probes."""

    def __init__(self, view: PlanView, links: Peers, hidden_size: int, delay_s: float = 0.0,
                 chunk_tokens: int = CHUNK_TOKENS, interval_s: float = INTERVAL_S) -> None:
        # delay_s: the test-only link delay (--link-delay-ms): replies to probes leave this much later
        self.view, self.links, self.delay_s, self.interval_s = view, links, delay_s, interval_s
        self.probe_bytes = max(1, hidden_size * 4 * chunk_tokens)
        self.stats: dict[str, pb.LinkStat] = {}  # node id -> its latest measurement
        self._measuring: dict[str, asyncio.Task[pb.LinkStat | None]] = {}

    def link_stats(self) -> list[pb.LinkStat]:
        """The links to peers this peer still knows, for its PeerInfo."""
        known = self.view.known
        return [s for n, s in self.stats.items() if n in known and n != self.view.node_id]

    # ---------------------------------------------------------------- measuring

    def _targets(self) -> dict[str, str]:
        """node id -> address of every other peer this peer knows."""
        me = self.view.node_id
        return {n: p.address for n, p in list(self.view.known.items()) if n != me and p.address}

    async def measure_all(self, timeout: float = 2.0, only_new: bool = False) -> None:
        """Measure every known peer's link at once (in parallel), waiting at most `timeout` seconds."""
        targets = {n: a for n, a in self._targets().items() if not (only_new and n in self.stats)}
        tasks = [self._measure_once(n, a) for n, a in targets.items()]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)

    def _measure_once(self, node_id: str, address: str) -> asyncio.Task[pb.LinkStat | None]:
        """One measurement of this link at a time; a caller that comes meanwhile shares it."""
        t = self._measuring.get(node_id)
        if t is None or t.done():
            t = self._measuring[node_id] = asyncio.ensure_future(self.measure(node_id, address))
        return t

    async def measure(self, node_id: str, address: str) -> pb.LinkStat | None:
        """RTT and throughput to one peer; None (and the old measurement kept) if it does not answer."""
        stub = self.links.stub(address)
        try:
            rtts = []
            for _ in range(RTT_PROBES):
                t0 = time.perf_counter()
                await stub.Probe(pb.ProbeRequest(), timeout=PROBE_TIMEOUT_S)
                rtts.append(time.perf_counter() - t0)
            rtt = min(rtts)
            payload = bytes(self.probe_bytes)
            best = float("inf")
            for _ in range(THROUGHPUT_PROBES):
                t0 = time.perf_counter()
                await stub.Probe(pb.ProbeRequest(payload=payload), timeout=PROBE_TIMEOUT_S)
                best = min(best, time.perf_counter() - t0)
        except grpc.aio.AioRpcError as e:
            log.debug("probing %s at %s failed: %s", node_id[:8], address, e.details() or e.code().name)
            return None
        mbps = self.probe_bytes * 8 / 1e6 / max(best - rtt, MIN_TRANSFER_S)
        stat = pb.LinkStat(node_id=node_id, rtt_ms=rtt * 1000, mbps=mbps, measured_at=time.time())
        self.stats[node_id] = stat
        log.debug("link to %s: rtt %.2f ms, %.0f Mbit/s", node_id[:8], stat.rtt_ms, mbps)
        return stat

    async def run(self) -> None:
        """The background loop: new peers at once, every link again each interval (jittered, so peers
        do not all probe together), skipping links busy with frames."""
        due: dict[str, float] = {}
        while True:
            await asyncio.sleep(NEW_PEER_CHECK_S)
            now = time.monotonic()
            for node_id, address in self._targets().items():
                if node_id not in self.stats:
                    due.setdefault(node_id, now)
                when = due.setdefault(node_id, now + RECHECK_S * random.uniform(1.0, 1.5))
                if when > now:
                    continue
                if self.links.busy(address, BUSY_S):
                    due[node_id] = now + 5 * NEW_PEER_CHECK_S
                    continue
                due[node_id] = now + self.interval_s * random.uniform(0.8, 1.2)
                self._measure_once(node_id, address)

    # ---------------------------------------------------------------- answering

    async def answer(self, request: pb.ProbeRequest) -> pb.ProbeReply:
        """Another peer's probe: `reply_bytes` zero bytes back (after the test-only delay, if set)."""
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        return pb.ProbeReply(payload=bytes(min(request.reply_bytes, MAX_REPLY_BYTES)))

    def close(self) -> None:
        for t in self._measuring.values():
            t.cancel()
        self._measuring.clear()


def render_links(plan: pb.Plan, now: float | None = None) -> str:
    """The measured links of a plan's peers as text (for `together status`)."""
    names = {p.node_id: p.name for p in plan.peers}
    now = time.time() if now is None else now
    rows = [(p.name, names.get(ln.node_id, ln.node_id[:8]), f"{ln.rtt_ms:.2f} ms", _rate(ln.mbps),
             f"{max(0.0, now - ln.measured_at):.0f} s ago") for p in plan.peers for ln in p.links]
    if not rows:
        return "links: not measured yet"
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = [f"  {r[0].ljust(widths[0])} -> " + "  ".join(c.ljust(w) for c, w in zip(r[1:], widths[1:])).rstrip()
             for r in sorted(rows)]
    return "links (measured round trip, throughput, age):\n" + "\n".join(lines)


def _rate(mbps: float) -> str:
    return f"{mbps / 1000:.1f} Gbit/s" if mbps >= 1000 else f"{mbps:.0f} Mbit/s"
