"""A peer: one `together join` process. `Node` builds the roles and wires them together:

- PlanView (view.py): who this peer is, the plan it follows, the peers it knows;
- Stage (stage.py): the loaded shard, running frames and passing them on;
- Origin (origin.py): an API peer's frames into the ring and their results back;
- Membership (membership.py): discovery, claims, heartbeats, following plans, succession;
- CoordinatorRole (coordination.py): the layer map, while this peer coordinates;
- TPManager (tpgroup.py): this peer's part in a tensor-parallel group;
- Servicer (servicer.py): the gRPC entry points, delegating to the roles."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import uuid
from pathlib import Path
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

import grpc

from backends.errors import TogetherError
from backends.lora import Adapter, module_dims, open_adapter
from backends.measure import Speed, measure_speed, measured_layer
from backends.shard import (LayerShard, backend_module, default_dtype, estimate_layer_bytes, load_shard,
                            resolve_device)
from backends.tokenizer import Tokenizer
from backends.weights import Checkpoint
from mesh.auth import add_port, make_server
from mesh.coordination import PEER_TIMEOUT_S, CoordinatorRole
from mesh.coordinator import LayerMap
from mesh.discovery import Discovery, primary_address
from mesh.host import free_memory, open_fds
from mesh.linkprobe import LinkProber
from mesh.links import Peers
from mesh.membership import HEARTBEAT_S, Membership
from mesh.metrics import PeerMetrics
from mesh.origin import Origin
from mesh.protocol import FrameError, caller_id, check_peer_info, params_from_pb, params_to_pb
from mesh.servicer import Servicer
from mesh.stage import Stage
from mesh.supply import Supply
from mesh.tasks import TaskSet
from mesh.tpgroup import TPManager
from mesh.training import Trainer
from mesh.view import PlanView
from mesh.weights import Faults, WeightServer
from protos import together_pb2 as pb
from protos import together_pb2_grpc as pbg

if TYPE_CHECKING:
    from mesh.scheduler import Scheduler

__all__ = ["Node", "NodeConfig", "FrameError", "params_to_pb", "params_from_pb", "check_peer_info", "caller_id",
           "HEARTBEAT_S", "PEER_TIMEOUT_S", "VERSION"]
VERSION = "0.1.0"
KV_RESERVE_TOKENS = 4096
PREFIX_CACHE_MAX = 1 << 30  # the default prefix cache's cap (1 GiB)
log = logging.getLogger("together.node")


@dataclass
class NodeConfig:
    model: str
    model_path: str
    backend: str
    host: str = "127.0.0.1"  # "" or 0.0.0.0: listen on every interface, advertise the LAN addresses
    port: int = 0
    mesh: str = "default"
    mesh_key: str | None = None
    peers: list[str] = field(default_factory=list)
    name: str = ""
    max_memory: int | None = None
    layers: tuple[int, int] | None = None
    dtype: str = "auto"
    wire_dtype: str | None = None
    device: str | None = None  # torch: auto, cpu, cuda[:N] or mps (see backends.shard.resolve_device)
    threads: int | None = None
    cpus: frozenset[int] | None = None  # --cpus: the cores the compute thread runs on (None: any)
    mdns: bool = True
    interfaces: list[str] | None = None
    settle_s: float = 2.0
    claim_window_s: float = 1.0
    adapters: list[str] = field(default_factory=list)  # LoRA adapters to serve: [NAME=]PATH
    tp_group: str = ""  # serve one stage with the other peers of this tensor-parallel group
    tp_size: int = 0    # the group's number of peers (>= 2 with tp_group)
    seq_lease: float = 60.0  # a sequence unseen in frames for this long is freed (its API peer is gone)
    weight_faults: str = ""  # test only: faults of this peer's weight server (mesh.weights.Faults.parse)
    link_delay_ms: float = 0.0  # test only: every message to another peer arrives this much later
    placement: str = "measured"  # as coordinator: "measured" (speeds and links) or "memory" (memory alone)
    # bytes of KV its stage keeps of computed prefixes (backends/prefix.py); None: min(1 GiB, 1/8 of
    # the memory it offers); 0: off (its stage keeps nothing; as an API peer it sends no prefixes)
    prefix_cache_memory: int | None = None
    draft: str = "lookup"  # API peer: speculative decoding's drafts: off, lookup, or a draft model's name/path
    draft_tokens: int = 8  # API peer: the most tokens a sequence drafts per trip (apps/cli.py's DRAFT_TOKENS)


class Node:
    """One `together join` process."""

    def __init__(self, cfg: NodeConfig, checkpoint: Checkpoint, tokenizer: Tokenizer | None = None,
                 seeds: Sequence[str] = ()):
        # seeds: peers that served this peer's model when it had none (apps/join.py, mesh/supply.py)
        self.cfg, self.ck, self.tok = cfg, checkpoint, tokenizer
        self.node_id = uuid.uuid4().hex
        self.started_at = time.time()
        self.name = cfg.name or f"{socket.gethostname().split('.')[0]}-{self.node_id[:4]}"
        self.num_layers = checkpoint.config.num_hidden_layers
        self.adapters: list[Adapter] = [open_adapter(spec) for spec in cfg.adapters]
        self._check_config()
        self.api_address = ""  # host:port of this peer's HTTP API, if it serves one
        self.scheduler: Scheduler | None = None  # set when this peer serves the API
        self.metrics = PeerMetrics()
        self.device = resolve_device(cfg.backend, cfg.device)  # a GPU that is not there fails here
        # bytes per layer depend on the dtype, which on auto depends on the device (bf16 on CUDA)
        self.dtype = cfg.dtype if cfg.dtype != "auto" else default_dtype(cfg.backend, checkpoint, self.device)
        self.layer_bytes = estimate_layer_bytes(checkpoint, cfg.backend, self.dtype, device=self.device)
        self.head_bytes = estimate_layer_bytes(checkpoint, cfg.backend, self.dtype, head=True, device=self.device)
        self.kv_reserve = kv_reserve = checkpoint.config.kv_bytes_per_token(4) * KV_RESERVE_TOKENS
        self.speed: Speed | None = None  # measured on this peer's backend as it starts (`_measure`)

        # the address others reach this peer at: the one given, else the LAN's
        self.view = PlanView(self.node_id, self.name, primary_address() if self._wide() else cfg.host,
                             self.num_layers, cfg.model)
        self.links = Peers(cfg.mesh_key, self.node_id, delay_s=cfg.link_delay_ms / 1000)
        self.prober = LinkProber(self.view, self.links, checkpoint.config.hidden_size, cfg.link_delay_ms / 1000)
        self.tasks = TaskSet()
        # roles that call each other both ways get late-bound callbacks (the other is built below)
        self.stage = Stage(self.view, self.links, self.metrics, deliver=lambda r: self.origin.deliver(r),
                           group_failed=lambda why: self.tp.group_failed(why), lease=cfg.seq_lease,
                           cpus=cfg.cpus)
        self.origin = Origin(self.view, self.stage, self.links, self.tasks)
        self.coordinator = CoordinatorRole(
            self.view, self.links, self.tasks, cfg.model, self.num_layers, kv_reserve, cfg.claim_window_s,
            rejoin=self._rejoin, hidden_size=checkpoint.config.hidden_size, placement=cfg.placement)
        self.tp = TPManager(cfg, checkpoint, self.view, self.stage, self.links, self.tasks,
                            report=lambda: self.membership.report(),
                            rejoin_alone=lambda: self.membership.rejoin_alone())
        self.membership = Membership(cfg, self.view, self.coordinator, self.stage, self.tp, self.links,
                                     self.tasks, info=self.info, make_shard=self._make_shard,
                                     prepare=lambda start, end: self.supply.ensure(start, end))
        self.view.on_ring_change += [self.origin.ring_changed, self.membership.follow_plan]
        self.links.on_broken = self.membership.link_broken
        # what this peer serves to peers that lack weights: its model and its adapters, nothing else
        self.weights = WeightServer({cfg.model: Path(cfg.model_path), **{f"{cfg.model}+{ad.name}": ad.path
                                                                          for ad in self.adapters}},
                                    Faults.parse(cfg.weight_faults) if cfg.weight_faults else None,
                                    sent=self.metrics.weight_bytes_sent)
        # what this peer's copy lacks of the layers it is given, and the adapters others serve, from peers
        self.supply = Supply(cfg, checkpoint, self.view, self.links, self.stage, self.weights, self.adapters,
                             self.metrics.weight_bytes_received, locked=lambda fn: self.membership.locked(fn),
                             report=lambda: self.membership.report(), seeds=seeds)
        # its part in LoRA training jobs (`together lora --mesh`): a trainable slice of its own layers
        self.trainer = Trainer(self.view, self.links, self.stage, checkpoint, cfg.model, cfg.backend, self.device)
        self.servicer = Servicer(cfg.mesh_key, self.num_layers, self.started_at, self.view, self.membership,
                                 self.coordinator, self.stage, self.origin, status=self.status,
                                 prober=self.prober, weights=self.weights, trainer=self.trainer)
        self._server: grpc.aio.Server | None = None
        self._discovery: Discovery | None = None

    def _check_config(self) -> None:
        if not self.cfg.seq_lease > 0:
            raise TogetherError(f"--seq-lease must be a positive number of seconds, got {self.cfg.seq_lease}")
        names = [ad.name for ad in self.adapters]
        if len(set(names)) != len(names):
            raise TogetherError(f"two adapters named {sorted(n for n in names if names.count(n) > 1)[0]!r}; "
                                f"name them apart with --adapter NAME=PATH")
        for ad in self.adapters:
            ad.check_fits(self.num_layers, module_dims(self.ck.config))
        if self.cfg.tp_group:
            if self.cfg.tp_size < 2 or self.adapters:
                raise TogetherError("a tensor-parallel group needs --tp-size of at least 2 and no LoRA adapters")
            from backends.tp import partition

            partition(self.ck.config, self.cfg.tp_size)  # heads that do not split: a clear error at start

    def _wide(self) -> bool:
        """No --host: listen on every interface."""
        return self.cfg.host in ("", "0.0.0.0")

    def _rejoin(self) -> None:
        self.tasks.spawn(self.membership.rejoin())

    def _make_shard(self, start: int, end: int) -> LayerShard:
        cfg = self.cfg
        sh = load_shard(cfg.backend, self.ck, start, end, dtype=self.dtype, wire_dtype=cfg.wire_dtype,
                        device=self.device, threads=cfg.threads)
        for ad in self.adapters:  # only this slice's layers of each adapter are read
            sh.load_adapter(ad)
        # a new slice starts with an empty prefix cache: a block is only valid for the same layers
        sh.enable_prefix_cache(self.prefix_cache_bytes(), cfg.model, cfg.max_memory)
        return sh

    def prefix_cache_bytes(self) -> int:
        """The prefix cache's budget: --prefix-cache-memory, else 1/8 of the memory this peer offers
        (a cache: it yields to live sequences), at most 1 GiB."""
        if self.cfg.prefix_cache_memory is not None:
            return self.cfg.prefix_cache_memory
        # as info() counts the offer, without reading the roles' state (this runs on the compute thread)
        free = self.cfg.max_memory if self.cfg.max_memory is not None else free_memory()
        return min(PREFIX_CACHE_MAX, max(0, free - self.head_bytes) // 8)

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Listen, find the other peers, enter the mesh and load the layers it gives this peer."""
        cfg = self.cfg
        self._server = make_server(cfg.mesh_key)
        pbg.add_TogetherServicer_to_server(self.servicer, self._server)
        bind = "0.0.0.0" if self._wide() else cfg.host
        self.view.port = add_port(self._server, f"{bind}:{cfg.port}", cfg.mesh_key)
        if not self.view.port:
            raise TogetherError(f"cannot listen on {bind}:{cfg.port}; pick another --port (or --host)")
        await self._server.start()
        # pay the backend's one-time imports now, so a standby that takes over a stage loads in a second;
        # a claim sized by speed also waits for this peer's speed, timed while the peers settle
        fits = self.info().free_memory >= self.layer_bytes + self.kv_reserve
        by_speed = fits and not (cfg.layers or cfg.tp_group)
        measuring = self.tasks.spawn(self._measure_first() if by_speed else self.stage.call(self._warm))
        self.view.known[self.node_id] = self.info()
        if cfg.mdns:
            self._discovery = Discovery(self.node_id, cfg.mesh, bind, self.port, self._txt(),
                                        interfaces=cfg.interfaces, on_change=self.membership.on_discovery,
                                        name=self.name, prefer=self.view.host)
            await self._discovery.start()
        for addr in cfg.peers:
            await self.membership.probe_manual(addr)
        await asyncio.sleep(cfg.settle_s)
        self.tasks.spawn(self.membership.heartbeat_loop())  # before loading, or the coordinator thinks we died
        self.tasks.spawn(self.supply.run())
        if by_speed:
            await measuring
        # the claim carries this peer's links (placement weighs them); timed after its own speed, not during
        await self.prober.measure_all()
        self.tasks.spawn(self.prober.run())
        await self.membership.enter_mesh()
        if not by_speed:  # its claim does not depend on its speed: time it once it is in
            self.tasks.spawn(self.stage.call(self._measure))

    def _warm(self) -> None:
        if self.cfg.backend == "torch":
            from backends.torch.model import warm
            warm()
        else:
            backend_module(self.cfg.backend, "shard")

    async def _measure_first(self) -> None:
        """Measure before the claim; a copy from peers first fetches the one layer measured (the
        coordinator's claim window waits for a peer's speed a few seconds at most)."""
        k = measured_layer(self.num_layers)
        if not self.supply.holds(k, k + 1):
            await self.stage.call(self._warm)
            try:
                await self.membership.locked(lambda: self.supply.ensure(k, k + 1))
            except Exception as e:  # measuring must not stop the peer: it joins unmeasured
                log.warning("could not fetch layer %d to measure this peer's speed (%s)", k, e)
                return
        await self.stage.call(self._measure)

    def _measure(self) -> None:
        """This peer's speed per layer on its backend, dtype, device and threads (compute thread)."""
        cfg = self.cfg
        k = measured_layer(self.num_layers)
        if not self.supply.holds(k, k + 1):  # never read a hole: a copy from peers may lack that layer
            log.info("speed not measured: layer %d is not on this disk (its copy came from peers)", k)
            return
        self._warm()
        try:
            self.speed = measure_speed(cfg.backend, self.ck, self.dtype, self.device, cfg.threads)
        except Exception as e:  # loading the real layers will say what is wrong; until then: unmeasured
            log.warning("could not measure this peer's speed (%s); placement counts it at 1 ms per layer", e)

    async def stop(self) -> None:
        """Leave cleanly: release the layers, unregister, close streams."""
        await self.membership.leave()
        self.tasks.cancel_all()
        self.prober.close()
        self.tp.close()
        if self._discovery:
            await self._discovery.stop()
        await self.links.close()
        if self._server:
            await self._server.stop(grace=0.5)
        self.stage.close()

    def info(self) -> pb.PeerInfo:
        """This peer as the others see it."""
        sh, cfg, sp = self.stage.shard, self.cfg, self.speed
        lo, hi = (sh.start, sh.end) if sh else (-1, -1)
        free = cfg.max_memory if cfg.max_memory is not None else free_memory()
        return pb.PeerInfo(
            node_id=self.node_id, name=self.name, address=self.address, backend=cfg.backend,
            free_memory=max(0, free - self.head_bytes), dtype=sh.dtype if sh else self.dtype,
            layer_ms=sp.layer_ms if sp else 0.0, head_ms=sp.head_ms if sp else 0.0,
            prefill_ms=sp.prefill_ms if sp else 0.0,
            weight_format=sh.weight_format if sh else sp.weight_format if sp else "",
            started_at=self.started_at, api=self.api_address, version=VERSION,
            model=cfg.model, start=lo, end=hi, ready=sh is not None,
            layer_bytes=self.layer_bytes,
            tokens_per_s=self.stage_tokens_per_s(), adapters=",".join(ad.name for ad in self.adapters),
            tp_group=self.tp.group_name, tp_size=self.tp.size, tp_address=self.tp.address,
            links=self.prober.link_stats(), weights=self.supply.progress, training=self.trainer.progress,
            # its model's shape: a coordinator of another model keeps this model's ring from these
            num_layers=self.num_layers, hidden_size=self.ck.config.hidden_size, kv_reserve=self.kv_reserve)

    def _txt(self) -> dict[str, str]:
        return {"backend": self.cfg.backend, "free_memory": str(self.info().free_memory),
                "version": VERSION, "model": self.cfg.model, "api": self.api_address,
                "started_at": repr(self.started_at)}

    def status(self) -> pb.StatusReply:
        sh, sched = self.stage.shard, self.scheduler
        return pb.StatusReply(peer=self.info(), plan=self.plan, sequences=sh.num_sequences if sh else 0,
                              cache_bytes=sh.cache_nbytes() if sh else 0,
                              tokens_per_s=self.stage_tokens_per_s(), tasks=len(asyncio.all_tasks()),
                              open_fds=open_fds(), pending_frames=len(self.origin.pending),
                              running=len(sched.running) if sched else 0,
                              waiting=len(sched.waiting) if sched else 0,
                              prefix_cache_bytes=sh.prefix_stats()["bytes"] if sh else 0,
                              prefix_blocks=sh.prefix_stats()["blocks"] if sh else 0)

    # ---------------------------------------------------------------- what the API and the CLI read

    @property
    def port(self) -> int:
        return self.view.port

    @property
    def address(self) -> str:
        return self.view.address

    @property
    def plan(self) -> pb.Plan:
        return self.view.plan

    @property
    def known(self) -> dict[str, pb.PeerInfo]:
        return self.view.known

    @property
    def on_plan(self) -> list[Callable[[pb.Plan], None]]:
        return self.view.on_plan

    @property
    def shard(self) -> LayerShard | None:
        return self.stage.shard

    @property
    def layer_map(self) -> LayerMap | None:
        return self.coordinator.layer_map

    @property
    def claim_reason(self) -> str:
        return self.membership.claim_reason

    @property
    def hop_ms(self) -> list[float]:
        return self.stage.hop_ms

    @property
    def bytes_per_token_hop(self) -> int:
        return self.stage.bytes_per_token_hop

    def stage_tokens_per_s(self) -> float:
        return self.stage.tokens_per_s()

    def new_frame_id(self) -> int:
        return self.origin.new_frame_id()

    async def run_frame(self, frame: pb.Frame, timeout: float = 120.0) -> pb.Result:
        """Send a frame into the ring at stage 0 and wait for its tokens."""
        return await self.origin.run_frame(frame, timeout)

    async def release(self, seq_ids: list[str], keep: Sequence[pb.KeepSeq] = ()) -> int:
        """Free these sequences' caches on every stage (keeping `keep`'s blocks in their prefix caches)."""
        return await self.origin.release(seq_ids, keep)

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

