"""A peer's life in the mesh: it finds the others (mDNS or --peer), enters the mesh and claims layers
from the coordinator, reports to it every HEARTBEAT_S, follows the plans it is pushed, and when the
coordinator goes silent decides whether to take over (the oldest survivor does) or to wait."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Callable

import grpc

from backends.errors import TogetherError
from backends.shard import LayerShard
from mesh import placement
from mesh.coordination import PEER_TIMEOUT_S, CoordinatorRole
from mesh.discovery import Peer
from mesh.links import Peers
from mesh.stage import Stage
from mesh.tasks import TaskSet
from mesh.tpgroup import TPManager
from mesh.view import PlanView
from protos import together_pb2 as pb

if TYPE_CHECKING:
    from mesh.node import NodeConfig

log = logging.getLogger(__name__)
HEARTBEAT_S = 0.5


class Membership:
    def __init__(self, cfg: NodeConfig, view: PlanView, coord: CoordinatorRole, stage: Stage, tp: TPManager,
                 links: Peers, tasks: TaskSet, info: Callable[[], pb.PeerInfo],
                 make_shard: Callable[[int, int], LayerShard]) -> None:
        # info: this peer's report as of now; make_shard: load layers [start, end) (on the compute thread)
        self.cfg, self.view, self.coord, self.stage, self.tp = cfg, view, coord, stage, tp
        self.links, self.tasks, self._info, self._make_shard = links, tasks, info, make_shard
        self.claim_reason = ""
        self.refused: set[str] = set()  # addresses that refused our mesh key
        self.stopping = False
        self._loading: tuple[int, int] | None = None
        self._load_lock = asyncio.Lock()
        self._coord_ok = time.monotonic()  # when the coordinator last answered
        self._cut_off = False  # this peer reaches nobody: it waits rather than split the mesh

    # ---------------------------------------------------------------- finding the others

    async def on_discovery(self, peers: dict[str, Peer]) -> None:
        for p in peers.values():
            if p.node_id not in self.view.known:
                self.tasks.spawn(self.probe(p.address))

    async def probe_manual(self, address: str, wait_s: float = 30.0) -> None:
        """A --peer may still be starting: keep asking for a while before going on without it."""
        deadline = time.monotonic() + wait_s
        while not await self.probe(address, attempts=1):
            if address in self.refused:
                raise TogetherError(f"peer {address} refused this peer's mesh key: start every peer "
                                    f"with the same --mesh-key")
            if time.monotonic() > deadline:
                log.warning("--peer %s did not answer for %.0f s; going on without it", address, wait_s)
                return
            await asyncio.sleep(0.5)

    async def probe(self, address: str, attempts: int = 3) -> bool:
        """Ask a peer who it is; True if it belongs to this mesh."""
        for attempt in range(attempts):
            try:
                st = await self.links.stub(address).Status(pb.StatusRequest(), timeout=3)
                break
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.UNAUTHENTICATED:
                    self.refused.add(address)
                    log.warning("ignoring peer %s: it refused our mesh key (%s)", address, e.details())
                    return False
                if attempt == attempts - 1:
                    log.info("peer %s did not answer: %s", address, e.details())
                    return False
                await asyncio.sleep(0.5)
        if st.peer.model != self.cfg.model:
            log.warning("ignoring peer %s: it serves %s, not %s", address, st.peer.model, self.cfg.model)
            return False
        self.view.known[st.peer.node_id] = st.peer
        if st.plan.epoch > self.view.plan.epoch and st.plan.coordinator:
            self.view.set_plan(st.plan)
        return True

    # ---------------------------------------------------------------- joining and claiming

    async def enter_mesh(self) -> None:
        """Find or become the coordinator, then claim layers."""
        view = self.view
        if not view.plan.coordinator:
            oldest = placement.choose_coordinator([(i.node_id, i.started_at) for i in view.known.values()])
            if oldest == view.node_id:
                self.coord.become(epoch=0)
            else:
                try:
                    plan = await self.links.stub(view.known[oldest].address).GetPlan(pb.PlanRequest(), timeout=3)
                    if plan.coordinator:
                        view.set_plan(plan)
                except grpc.aio.AioRpcError:
                    pass
                if not view.plan.coordinator:  # the oldest has not set up yet: it will; ask it
                    view.plan.coordinator = oldest
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
        if reply.plan.epoch >= self.view.plan.epoch:
            self.view.set_plan(reply.plan)
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
        await self.report()

    async def _join(self, req: pb.JoinRequest) -> pb.JoinReply:
        addr = self.view.coordinator_address()
        if addr == self.view.address:
            return await self.coord.join(req)
        if addr is None:
            raise TogetherError("this peer knows no coordinator")
        return await self.links.stub(addr).Join(req, timeout=10)

    async def _first_join(self, req: pb.JoinRequest) -> pb.JoinReply:
        for _ in range(60):  # the coordinator may still be starting
            try:
                return await self._join(req)
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.UNAUTHENTICATED:
                    raise TogetherError(f"the coordinator refused this peer: {e.details()}") from None
                log.info("join via %s failed (%s); retrying", self.view.coordinator_address(), e.details())
                await asyncio.sleep(0.5)
        raise TogetherError("could not reach the mesh's coordinator")

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
            if self.tp.group is not None:
                self.tp.dissolve("the plan moved its stage")
            members = self.view.plan_members(start, end) if self.tp.group_name else []
            if len(members) > 1:
                self.tp.stop_worker()
                return await self.tp.lead(start, end, members)
            log.info("%s loading layers [%d, %d) on %s", self.view.name, start, end, self.cfg.backend)
            await self.stage.load(lambda: self._make_shard(start, end))

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
        if plan.coordinator == view.node_id and not self.coord.active and not self.stopping:
            self._coord_ok = time.monotonic()
            await self.coord.take_handover(plan)
        elif self.coord.active and plan.coordinator != view.node_id:
            self.coord.meet(plan, started_at)
        elif plan.epoch >= view.plan.epoch or plan.coordinator != view.plan.coordinator:
            view.set_plan(plan)

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
        if reply.plan.epoch >= view.plan.epoch:
            view.set_plan(reply.plan)
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

    async def coordinator_lost(self) -> None:
        """The coordinator stopped answering: the oldest surviving peer takes over and rebuilds the
        layer map from the peers' own reports."""
        view = self.view
        dead = view.plan.coordinator
        alive = [p for p in view.plan.peers if p.node_id != dead]
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
            view.set_plan(newer)
            self.tasks.spawn(self.claim(rejoin=True))
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
                if st.plan.coordinator == dead and st.plan.epoch > self.view.plan.epoch:
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
