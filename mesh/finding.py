"""How a peer finds the others and the coordinator: probes of the peers mDNS or --peer names, the
choice of whom to follow while peers start together, and a first claim that waits for the coordinator
to exist (one line per reason, never a traceback). Part of `Membership`."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

import grpc

from backends.errors import TogetherError
from mesh import placement
from mesh.coordination import STEPPED_DOWN, CoordinatorRole
from mesh.discovery import Peer
from mesh.links import Peers
from mesh.tasks import TaskSet
from mesh.view import PlanView, all_peers
from protos import together_pb2 as pb

if TYPE_CHECKING:
    from mesh.node import NodeConfig

log = logging.getLogger("mesh.membership")

class _NoCoordinator(Exception):
    """This peer does not know (yet) which peer coordinates."""


class Finding:
    cfg: NodeConfig
    view: PlanView
    coord: CoordinatorRole
    links: Peers
    tasks: TaskSet
    refused: set[str]  # addresses that refused our mesh key

    # ---------------------------------------------------------------- finding the others

    async def on_discovery(self, peers: dict[str, Peer]) -> None:
        for p in peers.values():
            if p.node_id not in self.view.known:
                self.tasks.spawn(self._probe_advertised(p))

    async def _probe_advertised(self, p: Peer) -> None:
        # a peer on several networks advertises each of its addresses: the first that answers as it wins
        for _ in range(3):
            for host in p.addresses or (p.host,):
                if await self.probe(f"{host}:{p.port}", attempts=1, expect=p.node_id):
                    return
            await asyncio.sleep(0.5)
        log.info("peer %s (%s) did not answer at %s", p.properties.get("name", p.node_id[:8]), p.node_id[:8],
                 ", ".join(p.addresses))

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

    async def probe(self, address: str, attempts: int = 3, expect: str = "") -> bool:
        """Ask a peer who it is; True if it belongs to this mesh (and is `expect`, if given)."""
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
        if st.peer.node_id == self.view.node_id or (expect and st.peer.node_id != expect):
            return False  # an address another machine shares with this one (a container bridge)
        if st.peer.model != self.cfg.model and st.peer.num_layers <= 0:
            log.warning("ignoring peer %s: it serves %s, not %s, and is too old to share a mesh with another "
                        "model (upgrade it)", address, st.peer.model, self.cfg.model)
            return False
        # a peer of another model belongs to the mesh too: its ring is one of the mesh's rings
        self.view.known[st.peer.node_id] = st.peer
        theirs = st.plan.coordinator
        if self.coord.active and theirs and theirs != self.view.node_id:
            # two coordinators (peers that started together and met late): the older one wins
            boss = next((p for p in all_peers(st.plan) if p.node_id == theirs), None)
            if boss is not None:
                self.tasks.spawn(self.coord.push(boss.address, self.view.plan))
        elif self.view.mine(st.plan).epoch > self.view.plan.epoch and theirs:
            self.view.adopt(st.plan)
        return True

    async def _find_coordinator(self) -> None:
        """Follow the oldest coordinator any known peer follows; if none does yet, the oldest known
        peer coordinates (this one, or one still setting up: this peer asks it again until it has)."""
        view = self.view
        others = [i for i in view.known.values() if i.node_id != view.node_id]
        plans = await asyncio.gather(*(self._plan_of(i.address) for i in others))
        led = [(next(x for x in all_peers(p) if x.node_id == p.coordinator), p) for p in plans
               if p is not None and p.coordinator not in ("", view.node_id)
               and any(x.node_id == p.coordinator for x in all_peers(p))]
        if led:
            view.adopt(min(led, key=lambda b: (b[0].started_at, b[0].node_id))[1])
            return
        oldest = placement.choose_coordinator([(i.node_id, i.started_at) for i in view.known.values()])
        if oldest != view.node_id:
            view.plan.coordinator = oldest
        elif not self.coord.active:
            self.coord.become(epoch=view.plan.epoch)

    async def _plan_of(self, address: str) -> pb.Plan | None:
        try:
            plan: pb.Plan = await self.links.stub(address).GetPlan(pb.PlanRequest(), timeout=2)
            return plan
        except grpc.aio.AioRpcError:
            return None

    async def _join(self, req: pb.JoinRequest) -> pb.JoinReply:
        addr = self.view.coordinator_address()
        if addr == self.view.address and self.coord.active:
            return await self.coord.join(req)
        if addr is None or addr == self.view.address:
            raise _NoCoordinator()
        return await self.links.stub(addr).Join(req, timeout=10)

    async def _first_join(self, req: pb.JoinRequest, wait_s: float = 60.0) -> pb.JoinReply:
        """Join, retrying while the coordinator is unknown, unreachable or still setting up (peers that
        start together); says why once per reason, not once per try."""
        deadline, said = time.monotonic() + wait_s, ""
        while True:
            addr = self.view.coordinator_address()
            try:
                reply = await self._join(req)
                if reply.reason != STEPPED_DOWN:
                    return reply
                why = key = STEPPED_DOWN
                if reply.plan.coordinator:  # it names the coordinator it gave way to
                    self.view.adopt(reply.plan)
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.UNAUTHENTICATED:
                    raise TogetherError(f"the coordinator refused this peer: {e.details()}") from None
                why = f"the coordinator at {addr} cannot take the claim yet ({e.code().name}: {e.details()})"
                key = f"{addr} {e.code().name}"
            except _NoCoordinator:
                why = key = "no coordinator known yet"
            if time.monotonic() > deadline:
                raise TogetherError(f"could not join the mesh within {wait_s:.0f} s: {why}; check that the "
                                    f"peers share one network (or use --peer HOST:PORT)")
            if key != said:
                log.warning("%s waits to join: %s; retrying", self.view.name, why)
                said = key
            await asyncio.sleep(0.5)
            plan = self.view.plan
            guessed = all(p.node_id != plan.coordinator for p in plan.peers)  # no plan of it seen yet
            if not self.coord.active and (guessed or key == "no coordinator known yet"
                                          or key.endswith("FAILED_PRECONDITION")):
                plan.coordinator = ""
                await self._find_coordinator()
