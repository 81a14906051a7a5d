"""The coordinator's side of a peer: while this peer coordinates, it owns the layer map, answers
claims, heartbeats and leaves, drops peers that stopped answering, covers their layers, and pushes
every new plan to the members. On any other peer `layer_map` is None and this role is idle."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

import grpc

from backends.errors import RequestError
from mesh import placement
from mesh.coordinator import LayerMap
from mesh.links import Peers
from mesh.tasks import TaskSet
from mesh.view import PlanView
from protos import together_pb2 as pb

log = logging.getLogger(__name__)
STEPPED_DOWN = "this peer stopped coordinating; ask the new coordinator"
PEER_TIMEOUT_S = 3.0  # a peer silent this long is gone: its layers are reassigned
LOST_MEMORY_S = 600.0  # how long a coordinator keeps asking after dropped peers (partitions heal)
MEASURE_WAIT_S = 4.0  # how long a batch of claims waits for peers still timing their layers
STARTING_S = 30.0  # a peer started this recently and silent about its speed may still be measuring

Range = tuple[int, int] | None


class CoordinatorRole:
    def __init__(self, view: PlanView, links: Peers, tasks: TaskSet, model: str, num_layers: int,
                 kv_reserve: int, claim_window_s: float, rejoin: Callable[[], None], hidden_size: int = 0,
                 placement: str = "measured") -> None:
        # rejoin: claim again under the other coordinator after this one stepped down
        self.view, self.links, self.tasks = view, links, tasks
        self.hidden_size, self.placement = hidden_size, placement  # the planner's (mesh/planner.py)
        self.model, self.kv_reserve, self.claim_window_s = model, kv_reserve, claim_window_s
        self._rejoin = rejoin
        self.num_layers = num_layers
        self.layer_map: LayerMap | None = None  # only while this peer coordinates
        self._claim_batch: list[tuple[pb.PeerInfo, asyncio.Future[tuple[Range, str]]]] = []
        self._claim_timer: asyncio.TimerHandle | None = None
        self._claim_since = 0.0  # when the batch's window opened (loop time)
        self._gone: dict[str, tuple[str, float]] = {}  # dropped peers: node id -> (address, when)
        self._finding = False  # a find_lost round is under way

    @property
    def active(self) -> bool:
        return self.layer_map is not None

    def _map(self) -> LayerMap:
        if self.layer_map is None:
            raise RequestError("not the coordinator")
        return self.layer_map

    # ---------------------------------------------------------------- becoming and leaving

    def become(self, epoch: int) -> None:
        """Coordinate from what this peer knows (the first peer of a mesh)."""
        self.layer_map = LayerMap.rebuild(self.model, self.num_layers, self.view.node_id, self.kv_reserve,
                                          list(self.view.known.values()), epoch, self.hidden_size, self.placement)
        log.info("%s coordinates the mesh", self.view.name)
        self.view.set_plan(self.layer_map.plan())

    async def take_over(self, reports: list[pb.PeerInfo]) -> None:
        """The coordinator is gone: rebuild the map from the survivors' own reports, one epoch on."""
        log.warning("%s takes over as coordinator (the old one stopped answering)", self.view.name)
        old = next((p for p in self.view.plan.peers if p.node_id == self.view.plan.coordinator), None)
        if old is not None:  # if it was cut off rather than dead, the two meet once it is back
            self._gone[old.node_id] = (old.address, time.monotonic())
        self.view.known = {r.node_id: r for r in reports}
        self.layer_map = LayerMap.rebuild(self.model, self.num_layers, self.view.node_id, self.kv_reserve,
                                          reports, self.view.plan.epoch + 1, self.hidden_size, self.placement)
        self.reassign(set())
        await self.publish()

    async def take_handover(self, plan: pb.Plan) -> None:
        """The old coordinator left cleanly and named this peer its heir."""
        log.warning("%s takes over as coordinator (handed over)", self.view.name)
        self.layer_map = LayerMap.from_plan(plan, self.kv_reserve, self.hidden_size, self.placement)
        self.layer_map.epoch += 1
        await self.publish()

    async def hand_over(self) -> None:
        """A leaving coordinator gives its layers and the layer map to the oldest other peer."""
        lm = self._map()
        others = [m.info for n, m in lm.members.items() if n != self.view.node_id]
        if not others:
            return
        heir = placement.choose_coordinator([(i.node_id, i.started_at) for i in others])
        self.drop({self.view.node_id})
        lm.coordinator = heir
        plan = lm.plan()
        self.layer_map = None
        self.view.set_plan(plan)
        log.warning("%s hands the mesh to %s", self.view.name, next(i.name for i in others if i.node_id == heir))
        await asyncio.gather(*(self.push(i.address, plan) for i in others), return_exceptions=True)

    def meet(self, plan: pb.Plan, started_at: float) -> None:
        """Another coordinator's plan reached this one (peers started apart, or a partition healed):
        the older one wins and takes the other's peers, at an epoch above both sides'."""
        lm = self._map()
        theirs = next((p for p in plan.peers if p.node_id == plan.coordinator), None)
        if theirs is None:
            return
        self.view.known[theirs.node_id] = theirs
        self._gone.pop(theirs.node_id, None)
        if (theirs.started_at, theirs.node_id) < (started_at, self.view.node_id):
            log.warning("%s steps down: %s coordinates this mesh", self.view.name, theirs.name)
            mine = lm.plan()  # the winner merges our peers and bumps above our epoch
            self.layer_map = None
            self.view.set_plan(plan)
            self.tasks.spawn(self.push(theirs.address, mine))
            self._rejoin()
            return
        lm.epoch = max(lm.epoch, plan.epoch) + 1
        for p in plan.peers:
            if p.node_id not in lm.members and p.node_id != self.view.node_id:
                lm.upsert(p)
                self.view.known[p.node_id] = p
        # no reassign here: the other side's peers claim their layers again under this plan (peers
        # that started together may not have claimed at all yet: their --layers must stay free)
        self.tasks.spawn(self.publish())

    async def _find_lost_once(self) -> None:
        try:
            await self.find_lost()
        finally:
            self._finding = False

    async def find_lost(self) -> None:
        """Ask the peers dropped lately whether they are back (a partition healed): one that follows
        another coordinator makes the two meet, so the two sides merge into one ring."""
        now = time.monotonic()
        for node_id, (address, when) in list(self._gone.items()):
            if now - when > LOST_MEMORY_S:
                self._gone.pop(node_id, None)
                continue
            try:
                st = await self.links.stub(address).Status(pb.StatusRequest(), timeout=1.0)
            except grpc.aio.AioRpcError:
                continue
            lm = self.layer_map
            if lm is None:
                return
            self._gone.pop(node_id, None)
            if st.plan.coordinator and st.plan.coordinator != self.view.node_id:
                log.warning("%s hears %s again, under another coordinator: merging", self.view.name,
                            st.peer.name)
                me = lm.members.get(self.view.node_id)
                self.meet(st.plan, me.info.started_at if me else time.time())

    # ---------------------------------------------------------------- requests from the members

    async def join(self, request: pb.JoinRequest) -> pb.JoinReply:
        """A peer claims layers: the range it asks for, its group's, or (batched over a short window,
        so peers starting together split the model well) a share sized by its memory and speed."""
        lm = self._map()
        info = request.peer
        if info.model != self.model:
            return pb.JoinReply(ok=False, reason=f"this mesh serves {self.model}, not {info.model}",
                                start=-1, end=-1, plan=lm.plan())
        self.view.known[info.node_id] = info
        rng: Range
        if lm.in_tp(info):
            want = (request.want_start, request.want_end) if request.want_start >= 0 else None
            rng, reason = lm.claim_tp(info, want)
            if reason.startswith("waiting for tensor-parallel"):  # the peer asks again: no plan change
                return pb.JoinReply(ok=False, reason=reason, start=-1, end=-1, plan=lm.plan())
        elif request.want_start >= 0:
            rng, reason = lm.claim(info, (request.want_start, request.want_end))
        else:
            loop = asyncio.get_running_loop()
            fut: asyncio.Future[tuple[Range, str]] = loop.create_future()
            self._claim_batch.append((info, fut))
            if self._claim_timer is None:
                self._claim_since = loop.time()
                self._claim_timer = loop.call_later(self.claim_window_s, self._settle_claims)
            rng, reason = await fut
            if self.layer_map is None:
                return pb.JoinReply(ok=False, reason=STEPPED_DOWN, start=-1, end=-1, plan=self.view.plan)
        log.info("claim by %s: %s", info.name, reason)
        await self.publish()
        return pb.JoinReply(ok=rng is not None, reason=reason, start=rng[0] if rng else -1,
                            end=rng[1] if rng else -1, plan=self._map().plan())

    def _settle_claims(self) -> None:
        lm = self.layer_map
        loop = asyncio.get_running_loop()
        if lm is not None and (self._measuring(lm) or self._probing(lm)) \
                and loop.time() - self._claim_since < MEASURE_WAIT_S:
            # a peer that started with these is still timing its layers or its links: its claim (or
            # its links, for the planner) is on the way
            self._claim_timer = loop.call_later(0.25, self._settle_claims)
            return
        batch, self._claim_batch, self._claim_timer = self._claim_batch, [], None
        if lm is None:  # stepped down while the claims waited: their peers ask the new coordinator
            for _, fut in batch:
                if not fut.done():
                    fut.set_result((None, STEPPED_DOWN))
            return
        batch.sort(key=lambda b: (b[0].started_at, b[0].node_id))
        out = lm.claim_together([self._fresh(lm, b[0]) for b in batch])
        for info, fut in batch:
            if not fut.done():
                fut.set_result(out[info.node_id])

    def _measuring(self, lm: LayerMap) -> bool:
        """A peer that started moments ago, holds and claims nothing yet and has not reported its
        speed: it started with the claiming peers and is still measuring (backends/measure.py)."""
        skip = {info.node_id for info, _ in self._claim_batch} | {s[0] for s in lm.stages}
        infos = {**self.view.known, **{n: m.info for n, m in lm.members.items()}}  # members' are fresher
        return any(i.layer_ms <= 0 and not i.tp_group and n not in skip and time.time() - i.started_at < STARTING_S
                   for n, i in infos.items())

    def _probing(self, lm: LayerMap) -> bool:
        """Peers here measure links (some reported one), and a peer that started moments ago and
        holds nothing lacks a link to another such peer: it is still probing, and its claim (or, for
        a peer of the batch, its links) is on the way (mesh/linkprobe.py measures before claiming)."""
        infos = {**self.view.known, **{n: m.info for n, m in lm.members.items()}}
        infos.update({i.node_id: self._fresh(lm, i) for i, _ in self._claim_batch})
        if len(self._claim_batch) < 1 or not any(i.links for i in infos.values()):
            return False
        held = {s[0] for s in lm.stages}
        recent = [i for i in infos.values() if not i.tp_group and i.node_id not in held
                  and time.time() - i.started_at < STARTING_S]
        ids = {i.node_id for i in recent}
        return len(ids) > 1 and any(ids - {i.node_id} - {ln.node_id for ln in i.links} for i in recent)

    @staticmethod
    def _fresh(lm: LayerMap, info: pb.PeerInfo) -> pb.PeerInfo:
        """A claim's info with the links its later heartbeats reported (a claim may predate them)."""
        m = lm.members.get(info.node_id)
        if m is None or len(m.info.links) <= len(info.links):
            return info
        out = pb.PeerInfo()
        out.CopyFrom(info)
        del out.links[:]
        out.links.extend(m.info.links)
        return out

    async def leave(self, node_id: str) -> pb.Plan:
        if self.layer_map is not None and node_id in self.layer_map.members:
            log.info("peer %s leaves; handing its layers over", node_id[:8])
            self.drop({node_id})
            self._gone.pop(node_id, None)  # gone on purpose: nothing to look for
            await self.publish()
        return self.view.plan

    async def heartbeat(self, request: pb.HeartbeatRequest) -> pb.HeartbeatReply:
        lm = self.layer_map
        if lm is None:
            return pb.HeartbeatReply(plan=self.view.plan)
        peer = request.peer
        before, was_ready = lm.complete(), lm.ready(peer.node_id)
        lm.upsert(peer)
        self.view.known[peer.node_id] = peer
        if lm.left_group(peer):
            log.warning("peer %s left its tensor-parallel group: the group's stage is lost", peer.name)
            lm.lose_groups({peer.node_id})
            self.reassign(set())
            await self.publish()
            return pb.HeartbeatReply(plan=lm.plan())
        if lm.complete() != before or lm.ready(peer.node_id) != was_ready:
            lm.epoch += 1
            await self.publish()
        return pb.HeartbeatReply(plan=lm.plan())

    # ---------------------------------------------------------------- failures

    def forgive_stall(self) -> None:
        """This peer's own loop stalled: the members' silence meanwhile is no evidence."""
        if self.layer_map is not None:
            for m in self.layer_map.members.values():
                m.last_seen = max(m.last_seen, time.monotonic())

    async def expire_peers(self) -> None:
        """Drop the members silent for PEER_TIMEOUT_S that do not answer a direct question either."""
        lm = self._map()
        if self._gone and not self._finding:
            self._finding = True
            self.tasks.spawn(self._find_lost_once())
        lost = set()
        for node_id in lm.stale(PEER_TIMEOUT_S):
            m = lm.members[node_id]
            try:  # late heartbeats from a busy peer are not a death: ask it directly first
                st = await self.links.stub(m.info.address).Status(pb.StatusRequest(), timeout=2.0)
                m.last_seen = time.monotonic()
                if st.plan.coordinator != self.view.node_id:
                    # it follows another coordinator (or set up on its own): tell that one too, so the
                    # two meet and the older wins
                    self.tasks.spawn(self.push(m.info.address, lm.plan()))
                    rival = next((p for p in st.plan.peers if p.node_id == st.plan.coordinator), None)
                    if rival is not None and rival.address != m.info.address:
                        self.tasks.spawn(self.push(rival.address, lm.plan()))
                continue
            except grpc.aio.AioRpcError:
                pass
            log.warning("peer %s stopped answering; dropping it", m.info.name)
            lost.add(node_id)
        if lost:
            self.drop(lost)
            await self.publish()

    async def suspect(self, node_id: str, reason: str) -> None:
        """A peer's stream to `node_id` broke: ask it now rather than wait PEER_TIMEOUT_S. Only a
        refusal (nobody listens there) drops it; a slow answer is left to the heartbeat verdict."""
        lm = self._map()
        m = lm.members.get(node_id)
        if m is None or node_id == self.view.node_id:
            return
        try:
            await self.links.stub(m.info.address).Status(pb.StatusRequest(), timeout=1.0)
            m.last_seen = time.monotonic()
            return
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.UNAVAILABLE or lm.members.get(node_id) is not m:
                return
        log.warning("peer %s is gone (%s; it refuses connections); dropping it", m.info.name, reason)
        self.drop({node_id})
        await self.publish()

    def drop(self, lost: set[str]) -> None:
        lm = self._map()
        held = False
        for node_id in lost:
            m = lm.members.get(node_id)
            if m is not None:
                self._gone[node_id] = (m.info.address, time.monotonic())
            held = lm.remove(node_id) or held
            self.view.known.pop(node_id, None)
        if held:  # only lost layers are covered: gaps nobody held yet are left to claims (peers starting)
            self.reassign(lost)

    def reassign(self, lost: set[str]) -> None:
        """Cover the layers nobody holds: a standby first, else survivors with room."""
        lm = self._map()
        if not lm.missing():
            return
        stages = {s[0]: (s[1], s[2]) for s in lm.stages}
        members = [m.info for m in lm.members.values()]
        # a tensor-parallel group's peers are busy, waiting for their group, or (a broken group's)
        # maybe dead: candidates only once they report themselves as ordinary peers
        cands = [(i.node_id, int(i.free_memory), i.layer_ms or 1.0, stages.get(i.node_id)) for i in members
                 if not i.tp_group]
        layer_bytes = max([int(i.layer_bytes) for i in members] or [1])
        new, missing = placement.reassign(self.num_layers, lm.stages, lost, cands,
                                          layer_bytes=layer_bytes, kv_reserve=self.kv_reserve)
        if new is not None:
            log.warning("reassigned layers: %s", ", ".join(
                f"{lm.members[n].info.name if n in lm.members else n}[{a},{b})" for n, a, b in new))
            lm.stages = sorted(new, key=lambda st: st[1])
            lm.epoch += 1
        else:
            log.warning("no peer has room for layers %s: the ring waits for a peer to join",
                        ", ".join(f"[{a}, {b})" for a, b in missing))

    # ---------------------------------------------------------------- the plan

    async def publish(self) -> None:
        """Push the current plan to every member."""
        lm = self._map()
        plan = lm.plan()
        self.view.set_plan(plan)
        for m in list(lm.members.values()):
            if m.info.node_id != self.view.node_id:
                self.tasks.spawn(self.push(m.info.address, plan))

    async def push(self, address: str, plan: pb.Plan) -> None:
        try:
            await self.links.stub(address).PushPlan(plan, timeout=2)
        except grpc.aio.AioRpcError:
            pass
