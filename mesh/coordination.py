"""The coordinator's side of a peer: while this peer coordinates, it owns the layer maps (one per model
the mesh serves: several models in one mesh form one ring each, under this one coordinator), answers
claims, heartbeats and leaves, drops peers that stopped answering, covers their layers, and pushes
every new plan to the members. On any other peer `layer_map` is None and this role is idle."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

import grpc

from mesh import placement
from mesh.coordinator import LayerMap
from mesh.links import Peers
from mesh.rings import Rings
from mesh.tasks import TaskSet
from mesh.view import PlanView, all_peers
from protos import together_pb2 as pb

log = logging.getLogger(__name__)
STEPPED_DOWN = "this peer stopped coordinating; ask the new coordinator"
PEER_TIMEOUT_S = 3.0  # a peer silent this long is gone: its layers are reassigned
LOST_MEMORY_S = 600.0  # how long a coordinator keeps asking after dropped peers (partitions heal)
MEASURE_WAIT_S = 4.0  # how long a batch of claims waits for peers still timing their layers
STARTING_S = 30.0  # a peer started this recently and silent about its speed may still be measuring

Range = tuple[int, int] | None


class CoordinatorRole(Rings):
    def __init__(self, view: PlanView, links: Peers, tasks: TaskSet, model: str, num_layers: int,
                 kv_reserve: int, claim_window_s: float, rejoin: Callable[[], None], hidden_size: int = 0,
                 placement: str = "measured") -> None:
        # rejoin: claim again under the other coordinator after this one stepped down
        self.view, self.links, self.tasks = view, links, tasks
        self.hidden_size, self.placement = hidden_size, placement  # the planner's (mesh/planner.py)
        self.model, self.kv_reserve, self.claim_window_s = model, kv_reserve, claim_window_s
        self._rejoin = rejoin
        self.num_layers = num_layers
        # model -> its ring's layer map, only while this peer coordinates (its own model's always there)
        self.maps: dict[str, LayerMap] = {}
        self._active = False
        self._claim_batch: list[tuple[pb.PeerInfo, asyncio.Future[tuple[Range, str]]]] = []
        self._claim_timer: asyncio.TimerHandle | None = None
        self._claim_since = 0.0  # when the batch's window opened (loop time)
        self._gone: dict[str, tuple[str, float]] = {}  # dropped peers: node id -> (address, when)
        self._finding = False  # a find_lost round is under way

    # ---------------------------------------------------------------- becoming and leaving

    def become(self, epoch: int) -> None:
        """Coordinate from what this peer knows (the first peer of a mesh)."""
        self._rebuild(list(self.view.known.values()), lambda m: epoch if m == self.model else self._last_epoch(m))
        log.info("%s coordinates the mesh", self.view.name)
        self.view.set_plan(self._plan_for(self.model))

    async def take_over(self, reports: list[pb.PeerInfo]) -> None:
        """The coordinator is gone: rebuild the map from the survivors' own reports, one epoch on."""
        log.warning("%s takes over as coordinator (the old one stopped answering)", self.view.name)
        old = next((p for p in all_peers(self.view.plan) if p.node_id == self.view.plan.coordinator), None)
        if old is not None:  # if it was cut off rather than dead, the two meet once it is back
            self._gone[old.node_id] = (old.address, time.monotonic())
        self.view.known = {r.node_id: r for r in reports}
        self._rebuild(reports, lambda m: self._last_epoch(m) + 1)
        self.reassign(set())
        await self.publish()

    async def take_handover(self, plan: pb.Plan) -> None:
        """The old coordinator left cleanly and named this peer its heir."""
        log.warning("%s takes over as coordinator (handed over)", self.view.name)
        maps = {}
        for p in [plan, *plan.rings]:
            ours = p.model == self.model or not p.model
            first = next((i for i in p.peers if i.model == p.model), None)
            kv = self.kv_reserve if ours else int(first.kv_reserve) if first else 0
            maps[p.model or self.model] = lm = LayerMap.from_plan(
                p, kv, self.hidden_size if ours else first.hidden_size if first else 0, self.placement)
            lm.epoch += 1
        self.maps, self._active = maps, True
        if self.model not in self.maps:
            self.maps[self.model] = LayerMap(self.model, self.num_layers, self.view.node_id, self.kv_reserve,
                                             0, self.hidden_size, self.placement)
        await self.publish()

    async def hand_over(self) -> None:
        """A leaving coordinator gives its layers and the layer map to the oldest other peer."""
        self._map()
        others = [m.info for lm in self.maps.values() for n, m in lm.members.items() if n != self.view.node_id]
        if not others:
            return
        heir = placement.choose_coordinator([(i.node_id, i.started_at) for i in others])
        self.drop({self.view.node_id})
        heir_info = next(i for i in others if i.node_id == heir)
        self.view.known[heir] = heir_info
        for lm in self.maps.values():
            lm.coordinator = heir
        plans = {model: self._plan_for(model) for model in self.maps}
        self._stop()
        self.view.set_plan(plans[self.model])
        log.warning("%s hands the mesh to %s", self.view.name, heir_info.name)
        await asyncio.gather(*(self.push(i.address, plans[self._model(i)]) for i in others
                               if self._model(i) in plans), return_exceptions=True)

    def meet(self, plan: pb.Plan, started_at: float) -> None:
        """Another coordinator's plan reached this one (peers started apart, or a partition healed):
        the older one wins and takes the other's peers, at an epoch above both sides'."""
        self._map()
        theirs = next((p for p in all_peers(plan) if p.node_id == plan.coordinator), None)
        if theirs is None:
            return
        self.view.known[theirs.node_id] = theirs
        self._gone.pop(theirs.node_id, None)
        if (theirs.started_at, theirs.node_id) < (started_at, self.view.node_id):
            log.warning("%s steps down: %s coordinates this mesh", self.view.name, theirs.name)
            mine = self._plan_for(self.model)  # the winner merges our peers and bumps above our epochs
            self._stop()
            self.view.adopt(plan)
            self.tasks.spawn(self.push(theirs.address, mine))
            self._rejoin()
            return
        for ring in [plan, *plan.rings]:
            for p in ring.peers:
                lm = self._map_of(p)
                if lm is None or self._model(p) != (ring.model or self.model):
                    continue  # (a ring's plan names the coordinator too, whatever its model)
                if p.node_id not in lm.members and p.node_id != self.view.node_id:
                    lm.upsert(p)
                    self.view.known[p.node_id] = p
            if (ring.model or self.model) in self.maps:
                lm = self.maps[ring.model or self.model]
                lm.epoch = max(lm.epoch, ring.epoch) + 1
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
        self._map()
        info = request.peer
        got = self._map_of(info)
        if got is None and self.clash(info):
            log.warning("refused %s: %s", info.name, self.clash(info))
            return pb.JoinReply(ok=False, reason=self.clash(info), start=-1, end=-1,
                                plan=self._plan_for(self.model))
        if got is None:
            return pb.JoinReply(ok=False, reason=f"this mesh serves {self.model}, not {info.model} (that peer's "
                                f"version does not report its model's shape: upgrade it to serve several models "
                                f"in one mesh)", start=-1, end=-1, plan=self._plan_for(self.model))
        lm = got
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
            if not self._active:
                return pb.JoinReply(ok=False, reason=STEPPED_DOWN, start=-1, end=-1, plan=self.view.plan)
        log.info("claim by %s: %s", info.name, reason)
        await self.publish(lm.model)
        return pb.JoinReply(ok=rng is not None, reason=reason, start=rng[0] if rng else -1,
                            end=rng[1] if rng else -1, plan=self._plan_for(lm.model))

    def _settle_claims(self) -> None:
        loop = asyncio.get_running_loop()
        if self._active and any(self._measuring(lm) or self._probing(lm) for lm in self.maps.values()) \
                and loop.time() - self._claim_since < MEASURE_WAIT_S:
            # a peer that started with these is still timing its layers or its links: its claim (or
            # its links, for the planner) is on the way
            self._claim_timer = loop.call_later(0.25, self._settle_claims)
            return
        batch, self._claim_batch, self._claim_timer = self._claim_batch, [], None
        if not self._active:  # stepped down while the claims waited: their peers ask the new coordinator
            for _, fut in batch:
                if not fut.done():
                    fut.set_result((None, STEPPED_DOWN))
            return
        batch.sort(key=lambda b: (b[0].started_at, b[0].node_id))
        out: dict[str, tuple[Range, str]] = {}
        for model, lm in self.maps.items():  # each model's peers split that model
            mine = [self._fresh(lm, i) for i, _ in batch if self._model(i) == model]
            if mine:
                out.update(lm.claim_together(mine))
        for info, fut in batch:
            if not fut.done():
                fut.set_result(out.get(info.node_id, (None, f"no ring of {info.model} here")))

    def _measuring(self, lm: LayerMap) -> bool:
        """A peer that started moments ago, holds and claims nothing yet and has not reported its
        speed: it started with the claiming peers and is still measuring (backends/measure.py)."""
        skip = {info.node_id for info, _ in self._claim_batch} | {s[0] for s in lm.stages}
        infos = {**self._known(lm.model), **{n: m.info for n, m in lm.members.items()}}  # members' are fresher
        return any(i.layer_ms <= 0 and not i.tp_group and n not in skip and time.time() - i.started_at < STARTING_S
                   for n, i in infos.items())

    def _probing(self, lm: LayerMap) -> bool:
        """Peers here measure links (some reported one), and a peer that started moments ago and
        holds nothing lacks a link to another such peer: it is still probing, and its claim (or, for
        a peer of the batch, its links) is on the way (mesh/linkprobe.py measures before claiming)."""
        infos = {**self._known(lm.model), **{n: m.info for n, m in lm.members.items()}}
        infos.update({i.node_id: self._fresh(lm, i) for i, _ in self._claim_batch if self._model(i) == lm.model})
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
        lm = next((lm for lm in self.maps.values() if node_id in lm.members), None) if self._active else None
        if lm is not None:
            log.info("peer %s leaves; handing its layers over", node_id[:8])
            self.drop({node_id})
            self._gone.pop(node_id, None)  # gone on purpose: nothing to look for
            await self.publish(lm.model)
        return self.view.plan

    async def heartbeat(self, request: pb.HeartbeatRequest) -> pb.HeartbeatReply:
        peer = request.peer
        lm = self._map_of(peer) if self._active else None
        if lm is None:
            return pb.HeartbeatReply(plan=self.view.plan)
        before, was_ready = lm.complete(), lm.ready(peer.node_id)
        lm.upsert(peer)
        self.view.known[peer.node_id] = peer
        if lm.left_group(peer):
            log.warning("peer %s left its tensor-parallel group: the group's stage is lost", peer.name)
            lm.lose_groups({peer.node_id})
            self.reassign(set(), lm)
            await self.publish(lm.model)
            return pb.HeartbeatReply(plan=self._plan_for(lm.model))
        if lm.complete() != before or lm.ready(peer.node_id) != was_ready:
            lm.epoch += 1
            await self.publish(lm.model)
        return pb.HeartbeatReply(plan=self._plan_for(lm.model))

    # ---------------------------------------------------------------- failures

    def forgive_stall(self) -> None:
        """This peer's own loop stalled: the members' silence meanwhile is no evidence."""
        for lm in self.maps.values():
            for m in lm.members.values():
                m.last_seen = max(m.last_seen, time.monotonic())

    async def expire_peers(self) -> None:
        """Drop the members silent for PEER_TIMEOUT_S that do not answer a direct question either."""
        self._map()
        if self._gone and not self._finding:
            self._finding = True
            self.tasks.spawn(self._find_lost_once())
        lost = set()
        for lm, node_id in [(lm, n) for lm in list(self.maps.values()) for n in lm.stale(PEER_TIMEOUT_S)]:
            m = lm.members.get(node_id)
            if m is None or not self._active:
                continue
            try:  # late heartbeats from a busy peer are not a death: ask it directly first
                st = await self.links.stub(m.info.address).Status(pb.StatusRequest(), timeout=2.0)
                m.last_seen = time.monotonic()
                if st.plan.coordinator != self.view.node_id:
                    # it follows another coordinator (or set up on its own): tell that one too, so the
                    # two meet and the older wins
                    self.tasks.spawn(self.push(m.info.address, self._plan_for(lm.model)))
                    rival = next((p for p in all_peers(st.plan) if p.node_id == st.plan.coordinator), None)
                    if rival is not None and rival.address != m.info.address:
                        self.tasks.spawn(self.push(rival.address, self._plan_for(self._model(rival))
                                                   if self._model(rival) in self.maps else self._plan_for(lm.model)))
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
        self._map()
        lm = next((lm for lm in self.maps.values() if node_id in lm.members), None)
        m = lm.members.get(node_id) if lm is not None else None
        if lm is None or m is None or node_id == self.view.node_id:
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
        self._map()
        for lm in self.maps.values():
            held = False
            for node_id in lost:
                m = lm.members.get(node_id)
                if m is not None:
                    self._gone[node_id] = (m.info.address, time.monotonic())
                held = lm.remove(node_id) or held
                self.view.known.pop(node_id, None)
            if held:  # only lost layers are covered: gaps nobody held yet are left to claims (peers starting)
                self.reassign(lost, lm)

    def reassign(self, lost: set[str], lm: LayerMap | None = None) -> None:
        """Cover the layers nobody holds (of `lm`'s model, else of every model): a standby of that
        model first, else its survivors with room."""
        if lm is None:
            self._map()
            for each in list(self.maps.values()):
                self.reassign(lost, each)
            return
        if not lm.missing():
            return
        stages = {s[0]: (s[1], s[2]) for s in lm.stages}
        members = [m.info for m in lm.members.values()]
        # a tensor-parallel group's peers are busy, waiting for their group, or (a broken group's)
        # maybe dead: candidates only once they report themselves as ordinary peers
        cands = [(i.node_id, int(i.free_memory), i.layer_ms or 1.0, stages.get(i.node_id)) for i in members
                 if not i.tp_group]
        layer_bytes = max([int(i.layer_bytes) for i in members] or [1])
        new, missing = placement.reassign(lm.num_layers, lm.stages, lost, cands,
                                          layer_bytes=layer_bytes, kv_reserve=lm.kv_reserve)
        if new is not None:
            log.warning("reassigned layers: %s", ", ".join(
                f"{lm.members[n].info.name if n in lm.members else n}[{a},{b})" for n, a, b in new))
            lm.stages = sorted(new, key=lambda st: st[1])
            lm.epoch += 1
        else:
            log.warning("no peer has room for layers %s of %s: the ring waits for a peer to join",
                        ", ".join(f"[{a}, {b})" for a, b in missing), lm.model)

    # ---------------------------------------------------------------- the plan

    async def publish(self, model: str = "") -> None:
        """Push the current plan of `model` (else of every model) to its members; the others' views of
        that ring follow with their next heartbeat's reply."""
        self._map()
        self.view.set_plan(self._plan_for(self.model))
        for name, lm in list(self.maps.items()):
            if model and name != model:
                continue
            plan = self._plan_for(name)
            for m in list(lm.members.values()):
                if m.info.node_id != self.view.node_id:
                    self.tasks.spawn(self.push(m.info.address, plan))

    async def push(self, address: str, plan: pb.Plan) -> None:
        try:
            await self.links.stub(address).PushPlan(plan, timeout=2)
        except grpc.aio.AioRpcError:
            pass
