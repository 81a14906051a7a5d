"""Link-aware placement: the cost of a ring (compute per stage plus transfer per hop) and the
planner that picks which peers hold layers, their order and the split. Pure: no I/O; the
coordinator (`LayerMap.claim_together`) and `together plan` feed it numbers.

Times are ms, memory bytes, throughput megabits per second. A ring runs API peer -> stage 0 ->
... -> last stage -> API peer: the first hop carries token ids, the middle ones hidden states, the
last a sampled token id.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from mesh.placement import format_size, layers_that_fit

LAN_RTT_MS = 1.0  # an unmeasured link counts as a wired LAN: 1 ms round trip, 1 Gbit/s
LAN_MBPS = 1000.0
HEADER_BYTES = 160  # a frame's header and seal on every hop, on top of its payload
TOKEN_BYTES = 4  # one token id
PREFILL_TOKENS = 512  # the prefill chunk predictions are made for (--prefill-chunk's default)
STANDBY_MARGIN = 0.25  # a peer stands by only if its links cost this share of the ring's time per token
BRUTE_FORCE_MAX = 7  # orders tried exhaustively up to this many peers, greedily beyond
UNMEASURED_MS = 1.0  # a peer that did not report its speed counts at 1 ms per layer


class Unplaceable(ValueError):
    """No placement fits: the message names the shortfall and the fix."""


@dataclass(frozen=True)
class Machine:
    """One peer as the planner sees it."""

    node_id: str
    free_memory: int  # bytes offered for layer weights + KV reserve (embedding/head already set aside)
    layer_bytes: int  # weight bytes of one layer on its backend, dtype and format
    layer_ms: float  # decode: one token through one layer (0: unmeasured)
    prefill_ms: float = 0.0  # prefill: one token of a chunk through one layer (0: unmeasured)
    head_ms: float = 0.0  # the last stage's extra per decode step
    wire_bytes: int = 4  # bytes per hidden-state element it sends (its compute dtype)
    api: bool = False  # it serves the HTTP API
    name: str = ""

    @property
    def label(self) -> str:
        return self.name or self.node_id[:8]

    @property
    def decode_ms(self) -> float:
        return self.layer_ms if self.layer_ms > 0 and math.isfinite(self.layer_ms) else UNMEASURED_MS

    @property
    def chunk_ms(self) -> float:
        # unmeasured prefill: a token of a chunk costs at most what a decode step does
        ok = self.prefill_ms > 0 and math.isfinite(self.prefill_ms)
        return self.prefill_ms if ok else self.decode_ms

    @property
    def head(self) -> float:
        return self.head_ms if self.head_ms > 0 and math.isfinite(self.head_ms) else 0.0


@dataclass(frozen=True)
class Link:
    rtt_ms: float
    mbps: float


@dataclass(frozen=True)
class Shape:
    num_layers: int
    hidden_size: int
    kv_reserve: int = 0  # bytes per layer set aside for KV caches


Links = Mapping[tuple[str, str], Link]  # (from, to) -> the sender's measured link


@dataclass(frozen=True)
class Hop:
    src: str
    dst: str
    bytes: int  # per decode token
    ms: float  # per decode token
    prefill_ms: float  # per prefill chunk
    assumed: bool  # the link was not measured: LAN defaults


@dataclass
class Placement:
    stages: list[tuple[str, int, int]]
    standby: list[str]
    decode_ms: float  # one token of one stream, end to end
    prefill_chunk_ms: float  # one PREFILL_TOKENS chunk, end to end
    hops: list[Hop]
    compute_ms: dict[str, float]  # each stage's decode compute per token (head included)
    limit: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def decode_tokens_per_s(self) -> float:
        return 1000.0 / self.decode_ms if self.decode_ms > 0 else 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return PREFILL_TOKENS * 1000.0 / self.prefill_chunk_ms if self.prefill_chunk_ms > 0 else 0.0


def link_between(links: Links, src: str, dst: str) -> tuple[Link, bool]:
    """The link src -> dst (or its reverse when only that was measured); (LAN default, True) if unknown."""
    if src == dst:
        return Link(0.0, math.inf), False
    for key in ((src, dst), (dst, src)):
        ln = links.get(key)
        if ln is not None and ln.rtt_ms >= 0 and math.isfinite(ln.rtt_ms):
            mbps = ln.mbps if ln.mbps > 0 and math.isfinite(ln.mbps) else LAN_MBPS
            return Link(ln.rtt_ms, mbps), False
    return Link(LAN_RTT_MS, LAN_MBPS), True


def hop_ms(link: Link, nbytes: int) -> float:
    """Half a round trip plus the bytes at the link's throughput."""
    if math.isinf(link.mbps):
        return 0.0
    return link.rtt_ms / 2 + nbytes * 8 / (link.mbps * 1000.0)


def _hops(order: Sequence[Machine], api: str, hidden: int, links: Links) -> list[Hop]:
    path = [api] + [m.node_id for m in order] + [api]
    out = []
    for i, (src, dst) in enumerate(zip(path, path[1:])):
        ln, assumed = link_between(links, src, dst)
        if 0 < i < len(order):  # between stages: hidden states in the sender's dtype
            per_tok = hidden * order[i - 1].wire_bytes
            dec, pre = per_tok + HEADER_BYTES, per_tok * PREFILL_TOKENS + HEADER_BYTES
        elif i == 0:  # token ids into stage 0
            dec, pre = TOKEN_BYTES + HEADER_BYTES, TOKEN_BYTES * PREFILL_TOKENS + HEADER_BYTES
        else:  # the sampled token back
            dec = pre = TOKEN_BYTES + HEADER_BYTES
        out.append(Hop(src, dst, dec, hop_ms(ln, dec), hop_ms(ln, pre), assumed and src != dst))
    return out


def _api_of(machines: Sequence[Machine], order: Sequence[Machine]) -> str:
    """The API peer: the first machine serving it, else (none known) the first stage's."""
    return next((m.node_id for m in machines if m.api), order[0].node_id)


def evaluate(shape: Shape, machines: Sequence[Machine], links: Links,
             stages: Sequence[tuple[str, int, int]]) -> Placement:
    """The predicted times of a given ring (stages in ring order)."""
    by_id = {m.node_id: m for m in machines}
    order = [by_id[n] for n, _, _ in stages]
    hops = _hops(order, _api_of(machines, order), shape.hidden_size, links)
    compute = {}
    prefill = 0.0
    for i, (m, (_, a, b)) in enumerate(zip(order, stages)):
        last = i == len(stages) - 1
        compute[m.node_id] = (b - a) * m.decode_ms + (m.head if last else 0.0)
        prefill += (b - a) * m.chunk_ms * PREFILL_TOKENS + (m.head if last else 0.0)
    standby = [m.node_id for m in machines if m.node_id not in compute]
    decode = sum(compute.values()) + sum(h.ms for h in hops)
    prefill += sum(h.prefill_ms for h in hops)
    p = Placement(list(stages), standby, decode, prefill, hops, compute)
    p.limit = _limit(shape, p, by_id)
    return p


def _split(shape: Shape, order: Sequence[Machine], hops: Sequence[Hop]) -> list[int]:
    """Layers per stage, one at a time to the stage that would finish it soonest: a stage's time
    is its layers times its layer_ms plus its outgoing hop (and the head, for the last)."""
    n = len(order)
    caps = [min(shape.num_layers, layers_that_fit(m.free_memory, m.layer_bytes, shape.kv_reserve)) for m in order]
    busy = [hops[i + 1].ms + (order[i].head if i == n - 1 else 0.0) for i in range(n)]
    # every peer of the order holds at least one layer: which peers stand by is plan()'s choice
    alloc = [1 if caps[i] >= 1 else 0 for i in range(n)]
    busy = [b + order[i].decode_ms * alloc[i] for i, b in enumerate(busy)]
    for _ in range(shape.num_layers - sum(alloc)):
        room = [i for i in range(n) if alloc[i] < caps[i]]
        if not room:
            break
        # rounded: links that cost (next to) nothing split exactly as placement.split_proportional
        i = min(room, key=lambda i: (round(busy[i] + order[i].decode_ms, 6), i))
        alloc[i] += 1
        busy[i] += order[i].decode_ms
    return alloc


def _orders(active: Sequence[Machine], api: str | None, hidden: int, links: Links) -> list[tuple[Machine, ...]]:
    """Ring orders whose hops cost least (ties kept, the given order's first), all of them tried
    up to BRUTE_FORCE_MAX peers; beyond, one greedy order: each next peer the cheapest hop away."""
    if len(active) > BRUTE_FORCE_MAX:
        rest, order = list(active), []
        cur = api or rest[0].node_id
        while rest:
            nxt = min(rest, key=lambda m: link_between(links, cur, m.node_id)[0].rtt_ms)
            order.append(nxt)
            rest.remove(nxt)
            cur = nxt.node_id
        return [tuple(order)]
    scored = []
    for perm in itertools.permutations(active):
        a = api or perm[0].node_id
        scored.append((sum(h.ms for h in _hops(perm, a, hidden, links)), perm))
    best = min(s for s, _ in scored)
    tol = max(1e-6, best * 0.02)
    return [p for s, p in scored if s <= best + tol]


def _best(shape: Shape, active: Sequence[Machine], machines: Sequence[Machine], links: Links) -> Placement | None:
    """The fastest balanced ring over exactly the peers of `active` that get layers."""
    api = next((m.node_id for m in machines if m.api), None)
    best: tuple[float, float, Placement] | None = None
    seen_last: set[str] = set()
    for order in _orders(active, api, shape.hidden_size, links):
        if order[-1].node_id in seen_last:  # among equally cheap orders, the last stage's head decides
            continue
        seen_last.add(order[-1].node_id)
        hops = _hops(order, api or order[0].node_id, shape.hidden_size, links)
        alloc = _split(shape, order, hops)
        if sum(alloc) < shape.num_layers or alloc[-1] < 1:
            continue
        stages, cursor = [], 0
        for m, k in zip(order, alloc):
            if k:
                stages.append((m.node_id, cursor, cursor + k))
                cursor += k
        p = evaluate(shape, machines, links, stages)
        span = max(p.compute_ms[n] + h.ms for (n, _, _), h in zip(stages, p.hops[1:]))
        if best is None or (span, p.decode_ms) < best[:2]:
            best = (span, p.decode_ms, p)
    return best[2] if best else None


def plan(shape: Shape, machines: Sequence[Machine], links: Links | None = None) -> Placement:
    """The placement that minimises predicted time per token under memory limits.

    Every peer that fits a layer takes a share, stage times balanced (its outgoing hop counted,
    so a peer behind a slow link gets fewer layers), in the ring order whose hops cost least; a
    peer stands by when the ring without it still fits and is predicted faster, its links having
    cost STANDBY_MARGIN of the time per token.
    Raises Unplaceable, naming the shortfall, when all the peers together cannot hold the model."""
    links = links or {}
    if shape.num_layers < 1:
        raise Unplaceable("the model has no layers")
    caps = {m.node_id: min(shape.num_layers, layers_that_fit(m.free_memory, m.layer_bytes, shape.kv_reserve))
            for m in machines}
    active = [m for m in machines if caps[m.node_id] >= 1]
    if sum(caps.values()) < shape.num_layers:
        raise Unplaceable(_shortfall(shape, machines, caps))
    best = _best(shape, active, machines, links)
    if best is None:
        raise Unplaceable(_shortfall(shape, machines, caps))
    notes = []
    while len(best.stages) > 1:
        holding = [m for m in active if m.node_id in best.compute_ms]
        options = []
        for m in holding:
            rest = [o for o in holding if o is not m]
            if sum(caps[o.node_id] for o in rest) >= shape.num_layers:
                p = _best(shape, rest, machines, links)
                if p is not None:
                    options.append((p.decode_ms, m, p))
        if not options:
            break
        ms, drop, p = min(options, key=lambda o: o[0])
        # the gain must come from the links it adds: a slow peer on fast links takes fewer layers
        # but stays (it adds throughput when several streams pipeline)
        links_saved = sum(h.ms for h in best.hops) - sum(h.ms for h in p.hops)
        if ms >= best.decode_ms or links_saved < best.decode_ms * STANDBY_MARGIN:
            break
        notes.append(f"{drop.label} stands by: the ring without it is predicted "
                     f"{best.decode_ms / ms:.1f}x faster per token")
        active = [m for m in active if m is not drop]
        best = p
    best.notes = notes + best.notes
    if any(h.assumed for h in best.hops):
        best.notes.append(f"links not measured count as a LAN: {LAN_RTT_MS:g} ms round trip, {LAN_MBPS:g} Mbit/s")
    return best


def _shortfall(shape: Shape, machines: Sequence[Machine], caps: Mapping[str, int]) -> str:
    have = sum(caps.values())
    per = max((m.layer_bytes for m in machines), default=0) + shape.kv_reserve
    who = ", ".join(f"{m.label} {caps[m.node_id]} ({format_size(m.free_memory)})" for m in machines) or "no peers"
    return (f"not enough memory: the model's {shape.num_layers} layers need about "
            f"{format_size(shape.num_layers * per)} ({format_size(per)} per layer with its KV reserve), "
            f"the peers hold {have} layers ({who}); short by {shape.num_layers - have} layers, about "
            f"{format_size((shape.num_layers - have) * per)}: add a peer or memory (--max-memory)")


def _limit(shape: Shape, p: Placement, by_id: Mapping[str, Machine]) -> str:
    """What bounds the ring's speed, in words: a peer held back by its memory, a link, or compute."""
    if not p.stages:
        return ""
    hop_total = sum(h.ms for h in p.hops)
    compute_total = sum(p.compute_ms.values())
    slowest = max(p.stages, key=lambda st: p.compute_ms[st[0]])
    for n, a, b in p.stages:
        m = by_id[n]
        cap = layers_that_fit(m.free_memory, m.layer_bytes, shape.kv_reserve)
        if b - a >= cap and m.decode_ms < by_id[slowest[0]].decode_ms and len(p.stages) > 1:
            return (f"memory: {m.label} holds only the {cap} layers that fit in {format_size(m.free_memory)}; "
                    f"slower peers take the rest")
    total = p.decode_ms
    if hop_total > compute_total:
        worst = max(p.hops, key=lambda h: h.ms)
        names = {k: by_id[k].label if k in by_id else k[:8] for k in (worst.src, worst.dst)}
        return (f"link: {names[worst.src]} -> {names[worst.dst]} costs {worst.ms:.1f} of {total:.1f} ms per token "
                f"(links {hop_total:.1f} ms, compute {compute_total:.1f} ms)")
    n, a, b = slowest
    return (f"compute: {by_id[n].label}'s {b - a} layers take {p.compute_ms[n]:.1f} of {total:.1f} ms per token "
            f"(compute {compute_total:.1f} ms, links {hop_total:.1f} ms)")
