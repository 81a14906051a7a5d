"""Layer placement for the coordinator: pure functions, no I/O.

Ranges are half-open `[start, end)` over decoder layers. Memory figures are bytes; a layer
costs `layer_bytes` of weights plus `kv_reserve` bytes set aside for its KV caches (both per
layer), so a peer offering `free_memory` holds `free_memory // (layer_bytes + kv_reserve)`
layers.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence

Range = tuple[int, int]
Stage = tuple[str, int, int]  # (node_id, start, end)
Claim = tuple[int, int] | tuple[str, int, int]  # (start, end) or (owner, start, end)

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10, "kib": 1 << 10, "kb": 10**3,
    "m": 1 << 20, "mib": 1 << 20, "mb": 10**6,
    "g": 1 << 30, "gib": 1 << 30, "gb": 10**9,
    "t": 1 << 40, "tib": 1 << 40, "tb": 10**12,
}  # fmt: skip
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int) -> int:
    """Bytes in a size like "4GB", "512MiB", "1.5G" or "100000".

    KB/MB/GB/TB are decimal; KiB/MiB/GiB/TiB and the bare K/M/G/T are binary.
    """
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"size must not be negative: {text}")
        return text
    m = _SIZE_RE.match(text)
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _UNITS:
        raise ValueError(f"not a size: {text!r} (expected e.g. 4GB, 512MiB, 1.5G or a byte count)")
    return int(float(m.group(1)) * _UNITS[unit])


def format_size(n: int) -> str:
    """Human-readable binary size, e.g. 1.5 GiB."""
    if abs(n) < 1024:
        return f"{n} B"
    x = float(n)
    for unit in ("KiB", "MiB", "GiB"):
        x /= 1024
        if abs(x) < 1024:
            return f"{x:.1f} {unit}"
    return f"{x / 1024:.1f} TiB"


def layers_that_fit(free_memory: int, layer_bytes: int, kv_reserve: int) -> int:
    """How many layers (weights + KV reserve) fit in free_memory."""
    per_layer = layer_bytes + kv_reserve
    if per_layer <= 0:
        raise ValueError("a layer must cost some memory (layer_bytes + kv_reserve > 0)")
    return max(0, free_memory) // per_layer


def _claims(taken: Iterable[Claim]) -> list[tuple[str, int, int]]:
    out = []
    for claim in taken:
        if len(claim) == 3:
            owner, start, end = claim
        else:
            (start, end), owner = claim, "another peer"
        out.append((str(owner), int(start), int(end)))
    return sorted(out, key=lambda c: (c[1], c[2]))


def free_ranges(num_layers: int, taken: Iterable[Claim]) -> list[Range]:
    """The gaps in [0, num_layers) that no claim covers, in order."""
    gaps: list[Range] = []
    cursor = 0
    for _, start, end in _claims(taken):
        if start > cursor:
            gaps.append((cursor, min(start, num_layers)))
        cursor = max(cursor, end)
    if cursor < num_layers:
        gaps.append((cursor, num_layers))
    return [g for g in gaps if g[0] < g[1]]


def plan_claim(
    num_layers: int,
    layer_bytes: int,
    kv_reserve_bytes: int,
    taken: Sequence[Claim],
    peer_free_memory: int,
    want: Range | None = None,
) -> tuple[Range | None, str]:
    """The range a joining peer gets, or None, with the reason.

    Without `want`: the lowest free layers, contiguous, as many as fit after the KV reserve.
    With `want`: granted only if inside [0, num_layers), overlapping no claim, and fitting.
    `taken` entries are (start, end) or (owner, start, end); owners make refusals clearer.
    """
    fit = layers_that_fit(peer_free_memory, layer_bytes, kv_reserve_bytes)
    one_layer = layer_bytes + kv_reserve_bytes
    claims = _claims(taken)
    if want is not None:
        start, end = want
        if not (0 <= start < end <= num_layers):
            return None, f"layers [{start}, {end}) are not a range within [0, {num_layers})"
        overlaps = [c for c in claims if c[1] < end and start < c[2]]
        if overlaps:
            who = ", ".join(f"{owner} holds [{s}, {e})" for owner, s, e in overlaps)
            return None, f"layers [{start}, {end}) overlap live claims: {who}"
        if end - start > fit:
            return None, (
                f"layers [{start}, {end}) need {format_size((end - start) * one_layer)} "
                f"but this peer offers {format_size(peer_free_memory)} (room for {fit} layers)"
            )
        return (start, end), f"granted the requested layers [{start}, {end})"
    if fit < 1:
        return None, (
            f"not enough memory for one layer: a layer needs {format_size(one_layer)} "
            f"({format_size(layer_bytes)} weights + {format_size(kv_reserve_bytes)} KV reserve), "
            f"this peer offers {format_size(peer_free_memory)}"
        )
    gaps = free_ranges(num_layers, claims)
    if not gaps:
        return None, f"all {num_layers} layers are already claimed; standing by"
    start, gap_end = gaps[0]
    end = min(gap_end, start + fit)
    return (start, end), f"claimed layers [{start}, {end}) ({end - start} of {fit} that fit)"


def _speed(layer_ms: float) -> float:
    # An unmeasured peer (0 or negative) counts as 1 ms per layer rather than infinitely fast.
    return 1.0 / layer_ms if layer_ms > 0 else 1.0


Peer = tuple[str, int, float] | tuple[str, int, float, float]  # (node_id, free_memory, layer_ms[, head_ms])


def split_proportional(
    num_layers: int,
    layer_bytes: int,
    kv_reserve: int,
    peers: Sequence[Peer],
) -> list[Stage]:
    """Split [0, num_layers) among peers (node_id, free_memory, layer_ms[, head_ms]) claiming at once.

    Stage times are balanced: a stage takes its layers times its peer's layer_ms, plus head_ms if
    it is the last, so a peer twice as fast gets about twice the layers; nobody gets more than
    fits. The last stage goes to the peer that makes the slowest stage fastest (ties: the given
    order), the others keep the given order. Stages are contiguous and cover [0, num_layers) when
    total capacity allows (else [0, capacity)). Peers left out stand by.
    """
    caps = [min(num_layers, layers_that_fit(p[1], layer_bytes, kv_reserve)) for p in peers]
    ms = [1.0 / _speed(p[2]) for p in peers]
    heads = [max(0.0, p[3]) if len(p) == 4 and math.isfinite(p[3]) else 0.0 for p in peers]
    best: tuple[float, int, list[int]] | None = None
    for last in reversed(range(len(peers))):  # the given order's last first: it wins ties
        if caps[last] < 1:
            continue
        alloc = _balance(num_layers, caps, ms, heads, last)
        if alloc[last] < 1:
            continue
        span = max(n * m + (heads[i] if i == last else 0.0) for i, (n, m) in enumerate(zip(alloc, ms)))
        if best is None or span < best[0]:
            best = (span, last, alloc)
    if best is None:
        return []
    _, last, alloc = best
    stages: list[Stage] = []
    cursor = 0
    for i in [i for i in range(len(peers)) if i != last] + [last]:
        if alloc[i] > 0:
            stages.append((peers[i][0], cursor, cursor + alloc[i]))
            cursor += alloc[i]
    return stages


def _balance(num_layers: int, caps: list[int], ms: list[float], heads: list[float], last: int) -> list[int]:
    """Layers per peer, one at a time to the peer that would finish it soonest (ties: the earlier
    peer), with `last` starting `heads[last]` late: for equal layers, the fastest slowest stage."""
    alloc = [0] * len(caps)
    busy = [heads[i] if i == last else 0.0 for i in range(len(caps))]
    for _ in range(num_layers):
        room = [i for i in range(len(caps)) if alloc[i] < caps[i]]
        if not room:
            break
        i = min(room, key=lambda i: (busy[i] + ms[i], i))
        alloc[i] += 1
        busy[i] += ms[i]
    return alloc


def split_by_memory(num_layers: int, kv_reserve: int, peers: Sequence[tuple[str, int, int]]) -> list[Stage]:
    """Split [0, num_layers) among peers (node_id, free_memory, layer_bytes) in the given order,
    each a share in proportion to the layers that fit in its memory, ignoring speed and links
    (`--placement memory`: the baseline the planner is measured against). Peers that fit no
    layer stand by; with too little memory in all, a prefix is covered."""
    caps = [min(num_layers, layers_that_fit(free, max(1, lb), kv_reserve)) for _, free, lb in peers]
    total = sum(caps)
    if total <= num_layers:
        alloc = list(caps)
    else:  # largest remainders, ties to the earlier peer
        exact = [num_layers * c / total for c in caps]
        alloc = [int(x) for x in exact]
        for i in sorted(range(len(caps)), key=lambda i: (-(exact[i] - alloc[i]), i))[:num_layers - sum(alloc)]:
            alloc[i] += 1
    stages: list[Stage] = []
    cursor = 0
    for (node_id, _, _), k in zip(peers, alloc):
        if k > 0:
            stages.append((node_id, cursor, cursor + k))
            cursor += k
    return stages


Candidate = tuple[str, int, float, Range | None]  # (node_id, free_memory, layer_ms, current range)


def reassign(
    num_layers: int,
    stages: Sequence[Stage],
    lost: set[str],
    candidates: Sequence[Candidate],
    *,
    layer_bytes: int,
    kv_reserve: int = 0,
) -> tuple[list[Stage] | None, list[Range]]:
    """New stages covering the layers of lost peers (and any other gap), or None and the gaps.

    candidates are (node_id, free_memory, layer_ms, current_range or None for a standby);
    free_memory is the peer's whole offer, including what its current layers use. Per gap:
    a standby that fits all of it (fastest first), else the neighbouring survivors extended
    into it, else neighbours plus standbys for the middle; otherwise the gap stays missing.
    """
    survivors = sorted(((n, s, e) for n, s, e in stages if n not in lost), key=lambda st: st[1])
    refill = _Refill(survivors, [c for c in candidates if c[0] not in lost], layer_bytes, kv_reserve)
    missing = [gap for gap in free_ranges(num_layers, survivors) if not refill.fill(*gap)]
    if missing:
        return None, missing
    return refill.result(), []


class _Refill:
    """The survivors' ranges as reassign grows them, and the standbys it has placed so far."""

    def __init__(self, survivors: list[Stage], alive: list[Candidate], layer_bytes: int, kv_reserve: int) -> None:
        self.ranges: dict[str, list[int]] = {n: [s, e] for n, s, e in survivors}
        self.info = {c[0]: c for c in alive}
        self.caps = {n: layers_that_fit(c[1], layer_bytes, kv_reserve) for n, c in self.info.items()}
        self.standbys = [c for c in alive if c[0] not in self.ranges and c[3] is None]
        self.standbys.sort(key=lambda c: c[2] if c[2] > 0 else math.inf)  # fastest first; stable
        self.used: set[str] = set()
        self.new: list[Stage] = []

    def room(self, node_id: str | None) -> int:
        if node_id is None or node_id not in self.caps:
            return 0
        s, e = self.ranges[node_id]
        return max(0, self.caps[node_id] - (e - s))

    def fill(self, g_start: int, g_end: int) -> bool:
        """Cover the gap [g_start, g_end); False (and nothing changed) if it cannot be."""
        size = g_end - g_start
        whole = next((c for c in self.standbys if c[0] not in self.used and self.caps[c[0]] >= size), None)
        if whole is not None:
            self.used.add(whole[0])
            self.new.append((whole[0], g_start, g_end))
            return True
        left = next((n for n, r in self.ranges.items() if r[1] == g_start), None)
        right = next((n for n, r in self.ranges.items() if r[0] == g_end), None)
        room_l, room_r = self.room(left), self.room(right)
        if room_l + room_r >= size:
            # Split the gap between the neighbours in proportion to speed, within their room.
            s_l = _speed(self.info[left][2]) if left and room_l else 0.0
            s_r = _speed(self.info[right][2]) if right and room_r else 0.0
            want_l = round(size * s_l / (s_l + s_r)) if s_l + s_r > 0 else 0
            take_l = min(room_l, max(size - room_r, want_l))
            self._extend(left, right, take_l, size - take_l)
            return True
        # Neighbours take all they can; standbys (largest first) fill the middle.
        fill = self._fill_middle(g_start + room_l, g_end - room_r)
        if fill is None:
            return False
        self._extend(left, right, room_l, room_r)
        self.used.update(n for n, _, _ in fill)
        self.new.extend(fill)
        return True

    def _extend(self, left: str | None, right: str | None, take_l: int, take_r: int) -> None:
        if left:
            self.ranges[left][1] += take_l
        if right:
            self.ranges[right][0] -= take_r

    def _fill_middle(self, start: int, end: int) -> list[Stage] | None:
        fill: list[Stage] = []
        cursor = start
        for c in sorted((c for c in self.standbys if c[0] not in self.used), key=lambda c: -self.caps[c[0]]):
            if cursor >= end or self.caps[c[0]] < 1:
                break
            take = min(self.caps[c[0]], end - cursor)
            fill.append((c[0], cursor, cursor + take))
            cursor += take
        return fill if cursor >= end else None

    def result(self) -> list[Stage]:
        stages = [(n, r[0], r[1]) for n, r in self.ranges.items()] + self.new
        return sorted(stages, key=lambda st: st[1])


def choose_coordinator(peers: Sequence[tuple[str, float]]) -> str:
    """The coordinator among (node_id, started_at): the oldest, ties broken by node id."""
    if not peers:
        raise ValueError("no peers to choose a coordinator from")
    return min(peers, key=lambda p: (p[1], p[0]))[0]
