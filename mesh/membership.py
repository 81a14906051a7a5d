"""A peer's life in the mesh: it finds the others (mDNS or --peer; see finding.py), enters the mesh and
claims layers from the coordinator, reports to it every HEARTBEAT_S, follows the plans it is pushed, and when the
coordinator goes silent decides whether to take over (the oldest survivor does) or to wait."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Awaitable, Callable

import grpc

from backends.errors import TogetherError
from backends.shard import LayerShard
from mesh import placement
from mesh.coordination import PEER_TIMEOUT_S, CoordinatorRole
from mesh.finding import Finding
from mesh.links import Peers
from mesh.stage import Stage
from mesh.tasks import TaskSet
from mesh.tpgroup import TPManager
from mesh.rings import CLASH
from mesh.view import PlanView, all_peers
from protos import together_pb2 as pb

if TYPE_CHECKING:
    from mesh.node import NodeConfig

log = logging.getLogger(__name__)
HEARTBEAT_S = 0.5


class Membership(Finding):
    def __init__(self, cfg: NodeConfig, view: PlanView, coord: CoordinatorRole, stage: Stage, tp: TPManager,
                 links: Peers, tasks: TaskSet, info: Callable[[], pb.PeerInfo],
                 make_shard: Callable[[int, int], LayerShard],
                 prepare: Callable[[int, int], Awaitable[None]] | None = None) -> None:
        # info: this peer's report as of now; make_shard: load layers [start, end) (on the compute thread);
        # prepare: get what the disk lacks of [start, end) first (from peers: mesh/supply.py)
        self.cfg, self.view, self.coord, self.stage, self.tp = cfg, view, coord, stage, tp
        self.links, self.tasks, self._info, self._make_shard = links, tasks, info, make_shard
        self._prepare = prepare
        self.claim_reason = ""
        self.refused: set[str] = set()  # addresses that refused our mesh key
        self.stopping = False
        self._loading: tuple[int, int] | None = None
        self._load_lock = asyncio.Lock()
        self._coord_ok = time.monotonic()  # when the coordinator last answered
        self._cut_off = False  # this peer reaches nobody: it waits rather than split the mesh
        self._reclaiming = False  # a claim under a new coordinator is under way
        self._suspected: dict[str, float] = {}  # node id -> when this peer last reported it

    # ---------------------------------------------------------------- joining and claiming

    async def enter_mesh(self) -> None:
        """Find or become the coordinator, then claim layers."""
        if not self.view.plan.coordinator:
            await self._find_coordinator()
        await self.claim()

    async def claim(self, rejoin: bool = False) -> None:
        """Ask the coordinator for layers (rejoin: keep the loaded ones if still free) and load them."""
        want = self.cfg.layers
        if rejoin and self.stage.shard is not None:
            want = (self.stage.shard.start, self.stage.shard.end)
        req = pb.JoinRequest(peer=self._info(), want_start=want[0] if want else -1,
                             want_end=want[1] if want else -1)
        reply = await self._first_join(req)
        while self.tp.group_name and not reply.ok and reply.reason.startswith("waiting for tensor-parallel"):
            if self.claim_reason != reply.reason:
                log.warning("%s: %s", self.view.name, reply.reason)
            self.claim_reason = reply.reason
            await asyncio.sleep(0.5)  # the group's leader claims once all its peers are here
            req.peer.CopyFrom(self._info())
            reply = await self._join(req)
        self.claim_reason = reply.reason
        if self.view.mine(reply.plan).epoch >= self.view.plan.epoch:
            self.view.adopt(reply.plan)
        if not reply.ok and CLASH in reply.reason:  # its layers would not fit the ring of that name
            raise TogetherError(reply.reason)
        if self.tp.group_name and not reply.ok:
            if reply.reason.startswith("refused"):
                raise TogetherError(reply.reason)
            log.warning("%s: %s", self.view.name, reply.reason)  # a rank > 0: it follows the plan
        elif reply.ok and reply.start >= 0:
            await self.load(reply.start, reply.end)
        elif want is not None and not reply.ok:
            if rejoin and self.cfg.layers is None:
                self.stage.shard = None  # what it held is taken now: claim afresh
                return await self.claim()
            raise TogetherError(f"--layers {want[0]}-{want[1]} refused: {reply.reason}")
        else:
            log.warning("%s holds no layers: %s", self.view.name, reply.reason)
        try:
            await self.report()
        except grpc.aio.AioRpcError as e:  # the heartbeats say it again every HEARTBEAT_S
            log.info("report after the claim failed: %s", e.details())

    async def rejoin(self) -> None:
        """Claim again under the coordinator now in charge (keeping what this peer holds if still free)."""
        try:
            await self.claim(rejoin=True)
        except Exception as e:  # a background claim must not die with a traceback: say why, stand by
            log.warning("%s could not claim layers again: %s", self.view.name, e)

    async def rejoin_alone(self) -> None:
        self.cfg.layers = None  # --layers was the group's request: alone, take what is free, or stand by
        try:
            await self.claim()
        except Exception as e:  # a claim that fails leaves this peer a standby
            log.warning("%s could not claim layers after its group ended: %s", self.view.name, e)

    async def load(self, start: int, end: int) -> None:
        """Serve layers [start, end): alone, or leading the tensor-parallel group the plan names."""
        async with self._load_lock:  # a claim and a plan push may ask for the same layers at once
            sh = self.stage.shard
            if sh and (sh.start, sh.end) == (start, end) and self.tp.serves(start, end):
                return
            if self._prepare is not None:  # what the disk lacks of the range, from peers, before any reads it
                await self._prepare(start, end)
            if self.tp.group is not None:
                self.tp.dissolve("the plan moved its stage")
            members = self.view.plan_members(start, end) if self.tp.group_name else []
            if len(members) > 1:
                self.tp.stop_worker()
                return await self.tp.lead(start, end, members)
            log.info("%s loading layers [%d, %d) on %s", self.view.name, start, end, self.cfg.backend)
            await self.stage.load(lambda: self._make_shard(start, end))

    async def locked(self, fn: Callable[[], Awaitable[None]]) -> None:
        """Run `fn` while no range loads (an adapter taken from peers, a layer fetched to measure)."""
        async with self._load_lock:
            await fn()

    def follow_plan(self) -> None:
        """Load the layers the plan now gives this peer (after a reassignment)."""
        mine = self.view.my_stage()
        if self.tp.group is not None and (mine is None or list(mine.tp_members) != self.tp.members):
            self.tp.lost("the coordinator took the group's stage away")
        sh = self.stage.shard
        have = (sh.start, sh.end) if sh else None
        want = (mine.start, mine.end) if mine else None
        if want is not None and want != have and want != self._loading:
            self._loading = want
            self.tasks.spawn(self._load_and_report(*want))

    async def _load_and_report(self, start: int, end: int) -> None:
        try:
            await self.load(start, end)
            await self.report()
        finally:
            self._loading = None

    async def on_push(self, plan: pb.Plan, started_at: float) -> None:
        """A coordinator pushed a plan (already checked to fit this model)."""
        view = self.view
        if not self.coord.active:
            plan = view.mine(plan)  # (a pushed plan is this model's; never follow another's)
        if plan.coordinator == view.node_id and not self.coord.active and not self.stopping:
            self._coord_ok = time.monotonic()
            await self.coord.take_handover(plan)
        elif self.coord.active and plan.coordinator != view.node_id:
            self.coord.meet(plan, started_at)
        elif plan.coordinator != view.plan.coordinator and self._rival(plan):
            # peers that started together may set up two coordinators: stay with the older one; the
            # younger sees this peer follow it and makes the two meet (see expire_peers)
            log.info("%s ignores a plan of %s: it follows an older coordinator", view.name, plan.coordinator[:8])
        elif plan.epoch >= view.plan.epoch or plan.coordinator != view.plan.coordinator:
            new_boss = plan.coordinator != view.plan.coordinator
            view.set_plan(plan)
            if new_boss:
                self._claim_again_if_left_out()

    def _rival(self, plan: pb.Plan) -> bool:
        """The pushed plan comes from a younger coordinator that does not know the one this peer
        follows, and that one answered lately: not a succession, a rival."""
        cur = self.view.plan.coordinator
        ours = next((p for p in all_peers(self.view.plan) if p.node_id == cur), None)
        theirs = next((p for p in all_peers(plan) if p.node_id == plan.coordinator), None)
        if ours is None or theirs is None or any(p.node_id == cur for p in all_peers(plan)):
            return False
        alive = time.monotonic() - self._coord_ok < 3 * HEARTBEAT_S
        return alive and (ours.started_at, ours.node_id) < (theirs.started_at, theirs.node_id)

    def _claim_again_if_left_out(self) -> None:
        """Two coordinators met and this peer now follows the winner, which does not list the layers
        this peer holds or asked for: claim them from it (at most one claim at a time)."""
        view = self.view
        wants = self.stage.shard is not None or self.cfg.layers is not None
        if wants and view.my_stage() is None and not self._reclaiming and not self.stopping \
                and not self.tp.group_name:
            self._reclaiming = True
            self.tasks.spawn(self._reclaim())

    async def _reclaim(self) -> None:
        try:
            await self.rejoin()
        finally:
            self._reclaiming = False

    # ---------------------------------------------------------------- heartbeats and verdicts

    async def report(self) -> bool:
        """Tell the coordinator what this peer holds (heartbeat); False if there is nobody to tell."""
        view = self.view
        view.known[view.node_id] = info = self._info()
        addr = view.coordinator_address()
        if addr is None:
            return False
        req = pb.HeartbeatRequest(peer=info)
        if addr == view.address:
            reply = await self.coord.heartbeat(req)
        else:
            reply = await self.links.stub(addr).Heartbeat(req, timeout=2)
        if view.mine(reply.plan).epoch >= view.plan.epoch:
            view.adopt(reply.plan)
        return True

    async def heartbeat_loop(self) -> None:
        self._coord_ok = time.monotonic()
        while not self.stopping:
            t = time.monotonic()
            await asyncio.sleep(HEARTBEAT_S)
            if time.monotonic() - t > HEARTBEAT_S + 1.0:
                # this peer's own loop stalled (busy, swapped out): silence is not evidence now
                self._coord_ok = time.monotonic()
                self.coord.forgive_stall()
            try:
                if await self.report():
                    self._coord_ok = time.monotonic()
            except grpc.aio.AioRpcError as e:
                log.debug("heartbeat failed: %s", e.details())
            except Exception:  # the loop must outlive any one bad round
                log.exception("heartbeat round failed")
            try:
                await self.tp.tick()
            except Exception:
                log.exception("tensor-parallel round failed")
            try:
                if not self.coord.active and time.monotonic() - self._coord_ok > PEER_TIMEOUT_S:
                    await self.coordinator_lost()
                if self.coord.active:
                    await self.coord.expire_peers()
            except Exception:
                log.exception("membership round failed")

    def link_broken(self, address: str) -> None:
        """A stream to `address` died: have the coordinator check that peer now (see Suspect)."""
        view = self.view
        node = next((p.node_id for p in list(view.known.values()) + list(view.plan.peers)
                     if p.address == address and p.node_id != view.node_id), None)
        now = time.monotonic()
        if node is None or self.stopping or now - self._suspected.get(node, 0.0) < 1.0:
            return
        self._suspected[node] = now
        if node == view.plan.coordinator and not self.coord.active:
            self._coord_ok = 0.0  # the next heartbeat round decides, probing it first
        else:
            self.tasks.spawn(self.suspect(node, f"stream to {address} broke"))

    async def suspect(self, node_id: str, reason: str) -> None:
        if self.coord.active:
            return await self.coord.suspect(node_id, reason)
        addr = self.view.coordinator_address()
        if addr is not None:
            try:
                await self.links.stub(addr).Suspect(pb.SuspectRequest(node_id=node_id, reason=reason), timeout=3)
            except grpc.aio.AioRpcError as e:
                log.info("could not report %s to the coordinator: %s", node_id[:8], e.details())

    async def coordinator_lost(self) -> None:
        """The coordinator stopped answering: the oldest surviving peer takes over and rebuilds the
        layer map from the peers' own reports."""
        view = self.view
        dead = view.plan.coordinator
        alive = [p for p in all_peers(view.plan) if p.node_id != dead]  # every ring's: one coordinator for all
        if not alive or self.coord.active:
            return
        heir = placement.choose_coordinator([(p.node_id, p.started_at) for p in alive])
        if heir != view.node_id:
            return  # the heir will push its plan; until then our heartbeats keep failing
        old = next((p for p in view.plan.peers if p.node_id == dead), None)
        if old is not None and await self._still_answers(old.address):
            self._coord_ok = time.monotonic()
            return
        reports, newer = await self._gather_reports(alive, dead)
        if len(reports) == 1 and len(alive) > 1:
            # Nobody answers: this peer is the one cut off, not the coordinator. Taking over would
            # make a second, one-peer mesh that never merges back; wait for the link instead.
            if not self._cut_off:
                log.warning("%s cannot reach any peer; not taking over (waiting for the network)", view.name)
            self._cut_off = True
            return
        self._cut_off = False
        if newer is not None:
            # The others still hear the coordinator (it moved on without us): follow it and rejoin.
            view.adopt(newer)
            self.tasks.spawn(self.rejoin())
            return
        self._coord_ok = time.monotonic()
        await self.coord.take_over(reports)

    async def _still_answers(self, address: str) -> bool:
        """Heartbeats failed, but if it still answers it is not dead."""
        for _ in range(2):
            try:
                await self.links.stub(address).Status(pb.StatusRequest(), timeout=2.5)
                return True
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.UNAVAILABLE:
                    break  # refused at once: the process is gone
        return False

    async def _gather_reports(self, alive: list[pb.PeerInfo], dead: str) -> tuple[list[pb.PeerInfo], pb.Plan | None]:
        """The survivors' own reports (this peer's first), and a newer plan of the same coordinator if
        one of them has it."""
        reports, newer = [self._info()], None
        for p in alive:
            if p.node_id == self.view.node_id:
                continue
            try:
                st = await self.links.stub(p.address).Status(pb.StatusRequest(), timeout=2)
                reports.append(st.peer)
                if st.plan.coordinator == dead and self.view.mine(st.plan).epoch > self.view.plan.epoch:
                    newer = st.plan
            except grpc.aio.AioRpcError:
                pass  # also gone: its layers are reassigned below
        return reports, newer

    async def leave(self) -> None:
        """Stop heartbeats; hand the mesh over if this peer coordinates, else tell the coordinator."""
        self.stopping = True
        coord = self.view.coordinator_address()
        if self.coord.active:
            await self.coord.hand_over()
        elif coord and coord != self.view.address:
            try:
                await self.links.stub(coord).Leave(pb.LeaveRequest(node_id=self.view.node_id), timeout=2)
            except grpc.aio.AioRpcError:
                pass
