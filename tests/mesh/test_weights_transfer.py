"""Weights from peers over real gRPC servers in process: exactly a slice's bytes arrive, are checked
against the owner's hashes, resume after a cut, come from the next peer when one lacks them, and a
peer serves nothing outside its model and adapter files."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import AsyncIterator

import grpc
import numpy as np
import pytest

from backends.lora import open_adapter
from backends.manifest import LocalCopy, build_manifest, tensor_names
from backends.weights import open_checkpoint
from mesh.auth import add_port, make_channel, make_server
from mesh import weights
from mesh.weights import Faults, WeightsError, WeightServer, fetch_manifest, fetch_tensors
from protos import together_pb2 as pb
from protos import together_pb2_grpc as pbg
from tests.backends.test_manifest import same_tensor, tiny_adapter, tiny_hf, tiny_mlx
from tests.helpers import fresh_cache

LABEL = "smollm2-135m"


class WeightsOnly(pbg.TogetherServicer):
    """A peer's weight entry points alone (the Servicer's two delegate exactly so)."""

    def __init__(self, server: WeightServer) -> None:
        self.server = server

    async def Manifest(self, request, context):  # type: ignore[no-untyped-def]
        return await self.server.Manifest(request, context)

    async def FetchWeights(self, request, context):  # type: ignore[no-untyped-def]
        async for c in self.server.FetchWeights(request, context):
            yield c


@contextlib.asynccontextmanager
async def serving(*servers: WeightServer, key: str | None = None) -> AsyncIterator[list[str]]:
    started = []
    try:
        for ws in servers:
            srv = make_server(key)
            pbg.add_TogetherServicer_to_server(WeightsOnly(ws), srv)
            port = add_port(srv, "127.0.0.1:0", key)
            await srv.start()
            started.append((srv, f"127.0.0.1:{port}"))
        yield [a for _, a in started]
    finally:
        for srv, _ in started:
            await srv.stop(None)


def run(coro):  # tests stay sync: no pytest-asyncio in this project
    return asyncio.run(coro)


@pytest.fixture
def cache(tmp_path, monkeypatch, embedded_path):
    return fresh_cache(tmp_path, monkeypatch)


def slice_bytes(m, names) -> int:
    return sum(m.tensors[n].length for n in names) + sum(f.header for f in m.files)


def same_bytes(m, names, src: Path, copy: LocalCopy) -> None:
    """The copy holds the original's bytes of these tensors (opening a copied GGUF parses its header
    again, seconds: the reader test does that once)."""
    a, b = src.read_bytes(), (copy.path / src.name).read_bytes()
    for n in names:
        t = m.tensors[n]
        assert a[t.offset:t.end] == b[t.offset:t.end], n
    assert copy.complete(names)


def test_a_gguf_slice_arrives_exactly_and_reads_like_the_original(cache, embedded_path, embedded):
    owner = WeightServer({LABEL: embedded_path})
    m = build_manifest(embedded_path, LABEL)
    names = tensor_names(m, 10, 20, 30)
    seen: list[tuple[int, int, str]] = []

    async def main() -> int:
        async with serving(owner) as (addr,):
            return await fetch_tensors([pb.PeerInfo(address=addr, name="alpha")], None, "me", LABEL, names,
                                       LocalCopy.of(LABEL), progress=lambda d, t, p: seen.append((d, t, p)))

    got = run(main())
    assert got == slice_bytes(m, names) == owner.bytes_sent  # the slice's tensors and the header, no more
    assert seen[-1] == (got, got, "alpha") and len(seen) > 2
    copy = LocalCopy.of(LABEL)
    assert copy.complete(names) and copy.missing(tensor_names(m, 0, 10, 30))
    ck = open_checkpoint(copy.path)
    for n in embedded.slice_names(10, 20):
        same_tensor(embedded.get(n), ck.get(n))
    # a second fetch of what is there moves nothing
    assert run(_fetch_again(owner, names)) == 0


async def _fetch_again(owner: WeightServer, names: list[str]) -> int:
    async with serving(owner) as (addr,):
        return await fetch_tensors([addr], None, "me", LABEL, names, LocalCopy.of(LABEL))


@pytest.mark.parametrize("kind", ["hf", "mlx"])
def test_a_safetensors_slice_arrives_with_its_small_files(cache, tmp_path, kind):
    src = tiny_hf(tmp_path / "m") if kind == "hf" else tiny_mlx(tmp_path / "m")
    m = build_manifest(src, "tiny")
    names = tensor_names(m, 2, 3, 3)

    async def main() -> int:
        async with serving(WeightServer({"tiny": src})) as (addr,):
            return await fetch_tensors([addr], None, "me", "tiny", names, LocalCopy.of("tiny"))

    assert run(main()) == slice_bytes(m, names)
    ref, got = open_checkpoint(src), open_checkpoint(LocalCopy.of("tiny").path)
    assert got.config == ref.config and got.kind == kind
    if kind == "hf":  # the tokenizer's files travel whole
        assert (got.path / "tokenizer_config.json").read_bytes() == (src / "tokenizer_config.json").read_bytes()
    for n in ref.slice_names(2, 3):
        same_tensor(ref.get(n), got.get(n))


def test_a_corrupt_chunk_is_fetched_again(cache, embedded_path, embedded, monkeypatch):
    monkeypatch.setattr(weights, "CHUNK", 1 << 16)
    owner = WeightServer({LABEL: embedded_path}, Faults(corrupt=40))
    m = build_manifest(embedded_path, LABEL)
    names = tensor_names(m, 3, 4, 30)

    async def main() -> int:
        async with serving(owner) as (addr,):
            return await fetch_tensors([addr], None, "me", LABEL, names, LocalCopy.of(LABEL))

    got = run(main())
    assert got > slice_bytes(m, names)  # one span came twice
    same_bytes(m, names, embedded_path, LocalCopy.of(LABEL))


def test_a_cut_stream_resumes_where_it_stopped(cache, embedded_path, embedded, monkeypatch):
    monkeypatch.setattr(weights, "CHUNK", 1 << 16)  # a layer's tensor in several chunks
    m = build_manifest(embedded_path, LABEL)
    (name,) = [n for n in m.tensors if m.tensors[n].hf_name == "model.layers.5.mlp.down_proj.weight"]
    size, header = m.tensors[name].length, m.files[0].header
    assert size > 4 << 16
    owner = WeightServer({LABEL: embedded_path}, Faults(cut=header + size // 2))

    async def main() -> int:
        async with serving(owner) as (addr,):
            return await fetch_tensors([addr], None, "me", LABEL, [name], LocalCopy.of(LABEL))

    got = run(main())
    assert size + header <= got < 1.5 * size + header  # resumed, not started over
    same_bytes(m, [name], embedded_path, LocalCopy.of(LABEL))


def test_a_peer_without_the_tensor_sends_to_the_next(cache, tmp_path, monkeypatch):
    src = tiny_hf(tmp_path / "m")
    m = build_manifest(src, "tiny")
    part = tmp_path / "partial-cache"
    # a partial copy (layer 0 only) in another peer's cache, served by that peer
    monkeypatch.setenv("TOGETHER_CACHE", str(part))

    async def seed() -> None:
        async with serving(WeightServer({"tiny": src})) as (addr,):
            await fetch_tensors([addr], None, "b", "tiny", tensor_names(m, 0, 1, 3), LocalCopy.of("tiny"))

    run(seed())
    partial_dir = LocalCopy.of("tiny").path
    monkeypatch.setenv("TOGETHER_CACHE", str(cache))
    partial, owner = WeightServer({"tiny": partial_dir}), WeightServer({"tiny": src})
    want = tensor_names(m, 0, 2, 3)

    async def main() -> int:
        async with serving(partial, owner) as addrs:
            return await fetch_tensors(addrs, None, "me", "tiny", want, LocalCopy.of("tiny"))

    assert run(main()) == slice_bytes(m, want)
    layer0 = sum(m.tensors[n].length for n in tensor_names(m, 0, 1, 3))
    headers = sum(f.header for f in m.files)
    assert partial.bytes_sent == layer0 + headers  # what it holds, verified
    assert owner.bytes_sent == slice_bytes(m, want) - layer0 - headers
    ref, got = open_checkpoint(src), open_checkpoint(LocalCopy.of("tiny").path)
    for n in ref.slice_names(0, 2):
        same_tensor(ref.get(n), got.get(n))

    # nobody holds layer 2: a clear error naming it
    async def lacking() -> int:
        async with serving(WeightServer({"tiny": partial_dir})) as addrs:
            return await fetch_tensors(addrs, None, "me", "tiny", tensor_names(m, 2, 3, 3), LocalCopy.of("tiny"))

    with pytest.raises(WeightsError, match=r"no peer holds (model\.layers\.2\.|lm_head)"):
        run(lacking())


def test_an_adapter_arrives_by_its_layers(cache, tmp_path):
    src = tiny_adapter(tmp_path / "ad")
    m = build_manifest(src, "tiny+ad")
    names = tensor_names(m, 0, 2, 3)

    async def main() -> int:
        async with serving(WeightServer({"tiny": tmp_path, "tiny+ad": src})) as (addr,):
            return await fetch_tensors([addr], None, "me", "tiny+ad", names, LocalCopy.of("tiny+ad"))

    assert run(main()) == slice_bytes(m, names)
    a, b = open_adapter(str(src)), open_adapter(str(LocalCopy.of("tiny+ad").path))
    for layer, mods in a.weights(0, 2).items():
        for mod, (x, y) in mods.items():
            assert np.array_equal(x, b.weights(0, 2)[layer][mod][0]) and np.array_equal(y, b.weights(0, 2)[layer][mod][1])


async def _fetch_raw(addr: str, req: pb.FetchRequest, key: str | None = None) -> grpc.StatusCode:
    async with make_channel(addr, key, "me") as ch:
        try:
            async for _ in pbg.TogetherStub(ch).FetchWeights(req, timeout=10):
                pass
        except grpc.aio.AioRpcError as e:
            return e.code()
    return grpc.StatusCode.OK


def test_nothing_outside_the_served_files(cache, tmp_path, embedded_path):
    src = tiny_hf(tmp_path / "m")
    (src / "notes.txt").write_text("private")
    size = (src / "model.safetensors").stat().st_size

    async def main() -> list[grpc.StatusCode]:
        async with serving(WeightServer({"tiny": src})) as (addr,):
            reqs = [pb.FetchRequest(what="tiny", file=f, offset=0, length=4)
                    for f in ("../m/config.json", "/etc/passwd", "notes.txt", str(src / "config.json"), "")]
            reqs += [pb.FetchRequest(what="tiny", file="model.safetensors", offset=size - 2, length=4),
                     pb.FetchRequest(what=str(embedded_path), file=embedded_path.name, offset=0, length=4),
                     pb.FetchRequest(what="tiny", file="config.json", offset=0, length=4)]
            return [await _fetch_raw(addr, r) for r in reqs]

    *refused, ok = run(main())
    assert refused == [grpc.StatusCode.INVALID_ARGUMENT] * 5 + [grpc.StatusCode.OUT_OF_RANGE,
                                                                 grpc.StatusCode.NOT_FOUND]
    assert ok == grpc.StatusCode.OK


def test_a_wrong_mesh_key_gets_nothing(cache, embedded_path):
    owner = WeightServer({LABEL: embedded_path})

    async def main() -> None:
        async with serving(owner, key="right-key") as (addr,):
            m = await fetch_manifest([addr], "right-key", "me", LABEL)  # the right key works
            assert m.files
            with pytest.raises(WeightsError, match="no peer serves"):
                await fetch_manifest([addr], "wrong-key", "me", LABEL)
            code = await _fetch_raw(addr, pb.FetchRequest(what=LABEL, file=embedded_path.name, offset=0, length=64),
                                    key="wrong-key")
            assert code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED)

    run(main())
    assert owner.bytes_sent == 0


@pytest.mark.slow
def test_a_split_ring_from_fetched_slices_answers_like_the_original(cache, embedded_path, embedded, tokenizer,
                                                                    monkeypatch):
    """Two peers that had nothing fetch their halves with a mesh key; greedy tokens through their torch
    shards equal those through shards of the original file."""
    from backends.torch.shard import TorchShard
    from tests.helpers import greedy

    m = build_manifest(embedded_path, LABEL)
    dirs = []

    async def main() -> None:
        async with serving(WeightServer({LABEL: embedded_path}), key="k") as (addr,):
            for i, (lo, hi) in enumerate(((0, 13), (13, 30))):
                monkeypatch.setenv("TOGETHER_CACHE", str(cache / f"peer{i}"))
                await fetch_tensors([addr], "k", f"p{i}", LABEL, tensor_names(m, lo, hi, 30), LocalCopy.of(LABEL))
                dirs.append(LocalCopy.of(LABEL).path)

    run(main())
    # the tokenizer and chat template live in the GGUF header, which always travels
    from backends.tokenizer import Tokenizer

    prompt = tokenizer.encode("The capital of France is")
    assert Tokenizer.from_checkpoint(open_checkpoint(dirs[1])).encode("The capital of France is") == prompt
    ref = greedy([TorchShard(embedded, 0, 13, "float32"), TorchShard(embedded, 13, 30, "float32")], prompt, 12)
    a, b = open_checkpoint(dirs[0]), open_checkpoint(dirs[1])
    got = greedy([TorchShard(a, 0, 13, "float32"), TorchShard(b, 13, 30, "float32")], prompt, 12)
    assert got == ref


def test_a_copy_serves_what_it_fetched_since(cache, tmp_path, monkeypatch):
    """A standby may fetch from a peer that is still fetching: that peer's server reads its copy's
    sidecar again as it grows."""
    src = tiny_hf(tmp_path / "m")
    m = build_manifest(src, "tiny")
    owner = WeightServer({"tiny": src})
    monkeypatch.setenv("TOGETHER_CACHE", str(tmp_path / "b"))
    b_copy = LocalCopy.of("tiny")
    layer1 = tensor_names(m, 1, 2, 3)

    async def main() -> int:
        async with serving(owner) as (a,):
            await fetch_tensors([a], None, "b", "tiny", tensor_names(m, 0, 1, 3), b_copy)
            b = WeightServer({"tiny": b_copy.path})
            async with serving(b) as (b_addr,):
                monkeypatch.setenv("TOGETHER_CACHE", str(tmp_path / "c"))
                with pytest.raises(WeightsError, match="no peer"):  # b lacks layer 1 so far
                    await fetch_tensors([b_addr], None, "c", "tiny", layer1, LocalCopy.of("tiny"))
                await fetch_tensors([a], None, "b", "tiny", layer1, b_copy)  # b gets it
                sent, c_copy = owner.bytes_sent, LocalCopy.of("tiny")
                got = await fetch_tensors([b_addr], None, "c", "tiny", layer1, c_copy)
                assert owner.bytes_sent == sent  # all from b
                assert c_copy.complete(layer1)
                return got

    # the failed try may have got some of the headers already (how much depends on timing): the rest came from b
    assert 0 < run(main()) <= slice_bytes(m, layer1)


def test_a_stream_that_ends_short_counts_as_broken(cache, tmp_path):
    """A peer whose file shrank under it (its manifest cached before) ends streams early: the fetch
    tries it a few times, then gets the bytes from the next peer."""
    src, good = tiny_hf(tmp_path / "m"), tiny_hf(tmp_path / "m2")
    m = build_manifest(src, "tiny")
    shrunk = WeightServer({"tiny": src})
    names = tensor_names(m, 2, 3, 3)

    async def main() -> int:
        await shrunk.manifest("tiny", names)
        last = max(m.tensors[n].end for n in names)
        with open(src / "model.safetensors", "r+b") as f:
            f.truncate(last - 100)
        async with serving(shrunk, WeightServer({"tiny": good})) as addrs:
            return await fetch_tensors(addrs, None, "me", "tiny", names, LocalCopy.of("tiny"))

    assert run(main()) >= slice_bytes(m, names)
    assert LocalCopy.of("tiny").complete(names)
