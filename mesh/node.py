"""A peer: gRPC server, discovery, claims from the coordinator, one stage of the ring."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import math
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import AsyncIterator

import grpc
import numpy as np

from backends.errors import GroupError, RequestError, TogetherError
from backends.lora import Adapter, module_dims, open_adapter
from backends.sampling import SamplingParams
from backends.shard import LayerShard, SeqChunk, default_dtype, estimate_layer_bytes, load_shard
from backends.tokenizer import Tokenizer
from backends.weights import Checkpoint
from backends.wire import Hidden, WireError
from mesh import placement
from mesh.auth import NODE_KEY, make_server
from mesh.coordinator import LayerMap
from mesh.discovery import Discovery, Peer
from mesh.links import Peers
from protos import together_pb2 as pb
from protos import together_pb2_grpc as pbg

log = logging.getLogger(__name__)
VERSION = "0.1.0"
HEARTBEAT_S = 0.5
PEER_TIMEOUT_S = 3.0  # a peer silent this long is gone: its layers are reassigned
KV_RESERVE_TOKENS = 4096


@dataclass
class NodeConfig:
    model: str
    model_path: str
    backend: str
    host: str = "127.0.0.1"
    port: int = 0
    mesh: str = "default"
    mesh_key: str | None = None
    peers: list[str] = field(default_factory=list)
    name: str = ""
    max_memory: int | None = None
    layers: tuple[int, int] | None = None
    dtype: str = "auto"
    wire_dtype: str | None = None
    threads: int | None = None
    mdns: bool = True
    interfaces: list[str] | None = None
    settle_s: float = 2.0
    claim_window_s: float = 1.0
    adapters: list[str] = field(default_factory=list)  # LoRA adapters to serve: [NAME=]PATH
    tp_group: str = ""  # serve one stage with the other peers of this tensor-parallel group
    tp_size: int = 0    # the group's number of peers (>= 2 with tp_group)


def params_to_pb(p: SamplingParams) -> pb.SamplingParams:
    return pb.SamplingParams(
        temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, min_p=p.min_p,
        repetition_penalty=p.repetition_penalty, presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty, penalty_context=p.penalty_context,
        has_seed=p.seed is not None, seed=p.seed or 0, logprobs=p.logprobs)


def params_from_pb(m: pb.SamplingParams) -> SamplingParams:
    return SamplingParams(
        temperature=m.temperature, top_p=m.top_p or 1.0, top_k=m.top_k, min_p=m.min_p,
        repetition_penalty=m.repetition_penalty or 1.0, presence_penalty=m.presence_penalty,
        frequency_penalty=m.frequency_penalty, penalty_context=m.penalty_context or 64,
        seed=m.seed if m.has_seed else None, logprobs=m.logprobs)


class FrameError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, seqs: list[str] | None = None):
        super().__init__(message)
        self.code, self.seqs = code, seqs or []


class Node(pbg.TogetherServicer):
    """One `together join` process."""

    def __init__(self, cfg: NodeConfig, checkpoint: Checkpoint, tokenizer: Tokenizer | None = None):
        self.cfg, self.ck, self.tok = cfg, checkpoint, tokenizer
        self.node_id = uuid.uuid4().hex
        self.started_at = time.time()
        self.name = cfg.name or f"{socket.gethostname().split('.')[0]}-{self.node_id[:4]}"
        self.num_layers = checkpoint.config.num_hidden_layers
        self.adapters: list[Adapter] = [open_adapter(spec) for spec in cfg.adapters]
        self._check_adapters()
        if cfg.tp_group:
            if cfg.tp_size < 2 or self.adapters:
                raise TogetherError("a tensor-parallel group needs --tp-size of at least 2 and no LoRA adapters")
            from backends.tp import partition

            partition(checkpoint.config, cfg.tp_size)  # heads that do not split: a clear error at start
        self.tp_group, self.tp_size = cfg.tp_group, cfg.tp_size if cfg.tp_group else 0
        self._tp = None  # the TPGroup this peer leads (rank 0), if any
        self._tp_members: list[str] = []
        self._tp_address = ""  # its command channel while the group forms
        self._tp_worker: subprocess.Popen | None = None  # this peer's rank > 0 of another's group
        self._tp_stage: tuple[str, int, int] | None = None  # (leader, start, end) of that worker
        self.shard: LayerShard | None = None
        self.plan = pb.Plan(epoch=0, num_layers=self.num_layers)
        self.layer_map: LayerMap | None = None  # only on the coordinator
        self.known: dict[str, pb.PeerInfo] = {}  # node id -> latest info, from any source
        self.claim_reason = ""
        self.refused: set[str] = set()  # addresses that refused our mesh key
        self._loading: tuple[int, int] | None = None
        self._load_lock = asyncio.Lock()
        self.scheduler = None  # set when this peer serves the API
        self._coord_ok = time.monotonic()
        self._cut_off = False  # this peer reaches nobody: it waits rather than split the mesh
        self.peers = Peers(cfg.mesh_key, self.node_id)
        self.pending: dict[int, asyncio.Future[pb.Result]] = {}
        self.on_plan: list = []  # callbacks(plan) for the live table and the API
        self._frame_ids = itertools.count(int.from_bytes(os.urandom(4), "little") << 20)
        self._compute = ThreadPoolExecutor(1, thread_name_prefix="compute")  # one worker per backend
        self._server: grpc.aio.Server | None = None
        self._discovery: Discovery | None = None
        self._tasks: set[asyncio.Task] = set()
        self._claim_batch: list[tuple[pb.PeerInfo, asyncio.Future]] = []
        self._claim_timer: asyncio.TimerHandle | None = None
        self._stopping = False
        self.dtype = cfg.dtype
        self.layer_bytes = estimate_layer_bytes(checkpoint, cfg.backend, cfg.dtype)
        self.head_bytes = estimate_layer_bytes(checkpoint, cfg.backend, cfg.dtype, head=True)
        self.kv_reserve = checkpoint.config.kv_bytes_per_token(4) * KV_RESERVE_TOKENS
        self.layer_ms = _measure_layer_ms(checkpoint)
        self.hop_ms: list[float] = []  # recent compute time of frames at this stage
        self.tokens_out = 0
        self.bytes_per_token_hop = 0  # serialized size of a one-token frame to the next stage

    # ---------------------------------------------------------------- lifecycle

    @property
    def address(self) -> str:
        return f"{self.cfg.host}:{self.port}"

    def info(self) -> pb.PeerInfo:
        lo, hi = (self.shard.start, self.shard.end) if self.shard else (-1, -1)
        free = self.cfg.max_memory if self.cfg.max_memory is not None else _free_memory()
        return pb.PeerInfo(
            node_id=self.node_id, name=self.name, address=self.address, backend=self.cfg.backend,
            free_memory=max(0, free - self.head_bytes), layer_ms=self.layer_ms,
            started_at=self.started_at, api=getattr(self, "api_address", ""), version=VERSION,
            model=self.cfg.model, start=lo, end=hi, ready=self.shard is not None,
            layer_bytes=self.layer_bytes, standby=self.shard is None and bool(self.claim_reason),
            tokens_per_s=self.stage_tokens_per_s(), adapters=",".join(ad.name for ad in self.adapters),
            tp_group=self.tp_group, tp_size=self.tp_size, tp_address=self._tp_address)

    async def start(self) -> None:
        self._server = make_server(self.cfg.mesh_key)
        pbg.add_TogetherServicer_to_server(self, self._server)
        self.port = self._server.add_insecure_port(f"{self.cfg.host}:{self.cfg.port}")
        if not self.port:
            raise TogetherError(f"cannot listen on {self.cfg.host}:{self.cfg.port}; pick another --port")
        await self._server.start()
        self.known[self.node_id] = self.info()
        if self.cfg.mdns:
            self._discovery = Discovery(
                self.node_id, self.cfg.mesh, self.cfg.host, self.port, self._txt(),
                interfaces=self.cfg.interfaces, on_change=self._on_discovery, name=self.name)
            await self._discovery.start()
        for addr in self.cfg.peers:
            await self._probe_manual(addr)
        await asyncio.sleep(self.cfg.settle_s)
        self._spawn(self._heartbeat_loop())  # before loading, or the coordinator thinks we died
        await self._enter_mesh()

    def _txt(self) -> dict[str, str]:
        return {"backend": self.cfg.backend, "free_memory": str(self.info().free_memory),
                "version": VERSION, "model": self.cfg.model, "api": getattr(self, "api_address", ""),
                "started_at": repr(self.started_at)}

    async def stop(self) -> None:
        """Leave cleanly: release the layers, unregister, close streams."""
        self._stopping = True
        coord = self._coordinator_address()
        if self.layer_map is not None:
            await self._hand_over()
        elif coord and coord != self.address:
            try:
                await self.peers.stub(coord).Leave(pb.LeaveRequest(node_id=self.node_id), timeout=2)
            except grpc.aio.AioRpcError:
                pass
        for t in list(self._tasks):
            t.cancel()
        self._tp_stop_worker()
        if self._tp is not None:
            self._tp_dissolve("this peer stops")
        if self._discovery:
            await self._discovery.stop()
        await self.peers.close()
        if self._server:
            await self._server.stop(grace=0.5)
        self._compute.shutdown(wait=False, cancel_futures=True)

    async def _hand_over(self) -> None:
        """A leaving coordinator gives its layers and the layer map to the oldest other peer."""
        lm = self.layer_map
        assert lm is not None
        others = [m.info for n, m in lm.members.items() if n != self.node_id]
        if not others:
            return
        heir = placement.choose_coordinator([(i.node_id, i.started_at) for i in others])
        self._drop({self.node_id})
        lm.coordinator = heir
        plan = lm.plan()
        self.layer_map = None
        self._set_plan(plan)
        log.warning("%s hands the mesh to %s", self.name, next(i.name for i in others if i.node_id == heir))
        await asyncio.gather(*(self._push(i.address, plan) for i in others), return_exceptions=True)

    def _spawn(self, coro) -> asyncio.Task:
        t = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

    # ---------------------------------------------------------------- membership

    async def _on_discovery(self, peers: dict[str, Peer]) -> None:
        for p in peers.values():
            if p.node_id not in self.known:
                self._spawn(self._probe(p.address))

    async def _probe_manual(self, address: str, wait_s: float = 30.0) -> None:
        """A --peer may still be starting: keep asking for a while before going on without it."""
        deadline = time.monotonic() + wait_s
        while not await self._probe(address, attempts=1):
            if address in self.refused:
                raise TogetherError(f"peer {address} refused this peer's mesh key: start every peer "
                                    f"with the same --mesh-key")
            if time.monotonic() > deadline:
                log.warning("--peer %s did not answer for %.0f s; going on without it", address, wait_s)
                return
            await asyncio.sleep(0.5)

    async def _probe(self, address: str, attempts: int = 3) -> bool:
        """Ask a peer who it is; True if it belongs to this mesh."""
        for attempt in range(attempts):
            try:
                st = await self.peers.stub(address).Status(pb.StatusRequest(), timeout=3)
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
        self.known[st.peer.node_id] = st.peer
        if st.plan.epoch > self.plan.epoch and st.plan.coordinator:
            self._set_plan(st.plan)
        return True

    def _coordinator_address(self) -> str | None:
        c = self.plan.coordinator
        if not c:
            return None
        if c == self.node_id:
            return self.address
        p = self.known.get(c) or next((x for x in self.plan.peers if x.node_id == c), None)
        return p.address if p else None

    async def _enter_mesh(self) -> None:
        """Find or become the coordinator, then claim layers."""
        if not self.plan.coordinator:
            oldest = placement.choose_coordinator([(i.node_id, i.started_at) for i in self.known.values()])
            if oldest == self.node_id:
                self._become_coordinator(epoch=0)
            else:
                info = self.known[oldest]
                try:
                    plan = await self.peers.stub(info.address).GetPlan(pb.PlanRequest(), timeout=3)
                    if plan.coordinator:
                        self._set_plan(plan)
                except grpc.aio.AioRpcError:
                    pass
                if not self.plan.coordinator:  # the oldest has not set up yet: it will; ask it
                    self.plan.coordinator = oldest
        await self._claim()

    def _become_coordinator(self, epoch: int) -> None:
        self.layer_map = LayerMap.rebuild(self.cfg.model, self.num_layers, self.node_id,
                                          self.kv_reserve, list(self.known.values()), epoch)
        log.info("%s coordinates the mesh", self.name)
        self._set_plan(self.layer_map.plan())

    async def _claim(self, rejoin: bool = False) -> None:
        want = self.cfg.layers
        if rejoin and self.shard is not None:
            want = (self.shard.start, self.shard.end)  # keep what is loaded, if still free
        req = pb.JoinRequest(peer=self.info(), want_start=want[0] if want else -1,
                             want_end=want[1] if want else -1)
        for attempt in range(60):  # the coordinator may still be starting
            addr = self._coordinator_address()
            try:
                if addr == self.address:
                    reply = await self.Join(req, None)
                else:
                    reply = await self.peers.stub(addr).Join(req, timeout=10)
                break
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.UNAUTHENTICATED:
                    raise TogetherError(f"the coordinator refused this peer: {e.details()}") from None
                log.info("join via %s failed (%s); retrying", addr, e.details())
                await asyncio.sleep(0.5)
        else:
            raise TogetherError("could not reach the mesh's coordinator")
        while self.tp_group and not reply.ok and reply.reason.startswith("waiting for tensor-parallel"):
            if self.claim_reason != reply.reason:
                log.warning("%s: %s", self.name, reply.reason)
            self.claim_reason = reply.reason
            await asyncio.sleep(0.5)  # the group's leader claims once all its peers are here
            req.peer.CopyFrom(self.info())
            addr = self._coordinator_address()
            reply = await (self.Join(req, None) if addr == self.address else
                           self.peers.stub(addr).Join(req, timeout=10))
        self.claim_reason = reply.reason
        if reply.plan.epoch >= self.plan.epoch:
            self._set_plan(reply.plan)
        if self.tp_group and not reply.ok:
            if reply.reason.startswith("refused"):
                raise TogetherError(reply.reason)
            log.warning("%s: %s", self.name, reply.reason)  # a rank > 0: it follows the plan
        elif reply.ok and reply.start >= 0:
            await self._load(reply.start, reply.end)
        elif want is not None and not reply.ok:
            if rejoin and self.cfg.layers is None:
                self.shard = None  # what it held is taken now: claim afresh
                return await self._claim()
            raise TogetherError(f"--layers {want[0]}-{want[1]} refused: {reply.reason}")
        else:
            log.warning("%s holds no layers: %s", self.name, reply.reason)
        await self._report()

    def _plan_members(self, start: int, end: int) -> list[str]:
        """The tensor-parallel peers the plan gives this peer's stage [start, end), else []."""
        mine = next((s for s in self.plan.stages if s.node_id == self.node_id), None)
        return list(mine.tp_members) if mine and (mine.start, mine.end) == (start, end) else []

    async def _load(self, start: int, end: int) -> None:
        async with self._load_lock:  # a claim and a plan push may ask for the same layers at once
            if self.shard and (self.shard.start, self.shard.end) == (start, end) and \
                    self._tp_members == self._plan_members(start, end):
                return
            await self._load_now(start, end)

    async def _load_now(self, start: int, end: int) -> None:
        if self._tp is not None:
            self._tp_dissolve("the plan moved its stage")
        members = self._plan_members(start, end) if self.tp_group else []
        if len(members) > 1:
            self._tp_stop_worker()
            return await self._load_tp(start, end, members)
        log.info("%s loading layers [%d, %d) on %s", self.name, start, end, self.cfg.backend)
        loop = asyncio.get_running_loop()
        old, self.shard = self.shard, None
        del old
        def load() -> LayerShard:
            sh = load_shard(self.cfg.backend, self.ck, start, end, dtype=self.cfg.dtype,
                            wire_dtype=self.cfg.wire_dtype, threads=self.cfg.threads)
            for ad in self.adapters:  # only this slice's layers of each adapter are read
                sh.load_adapter(ad)
            return sh

        self.shard = await loop.run_in_executor(self._compute, load)

    # ---------------------------------------------------------------- tensor-parallel stages

    def _tp_key(self, leader: str) -> bytes:
        """The group's channel key: every peer of the mesh can derive it (with the mesh key, only they)."""
        return hashlib.sha256(f"together-tp|{self.cfg.mesh_key or ''}|{self.cfg.mesh}|{self.tp_group}|"
                              f"{leader}".encode()).digest()

    async def _load_tp(self, start: int, end: int, members: list[str]) -> None:
        """Lead a group: rank 0 here, its other peers start their ranks when they see the plan and
        this peer's command channel (tp_address); ready once every rank has loaded its part."""
        from backends.tp import TPGroup

        log.warning("%s leads tensor-parallel group %r: layers [%d, %d) on %d peers", self.name,
                    self.tp_group, start, end, len(members))
        loop = asyncio.get_running_loop()
        old, self.shard = self.shard, None
        del old
        try:
            grp = await loop.run_in_executor(self._compute, lambda: TPGroup(
                self.ck, start, end, self.cfg.backend, len(members), dtype=self.cfg.dtype,
                wire_dtype=self.cfg.wire_dtype, threads=self.cfg.threads, host=self.cfg.host,
                key=self._tp_key(self.node_id)))
        except TogetherError as e:
            return self._tp_lost(f"cannot form the group: {e}")
        self._tp, self._tp_members = grp, members
        self._tp_address = f"{grp.address[0]}:{grp.address[1]}"
        self._spawn(self._report_quietly())
        try:
            shard = await loop.run_in_executor(self._compute, lambda: grp.start(spawn=False, form_timeout=120))
        except TogetherError as e:
            if self._tp is grp:
                self._tp_lost(f"the group did not form: {e}")
            return
        finally:
            self._tp_address = ""
        if self._tp is grp:
            self.shard = shard
        else:  # dissolved while it formed
            grp.close()

    async def _report_quietly(self) -> None:
        try:
            await self._report()
        except grpc.aio.AioRpcError as e:
            log.debug("report failed: %s", e.details())

    def _tp_dissolve(self, why: str) -> None:
        """Close the group this peer leads; it serves as an ordinary peer from now on (MLX allows one
        group per process, and the coordinator counts the group as broken)."""
        grp, self._tp = self._tp, None
        self._tp_members, self._tp_address = [], ""
        if grp is not None:
            if self.shard is not None and self.shard is grp.shard:
                self.shard = None
            # off the event loop: a forward under way may hold the group's channels a moment
            threading.Thread(target=grp.close, daemon=True, name="tp-close").start()
        if self.tp_group:
            log.warning("%s leaves tensor-parallel group %r (%s); it serves as an ordinary peer now",
                        self.name, self.tp_group, why)
        self.tp_group, self.tp_size = "", 0

    def _tp_lost(self, why: str) -> None:
        """A rank of this peer's group failed: tell the coordinator, which reassigns the stage."""
        if not self.tp_group:
            return
        self._tp_dissolve(why)
        self._spawn(self._report_quietly())

    def _tp_stop_worker(self) -> None:
        w, self._tp_worker, self._tp_stage = self._tp_worker, None, None
        if w is not None and w.poll() is None:
            w.kill()
            w.wait()

    async def _tp_tick(self) -> None:
        """A group's rank > 0: start this peer's worker once the plan gives the group a stage and its
        leader's channel is open; when the worker ends, the group is over: serve as an ordinary peer."""
        if not self.tp_group or self._tp is not None:
            return
        w = self._tp_worker
        if w is not None and w.poll() is not None:
            self._tp_worker = None
            self._tp_dissolve(f"its worker exited with code {w.returncode}")
            self._spawn(self._report_quietly())
            self._spawn(self._rejoin_alone())
            return
        st = next((s for s in self.plan.stages if self.node_id in s.tp_members and s.node_id != self.node_id),
                  None)
        if st is None or (w is not None and self._tp_stage != (st.node_id, st.start, st.end)):
            if w is not None:  # the group's stage is gone or moved
                self._tp_stop_worker()
            return
        if w is not None:
            return
        leader = self.known.get(st.node_id)
        if leader is None:
            return
        try:
            peer = (await self.peers.stub(leader.address).Status(pb.StatusRequest(), timeout=1)).peer
        except grpc.aio.AioRpcError:
            return
        if not peer.tp_address or (peer.start, peer.end) not in ((-1, -1), (st.start, st.end)):
            return
        rank = list(st.tp_members).index(self.node_id)
        host = leader.address.rpartition(":")[0]
        if peer.tp_address.rpartition(":")[0] not in ("0.0.0.0", "", "::"):
            host = peer.tp_address.rpartition(":")[0]
        dtype = self.cfg.dtype if self.cfg.dtype != "auto" else default_dtype(self.cfg.backend, self.ck, None)
        cmd = [sys.executable, "-m", "backends.tp", "--rank", str(rank), "--world", str(len(st.tp_members)),
               "--connect", f"{host}:{peer.tp_address.rpartition(':')[2]}", "--model", self.cfg.model_path,
               "--layers", f"{st.start}-{st.end}", "--backend", self.cfg.backend, "--dtype", dtype,
               "--parent", str(os.getpid())]
        if self.cfg.threads:
            cmd += ["--threads", str(self.cfg.threads)]
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, TOGETHER_TP_KEY=self._tp_key(st.node_id).hex())
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        log.warning("%s serves rank %d of tensor-parallel group %r: layers [%d, %d) with %s", self.name, rank,
                    self.tp_group, st.start, st.end, peer.name)
        self._tp_stage = (st.node_id, st.start, st.end)
        self._tp_worker = subprocess.Popen(cmd, cwd=root, env=env, stdin=subprocess.DEVNULL)

    async def _rejoin_alone(self) -> None:
        self.cfg.layers = None  # --layers was the group's request: alone, take what is free, or stand by
        try:
            await self._claim()
        except Exception as e:  # a claim that fails leaves this peer a standby
            log.warning("%s could not claim layers after its group ended: %s", self.name, e)

    def _check_adapters(self) -> None:
        names = [ad.name for ad in self.adapters]
        if len(set(names)) != len(names):
            raise TogetherError(f"two adapters named {sorted(n for n in names if names.count(n) > 1)[0]!r}; "
                                f"name them apart with --adapter NAME=PATH")
        for ad in self.adapters:
            ad.check_fits(self.num_layers, module_dims(self.ck.config))

    def adapter_names(self) -> set[str]:
        """Adapters any peer of the plan (or this one) serves."""
        names = {ad.name for ad in self.adapters}
        for p in self.plan.peers:
            names.update(filter(None, p.adapters.split(",")))
        return names

    def ring_adapters(self) -> list[str]:
        """Adapters every stage of the current plan has loaded: the ones requests can use."""
        if not self.plan.stages:
            return []
        infos = {p.node_id: p for p in self.plan.peers}
        infos[self.node_id] = self.info()
        common: set[str] | None = None
        for st in self.plan.stages:
            have = set(filter(None, infos[st.node_id].adapters.split(","))) if st.node_id in infos else set()
            common = have if common is None else common & have
        return sorted(common or ())

    async def _report(self) -> bool:
        """Tell the coordinator what this peer holds (heartbeat); False if there is nobody to tell."""
        self.known[self.node_id] = info = self.info()
        addr = self._coordinator_address()
        if addr is None:
            return False
        if addr == self.address:
            reply = await self.Heartbeat(pb.HeartbeatRequest(peer=info, epoch=self.plan.epoch), None)
        else:
            reply = await self.peers.stub(addr).Heartbeat(
                pb.HeartbeatRequest(peer=info, epoch=self.plan.epoch), timeout=2)
        if reply.plan.epoch >= self.plan.epoch:
            self._set_plan(reply.plan)
        return True

    async def _heartbeat_loop(self) -> None:
        self._coord_ok = time.monotonic()
        while not self._stopping:
            t = time.monotonic()
            await asyncio.sleep(HEARTBEAT_S)
            if time.monotonic() - t > HEARTBEAT_S + 1.0:
                # this peer's own loop stalled (busy, swapped out): silence is not evidence now
                self._coord_ok = time.monotonic()
                if self.layer_map is not None:
                    for m in self.layer_map.members.values():
                        m.last_seen = max(m.last_seen, time.monotonic())
            try:
                if await self._report():
                    self._coord_ok = time.monotonic()
            except grpc.aio.AioRpcError as e:
                log.debug("heartbeat failed: %s", e.details())
            except Exception:  # the loop must outlive any one bad round
                log.exception("heartbeat round failed")
            try:
                await self._tp_tick()
            except Exception:
                log.exception("tensor-parallel round failed")
            try:
                if self.layer_map is None and time.monotonic() - self._coord_ok > PEER_TIMEOUT_S:
                    await self._coordinator_lost()
                if self.layer_map is not None:
                    await self._expire_peers()
            except Exception:
                log.exception("membership round failed")

    async def _coordinator_lost(self) -> None:
        """The coordinator stopped answering: the oldest surviving peer takes over and rebuilds the
        layer map from the peers' own reports."""
        dead = self.plan.coordinator
        alive = [p for p in self.plan.peers if p.node_id != dead]
        if not alive or self.layer_map is not None:
            return
        heir = placement.choose_coordinator([(p.node_id, p.started_at) for p in alive])
        if heir != self.node_id:
            return  # the heir will push its plan; until then our heartbeats keep failing
        old = next((p for p in self.plan.peers if p.node_id == dead), None)
        if old is not None:
            for _ in range(2):  # heartbeats failed, but if it still answers it is not dead
                try:
                    await self.peers.stub(old.address).Status(pb.StatusRequest(), timeout=2.5)
                    self._coord_ok = time.monotonic()
                    return
                except grpc.aio.AioRpcError as e:
                    if e.code() == grpc.StatusCode.UNAVAILABLE:
                        break  # refused at once: the process is gone
        reports, newer = [self.info()], None
        for p in alive:
            if p.node_id == self.node_id:
                continue
            try:
                st = await self.peers.stub(p.address).Status(pb.StatusRequest(), timeout=2)
                reports.append(st.peer)
                if st.plan.coordinator == dead and st.plan.epoch > self.plan.epoch:
                    newer = st.plan
            except grpc.aio.AioRpcError:
                pass  # also gone: its layers are reassigned below
        if len(reports) == 1 and len(alive) > 1:
            # Nobody answers: this peer is the one cut off, not the coordinator. Taking over would
            # make a second, one-peer mesh that never merges back; wait for the link instead.
            if not self._cut_off:
                log.warning("%s cannot reach any peer; not taking over (waiting for the network)", self.name)
            self._cut_off = True
            return
        self._cut_off = False
        if newer is not None:
            # The others still hear the coordinator (it moved on without us): follow it and rejoin.
            self._set_plan(newer)
            self._spawn(self._claim(rejoin=True))
            return
        log.warning("%s takes over as coordinator (the old one stopped answering)", self.name)
        self.known = {r.node_id: r for r in reports}
        self.layer_map = LayerMap.rebuild(self.cfg.model, self.num_layers, self.node_id, self.kv_reserve,
                                          reports, self.plan.epoch + 1)
        self._coord_ok = time.monotonic()
        self._reassign(set())
        await self._publish()

    async def _expire_peers(self) -> None:
        assert self.layer_map is not None
        lost = set()
        for node_id in self.layer_map.stale(PEER_TIMEOUT_S):
            m = self.layer_map.members[node_id]
            try:  # late heartbeats from a busy peer are not a death: ask it directly first
                st = await self.peers.stub(m.info.address).Status(pb.StatusRequest(), timeout=2.0)
                m.last_seen = time.monotonic()
                if st.plan.coordinator != self.node_id:
                    # it gave up on us and set up on its own: the older coordinator wins when they meet
                    self._spawn(self._push(m.info.address, self.layer_map.plan()))
                continue
            except grpc.aio.AioRpcError:
                pass
            log.warning("peer %s stopped answering; dropping it", m.info.name)
            lost.add(node_id)
        if lost:
            self._drop(lost)
            await self._publish()

    def _drop(self, lost: set[str]) -> None:
        assert self.layer_map is not None
        for node_id in lost:
            self.layer_map.remove(node_id)
            self.known.pop(node_id, None)
        self._reassign(lost)

    def _reassign(self, lost: set[str]) -> None:
        """Cover the layers nobody holds: a standby first, else survivors with room."""
        lm = self.layer_map
        assert lm is not None
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

    def _set_plan(self, plan: pb.Plan) -> None:
        old = self.plan
        changed = (plan.epoch, plan.complete) != (old.epoch, old.complete) or \
            len(plan.peers) != len(old.peers)
        self.plan = plan
        for p in plan.peers:
            if p.node_id != self.node_id:
                self.known[p.node_id] = p
        if _stage_list(plan) != _stage_list(old):
            # frames on the old path may never come back: their sequences are replayed
            for fid, fut in list(self.pending.items()):
                if not fut.done():
                    fut.set_result(pb.Result(frame_id=fid, error="the ring changed (a peer left or joined)",
                                             error_code=grpc.StatusCode.UNAVAILABLE.value[0]))
            self._follow_plan()
        if changed:
            for cb in self.on_plan:
                cb(plan)

    def _follow_plan(self) -> None:
        """Load the layers the plan now gives this peer (after a reassignment)."""
        mine = next((s for s in self.plan.stages if s.node_id == self.node_id), None)
        if self._tp is not None and (mine is None or list(mine.tp_members) != self._tp_members):
            self._tp_lost("the coordinator took the group's stage away")
        have = (self.shard.start, self.shard.end) if self.shard else None
        want = (mine.start, mine.end) if mine else None
        if want is not None and want != have and want != self._loading:
            self._loading = want

            async def load() -> None:
                try:
                    await self._load(*want)
                    await self._report()
                finally:
                    self._loading = None

            self._spawn(load())

    async def _publish(self) -> None:
        """Coordinator: push the current plan to every member."""
        assert self.layer_map is not None
        plan = self.layer_map.plan()
        self._set_plan(plan)
        for m in list(self.layer_map.members.values()):
            if m.info.node_id != self.node_id:
                self._spawn(self._push(m.info.address, plan))

    async def _push(self, address: str, plan: pb.Plan) -> None:
        try:
            await self.peers.stub(address).PushPlan(plan, timeout=2)
        except grpc.aio.AioRpcError:
            pass

    # ---------------------------------------------------------------- membership RPCs

    async def _refuse_spoof(self, info_id: str, context) -> None:
        """With a mesh key, a peer may only speak for itself."""
        who = caller_id(context)
        if self.cfg.mesh_key and context is not None and who != info_id:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"a peer may only join, report or leave for itself (signed as {who!r})")

    async def _check_info(self, info: pb.PeerInfo, context) -> None:
        why = check_peer_info(info, self.num_layers)
        if why is not None and context is not None:
            log.warning("refused a peer report from %s: %s", context.peer(), why)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad peer info: {why}")
        await self._refuse_spoof(info.node_id, context)

    async def Join(self, request: pb.JoinRequest, context) -> pb.JoinReply:
        await self._check_info(request.peer, context)
        if self.layer_map is None:
            if context is not None:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                    f"{self.name} is not the coordinator; ask {self.plan.coordinator}")
            raise RequestError("not the coordinator")
        info = request.peer
        if info.model != self.cfg.model:
            return pb.JoinReply(ok=False, reason=f"this mesh serves {self.cfg.model}, not {info.model}",
                                start=-1, end=-1, plan=self.layer_map.plan())
        self.known[info.node_id] = info
        if self.layer_map.in_tp(info):
            want = (request.want_start, request.want_end) if request.want_start >= 0 else None
            rng, reason = self.layer_map.claim_tp(info, want)
            if reason.startswith("waiting for tensor-parallel"):  # the peer asks again: no plan change
                return pb.JoinReply(ok=False, reason=reason, start=-1, end=-1, plan=self.layer_map.plan())
        elif request.want_start >= 0:
            rng, reason = self.layer_map.claim(info, (request.want_start, request.want_end))
        else:
            fut: asyncio.Future = asyncio.get_running_loop().create_future()
            self._claim_batch.append((info, fut))
            if self._claim_timer is None:
                self._claim_timer = asyncio.get_running_loop().call_later(
                    self.cfg.claim_window_s, self._settle_claims)
            rng, reason = await fut
        log.info("claim by %s: %s", info.name, reason)
        await self._publish()
        return pb.JoinReply(ok=rng is not None, reason=reason, start=rng[0] if rng else -1,
                            end=rng[1] if rng else -1, plan=self.layer_map.plan())

    def _settle_claims(self) -> None:
        assert self.layer_map is not None
        batch, self._claim_batch, self._claim_timer = self._claim_batch, [], None
        batch.sort(key=lambda b: (b[0].started_at, b[0].node_id))
        out = self.layer_map.claim_together([b[0] for b in batch])
        for info, fut in batch:
            if not fut.done():
                fut.set_result(out[info.node_id])

    async def Leave(self, request: pb.LeaveRequest, context) -> pb.Plan:
        await self._refuse_spoof(request.node_id, context)
        if self.layer_map is not None and request.node_id in self.layer_map.members:
            log.info("peer %s leaves; handing its layers over", request.node_id[:8])
            self._drop({request.node_id})
            await self._publish()
        return self.plan

    async def Heartbeat(self, request: pb.HeartbeatRequest, context) -> pb.HeartbeatReply:
        await self._check_info(request.peer, context)
        if self.layer_map is None:
            return pb.HeartbeatReply(plan=self.plan)
        before = self.layer_map.complete()
        was_ready = self.layer_map.ready(request.peer.node_id)
        self.layer_map.upsert(request.peer)
        self.known[request.peer.node_id] = request.peer
        if self.layer_map.left_group(request.peer):
            log.warning("peer %s left its tensor-parallel group: the group's stage is lost", request.peer.name)
            self.layer_map.lose_groups({request.peer.node_id})
            self._reassign(set())
            await self._publish()
            return pb.HeartbeatReply(plan=self.layer_map.plan())
        if self.layer_map.complete() != before or self.layer_map.ready(request.peer.node_id) != was_ready:
            self.layer_map.epoch += 1
            await self._publish()
        return pb.HeartbeatReply(plan=self.layer_map.plan())

    async def GetPlan(self, request: pb.PlanRequest, context) -> pb.Plan:
        return self.plan

    async def PushPlan(self, request: pb.Plan, context) -> pb.Ack:
        # only a coordinator speaks for its plan, and a plan must fit this model
        if self.cfg.mesh_key and context is not None and caller_id(context) not in (
                request.coordinator, self.plan.coordinator):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "only a coordinator may push a plan")
        if request.num_layers != self.num_layers or any(
                not 0 <= st.start < st.end <= self.num_layers for st in request.stages) or \
                not any(p.node_id == request.coordinator for p in request.peers):
            if context is not None:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a plan that does not fit this model")
            return pb.Ack()
        if request.coordinator == self.node_id and self.layer_map is None and not self._stopping:
            # the old coordinator left cleanly and named this peer its heir
            log.warning("%s takes over as coordinator (handed over)", self.name)
            self.layer_map = LayerMap.from_plan(request, self.kv_reserve)
            self.layer_map.epoch += 1
            self._coord_ok = time.monotonic()
            await self._publish()
            return pb.Ack()
        if self.layer_map is not None and request.coordinator != self.node_id:
            # two coordinators met (peers started apart and found each other late): the older wins
            theirs = next((p for p in request.peers if p.node_id == request.coordinator), None)
            if theirs is None:
                return pb.Ack()
            if (theirs.started_at, theirs.node_id) < (self.started_at, self.node_id):
                log.warning("%s steps down: %s coordinates this mesh", self.name, theirs.name)
                self.layer_map = None
                self.known[theirs.node_id] = theirs
                self._set_plan(request)
                self._spawn(self._claim(rejoin=True))
            else:
                self.known[theirs.node_id] = theirs
                self.layer_map.upsert(theirs)
                self._spawn(self._push(theirs.address, self.layer_map.plan()))
            return pb.Ack()
        if request.epoch >= self.plan.epoch or request.coordinator != self.plan.coordinator:
            self._set_plan(request)
        return pb.Ack()

    async def Status(self, request: pb.StatusRequest, context) -> pb.StatusReply:
        sh = self.shard
        sched = self.scheduler
        return pb.StatusReply(peer=self.info(), plan=self.plan, sequences=sh.num_sequences if sh else 0,
                              cache_bytes=sh.cache_nbytes() if sh else 0,
                              tokens_per_s=self.stage_tokens_per_s(), tasks=len(asyncio.all_tasks()),
                              open_fds=_open_fds(), pending_frames=len(self.pending),
                              running=len(sched.running) if sched else 0,
                              waiting=len(sched.waiting) if sched else 0)

    def stage_tokens_per_s(self) -> float:
        recent = self.hop_ms[-32:]
        return 1000.0 / (sum(recent) / len(recent)) if recent else 0.0

    # ---------------------------------------------------------------- the ring

    def stage_of(self, index: int) -> tuple[str, pb.Assignment]:
        """Address and assignment of the plan's stage `index`."""
        st = self.plan.stages[index]
        if st.node_id == self.node_id:
            return self.address, st
        p = self.known.get(st.node_id)
        if p is None:
            raise FrameError(grpc.StatusCode.UNAVAILABLE, f"stage {index} ({st.node_id[:8]}) is unknown")
        return p.address, st

    async def Release(self, request: pb.ReleaseRequest, context) -> pb.ReleaseReply:
        freed = 0
        if self.shard is not None:
            sh = self.shard
            freed = await asyncio.get_running_loop().run_in_executor(
                self._compute, lambda: sum(sh.free_sequence(s) for s in request.seq_ids))
        return pb.ReleaseReply(freed=freed)

    async def Forward(self, request_iterator: AsyncIterator[pb.Frame], context) -> AsyncIterator[pb.Ack]:
        async for frame in request_iterator:
            try:
                await self.handle_frame(frame)
            except FrameError as e:
                if not frame.origin:
                    await context.abort(e.code, str(e))
                await self._fail(frame, e)
        if False:  # an async generator that yields nothing: acks are not needed
            yield pb.Ack()

    async def Deliver(self, request_iterator: AsyncIterator[pb.Result], context) -> AsyncIterator[pb.Ack]:
        async for result in request_iterator:
            self.deliver(result)
        if False:
            yield pb.Ack()

    def deliver(self, result: pb.Result) -> None:
        fut = self.pending.pop(result.frame_id, None)
        if fut is not None and not fut.done():
            fut.set_result(result)

    async def _fail(self, frame: pb.Frame, e: FrameError) -> None:
        res = pb.Result(frame_id=frame.frame_id, epoch=self.plan.epoch, error=str(e),
                        error_code=e.code.value[0], failed_seqs=e.seqs or [s.seq_id for s in frame.seqs])
        await self._send_result(frame.origin, res)

    async def _send_result(self, origin: str, res: pb.Result) -> None:
        if origin == self.address:
            self.deliver(res)
        else:
            try:
                await self.peers.stream(origin, "Deliver").send(res)
            except ConnectionError as e:
                log.warning("cannot return results to %s: %s", origin, e)

    async def handle_frame(self, frame: pb.Frame) -> None:
        """Run one frame through this stage, then pass it on (or return the tokens to its origin)."""
        if frame.epoch != self.plan.epoch:
            raise FrameError(grpc.StatusCode.FAILED_PRECONDITION,
                             f"stale plan epoch {frame.epoch} (this peer is at {self.plan.epoch})")
        sh = self.shard
        if sh is None:
            raise FrameError(grpc.StatusCode.UNAVAILABLE, f"{self.name} holds no layers")
        index = next((i for i, s in enumerate(self.plan.stages) if s.node_id == self.node_id), None)
        if index is None:
            raise FrameError(grpc.StatusCode.FAILED_PRECONDITION, f"{self.name} is not a stage of the plan")
        chunks = [SeqChunk(e.seq_id, e.offset, e.length) for e in frame.seqs]
        if not chunks or len({c.seq_id for c in chunks}) != len(chunks):
            raise FrameError(grpc.StatusCode.INVALID_ARGUMENT,
                             "corrupt frame: no sequences, or a sequence twice in one frame")
        try:
            if sh.is_first:
                x = np.frombuffer(np.asarray(frame.tokens, np.int32).tobytes(), np.int32)
            else:
                x = Hidden(frame.data, frame.dtype, tuple(frame.shape))
        except WireError as e:
            raise FrameError(grpc.StatusCode.INVALID_ARGUMENT, f"corrupt frame: {e}") from None
        t0 = time.perf_counter()
        try:
            out = await asyncio.get_running_loop().run_in_executor(
                self._compute, self._run, sh, frame, chunks, x)
        except GroupError as e:  # a rank of this peer's group is gone: the stage is lost
            if self._tp is not None and sh is self.shard:
                self._tp_lost(str(e))
            raise FrameError(grpc.StatusCode.UNAVAILABLE, str(e)) from None
        except (RequestError, WireError) as e:
            raise FrameError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        except Exception as e:  # poisoned numbers or a backend bug fail this frame, not the whole link
            if sh is not self.shard:  # its group was dissolved under it: the sequences are replayed
                raise FrameError(grpc.StatusCode.UNAVAILABLE, f"{self.name}'s stage changed: {e}") from None
            log.exception("frame %d failed in %s's compute", frame.frame_id, self.name)
            raise FrameError(grpc.StatusCode.INTERNAL, f"{self.name} failed: {type(e).__name__}: {e}") from None
        compute_ms = (time.perf_counter() - t0) * 1000
        self.hop_ms.append(compute_ms)
        del self.hop_ms[:-64]
        hops = list(frame.hop_ms) + [compute_ms]
        if sh.is_last:
            self.tokens_out += len(out)
            res = pb.Result(frame_id=frame.frame_id, epoch=frame.epoch, hop_ms=hops, results=[
                pb.TokenResult(seq_id=s.seq_id, token=s.token, logprob=s.logprob,
                               top_tokens=[t for t, _ in s.top_logprobs],
                               top_logprobs=[lp for _, lp in s.top_logprobs]) for s in out])
            await self._send_result(frame.origin, res)
            return
        addr, _ = self.stage_of(index + 1)
        nxt = pb.Frame(frame_id=frame.frame_id, epoch=frame.epoch, seqs=frame.seqs, dtype=out.dtype,
                       shape=list(out.shape), data=bytes(out.data), origin=frame.origin,
                       sent_at=time.time(), hop_ms=hops)
        if len(frame.seqs) == 1 and frame.seqs[0].length == 1:
            self.bytes_per_token_hop = nxt.ByteSize()
        await self.send_frame(addr, nxt)

    def _run(self, sh: LayerShard, frame: pb.Frame, chunks: list[SeqChunk], x):
        started = [e.seq_id for e in frame.seqs if e.start]
        for e in frame.seqs:
            if e.start:
                sh.add_sequence(e.seq_id, params_from_pb(e.sampling), list(e.history), e.adapter)
        try:
            return sh.forward(chunks, x)
        except Exception:
            for s in started:  # a refused frame must not leave caches behind
                sh.free_sequence(s)
            raise

    async def send_frame(self, address: str, frame: pb.Frame) -> None:
        if address == self.address:
            try:
                await self.handle_frame(frame)
            except FrameError as e:
                await self._fail(frame, e)
        else:
            try:
                await self.peers.stream(address, "Forward").send(frame)
            except ConnectionError as e:
                await self._fail(frame, FrameError(grpc.StatusCode.UNAVAILABLE, str(e)))

    # ---------------------------------------------------------------- API side

    def new_frame_id(self) -> int:
        return next(self._frame_ids)

    async def run_frame(self, frame: pb.Frame, timeout: float = 120.0) -> pb.Result:
        """Send a frame into the ring at stage 0 and wait for its tokens."""
        if not self.plan.complete:
            raise FrameError(grpc.StatusCode.UNAVAILABLE, f"the ring is incomplete: {self.plan.missing}")
        frame.epoch, frame.origin = self.plan.epoch, self.address
        fut: asyncio.Future[pb.Result] = asyncio.get_running_loop().create_future()
        self.pending[frame.frame_id] = fut
        try:
            addr, _ = self.stage_of(0)
            self._spawn(self.send_frame(addr, frame))
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise FrameError(grpc.StatusCode.DEADLINE_EXCEEDED,
                             f"the ring did not answer within {timeout:.0f} s") from None
        finally:
            self.pending.pop(frame.frame_id, None)

    async def release(self, seq_ids: list[str]) -> int:
        """Free these sequences' caches on every stage."""
        calls = []
        for st in self.plan.stages:
            if st.node_id == self.node_id:
                calls.append(self.Release(pb.ReleaseRequest(seq_ids=seq_ids), None))
            elif (p := self.known.get(st.node_id)) is not None:
                calls.append(self.peers.stub(p.address).Release(pb.ReleaseRequest(seq_ids=seq_ids),
                                                                timeout=5))
        out = await asyncio.gather(*calls, return_exceptions=True)
        return sum(r.freed for r in out if isinstance(r, pb.ReleaseReply))


def check_peer_info(info: pb.PeerInfo, num_layers: int) -> str | None:
    """Why a PeerInfo from the wire cannot be believed, or None."""
    if not info.node_id or len(info.node_id) > 64:
        return "missing or oversized node id"
    if not all(math.isfinite(x) for x in (info.layer_ms, info.started_at, info.tokens_per_s)):
        return "non-finite numbers"
    host, _, port = info.address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        return f"bad address {info.address!r}"
    if (info.start, info.end) != (-1, -1) and not 0 <= info.start < info.end <= num_layers:
        return f"impossible layer range [{info.start}, {info.end})"
    if len(info.adapters) > 4096:
        return "oversized adapter list"
    if info.tp_group and (len(info.tp_group) > 64 or not 2 <= info.tp_size <= 64):
        return "a tensor-parallel group needs a short name and 2 to 64 peers"
    return None


def caller_id(context) -> str | None:
    """The node id a caller signed into its metadata (trusted only when a mesh key is set)."""
    if context is None:
        return None
    for k, v in context.invocation_metadata() or ():
        if k == NODE_KEY:
            return v
    return None


def _open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        import psutil

        return psutil.Process().num_fds()


def _stage_list(plan: pb.Plan) -> list[tuple[str, int, int, tuple[str, ...]]]:
    return [(s.node_id, s.start, s.end, tuple(s.tp_members)) for s in plan.stages]


def _free_memory() -> int:
    import psutil

    return int(psutil.virtual_memory().available * 0.8)


def _measure_layer_ms(ck: Checkpoint) -> float:
    """A quick stand-in for a decode step through one layer: one matvec per weight shape."""
    c = ck.config
    shapes = [(c.hidden_size, c.num_attention_heads * c.head_dim),
              (c.hidden_size, 2 * c.num_key_value_heads * c.head_dim),
              (c.num_attention_heads * c.head_dim, c.hidden_size),
              (c.hidden_size, 2 * c.intermediate_size), (c.intermediate_size, c.hidden_size)]
    rng = np.random.default_rng(0)
    ws = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
    x = rng.standard_normal((1, c.hidden_size), dtype=np.float32)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        h = x
        for w in ws:
            h = (h[:, : w.shape[0]] if h.shape[1] >= w.shape[0] else np.resize(h, (1, w.shape[0]))) @ w
        best = min(best, time.perf_counter() - t)
    return best * 1000
