"""This peer's picture of the mesh: who it is, the plan it follows and every peer it has heard of.
Every role reads it; only `set_plan` replaces the plan, and it tells the roles that care."""

from __future__ import annotations

from typing import Callable

import grpc

from mesh.protocol import FrameError, stage_list
from protos import together_pb2 as pb


def all_peers(plan: pb.Plan) -> list[pb.PeerInfo]:
    """Every peer a plan names: its own ring's and its other rings' (several models in one mesh),
    each once."""
    seen: dict[str, pb.PeerInfo] = {}
    for p in [*plan.peers, *(q for r in plan.rings for q in r.peers)]:
        seen.setdefault(p.node_id, p)
    return list(seen.values())


def plan_for(plan: pb.Plan, model: str) -> pb.Plan | None:
    """The plan of `model` out of a plan and its rings, carrying the others as its rings; None if the
    mesh has no ring of that model yet."""
    every = [plan, *plan.rings]
    mine = next((p for p in every if p.model == model), None)
    if mine is None:
        return None
    out = pb.Plan()
    out.CopyFrom(mine)
    del out.rings[:]
    for p in every:
        if p.model != model:
            r = out.rings.add()
            r.CopyFrom(p)
            del r.rings[:]
    return out


class PlanView:
    def __init__(self, node_id: str, name: str, host: str, num_layers: int, model: str = "") -> None:
        self.node_id, self.name, self.host = node_id, name, host
        self.model = model  # this peer's model: the ring it follows
        self.port = 0  # known once the server listens
        self.plan = pb.Plan(epoch=0, num_layers=num_layers, model=model)
        self.known: dict[str, pb.PeerInfo] = {}  # node id -> latest info, from any source
        self.on_plan: list[Callable[[pb.Plan], None]] = []  # a new epoch, readiness or peer count
        self.on_ring_change: list[Callable[[], None]] = []  # the ring's path changed

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def set_plan(self, plan: pb.Plan) -> None:
        old = self.plan
        changed = (plan.epoch, plan.complete) != (old.epoch, old.complete) or len(plan.peers) != len(old.peers)
        self.plan = plan
        for p in all_peers(plan):
            if p.node_id != self.node_id:
                self.known[p.node_id] = p
        if stage_list(plan) != stage_list(old):
            for cb in self.on_ring_change:
                cb()
        if changed:
            for listener in self.on_plan:
                listener(plan)

    def coordinator_address(self) -> str | None:
        c = self.plan.coordinator
        if not c:
            return None
        if c == self.node_id:
            return self.address
        p = self.known.get(c) or next((x for x in all_peers(self.plan) if x.node_id == c), None)
        return p.address if p else None

    def mine(self, plan: pb.Plan) -> pb.Plan:
        """This model's plan out of a plan that may be another model's (its coordinator's, several
        models in one mesh), or, while the mesh has no ring of this model yet, an empty one under
        that coordinator (naming it among its peers, as a pushed plan does)."""
        if not plan.model or not self.model or plan.model == self.model:
            return plan
        got = plan_for(plan, self.model)
        if got is not None:
            return got
        out = pb.Plan(epoch=self.plan.epoch if self.plan.model == self.model else 0, coordinator=plan.coordinator,
                      num_layers=self.plan.num_layers, model=self.model, complete=False,
                      missing=f"no peer holds layers of {self.model} yet")
        for p in [plan, *plan.rings]:
            r = out.rings.add()
            r.CopyFrom(p)
            del r.rings[:]
        out.peers.extend(q for q in all_peers(plan) if q.node_id == plan.coordinator)
        return out

    def adopt(self, plan: pb.Plan) -> None:
        """Follow a plan that may be another model's: this model's plan out of it (see `mine`)."""
        self.set_plan(self.mine(plan))

    def stage_of(self, index: int) -> tuple[str, pb.Assignment]:
        """Address and assignment of the plan's stage `index`."""
        st = self.plan.stages[index]
        if st.node_id == self.node_id:
            return self.address, st
        p = self.known.get(st.node_id)
        if p is None:
            raise FrameError(grpc.StatusCode.UNAVAILABLE, f"stage {index} ({st.node_id[:8]}) is unknown")
        return p.address, st

    def my_index(self) -> int | None:
        """This peer's position in the ring, if it is a stage of the plan."""
        return next((i for i, s in enumerate(self.plan.stages) if s.node_id == self.node_id), None)

    def my_stage(self) -> pb.Assignment | None:
        return next((s for s in self.plan.stages if s.node_id == self.node_id), None)

    def plan_members(self, start: int, end: int) -> list[str]:
        """The tensor-parallel peers the plan gives this peer's stage [start, end), else []."""
        mine = self.my_stage()
        return list(mine.tp_members) if mine and (mine.start, mine.end) == (start, end) else []
