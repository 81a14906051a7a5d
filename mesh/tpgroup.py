"""This peer's part in a tensor-parallel group: as the leader (rank 0) it forms the group and serves
the group's stage; as another member it runs a worker process (rank > 0) connected to its leader's
command channel. A group that loses a member is over: every member serves as an ordinary peer."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import subprocess
import threading
from typing import TYPE_CHECKING, Awaitable, Callable

import grpc

from backends.errors import TogetherError
from backends.shard import default_dtype
from backends.weights import Checkpoint
from mesh.links import Peers
from mesh.stage import Stage
from mesh.tasks import TaskSet
from mesh.view import PlanView
from protos import together_pb2 as pb

if TYPE_CHECKING:
    from backends.tp import TPGroup
    from mesh.node import NodeConfig

log = logging.getLogger(__name__)
TP_NEEDS_KEY = ("a tensor-parallel group needs a mesh key (its command channel is keyed by it; without one "
                "anyone on the network could drive its ranks): start every peer with the same --mesh-key "
                "or TOGETHER_MESH_KEY")


class TPManager:
    def __init__(self, cfg: NodeConfig, ck: Checkpoint, view: PlanView, stage: Stage, links: Peers,
                 tasks: TaskSet, report: Callable[[], Awaitable[bool]],
                 rejoin_alone: Callable[[], Awaitable[None]]) -> None:
        # report: tell the coordinator what this peer holds now; rejoin_alone: claim as an ordinary peer
        self.cfg, self.ck, self.view, self.stage, self.links, self.tasks = cfg, ck, view, stage, links, tasks
        self._report, self._rejoin_alone = report, rejoin_alone
        self.group_name, self.size = cfg.tp_group, cfg.tp_size if cfg.tp_group else 0
        self.group: TPGroup | None = None  # the group this peer leads (rank 0), if any
        self.members: list[str] = []
        self.address = ""  # the group's command channel while it forms
        self.worker: subprocess.Popen[bytes] | None = None  # this peer's rank > 0 of another's group
        self.worker_stage: tuple[str, int, int] | None = None  # (leader, start, end) of that worker

    def key(self, leader: str) -> bytes:
        """The group's channel key, derived from the mesh key: only peers holding it can derive it."""
        if not self.cfg.mesh_key:  # join refuses --tp-group without it; never key a channel with public facts
            raise TogetherError(TP_NEEDS_KEY)
        return hmac.new(self.cfg.mesh_key.encode(), f"together-tp|{self.cfg.mesh}|{self.group_name}|{leader}".encode(),
                        hashlib.sha256).digest()

    def serves(self, start: int, end: int) -> bool:
        """This peer's group (or its absence) is what the plan gives its stage [start, end)."""
        return self.members == self.view.plan_members(start, end)

    async def lead(self, start: int, end: int, members: list[str]) -> None:
        """Lead a group: rank 0 here, its other peers start their ranks when they see the plan and
        this peer's command channel (address); ready once every rank has loaded its part."""
        from backends.tp import TPGroup

        log.warning("%s leads tensor-parallel group %r: layers [%d, %d) on %d peers", self.view.name,
                    self.group_name, start, end, len(members))
        self.stage.shard = None
        cfg = self.cfg
        try:
            grp = await self.stage.call(lambda: TPGroup(
                self.ck, start, end, cfg.backend, len(members), dtype=cfg.dtype, wire_dtype=cfg.wire_dtype,
                threads=cfg.threads, host=cfg.host, key=self.key(self.view.node_id)))
        except TogetherError as e:
            return self.lost(f"cannot form the group: {e}")
        self.group, self.members = grp, members
        # listening on every interface (no --host): the members reach it at this peer's address
        ip = self.view.host if grp.address[0] in ("", "0.0.0.0") else grp.address[0]
        self.address = f"{ip}:{grp.address[1]}"
        self.tasks.spawn(self.report_quietly())
        try:
            shard = await self.stage.call(lambda: grp.start(spawn=False, form_timeout=120))
        except TogetherError as e:
            if self.group is grp:
                self.lost(f"the group did not form: {e}")
            return
        finally:
            self.address = ""
        if self.group is grp:
            self.stage.shard = shard
        else:  # dissolved while it formed
            grp.close()

    async def report_quietly(self) -> None:
        try:
            await self._report()
        except grpc.aio.AioRpcError as e:
            log.debug("report failed: %s", e.details())

    def dissolve(self, why: str) -> None:
        """Close the group this peer leads; it serves as an ordinary peer from now on (MLX allows one
        group per process, and the coordinator counts the group as broken)."""
        grp, self.group = self.group, None
        self.members, self.address = [], ""
        if grp is not None:
            if self.stage.shard is not None and self.stage.shard is grp.shard:
                self.stage.shard = None
            # off the event loop: a forward under way may hold the group's channels a moment
            threading.Thread(target=grp.close, daemon=True, name="tp-close").start()
        if self.group_name:
            log.warning("%s leaves tensor-parallel group %r (%s); it serves as an ordinary peer now",
                        self.view.name, self.group_name, why)
        self.group_name, self.size = "", 0

    def lost(self, why: str) -> None:
        """A rank of this peer's group failed: tell the coordinator, which reassigns the stage."""
        if not self.group_name:
            return
        self.dissolve(why)
        self.tasks.spawn(self.report_quietly())

    def group_failed(self, why: str) -> None:
        """The stage's forward found a rank gone."""
        if self.group is not None:
            self.lost(why)

    def stop_worker(self) -> None:
        w, self.worker, self.worker_stage = self.worker, None, None
        if w is not None and w.poll() is None:
            w.kill()
            w.wait()

    def close(self) -> None:
        self.stop_worker()
        if self.group is not None:
            self.dissolve("this peer stops")

    async def tick(self) -> None:
        """A group's rank > 0: start this peer's worker once the plan gives the group a stage and its
        leader's channel is open; when the worker ends, the group is over: serve as an ordinary peer."""
        if not self.group_name or self.group is not None:
            return
        w = self.worker
        if w is not None and w.poll() is not None:
            self.worker = None
            self.dissolve(f"its worker exited with code {w.returncode}")
            self.tasks.spawn(self.report_quietly())
            self.tasks.spawn(self._rejoin_alone())
            return
        me = self.view.node_id
        st = next((s for s in self.view.plan.stages if me in s.tp_members and s.node_id != me), None)
        if st is None or (w is not None and self.worker_stage != (st.node_id, st.start, st.end)):
            if w is not None:  # the group's stage is gone or moved
                self.stop_worker()
            return
        if w is not None:
            return
        leader = self.view.known.get(st.node_id)
        if leader is None:
            return
        try:
            peer = (await self.links.stub(leader.address).Status(pb.StatusRequest(), timeout=1)).peer
        except grpc.aio.AioRpcError:
            return
        if not peer.tp_address or (peer.start, peer.end) not in ((-1, -1), (st.start, st.end)):
            return
        self._start_worker(st, leader, peer)

    def _start_worker(self, st: pb.Assignment, leader: pb.PeerInfo, peer: pb.PeerInfo) -> None:
        from backends.tp import WorkerSpec, spawn_worker

        rank = list(st.tp_members).index(self.view.node_id)
        host = leader.address.rpartition(":")[0]
        if peer.tp_address.rpartition(":")[0] not in ("0.0.0.0", "", "::"):
            host = peer.tp_address.rpartition(":")[0]
        cfg = self.cfg
        dtype = cfg.dtype if cfg.dtype != "auto" else default_dtype(cfg.backend, self.ck, None)
        spec = WorkerSpec(rank=rank, world=len(st.tp_members), connect=f"{host}:{peer.tp_address.rpartition(':')[2]}",
                          model=cfg.model_path, layers=(st.start, st.end), backend=cfg.backend, dtype=dtype,
                          threads=cfg.threads, parent=os.getpid())
        log.warning("%s serves rank %d of tensor-parallel group %r: layers [%d, %d) with %s", self.view.name,
                    rank, self.group_name, st.start, st.end, peer.name)
        self.worker_stage = (st.node_id, st.start, st.end)
        self.worker = spawn_worker(spec, self.key(st.node_id))
