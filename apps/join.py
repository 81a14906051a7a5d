"""`together join` and `together status`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
from typing import TYPE_CHECKING

from aiohttp import web

from backends.errors import TogetherError
from protos import together_pb2 as pb

if TYPE_CHECKING:
    from backends.tokenizer import Tokenizer
    from mesh.node import Node, NodeConfig

log = logging.getLogger("together.join")
OPEN_MESH = ("warning: no mesh key: this mesh is open to anyone on the network (any host can join, read "
             "and alter its traffic, and run its model); set TOGETHER_MESH_KEY (or --mesh-key-file) on every peer")


def render_plan(plan: pb.Plan, me: str = "") -> str:
    """The live table: peers (what each runs: backend, dtype, weight format, measured ms per layer),
    their layers, the coordinator and the ring's state; then one table per other ring of the mesh
    (several models in one mesh)."""
    out = _render_ring(plan, me, "mesh plan")
    for r in plan.rings:
        out += "\n" + _render_ring(r, me, f"ring of {r.model}:")
    return out + "\n(C = coordinator, * = this peer)"


def _render_ring(plan: pb.Plan, me: str, title: str) -> str:
    stages = {s.node_id: s for s in plan.stages}
    ranks = {n: (s, r) for s in plan.stages for r, n in enumerate(s.tp_members) if r > 0}
    rows = [("", "peer", "backend", "dtype", "weights", "ms/layer", "layers", "memory", "address", "state",
             "adapters")]
    for p in sorted(plan.peers, key=lambda p: (stages[p.node_id].start if p.node_id in stages else 1 << 30,
                                                p.name)):
        if p.model and plan.model and p.model != plan.model:
            continue  # the mesh's coordinator, of another model's ring: listed there
        st = stages.get(p.node_id)
        layers = f"[{st.start}, {st.end})" if st else "standby"
        state = "ready" if p.ready and st else ("loading" if st else "standby")
        if p.weights:  # fetching its slice from peers: what it waits for
            state += f" ({p.weights})"
        if st is not None and st.tp_members:
            layers += f" tp {p.tp_group} rank 0/{len(st.tp_members)}"
        elif p.node_id in ranks:  # a rank > 0 of a tensor-parallel stage: part of that one stage
            gs, r = ranks[p.node_id]
            layers = f"[{gs.start}, {gs.end}) tp {p.tp_group} rank {r}/{len(gs.tp_members)}"
            state = "tp rank"
        elif p.tp_group and not st:
            state = f"waiting for tp group {p.tp_group}"
        mark = ("C" if p.node_id == plan.coordinator else " ") + ("*" if p.node_id == me else " ")
        speed = f"{p.layer_ms:.2f}" if p.layer_ms > 0 else "-"  # measured on its backend as it started
        rows.append((mark, p.name, p.backend, p.dtype or "-", p.weight_format or "-", speed, layers,
                     f"{p.free_memory / 2**30:.2f} GiB", p.address, state, p.adapters.replace(",", " ") or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    ring = "complete" if plan.complete else f"incomplete ({plan.missing})"
    model = f" of {plan.model}" if plan.rings else ""
    return f"{title} epoch {plan.epoch}, {plan.num_layers} layers{model}, ring {ring}\n" + "\n".join(lines)


def _auto_backend() -> str:
    """MLX on a Mac, torch elsewhere, else whichever is installed. It imports only the frameworks it tries
    (a Mac's MLX peer never loads torch: seconds of its start)."""
    for b in ("mlx", "torch") if sys.platform == "darwin" else ("torch", "mlx"):
        try:
            __import__("mlx.core" if b == "mlx" else "torch")
            return b
        except Exception:  # as backends.shard.available_backends: one that fails to import is not there
            continue
    raise TogetherError("neither mlx nor torch is installed: pip install 'together[mlx]' or 'together[torch]'")


def _node_config(a: argparse.Namespace) -> NodeConfig:
    """The peer's settings from the command line, checked (the model resolved to a path)."""
    from backends.models import local_model, model_label
    from mesh.node import NodeConfig
    from mesh.placement import parse_size

    backend = _auto_backend() if a.backend == "auto" else a.backend
    layers = None
    if a.layers:
        try:
            lo, hi = (int(x) for x in a.layers.split("-"))
        except ValueError:
            raise TogetherError(f"--layers {a.layers!r}: expected START-END, e.g. 0-12") from None
        layers = (lo, hi)
    if a.tp_size is not None and not a.tp_group:
        raise TogetherError("--tp-size needs --tp-group NAME")
    tp_size = 2 if a.tp_size is None else a.tp_size
    if a.tp_group and tp_size < 2:
        raise TogetherError(f"--tp-size {tp_size}: a tensor-parallel group needs at least 2 peers "
                            f"(without --tp-group a peer serves its stage alone)")
    if a.tp_group and a.adapter:
        raise TogetherError("LoRA adapters are not supported on a tensor-parallel stage: drop --adapter "
                            "or --tp-group")
    if not 0 <= a.link_delay_ms <= 60_000:
        raise TogetherError(f"--link-delay-ms {a.link_delay_ms}: use 0 (no delay) to 60000")
    if a.draft_tokens < 0:
        raise TogetherError(f"--draft-tokens {a.draft_tokens}: use 0 (no drafts) or more")
    if not a.draft.strip():
        raise TogetherError("--draft '': use off, lookup, or a draft model's name or path")
    if a.micro_batches < 0 or a.prefill_chunk < 1:
        raise TogetherError(f"--micro-batches {a.micro_batches} / --prefill-chunk {a.prefill_chunk}: use "
                            f"--micro-batches 0 (one per stage) or more, and --prefill-chunk 1 or more")
    if a.tp_group and not a.mesh_key:
        from mesh.tpgroup import TP_NEEDS_KEY

        raise TogetherError(TP_NEEDS_KEY)
    try:
        max_memory = parse_size(a.max_memory) if a.max_memory else None
    except ValueError as e:
        raise TogetherError(f"--max-memory: {e}") from None
    try:
        prefix_memory = None if a.prefix_cache_memory is None else parse_size(a.prefix_cache_memory)
    except ValueError as e:
        raise TogetherError(f"--prefix-cache-memory: {e} (0 turns the prefix cache off)") from None
    cpus = parse_cpus(a.cpus) if a.cpus else None
    path = local_model(a.model)  # else from a peer, else from PyPI / the hub (`_model_path`)
    return NodeConfig(model=model_label(a.model), model_path=str(path or ""), backend=backend, host=a.host,
                     port=a.port, mesh=a.mesh, mesh_key=a.mesh_key, peers=list(a.peer), name=a.name,
                     max_memory=max_memory, layers=layers, dtype=a.dtype, wire_dtype=a.wire_dtype, device=a.device,
                     threads=a.threads if a.threads or not cpus else len(cpus), cpus=cpus, mdns=not a.no_mdns, adapters=list(a.adapter),
                     tp_group=a.tp_group, tp_size=tp_size if a.tp_group else 0, seq_lease=a.seq_lease,
                     link_delay_ms=a.link_delay_ms, placement=a.placement, weight_faults=a.weight_faults,
                     draft=a.draft.strip(), draft_tokens=a.draft_tokens, prefix_cache_memory=prefix_memory,
                     settle_s=a.settle if not a.no_mdns else 0.0,
                     interfaces=[a.host] if a.host not in ("0.0.0.0", "") else None)


def parse_cpus(text: str) -> frozenset[int]:
    """--cpus: CPU numbers and ranges, e.g. "0", "2-3" or "0,4-7", each one this process may run on."""
    cpus: set[int] = set()
    for part in text.split(","):
        lo, dash, hi = part.strip().partition("-")
        if not lo.isdigit() or (dash and not hi.isdigit()) or int(hi or lo) < int(lo):
            raise TogetherError(f"--cpus {text!r}: expected CPU numbers and ranges, e.g. 0 or 0-3 or 0,2")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    have = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    if have is None:
        raise TogetherError("--cpus: this system cannot pin threads to CPUs (Linux only); drop --cpus")
    if not cpus or not cpus <= have:
        raise TogetherError(f"--cpus {text!r}: this process may run on CPUs {format_cpus(have)} only; "
                            f"pick some of those")
    return frozenset(cpus)


def format_cpus(cpus: set[int] | frozenset[int]) -> str:
    """0,1,2,5 -> "0-2,5"."""
    out: list[str] = []
    run: list[int] = []
    for c in sorted(cpus):
        if run and c != run[-1] + 1:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
            run = []
        run.append(c)
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)


def _api_socket(a: argparse.Namespace) -> socket.socket:
    """--api-host:--api-port, taken at once: a busy port is a clear error before this peer joins; the API
    serves on it once the tokenizer has loaded (connections wait in the backlog until then)."""
    family = socket.AF_INET6 if ":" in a.api_host else socket.AF_INET
    try:
        return socket.create_server((a.api_host, a.api_port), family=family)
    except OSError as e:
        raise TogetherError(f"cannot serve the API on {a.api_host}:{a.api_port}: {e.strerror}; "
                            f"pick another --api-port") from None


async def _start_api(a: argparse.Namespace, node: Node, tok: Tokenizer, sock: socket.socket) -> web.AppRunner:
    """The scheduler and the OpenAI API of this peer, on the socket `_api_socket` took."""
    from apps.api import make_app
    from mesh.scheduler import Scheduler

    from mesh.prefixes import PrefixMirror

    # with the prefix cache off here, this API peer sends no prefixes and asks no stage to keep anything
    prefixes = PrefixMirror(node.cfg.model) if node.prefix_cache_bytes() else None
    from mesh.drafting import start_drafting

    drafting = await start_drafting(node, tok)  # a draft model loads here, off the event loop
    node.scheduler = sched = Scheduler(node, tok, max_kv_tokens=a.max_kv_tokens, prefill_chunk=a.prefill_chunk,
                                       micro_batches=a.micro_batches, prefixes=prefixes, drafting=drafting)
    runner = web.AppRunner(make_app(node, sched, api_key=a.api_key, cors_origin=a.cors_origin), access_log=None)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    return runner


def _runs(node: Node) -> str:
    """What this peer runs and how fast, e.g. "torch bfloat16 int4/g32, 0.82 ms per layer (measured in 0.4 s)"."""
    sp = node.speed
    pinned = f", compute on CPU {format_cpus(node.cfg.cpus)}" if node.cfg.cpus else ""
    if sp is None:
        later = node.cfg.layers or node.cfg.tp_group  # its range does not wait for its speed
        return (f"{node.cfg.backend} {node.dtype}, speed " + ("measured once its layers load" if later else "not measured")
                + pinned)
    return (f"{node.cfg.backend} {sp.dtype} {sp.weight_format}, {sp.layer_ms:.2f} ms per layer "
            f"(measured in {sp.seconds:.1f} s){pinned}")


async def _model_path(cfg: NodeConfig, a: argparse.Namespace) -> list[str]:
    """A model not on this disk: from a peer of the mesh that has it (its headers now, the tensors of the
    layers this peer gets later), else from PyPI or the hub. Sets cfg.model_path; the peers that serve it."""
    from backends.errors import ModelError
    from backends.models import resolve_model
    from mesh.supply import model_from_mesh

    why: dict[str, str] = {}
    found = await model_from_mesh(cfg, wait_s=max(3.0, a.settle), why=why)
    if found is not None:
        print(f"{cfg.model}: not on this disk; taking it from the mesh ({', '.join(found[1])})",
              file=sys.stderr, flush=True)
        cfg.model_path = str(found[0])
        return found[1]
    try:
        cfg.model_path = str(resolve_model(a.model))
    except ModelError as e:
        where = "no --peer given and mDNS off" if not (cfg.peers or cfg.mdns) else "no peer found serves it" + (
            ": " + "; ".join(f"{k}: {v}" for k, v in why.items()) if why else "")
        raise TogetherError(f"{e}; nor could a peer of mesh {cfg.mesh!r} give {cfg.model!r} ({where}): start "
                            f"a peer that has the model, or pass --peer HOST:PORT of one") from None
    return []


def choose_model(choices: list[str], plans: list[pb.Plan]) -> tuple[str, str]:
    """--model A,B: the first of the models whose ring in the mesh lacks layers (one a peer of its
    can fill), else the first model; and why, in words. `plans`: what the mesh's peers follow (each
    carries the other rings)."""
    from backends.models import model_label
    from mesh.placement import free_ranges

    rings: dict[str, pb.Plan] = {}
    for plan in plans:
        for r in (plan, *plan.rings):
            if r.model and (r.model not in rings or r.epoch > rings[r.model].epoch):
                rings[r.model] = r
    for c in choices:
        got = rings.get(model_label(c))
        gaps = free_ranges(got.num_layers, [(s.start, s.end) for s in got.stages]) if got is not None else []
        if gaps:
            return c, "its ring lacks layers " + ", ".join(f"[{x}, {y})" for x, y in gaps)
    if not rings:
        return choices[0], "no ring of the mesh answered: the first"
    return choices[0], "no ring of these models lacks layers: the first"


async def _pick_model(a: argparse.Namespace) -> str:
    """--model A,B: ask the mesh's peers (--peer, and those mDNS finds while the peers settle) which
    rings they see, and stand by for the first model whose ring lacks layers."""
    from backends.models import model_label
    from mesh.discovery import Discovery

    choices = [m.strip() for m in a.model.split(",") if m.strip()]
    if len(choices) < 2:
        return choices[0] if choices else a.model
    addrs = list(a.peer)
    if not a.no_mdns:
        disc = Discovery(f"pick-{id(a):x}", a.mesh, a.host or "0.0.0.0", 0, advertise=False,
                         interfaces=[a.host] if a.host not in ("0.0.0.0", "") else None)
        await disc.start()
        try:
            await asyncio.sleep(max(1.0, a.settle))
            addrs += [p.address for p in disc.peers.values()]
        finally:
            await disc.stop()
    plans = []
    for addr in dict.fromkeys(addrs):
        try:
            plans.append((await peer_status(addr, a.mesh_key, "pick-model")).plan)
        except TogetherError as e:
            print(f"--model: {e}", file=sys.stderr, flush=True)
    model, why = choose_model(choices, plans)
    print(f"--model {a.model}: serving {model_label(model)} ({why})", file=sys.stderr, flush=True)
    return model


async def run_join(a: argparse.Namespace) -> int:
    from backends.tokenizer import Tokenizer
    from backends.weights import open_checkpoint
    from mesh.node import Node

    if "," in a.model:  # models it could serve: the one whose ring lacks layers
        a.model = await _pick_model(a)
    cfg = _node_config(a)
    seeds = await _model_path(cfg, a) if not cfg.model_path else []
    ck = open_checkpoint(cfg.model_path)
    sock = _api_socket(a) if a.api_port is not None else None
    node = Node(cfg, ck, None, seeds=seeds)
    node.supply.say = lambda line: print(line, file=sys.stderr, flush=True)
    node.on_plan.append(lambda plan: print(render_plan(plan, node.node_id), file=sys.stderr, flush=True))
    # only a peer that serves the API tokenizes (the others skip loading transformers); it loads its tokenizer
    # while it enters the mesh, so it claims with the peers started with it, as the API peer (the planner's
    # first and last hop), instead of seconds after them
    tok_load = asyncio.create_task(asyncio.to_thread(Tokenizer.from_checkpoint, ck)) if sock else None
    if sock is not None:
        node.api_address = f"{a.api_host}:{sock.getsockname()[1]}"
    runner: web.AppRunner | None = None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    starting = asyncio.create_task(node.start())
    try:
        if tok_load is not None and sock is not None:
            pending: set[asyncio.Task] = {tok_load, starting}
            while tok_load in pending:  # a start that fails fails now, not once the tokenizer is in
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if starting in done:
                    starting.result()
            node.tok = tok = tok_load.result()
            runner = await _start_api(a, node, tok, sock)
        await starting
        if not cfg.mesh_key:
            print(OPEN_MESH, file=sys.stderr, flush=True)
        print(f"{node.name} joined mesh {a.mesh!r} at {node.address} ({_runs(node)}): {node.claim_reason}"
              + (f"; API on http://{node.api_address}" if runner else ""), file=sys.stderr, flush=True)
        await stop.wait()
        print(f"{node.name} leaving the mesh", file=sys.stderr, flush=True)
    finally:
        for task in (tok_load, starting):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if runner is not None:
            await runner.cleanup()
        elif sock is not None:
            sock.close()
        await node.stop()
    return 0


async def peer_status(address: str, mesh_key: str | None, who: str) -> pb.StatusReply:
    """A live peer's Status (its info and the plan it follows), or a one-line error."""
    import grpc

    from mesh.auth import make_channel
    from protos import together_pb2_grpc as pbg

    ch = make_channel(address, mesh_key, who)
    try:
        return await pbg.TogetherStub(ch).Status(pb.StatusRequest(), timeout=5)
    except grpc.aio.AioRpcError as e:
        raise TogetherError(f"{address}: {e.details() or e.code().name}") from None
    finally:
        await ch.close(grace=None)


async def run_status(a: argparse.Namespace) -> int:
    st = await peer_status(a.peer, a.mesh_key, "status-cli")
    if a.json:
        from google.protobuf.json_format import MessageToDict

        print(json.dumps(MessageToDict(st), indent=2))
    else:
        from mesh.linkprobe import render_links

        print(render_plan(st.plan, st.peer.node_id) + "\n" + render_links(st.plan))
    return 0
