"""The coordinator's layer map: who holds which layers, under which plan epoch."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from mesh import placement, planner
from protos import together_pb2 as pb

PLACEMENTS = ("measured", "memory")  # --placement: by speeds and links (the planner), or memory alone
_WIRE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def _age(info: pb.PeerInfo) -> tuple[float, str]:
    """Oldest first, ties by node id: the order that picks coordinators and group leaders."""
    return info.started_at, info.node_id


@dataclass
class Member:
    info: pb.PeerInfo
    last_seen: float = field(default_factory=time.monotonic)


class LayerMap:
    """Claims, standbys and the plan epoch. Pure state; the node does the I/O around it."""

    def __init__(self, model: str, num_layers: int, coordinator: str, kv_reserve: int, epoch: int = 0,
                 hidden_size: int = 0, placement: str = "measured") -> None:
        self.model, self.num_layers, self.coordinator = model, num_layers, coordinator
        self.kv_reserve = kv_reserve  # bytes per layer set aside for KV caches
        self.hidden_size, self.placement = hidden_size, placement  # for the planner's predictions
        self.epoch = epoch
        self.members: dict[str, Member] = {}
        self.stages: list[tuple[str, int, int]] = []
        # tensor-parallel stages: leader -> (group name, member ids in rank order, leader first)
        self.groups: dict[str, tuple[str, list[str]]] = {}
        self.broken: set[str] = set()  # groups that lost a rank: their peers serve alone now

    # ---- membership

    def upsert(self, info: pb.PeerInfo) -> None:
        m = self.members.setdefault(info.node_id, Member(pb.PeerInfo()))
        m.info.CopyFrom(info)
        m.last_seen = time.monotonic()

    def remove(self, node_id: str) -> bool:
        """Forget a peer; True if it held layers (the plan changed)."""
        self.members.pop(node_id, None)
        if self.lose_groups({node_id}):
            return True
        before = len(self.stages)
        self.stages = [s for s in self.stages if s[0] != node_id]
        if len(self.stages) != before:
            self.epoch += 1
            return True
        return False

    def stale(self, timeout: float) -> list[str]:
        now = time.monotonic()
        return [n for n, m in self.members.items()
                if n != self.coordinator and now - m.last_seen > timeout]

    # ---- claims

    def _bytes(self, info: pb.PeerInfo) -> int:
        return max(int(info.layer_bytes), 1)

    def claim(self, info: pb.PeerInfo, want: tuple[int, int] | None) -> tuple[tuple[int, int] | None, str]:
        """One peer's claim: a requested range, or the next free one that fits."""
        self.upsert(info)
        mine = [s for s in self.stages if s[0] == info.node_id]
        if mine and want is None:
            return (mine[0][1], mine[0][2]), "already holds these layers"
        taken = [s for s in self.stages if s[0] != info.node_id]
        rng, reason = placement.plan_claim(self.num_layers, self._bytes(info), self.kv_reserve,
                                           taken, int(info.free_memory), want)
        if rng is not None:
            self.stages = sorted(taken + [(info.node_id, rng[0], rng[1])], key=lambda s: s[1])
            self.epoch += 1
        return rng, reason

    def claim_together(self, infos: list[pb.PeerInfo]) -> dict[str, tuple[tuple[int, int] | None, str]]:
        """Several peers claiming at once: when nothing is claimed yet, one split of them all (by
        the planner on measured speeds and links, or by memory alone with --placement memory),
        else one after another."""
        for i in infos:
            self.upsert(i)
        out: dict[str, tuple[tuple[int, int] | None, str]] = {}
        if not self.stages and len(infos) > 1:
            stages, how, why_not = self._split_together(infos)
            if stages:
                self.stages = stages
                self.epoch += 1
                got = {s[0]: (s[1], s[2]) for s in stages}
                for i in infos:
                    r = got.get(i.node_id)
                    out[i.node_id] = (r, f"claimed layers [{r[0]}, {r[1]}) in {how}" if r else why_not)
                return out
        for i in infos:
            out[i.node_id] = self.claim(i, None)
        return out

    def _split_together(self, infos: list[pb.PeerInfo]) -> tuple[list[tuple[str, int, int]], str, str]:
        """(stages, how they were chosen, why a peer left out stands by)."""
        covers = "standing by: the others' split covers the model"
        if self.placement == "memory":
            stages = placement.split_by_memory(self.num_layers, self.kv_reserve,
                                               [(i.node_id, int(i.free_memory), self._bytes(i)) for i in infos])
            return stages, "a memory-only split (--placement memory)", covers
        if self.hidden_size and any(i.links for i in infos):
            try:
                p = planner.plan(self._shape(), self._machines(infos), self._links(infos))
            except planner.Unplaceable:
                pass  # not enough memory yet: the split below covers what it can, the rest waits for peers
            else:
                why = "; ".join(p.notes[:1]) or covers
                return p.stages, f"a link-aware split (predicted {p.decode_tokens_per_s:.1f} tok/s)", \
                    f"standing by: {why}"
        ref = max(self._bytes(i) for i in infos)
        # normalise memory to a common layer size so backends with smaller layers count more
        peers: list[placement.Peer] = [
            (i.node_id, int(i.free_memory) * ref // self._bytes(i), i.layer_ms or 1.0, i.head_ms) for i in infos]
        return placement.split_proportional(self.num_layers, ref, self.kv_reserve, peers), \
            "a proportional split", covers

    # ---- the planner's view of the members

    def _shape(self) -> planner.Shape:
        return planner.Shape(self.num_layers, self.hidden_size, self.kv_reserve)

    def _machines(self, infos: list[pb.PeerInfo]) -> list[planner.Machine]:
        return [planner.Machine(i.node_id, int(i.free_memory), self._bytes(i), i.layer_ms, i.prefill_ms, i.head_ms,
                                _WIRE_BYTES.get(i.dtype, 4), api=bool(i.api), name=i.name)
                for i in sorted(infos, key=_age)]

    def _links(self, infos: list[pb.PeerInfo]) -> dict[tuple[str, str], planner.Link]:
        return {(i.node_id, ln.node_id): planner.Link(ln.rtt_ms, ln.mbps) for i in infos for ln in i.links}

    def predict(self) -> planner.Placement | None:
        """The planner's prediction for the current stages, if every stage's peer is known."""
        infos = [m.info for m in self.members.values()]
        if not self.stages or not self.hidden_size or any(s[0] not in self.members for s in self.stages):
            return None
        if placement.free_ranges(self.num_layers, self.stages):
            return None
        return planner.evaluate(self._shape(), self._machines(infos), self._links(infos), self.stages)

    # ---- tensor-parallel groups

    def in_tp(self, info: pb.PeerInfo) -> bool:
        """A peer of a tensor-parallel group that still stands (not broken by a lost rank)."""
        return bool(info.tp_group) and info.tp_group not in self.broken

    def tp_peers(self, group: str) -> list[pb.PeerInfo]:
        """The known peers of a group, oldest (its leader) first."""
        return sorted((m.info for m in self.members.values() if m.info.tp_group == group), key=_age)

    def claim_tp(self, info: pb.PeerInfo, want: tuple[int, int] | None) -> tuple[tuple[int, int] | None, str]:
        """A group's claim: its leader (the oldest peer) claims one range for the whole group once
        all its peers are here; the others serve as its ranks > 0 and hold no range of their own."""
        self.upsert(info)
        g = info.tp_group
        peers = self.tp_peers(g)
        leader = peers[0]
        if leader.backend != info.backend:
            return None, (f"refused: tensor-parallel group {g!r} cannot mix backends: its leader {leader.name} "
                          f"runs {leader.backend}, this peer {info.backend}")
        if leader.tp_size != info.tp_size:
            return None, (f"refused: tensor-parallel group {g!r} has {leader.tp_size} peers (its leader "
                          f"{leader.name}'s --tp-size), this peer says {info.tp_size}")
        for lead, (_, ids) in self.groups.items():
            if info.node_id in ids and lead != info.node_id:
                return None, f"member of tensor-parallel group {g!r}: rank {ids.index(info.node_id)}"
        same = [p for p in peers if p.backend == leader.backend and p.tp_size == leader.tp_size]
        if leader.node_id != info.node_id:
            if info.node_id not in [p.node_id for p in same[:leader.tp_size]]:
                return None, f"refused: tensor-parallel group {g!r} already has its {leader.tp_size} peers"
            return None, f"member of tensor-parallel group {g!r} ({min(len(same), leader.tp_size)}/" \
                         f"{leader.tp_size} peers): waiting for its leader {leader.name}"
        if len(same) < info.tp_size:
            return None, f"waiting for tensor-parallel group {g!r}: {len(same)}/{info.tp_size} peers"
        rng, reason = self.claim(info, want)
        if rng is not None:
            ids = [p.node_id for p in same[:info.tp_size]]
            self.groups[info.node_id] = (g, ids)
            reason = f"{reason} (as tensor-parallel group {g!r} of {len(ids)} peers)"
        return rng, reason

    def left_group(self, info: pb.PeerInfo) -> bool:
        """A peer of a formed group reports it no longer belongs to it (its rank failed)."""
        return any(info.node_id in ids and info.tp_group != g for g, ids in self.groups.values())

    def lose_groups(self, node_ids: set[str]) -> bool:
        """Ranks gone: each of their groups' stage is lost like any stage (its layers are reassigned)
        and the group's other peers serve as ordinary peers from now on. True if the plan changed."""
        changed = False
        for lead, (g, ids) in list(self.groups.items()):
            if node_ids & set(ids):
                del self.groups[lead]
                self.broken.add(g)
                self.stages = [s for s in self.stages if s[0] != lead]
                changed = True
        if changed:
            self.epoch += 1
        return changed

    # ---- the plan

    def ready(self, node_id: str) -> bool:
        m = self.members.get(node_id)
        st = next((s for s in self.stages if s[0] == node_id), None)
        return bool(m and st and m.info.ready and (m.info.start, m.info.end) == (st[1], st[2]))

    def missing(self) -> list[tuple[int, int]]:
        return placement.free_ranges(self.num_layers, self.stages)

    def complete(self) -> bool:
        return not self.missing() and all(self.ready(s[0]) for s in self.stages)

    def plan(self) -> pb.Plan:
        gaps = self.missing()
        waiting = [s for s in self.stages if not self.ready(s[0])]
        why = []
        if gaps:
            why.append("no peer holds layers " + ", ".join(f"[{a}, {b})" for a, b in gaps))
        if waiting:
            why.append("still loading: " + ", ".join(
                f"{self.members[n].info.name if n in self.members else n} [{a}, {b})"
                for n, a, b in waiting))
        pred = self.predict()
        return pb.Plan(
            epoch=self.epoch, coordinator=self.coordinator, num_layers=self.num_layers,
            model=self.model, complete=not why, missing="; ".join(why),
            predicted_tokens_per_s=pred.decode_tokens_per_s if pred else 0.0,
            predicted_prefill_tokens_per_s=pred.prefill_tokens_per_s if pred else 0.0,
            limit=pred.limit if pred else "",
            stages=[pb.Assignment(node_id=n, start=a, end=b, tp_members=self.groups.get(n, ("", []))[1])
                    for n, a, b in self.stages],
            peers=[m.info for m in self.members.values()],
        )

    @classmethod
    def from_plan(cls, plan: pb.Plan, kv_reserve: int, hidden_size: int = 0,
                  placement: str = "measured") -> "LayerMap":
        """Take over a plan handed over by a leaving coordinator."""
        lm = cls(plan.model, plan.num_layers, plan.coordinator, kv_reserve, plan.epoch, hidden_size, placement)
        for info in plan.peers:
            if not (info.model and plan.model and info.model != plan.model):  # (another model's coordinator)
                lm.upsert(info)
        lm.stages = [(s.node_id, s.start, s.end) for s in plan.stages]
        for s in plan.stages:
            if s.tp_members and s.node_id in lm.members:
                lm.groups[s.node_id] = (lm.members[s.node_id].info.tp_group, list(s.tp_members))
        return lm

    @classmethod
    def rebuild(cls, model: str, num_layers: int, coordinator: str, kv_reserve: int,
                reports: list[pb.PeerInfo], epoch: int, hidden_size: int = 0,
                placement: str = "measured") -> "LayerMap":
        """A new coordinator's map, from what the peers say they hold."""
        lm = cls(model, num_layers, coordinator, kv_reserve, epoch, hidden_size, placement)
        taken: list[tuple[int, int]] = []
        ordered = sorted(reports, key=_age)
        for info in ordered:
            lm.upsert(info)
            if info.start >= 0 and info.end > info.start and not any(
                    a < info.end and info.start < b for a, b in taken):
                lm.stages.append((info.node_id, info.start, info.end))
                taken.append((info.start, info.end))
                if info.tp_group:  # a group's leader: its peers are the group's oldest
                    same = [p for p in ordered if p.tp_group == info.tp_group and p.backend == info.backend]
                    if len(same) >= info.tp_size and same[0].node_id == info.node_id:
                        lm.groups[info.node_id] = (info.tp_group, [p.node_id for p in same[:info.tp_size]])
        lm.stages.sort(key=lambda s: s[1])
        return lm
