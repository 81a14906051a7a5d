"""A peer's weights from its peers: the model found on the mesh before the peer can build itself
(`model_from_mesh`: only the headers and small files, enough for its config and tokenizer), then,
whatever range it is given, the tensors of that range its copy lacks (`Supply.ensure`, before the
shard loads from disk as usual), and the adapters other peers serve (`Supply.adopt`), which it loads
for its layers and then serves itself. The transfer itself is mesh/weights.py."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Awaitable, Callable, Sequence

import grpc

from backends.lora import Adapter, module_dims, open_adapter
from backends.manifest import SIDECAR, LocalCopy, tensor_names
from backends.weights import Checkpoint
from mesh.auth import make_channel
from mesh.discovery import Discovery
from mesh.weights import PeerRef, WeightsError, fetch_manifest, fetch_tensors
from protos import together_pb2 as pb
from protos import together_pb2_grpc as pbg

if TYPE_CHECKING:
    from prometheus_client import Counter

    from mesh.links import Peers
    from mesh.node import NodeConfig
    from mesh.stage import Stage
    from mesh.view import PlanView
    from mesh.weights import WeightServer

log = logging.getLogger(__name__)
MANUAL_WAIT_S = 30.0  # a --peer may still be starting (as finding.probe_manual waits)
PEERS_WAIT_S = 10.0  # how long a fetch waits for some peer to be known before it gives up
ADOPT_EVERY_S = 1.0
RETRY_S = 30.0  # an adapter that could not be taken is asked for again after this long


async def model_from_mesh(cfg: NodeConfig, wait_s: float, why: dict[str, str] | None = None
                          ) -> tuple[Path, list[str]] | None:
    """Ask the --peer addresses (each until it answers, 30 s at most, as a claim would) and the peers mDNS
    finds within `wait_s` for `cfg.model`; from those that serve it, fetch the headers and small files
    into this peer's copy (cache_dir()/mesh/LABEL). (The copy's path, the addresses serving it), or None;
    `why` gets each asked address's last answer."""
    if not cfg.peers and not cfg.mdns:
        return None  # nobody to ask
    disc = None
    if cfg.mdns:
        disc = Discovery(f"seek-{uuid.uuid4().hex[:12]}", cfg.mesh, cfg.host or "0.0.0.0", 0,
                         interfaces=cfg.interfaces, advertise=False)
        await disc.start()
    me = f"seek-{uuid.uuid4().hex[:8]}"
    answered: set[str] = set()  # addresses that said they do not serve it
    why = {} if why is None else why
    t0 = time.monotonic()
    try:
        while True:
            seen = list(cfg.peers) + ([p.address for p in disc.peers.values()
                                       if p.properties.get("model") == cfg.model] if disc else [])
            serving = [a for a in dict.fromkeys(seen)
                       if a not in answered and await _serves(cfg, me, a, answered, why)]
            if serving:
                copy = LocalCopy.of(cfg.model)
                got = await fetch_tensors(serving, cfg.mesh_key, me, cfg.model, [], copy)
                log.info("%s: %d bytes of headers and small files from %s", cfg.model, got, serving[0])
                return copy.path, serving
            waited = time.monotonic() - t0
            if waited >= wait_s and (waited >= MANUAL_WAIT_S or all(a in answered for a in cfg.peers)):
                return None
            await asyncio.sleep(0.3)
    finally:
        if disc is not None:
            await disc.stop()


async def _serves(cfg: NodeConfig, me: str, addr: str, answered: set[str], why: dict[str, str]) -> bool:
    """Whether the peer at `addr` serves cfg.model; one that answers no joins `answered`, and `why`."""
    ch = make_channel(addr, cfg.mesh_key, me)
    try:
        await pbg.TogetherStub(ch).Manifest(pb.ManifestRequest(what=cfg.model), timeout=10)
        return True
    except grpc.aio.AioRpcError as e:
        why[addr] = e.details() or e.code().name
        starting = e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        if not starting or "mesh key" in why[addr]:  # (make_channel explains a failed handshake so)
            answered.add(addr)
            log.info("%s does not serve %s: %s", addr, cfg.model, e.details() or e.code().name)
        return False
    finally:
        await ch.close(grace=None)


def local_copy(model_path: str) -> LocalCopy | None:
    """The peer's model as a copy received from peers (possibly partial), or None for a model on disk."""
    p = Path(model_path)
    return LocalCopy(p) if p.is_dir() and (p / SIDECAR).is_file() else None


class Supply:
    """What a peer's copy lacks, fetched from its peers; progress for its PeerInfo (`progress`)."""

    def __init__(self, cfg: NodeConfig, ck: Checkpoint, view: PlanView, links: Peers, stage: Stage,
                 weights: WeightServer, adapters: list[Adapter], received: Counter,
                 locked: Callable[[Callable[[], Awaitable[None]]], Awaitable[None]],
                 report: Callable[[], Awaitable[object]], seeds: Sequence[str] = ()) -> None:
        # adapters: the peer's list (adopted ones are appended); locked(fn): run fn under the load lock;
        # report: tell the coordinator (after an adoption)
        self.cfg, self.ck, self.view, self.links, self.stage = cfg, ck, view, links, stage
        self.weights, self.adapters, self.received = weights, adapters, received
        self._locked, self._report = locked, report
        self.copy = local_copy(cfg.model_path)
        self.seeds = list(seeds)
        self.progress = ""  # e.g. "fetching 41% of 27.5 MB from alpha"; "" when idle
        self.bytes_received = 0
        self.say: Callable[[str], None] = lambda s: log.info("%s", s)  # join prints to stderr
        self._adopted: dict[str, LocalCopy] = {}  # adapter name -> its copy
        self._failed: dict[str, float] = {}  # adapter -> when it last could not be adopted (asked again later)

    @property
    def num_layers(self) -> int:
        return self.ck.config.num_hidden_layers

    def holds(self, start: int, end: int) -> bool:
        """The model's tensors of [start, end) are on disk here (always, for a model not from peers)."""
        c = self.copy
        return c is None or (c.manifest is not None
                             and c.complete(tensor_names(c.manifest, start, end, self.num_layers)))

    def _peers(self, start: int, end: int, has: Callable[[object], bool] | None = None) -> list[PeerRef]:
        """Whom to ask: the plan's peers holding [start, end) first, then the others, then the seeds."""
        plan, me = self.view.plan, self.view.node_id
        # the plan's peers are alive as far as the coordinator knows; before a plan, those probed
        pool = [p for p in plan.peers if p.node_id != me] or list(self.view.known.values())
        infos = {p.node_id: p for p in pool
                 if p.node_id != me and p.model == self.cfg.model and (has is None or has(p))}
        ranges = {s.node_id: (s.start, s.end) for s in plan.stages}

        def overlap(nid: str) -> int:
            lo, hi = ranges.get(nid, (0, 0))
            return max(0, min(hi, end) - max(lo, start))

        ordered = sorted(infos.values(), key=lambda p: (-overlap(p.node_id), p.started_at))
        out: list[PeerRef] = list(ordered)
        addrs = {p.address for p in ordered}
        out += [a for a in self.seeds if a not in addrs]
        return out

    async def _fetch(self, what: str, names: list[str], copy: LocalCopy, peers: list[PeerRef]) -> int:
        last = [0.0]

        def progress(done: int, total: int, name: str) -> None:
            self.progress = f"fetching {100 * done // max(1, total)}% of {total / 1e6:.1f} MB from {name}"
            if time.monotonic() - last[0] >= 1.0 or done >= total:
                last[0] = time.monotonic()
                self.say(f"{self.view.name}: {what}: {self.progress}")

        try:
            got = await fetch_tensors(peers, self.cfg.mesh_key, self.view.node_id, what, names, copy,
                                      progress=progress, received=self.received, stub=self.links.stub)
        finally:
            self.progress = ""
        self.bytes_received += got
        if got:
            self.say(f"{self.view.name}: {what}: received {got / 1e6:.1f} MB from peers")
        self.weights.add(what, copy.path)  # serve what it now holds (its verified spans only)
        return got

    async def _some_peers(self, start: int, end: int) -> list[PeerRef]:
        deadline = time.monotonic() + PEERS_WAIT_S
        while not (peers := self._peers(start, end)):  # a restart with a partial copy: peers not known yet
            if time.monotonic() > deadline:
                raise WeightsError(f"layers [{start}, {end}) of {self.cfg.model} are not on this disk and no "
                                   f"peer is known to ask; pass --peer HOST:PORT of a peer that has the model")
            await asyncio.sleep(0.3)
        return peers

    async def ensure(self, start: int, end: int) -> None:
        """Fetch what this peer's copies (the model's, the adopted adapters') lack of [start, end)."""
        c = self.copy
        if c is not None and c.manifest is not None:
            names = c.missing(tensor_names(c.manifest, start, end, self.num_layers))
            if names or c.headers_missing():  # what `holds` checks, without listing the slice twice
                await self._fetch(self.cfg.model, names, c, await self._some_peers(start, end))
        for name, ac in list(self._adopted.items()):
            if ac.manifest is None:
                continue
            names = ac.missing(tensor_names(ac.manifest, start, end, self.num_layers))
            try:
                if names or ac.headers_missing():
                    await self._fetch(self._what(name), names, ac, self._peers(start, end, self._serves(name)))
            except WeightsError as e:  # the layers load without it (it leaves `adapters`) rather than not at all
                log.warning("%s drops adapter %r: %s", self.view.name, name, e)
                del self._adopted[name]
                self.adapters[:] = [ad for ad in self.adapters if ad.name != name]
                self._failed[name] = time.monotonic()

    def _what(self, adapter: str) -> str:
        return f"{self.cfg.model}+{adapter}"

    @staticmethod
    def _serves(adapter: str) -> Callable[[object], bool]:
        return lambda p: adapter in getattr(p, "adapters", "").split(",")

    # ---------------------------------------------------------------- adapters others serve

    def wanted(self) -> list[str]:
        """Adapters some peer of the plan serves that this one has not (nor failed to adopt lately)."""
        now = time.monotonic()
        have = {ad.name for ad in self.adapters} | {n for n, t in self._failed.items() if now - t < RETRY_S}
        names = {n for p in self.view.plan.peers if p.node_id != self.view.node_id and p.model == self.cfg.model
                 for n in p.adapters.split(",") if n}
        return sorted(names - have)

    async def run(self) -> None:
        """Adopt the adapters others serve, as they appear (background, every ADOPT_EVERY_S)."""
        while True:
            for name in self.wanted():
                try:
                    await self._locked(functools.partial(self.adopt, name))
                except Exception as e:  # one adapter that cannot be had must not stop the others
                    self._failed[name] = time.monotonic()
                    log.warning("%s could not take adapter %r from its peers: %s", self.view.name, name, e)
            await asyncio.sleep(ADOPT_EVERY_S)

    async def adopt(self, name: str) -> None:
        """Fetch adapter `name` (its config, and its tensors of this peer's layers), load it into the
        shard and serve it. Runs under the load lock: the range cannot change meanwhile."""
        if any(ad.name == name for ad in self.adapters):
            return
        what, sh = self._what(name), self.stage.shard
        lo, hi = (sh.start, sh.end) if sh else (0, 0)
        peers = self._peers(lo, hi, self._serves(name))
        copy = LocalCopy.of(what)  # a copy of another adapter under this name is discarded by begin
        copy.begin(await fetch_manifest(peers, self.cfg.mesh_key, self.view.node_id, what, stub=self.links.stub))
        assert copy.manifest is not None
        names = tensor_names(copy.manifest, lo, hi, self.num_layers) if sh else []
        await self._fetch(what, copy.missing(names), copy, peers)
        ad = open_adapter(f"{name}={copy.path}")
        ad.check_fits(self.num_layers, module_dims(self.ck.config))
        if sh is not None:
            await self.stage.call(lambda: sh.load_adapter(ad))
        self._adopted[name] = copy
        self.adapters.append(ad)
        self.say(f"{self.view.name}: serving adapter {name!r} from its peers")
        await self._report()
