"""`together plan`: the placement the planner would choose for a model on a live mesh or on machines
described in a file, with predicted prefill and decode tokens/s, memory per peer, bytes per token per
hop and what limits the ring. Reads the model's config only: it never loads weights."""

from __future__ import annotations

import argparse
import json
import math
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backends.config import ModelConfig
from backends.errors import ModelError, TogetherError
from mesh import planner
from mesh.placement import format_size, parse_size

KV_RESERVE_TOKENS = 4096  # as a peer sets aside (mesh/node.py)
# bytes per weight as a backend holds it: affine groups of 32 carry a 16-bit scale and zero each
FORMAT_BYTES = {"float32": 4.0, "float16": 2.0, "bfloat16": 2.0, "int8": 1.125, "int4": 0.625}
_WIRE = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass
class Model:
    label: str
    config: ModelConfig
    format: str  # how its file stores the layers ("int4", "bfloat16", ...): a machine's default


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from apps.cli import _add_mesh_key_args

    p = sub.add_parser("plan", help="predict the placement, memory and tokens/s of a model on a mesh or "
                                    "on described machines (reads the config only)")
    p.add_argument("--model", required=True, help="smollm2-135m, a local .gguf or model dir (config.json "
                                                  "alone is enough), or an HF hub id (fetches config.json only)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--peer", metavar="HOST:PORT", help="plan for the live mesh this peer belongs to")
    src.add_argument("--machines", metavar="FILE", help="a TOML or JSON file of machines and links")
    _add_mesh_key_args(p)
    p.add_argument("--json", action="store_true", help="print the placement as JSON")
    p.set_defaults(func=cmd_plan)


def cmd_plan(a: argparse.Namespace) -> int:
    model = load_model(a.model)
    if a.peer:
        import asyncio

        machines, links = asyncio.run(_live(a.peer, a.mesh_key, model))
    else:
        machines, links = read_machines(Path(a.machines), model)
    shape = planner.Shape(model.config.num_hidden_layers, model.config.hidden_size, kv_reserve(model.config))
    try:
        placement = planner.plan(shape, [m.machine for m in machines], links)
    except planner.Unplaceable as e:
        print(f"impossible: {e}", file=sys.stderr)
        return 1
    print(json.dumps(as_json(model, machines, placement), indent=2) if a.json
          else render(model, shape, machines, placement))
    return 0


# ---------------------------------------------------------------- the model, from its config alone


def load_model(name: str) -> Model:
    """The config of a model name, path or hub id; no weights are read."""
    from backends.models import EMBEDDED, fetch_embedded, model_label

    path = fetch_embedded(name, quiet=True) if name in EMBEDDED else Path(name).expanduser()
    if not path.exists():
        path = _hub_config(name)
    if path.is_dir() and not (path / "config.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        if not ggufs:
            raise ModelError(f"{path}: no config.json and no .gguf in this directory")
        path = ggufs[0]
    if path.suffix == ".gguf":
        from backends.weights import open_checkpoint  # reads the header and tensor index, not the data

        ck = open_checkpoint(path)
        quant = [t for n, t in ck.tensors.items() if n.startswith("model.layers.0.") and t.quantized]
        fmt = ("int8" if "q8" in path.name.lower() else "int4") if quant else "float32"
        return Model(model_label(name), ck.config, fmt)
    cfg_path = path / "config.json" if path.is_dir() else path
    try:
        d = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"{cfg_path}: cannot read the model's config ({e})") from None
    fmt = "int4" if (d.get("quantization") or {}).get("bits") == 4 else \
        "int8" if (d.get("quantization") or {}).get("bits") == 8 else "bfloat16"
    return Model(model_label(name), ModelConfig.from_dict(d, str(cfg_path)), fmt)


def _hub_config(repo_id: str) -> Path:
    from backends.models import _HUB_ID

    if not _HUB_ID.match(repo_id):
        raise ModelError(f"model {repo_id!r} not found: not a local path, not a hub id, not an embedded model")
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

        return Path(hf_hub_download(repo_id, "config.json"))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise ModelError(f"could not fetch {repo_id}'s config.json from the Hugging Face hub "
                         f"({type(e).__name__}); offline, pass a local directory holding its config.json") from None


def kv_reserve(cfg: ModelConfig) -> int:
    return cfg.kv_bytes_per_token(4) * KV_RESERVE_TOKENS


def head_bytes(cfg: ModelConfig, fmt: str) -> int:
    """The embedding (and an untied lm_head): what the first and last stages hold besides layers."""
    n = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
    return int(n * FORMAT_BYTES[fmt])


# ---------------------------------------------------------------- machines


@dataclass
class Described:
    machine: planner.Machine
    memory: int  # what it offers in all (the embedding/head included)
    backend: str
    format: str
    estimated: bool  # speeds estimated from stated bandwidth / flops, not measured


def read_machines(path: Path, model: Model) -> tuple[list[Described], dict[tuple[str, str], planner.Link]]:
    """Machines and links from a TOML or JSON file (see README: `together plan`)."""
    try:
        text = path.read_text()
        doc: dict[str, Any] = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (OSError, ValueError) as e:
        raise TogetherError(f"{path}: cannot read the machines file ({e})") from None
    entries = doc.get("machines") or doc.get("machine")
    if not isinstance(entries, list) or not entries:
        raise TogetherError(f"{path}: no machines: give a list `machines` ([[machines]] in TOML) of "
                            f"{{name, memory, backend, layer_ms or bandwidth_gbs}}")
    machines = [_machine(e, i, model) for i, e in enumerate(entries)]
    names = [m.machine.node_id for m in machines]
    if len(set(names)) != len(names):
        raise TogetherError(f"{path}: two machines share a name; names must be unique")
    return machines, _links(doc, names, path)


def _machine(e: dict[str, Any], i: int, model: Model) -> Described:
    cfg = model.config
    name = str(e.get("name") or f"machine-{i}")
    try:
        memory = parse_size(e["memory"] if isinstance(e["memory"], int) else str(e["memory"]))
    except (KeyError, ValueError) as err:
        raise TogetherError(f"machine {name}: `memory` (e.g. \"16GB\") is required and must be a size "
                            f"({err})") from None
    dtype = str(e.get("dtype", "bfloat16"))
    fmt = str(e.get("format") or (model.format if model.format.startswith("int") else dtype))
    if fmt not in FORMAT_BYTES or dtype not in _WIRE:
        raise TogetherError(f"machine {name}: dtype {dtype!r} / format {fmt!r}: dtype is one of "
                            f"{', '.join(_WIRE)}, format one of {', '.join(FORMAT_BYTES)}")
    layer_bytes = cfg.layer_bytes(FORMAT_BYTES[fmt])
    params = cfg.layer_bytes(1.0)
    layer_ms, prefill_ms = float(e.get("layer_ms", 0)), float(e.get("prefill_ms", 0))
    head_ms = float(e.get("head_ms", 0))
    estimated = False
    if layer_ms <= 0:
        bw = float(e.get("bandwidth_gbs", 0))
        if bw <= 0:
            raise TogetherError(f"machine {name}: give `layer_ms` (measured for this model: `together join` "
                                f"prints it) or `bandwidth_gbs` (its memory bandwidth, to estimate it)")
        layer_ms = layer_bytes / (bw * 1e9) * 1e3  # a decode step streams the layer's weights once
        head_ms = head_ms or cfg.vocab_size * cfg.hidden_size * FORMAT_BYTES[fmt] / (bw * 1e9) * 1e3
        estimated = True
    if prefill_ms <= 0 and float(e.get("tflops", 0)) > 0:
        prefill_ms = 2 * params / (float(e["tflops"]) * 1e12) * 1e3  # a prefill token: 2 flops per weight
        estimated = True
    if not all(math.isfinite(x) and x >= 0 for x in (layer_ms, prefill_ms, head_ms)):
        raise TogetherError(f"machine {name}: times must be finite, non-negative numbers of ms")
    free = max(0, memory - head_bytes(cfg, fmt))
    m = planner.Machine(name, free, layer_bytes, layer_ms, prefill_ms, head_ms, _WIRE[dtype],
                        api=bool(e.get("api", False)), name=name)
    return Described(m, memory, str(e.get("backend", "torch")), fmt, estimated)


def _links(doc: dict[str, Any], names: list[str], path: Path) -> dict[tuple[str, str], planner.Link]:
    """Links are symmetric pairs {between = [A, B], rtt_ms, mbps}; `default_link` fills the rest."""
    out: dict[tuple[str, str], planner.Link] = {}
    default = doc.get("default_link")
    if default is not None:
        d = planner.Link(float(default.get("rtt_ms", planner.LAN_RTT_MS)), float(default.get("mbps", planner.LAN_MBPS)))
        out.update({(x, y): d for x in names for y in names if x != y})
    for ln in doc.get("links") or doc.get("link") or []:
        pair = ln.get("between")
        if not (isinstance(pair, list) and len(pair) == 2 and all(p in names for p in pair)):
            raise TogetherError(f"{path}: a link needs `between = [A, B]` naming two machines ({', '.join(names)})")
        link = planner.Link(float(ln.get("rtt_ms", planner.LAN_RTT_MS)), float(ln.get("mbps", planner.LAN_MBPS)))
        if not (link.rtt_ms >= 0 and link.mbps > 0):
            raise TogetherError(f"{path}: link {pair}: rtt_ms must be >= 0 and mbps > 0")
        out[(pair[0], pair[1])] = out[(pair[1], pair[0])] = link
    return out


async def _live(address: str, mesh_key: str | None,
                model: Model) -> tuple[list[Described], dict[tuple[str, str], planner.Link]]:
    """The live mesh's peers, their measured speeds and links (the Status of one of them)."""
    from apps.join import peer_status

    st = await peer_status(address, mesh_key, "plan-cli")
    peers = {p.node_id: p for p in st.plan.peers}
    peers[st.peer.node_id] = st.peer
    same = st.plan.model == model.label
    out = []
    for p in sorted(peers.values(), key=lambda p: (p.started_at, p.node_id)):
        fmt = "int4" if p.weight_format.startswith("int4") else "int8" if p.weight_format.startswith("int8") \
            else p.dtype if p.dtype in FORMAT_BYTES else model.format
        lb = int(p.layer_bytes) if same and p.layer_bytes else model.config.layer_bytes(FORMAT_BYTES[fmt])
        # another model than the mesh serves: decode streams weights, so its time scales with their bytes
        scale = lb / p.layer_bytes if p.layer_bytes and not same else 1.0
        m = planner.Machine(p.node_id, int(p.free_memory), lb, p.layer_ms * scale, p.prefill_ms * scale,
                            p.head_ms * scale, _WIRE.get(p.dtype, 4), api=bool(p.api), name=p.name)
        out.append(Described(m, int(p.free_memory) + head_bytes(model.config, fmt), p.backend, fmt, not same))
    links = {(p.node_id, ln.node_id): planner.Link(ln.rtt_ms, ln.mbps) for p in peers.values() for ln in p.links}
    return out, links


# ---------------------------------------------------------------- output


def render(model: Model, shape: planner.Shape, machines: list[Described], p: planner.Placement) -> str:
    cfg = model.config
    by_id = {d.machine.node_id: d for d in machines}
    lines = [f"{model.label}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
             f"KV reserve {format_size(shape.kv_reserve)} per layer", "",
             f"{'peer':<16} {'backend':<8} {'format':<9} {'layers':<12} {'memory used of free':<26} ms/layer"]
    for n, a, b in p.stages:
        d = by_id[n]
        used = (b - a) * (d.machine.layer_bytes + shape.kv_reserve) + (d.memory - d.machine.free_memory)
        est = " (estimated)" if d.estimated else ""
        lines.append(f"{d.machine.label:<16} {d.backend:<8} {d.format:<9} {f'[{a}, {b})':<12} "
                     f"{format_size(used) + ' of ' + format_size(d.memory):<26} {d.machine.decode_ms:.3f}{est}")
    for n in p.standby:
        lines.append(f"{by_id[n].machine.label:<16} {by_id[n].backend:<8} {by_id[n].format:<9} standby")
    lines += ["", "hops (per decode token):"]
    for h in p.hops:
        if h.src == h.dst:
            continue
        src, dst = (by_id[x].machine.label if x in by_id else x for x in (h.src, h.dst))
        lines.append(f"  {src} -> {dst}: {h.bytes} bytes, {h.ms:.2f} ms" + (" (assumed LAN)" if h.assumed else ""))
    lines += ["", f"predicted decode:  {p.decode_tokens_per_s:.1f} tokens/s "
                  f"(one stream, {p.decode_ms:.1f} ms per token)",
              f"predicted prefill: {p.prefill_tokens_per_s:.0f} tokens/s ({planner.PREFILL_TOKENS}-token chunks)",
              f"limit: {p.limit}"]
    lines += [f"note: {n}" for n in p.notes]
    return "\n".join(lines)


def as_json(model: Model, machines: list[Described], p: planner.Placement) -> dict[str, Any]:
    names = {d.machine.node_id: d.machine.label for d in machines}
    return {"model": model.label, "stages": [{"peer": names[n], "start": a, "end": b} for n, a, b in p.stages],
            "standby": [names[n] for n in p.standby],
            "peers": [{"peer": d.machine.label, "backend": d.backend, "format": d.format,
                       "layer_ms": d.machine.layer_ms, "prefill_ms": d.machine.prefill_ms, "head_ms": d.machine.head_ms,
                       "estimated": d.estimated} for d in machines],
            "decode_tokens_per_s": p.decode_tokens_per_s, "prefill_tokens_per_s": p.prefill_tokens_per_s,
            "hops": [{"from": names.get(h.src, h.src), "to": names.get(h.dst, h.dst), "bytes": h.bytes, "ms": h.ms}
                     for h in p.hops if h.src != h.dst],
            "limit": p.limit, "notes": p.notes}
