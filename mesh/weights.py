"""Weights from peers: a peer serves the files of its model and adapters (`WeightServer`, behind the
Manifest and FetchWeights RPCs), and a peer that lacks tensors gets exactly those from the others
(`fetch_tensors`) into its `LocalCopy`: in ~1 MiB chunks, each tensor checked against the owner's
SHA-256, resumed from the bytes already written after a cut link, another peer tried on failure.

`what` names a model label (as `together join --model` labels it) or "label+ADAPTER".

A peer without its slice (mesh/supply.py): `copy.begin(await fetch_manifest(...))`, `fetch_tensors` of
`tensor_names(copy.manifest, start, end, n)`, then `open_checkpoint(copy.path)`."""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Sequence

import grpc
from prometheus_client import Counter

from backends.errors import TogetherError
from backends.manifest import SIDECAR, FileEntry, LocalCopy, Manifest, Span, build_manifest
from mesh.auth import make_channel
from protos import together_pb2 as pb
from protos import together_pb2_grpc as pbg

if TYPE_CHECKING:
    Context = grpc.aio.ServicerContext[Any, Any]

log = logging.getLogger(__name__)
CHUNK = 1 << 20
TRIES = 3  # per span: hash mismatches, and per peer: broken streams, before giving up on it
PARALLEL = 4  # runs of tensors fetched at once
Progress = Callable[[int, int, str], None]  # (bytes done, bytes in all, peer name)
PeerRef = str | pb.PeerInfo  # an address "host:port", or a peer as the plan lists it


class WeightsError(TogetherError):
    """Weights could not be had from any peer."""


@dataclass
class Faults:
    """Test-only faults of a server: flip a byte of its `corrupt`-th chunk (1-based, once) and break its
    stream once `cut` bytes have gone out (once). Built from text "corrupt=N,cut=BYTES"."""

    corrupt: int = 0
    cut: int = 0
    _chunks: int = 0
    _sent: int = 0

    @classmethod
    def parse(cls, text: str) -> "Faults":
        f = cls()
        for part in filter(None, text.split(",")):
            k, _, v = part.partition("=")
            if k not in ("corrupt", "cut"):
                raise TogetherError(f"weight faults: unknown {k!r} (corrupt=N,cut=BYTES)")
            setattr(f, k, int(v))
        return f


# ---------------------------------------------------------------- the manifest on the wire


def manifest_to_pb(m: Manifest, names: Sequence[str] = ()) -> pb.ManifestReply:
    """The manifest (with `names`: its files and only those tensors, hashed); hashes are sent for every
    tensor that has one."""
    tensors = [m.tensors[n] for n in dict.fromkeys(names) if n in m.tensors] if names else m.tensors.values()
    return pb.ManifestReply(
        what=m.what, kind=m.kind, num_layers=m.num_layers, tied_head=m.tied_head,
        files=[pb.WeightFile(path=f.path, size=f.size, header=f.header, header_sha256=f.header_sha256)
               for f in m.files],
        tensors=[pb.WeightTensor(name=t.name, file=t.file, offset=t.offset, length=t.length, sha256=t.sha256,
                                 hf_name=t.hf_name) for t in tensors])


def manifest_from_pb(r: pb.ManifestReply) -> Manifest:
    files = [FileEntry(f.path, f.size, f.header, f.header_sha256) for f in r.files]
    for f in files:  # a flat directory: nothing the receiver writes may leave it
        if not f.path or "/" in f.path or "\\" in f.path or f.path.startswith(".") or f.header > f.size:
            raise WeightsError(f"{r.what}: a manifest with a bad file entry {f.path!r}")
    sizes = {f.path: f.size for f in files}
    tensors = {t.name: Span(t.name, t.file, t.offset, t.length, t.sha256, t.hf_name) for t in r.tensors}
    for t in tensors.values():
        if t.file not in sizes or t.end > sizes[t.file]:
            raise WeightsError(f"{r.what}: a manifest whose tensor {t.name!r} lies outside its files")
    return Manifest(r.what, r.kind, r.num_layers, r.tied_head, files, tensors)


# ---------------------------------------------------------------- serving


class WeightServer:
    """What this peer serves: its model (label -> the --model path) and adapters ("label+NAME" -> the
    --adapter dir). Files are found through the owner's manifest by (what, relative file), never by a
    path from a request. A path that is a LocalCopy (it has the sidecar) serves its verified spans only."""

    def __init__(self, sources: dict[str, Path], faults: Faults | None = None,
                 sent: Counter | None = None) -> None:
        self._sources = dict(sources)
        self._manifests: dict[str, Manifest] = {}
        self._copies: dict[str, LocalCopy] = {}
        self._seen: dict[str, int] = {}  # sidecar mtimes of the copies read
        self.faults, self._sent = faults, sent
        self.bytes_sent = 0
        self._lock = asyncio.Lock()

    def add(self, what: str, path: Path) -> None:
        """Serve `what` from `path` too (e.g. a copy this peer just fetched)."""
        self._sources[what] = path
        self._manifests.pop(what, None)
        self._copies.pop(what, None)

    async def manifest(self, what: str, names: Sequence[str] = ()) -> Manifest:
        if not names:  # chunks keep flowing while another request's tensors are hashed
            return await asyncio.to_thread(self._manifest, what, names)
        async with self._lock:  # one hashing at a time
            return await asyncio.to_thread(self._manifest, what, names)

    def _manifest(self, what: str, names: Sequence[str]) -> Manifest:
        path = self._sources.get(what)
        if path is None:
            raise KeyError(what)
        sidecar = path / SIDECAR
        if path.is_dir() and sidecar.is_file():
            # a copy this peer fills as it serves: read its sidecar again when it changed
            seen = sidecar.stat().st_mtime_ns
            copy = self._copies.get(what)
            if copy is None or self._seen.get(what) != seen:
                copy = self._copies[what] = LocalCopy(path)
                self._seen[what] = seen
            if copy.manifest is None:
                raise KeyError(what)
            m = Manifest.from_dict(copy.manifest.to_dict())
            m.root = path
            return m
        m = self._manifests.get(what) or build_manifest(path, what)
        self._manifests[what] = m
        if names:
            m.hash(names)
        return m

    async def Manifest(self, request: pb.ManifestRequest, context: Context) -> pb.ManifestReply:
        try:
            names = list(request.names)[:100_000]
            m = await self.manifest(request.what, names)
        except KeyError:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"this peer does not serve {request.what!r}")
        except TogetherError as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        return manifest_to_pb(m, names)

    async def FetchWeights(self, request: pb.FetchRequest, context: Context) -> AsyncIterator[pb.WeightChunk]:
        try:
            m = await self.manifest(request.what)
        except (KeyError, TogetherError):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"this peer does not serve {request.what!r}")
        f = m.file(request.file)
        if f is None or m.root is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"{request.file!r} is not a file of {request.what!r}")
        assert f is not None and m.root is not None
        off, n = request.offset, request.length
        if n == 0 or off + n > f.size:
            await context.abort(grpc.StatusCode.OUT_OF_RANGE, f"bytes {off}+{n} lie past the end of {f.path} "
                                                              f"({f.size} bytes)")
        copy = self._copies.get(request.what)
        if copy is not None and not copy.covered(f.path, off, n):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"this peer holds only part of {request.what!r}, "
                                                           f"not bytes {off}+{n} of {f.path}")
        fd = os.open(m.root / f.path, os.O_RDONLY)
        try:
            end = off + n
            while off < end:
                data = await asyncio.to_thread(os.pread, fd, min(CHUNK, end - off), off)
                if not data:
                    break
                data = self._fault(data)
                if data is _CUT:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "test fault: the link was cut")
                yield pb.WeightChunk(offset=off, data=data)
                off += len(data)
                self.bytes_sent += len(data)
                if self._sent is not None:
                    self._sent.inc(len(data))
        finally:
            os.close(fd)

    def _fault(self, data: bytes) -> bytes:
        f = self.faults
        if f is None:
            return data
        f._chunks += 1
        f._sent += len(data)
        if f.corrupt and f._chunks == f.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        if f.cut and f._sent >= f.cut:
            f.cut = 0
            return _CUT
        return data


_CUT = b"cut"  # (by identity) what _fault returns for a cut link


# ---------------------------------------------------------------- fetching


def _addr(p: PeerRef) -> tuple[str, str]:
    return (p, p) if isinstance(p, str) else (p.address, p.name or p.address)


class _Stubs:
    """Stubs by address: the caller's (e.g. `links.Peers.stub`, whose channels it keeps), else channels
    of our own, closed at the end."""

    def __init__(self, mesh_key: str | None, node_id: str, stub: Callable[[str], pbg.TogetherStub] | None) -> None:
        self.mesh_key, self.node_id, self._stub = mesh_key, node_id, stub
        self.channels: dict[str, grpc.aio.Channel] = {}

    def __call__(self, addr: str) -> pbg.TogetherStub:
        if self._stub is not None:
            return self._stub(addr)
        ch = self.channels.get(addr)
        if ch is None:
            ch = self.channels[addr] = make_channel(addr, self.mesh_key, self.node_id)
        return pbg.TogetherStub(ch)

    async def close(self) -> None:
        for ch in self.channels.values():
            await ch.close(grace=None)
        self.channels.clear()


async def fetch_manifest(peers: Sequence[PeerRef], mesh_key: str | None, node_id: str, what: str,
                         names: Sequence[str] = (), stub: Callable[[str], pbg.TogetherStub] | None = None
                         ) -> Manifest:
    """The manifest of `what` from the first of `peers` that serves it (with the hashes of `names`).
    `stub(address)` gives the stub to call (default: a channel of its own per peer, closed after)."""
    errors = []
    stubs = _Stubs(mesh_key, node_id, stub)
    try:
        for p in peers:
            addr, name = _addr(p)
            try:
                return await _ask_manifest(stubs, addr, what, names)
            except grpc.aio.AioRpcError as e:
                errors.append(f"{name}: {e.details() or e.code().name}")
    finally:
        await stubs.close()
    raise WeightsError(f"no peer serves {what!r}" + (f" ({'; '.join(errors)})" if errors else " (no peers)"))


class _BadStream(Exception):
    """A stream that ended early or sent bytes out of place: counted as a broken stream."""


async def _ask_manifest(stubs: _Stubs, addr: str, what: str, names: Sequence[str]) -> Manifest:
    # the owner hashes the tensors named first (a run's: at most ~64 MiB, cached after)
    reply = await stubs(addr).Manifest(pb.ManifestRequest(what=what, names=list(names)), timeout=600)
    return manifest_from_pb(reply)


def _runs(spans: list[Span]) -> list[list[Span]]:
    """Spans of one file that touch each other, as runs fetched by one request (at most ~64 MiB)."""
    out: list[list[Span]] = []
    for s in sorted(spans, key=lambda s: (s.file, s.offset)):
        last = out[-1][-1] if out else None
        if last and last.file == s.file and last.end == s.offset and s.end - out[-1][0].offset <= 64 * CHUNK:
            out[-1].append(s)
        else:
            out.append([s])
    return out


class _Fetch:
    """One fetch_tensors call: its peers, its copy, its counters."""

    def __init__(self, peers: Sequence[PeerRef], stubs: _Stubs, what: str, dest: LocalCopy,
                 progress: Progress | None, received: Counter | None) -> None:
        self.peers = [_addr(p) for p in peers]
        self.stubs, self.what, self.dest = stubs, what, dest
        self.progress, self.received = progress, received
        self.done = self.total = self.bytes = 0  # progress (less what failed its check); bytes received
        self.bad: dict[str, int] = {}
        self.other: set[str] = set()  # peers that serve other files under this name

    async def hashes(self, run: list[Span]) -> None:
        """The owner's SHA-256 of every span of the run, from the first peer that knows it."""
        for addr, name in self.peers:
            todo = [s.name for s in run if not s.sha256]
            if not todo:
                return
            if addr in self.other:
                continue
            try:
                m = await _ask_manifest(self.stubs, addr, self.what, todo)
            except (grpc.aio.AioRpcError, WeightsError):
                continue  # it does not serve this (or is gone): ask the next
            if not self.dest.learn(m):
                log.warning("weights: %s serves other files as %r; not asking it", name, self.what)
                self.other.add(addr)
        missing = next((s.name for s in run if not s.sha256), None)
        if missing is not None:
            raise WeightsError(f"no peer holds {missing} of {self.what!r} (asked "
                               f"{', '.join(n for _, n in self.peers)}); start a peer that has the whole model")

    async def run(self, run: list[Span]) -> None:
        await self.hashes(run)
        order = [p for p in self.peers if p[0] not in self.other]
        broken: dict[str, int] = {}
        why = ""
        while todo := [s for s in run if s.name not in self.dest.verified]:
            if not order:
                raise WeightsError(f"no peer could send {todo[0].name} of {self.what!r} ({why})")
            addr, name = order[0]
            try:
                await self._stream(addr, name, todo)
            except (grpc.aio.AioRpcError, _BadStream) as e:
                code = e.code() if isinstance(e, grpc.aio.AioRpcError) else grpc.StatusCode.DATA_LOSS
                why = f"{name}: {e.details() if isinstance(e, grpc.aio.AioRpcError) else e}"
                if code == grpc.StatusCode.NOT_FOUND and len(todo) > 1:
                    # a partial copy may hold some of the run: ask for its spans one by one
                    for one in todo:
                        await self.run([one])
                    return
                if code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT,
                                grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.UNAUTHENTICATED):
                    order.pop(0)
                    continue
                broken[addr] = broken.get(addr, 0) + 1
                log.info("weights: a stream from %s broke (%s); resuming", name, why)
                if broken[addr] >= TRIES:
                    order.pop(0)
                continue
            finally:
                self.dest.save()
            for s in todo:
                if self.dest.written.get(s.name, 0) < s.length:
                    continue
                if not self.dest.record(s.name, await asyncio.to_thread(self.dest.matches, s.name)):
                    self.bad[s.name] = self.bad.get(s.name, 0) + 1
                    self.done -= s.length
                    log.warning("weights: %s from %s failed its SHA-256 check; fetching it again", s.name, name)
                    if self.bad[s.name] >= TRIES:
                        raise WeightsError(f"{s.name} of {self.what!r} from {name} failed its SHA-256 check "
                                           f"{TRIES} times; the peers' copies differ from the owner's")
                    order.append(order.pop(0))  # another peer next, if there is one
            self.dest.save()

    async def _stream(self, addr: str, name: str, todo: list[Span]) -> None:
        # from the first byte not yet written (the spans before it are whole: verified after the stream)
        first = next((s for s in todo if self.dest.written.get(s.name, 0) < s.length), None)
        if first is None:
            return
        pos = first.offset + self.dest.written.get(first.name, 0)
        end = todo[-1].end
        req = pb.FetchRequest(what=self.what, file=first.file, offset=pos, length=end - pos)
        call = self.stubs(addr).FetchWeights(req, timeout=600)
        async for chunk in call:
            n = len(chunk.data)
            if chunk.offset != pos or pos + n > end:
                raise _BadStream(f"sent bytes {chunk.offset}+{n} of {first.file}, expected {pos}")
            await asyncio.to_thread(self.dest.write, first.file, pos, chunk.data)
            pos += n
            for s in todo:
                self.dest.written[s.name] = max(0, min(s.length, pos - s.offset))
            self.done += n
            self.bytes += n
            if self.received is not None:
                self.received.inc(n)
            if self.progress is not None:
                self.progress(self.done, self.total, name)
        if pos < end:
            raise _BadStream(f"ended at byte {pos} of {first.file}, before {end}")



async def fetch_tensors(peers: Sequence[PeerRef], mesh_key: str | None, node_id: str, what: str,
                        names: Sequence[str], dest: LocalCopy, progress: Progress | None = None,
                        received: Counter | None = None,
                        stub: Callable[[str], pbg.TogetherStub] | None = None) -> int:
    """Get the tensors `names` (stored names, see `backends.manifest.tensor_names`) of `what` into
    `dest` from any of `peers`, plus every file's header and small files, checked against the owner's
    SHA-256s. Returns the bytes received (counted on `received` too). Raises WeightsError naming the
    peer and the tensor when no peer could send one. `stub` as for fetch_manifest."""
    if dest.manifest is None:
        dest.begin(await fetch_manifest(peers, mesh_key, node_id, what, stub=stub))
    m = dest.manifest
    assert m is not None
    unknown = [n for n in names if n not in m.tensors]
    if unknown:
        raise WeightsError(f"{what!r} has no tensor {unknown[0]!r}")
    spans = [m.span(n) for n in [*dest.headers_missing(), *dest.missing(dict.fromkeys(names))]]
    stubs = _Stubs(mesh_key, node_id, stub)
    job = _Fetch(peers, stubs, what, dest, progress, received)
    job.total = sum(s.length - dest.written.get(s.name, 0) for s in spans)
    gate = asyncio.Semaphore(PARALLEL)

    async def one(run: list[Span]) -> None:
        async with gate:
            await job.run(run)

    tasks = [asyncio.ensure_future(one(r)) for r in _runs(spans)]
    try:
        await asyncio.gather(*tasks)
    finally:  # one run failed (or we were cancelled): stop the others before the channels close
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        dest.save()
        await stubs.close()
    return job.bytes
