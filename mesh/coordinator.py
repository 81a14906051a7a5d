"""The coordinator's layer map: who holds which layers, under which plan epoch."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from mesh import placement
from protos import together_pb2 as pb


@dataclass
class Member:
    info: pb.PeerInfo
    last_seen: float = field(default_factory=time.monotonic)


class LayerMap:
    """Claims, standbys and the plan epoch. Pure state; the node does the I/O around it."""

    def __init__(self, model: str, num_layers: int, coordinator: str, kv_reserve: int, epoch: int = 0):
        self.model, self.num_layers, self.coordinator = model, num_layers, coordinator
        self.kv_reserve = kv_reserve  # bytes per layer set aside for KV caches
        self.epoch = epoch
        self.members: dict[str, Member] = {}
        self.stages: list[tuple[str, int, int]] = []

    # ---- membership

    def upsert(self, info: pb.PeerInfo) -> None:
        m = self.members.get(info.node_id)
        if m is None:
            self.members[info.node_id] = Member(pb.PeerInfo(), time.monotonic())
            m = self.members[info.node_id]
        m.info.CopyFrom(info)
        m.last_seen = time.monotonic()

    def remove(self, node_id: str) -> bool:
        """Forget a peer; True if it held layers (the plan changed)."""
        self.members.pop(node_id, None)
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
        """Several peers claiming at once: split in proportion to memory and speed when nothing
        is claimed yet, else one after another."""
        for i in infos:
            self.upsert(i)
        out: dict[str, tuple[tuple[int, int] | None, str]] = {}
        if not self.stages and len(infos) > 1:
            ref = max(self._bytes(i) for i in infos)
            # normalise memory to a common layer size so backends with smaller layers count more
            peers = [(i.node_id, int(i.free_memory) * ref // self._bytes(i), i.layer_ms or 1.0)
                     for i in infos]
            stages = placement.split_proportional(self.num_layers, ref, self.kv_reserve, peers)
            if stages:
                self.stages = stages
                self.epoch += 1
                got = {s[0]: (s[1], s[2]) for s in stages}
                for i in infos:
                    r = got.get(i.node_id)
                    out[i.node_id] = (r, f"claimed layers [{r[0]}, {r[1]}) in a proportional split"
                                      if r else "standing by: the others' split covers the model")
                return out
        for i in infos:
            out[i.node_id] = self.claim(i, None)
        return out

    def release(self, node_id: str) -> None:
        self.stages = [s for s in self.stages if s[0] != node_id]
        self.epoch += 1

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
        return pb.Plan(
            epoch=self.epoch, coordinator=self.coordinator, num_layers=self.num_layers,
            model=self.model, complete=not why, missing="; ".join(why),
            stages=[pb.Assignment(node_id=n, start=a, end=b) for n, a, b in self.stages],
            peers=[m.info for m in self.members.values()],
        )

    @classmethod
    def from_plan(cls, plan: pb.Plan, kv_reserve: int) -> "LayerMap":
        """Take over a plan handed over by a leaving coordinator."""
        lm = cls(plan.model, plan.num_layers, plan.coordinator, kv_reserve, plan.epoch)
        for info in plan.peers:
            lm.upsert(info)
        lm.stages = [(s.node_id, s.start, s.end) for s in plan.stages]
        return lm

    @classmethod
    def rebuild(cls, model: str, num_layers: int, coordinator: str, kv_reserve: int,
                reports: list[pb.PeerInfo], epoch: int) -> "LayerMap":
        """A new coordinator's map, from what the peers say they hold."""
        lm = cls(model, num_layers, coordinator, kv_reserve, epoch)
        taken: list[tuple[int, int]] = []
        for info in sorted(reports, key=lambda i: (i.started_at, i.node_id)):
            lm.upsert(info)
            if info.start >= 0 and info.end > info.start and not any(
                    a < info.end and info.start < b for a, b in taken):
                lm.stages.append((info.node_id, info.start, info.end))
                taken.append((info.start, info.end))
        lm.stages.sort(key=lambda s: s[1])
        return lm
