"""`together lora --mesh NAME`: LoRA training across a ring of peers, each training the LoRA weights of
its own layers (mesh/training.py). This process is the driver: it reads and checks the data and
tokenizes it as `together lora` does (bad data is refused before the ring hears of the job), draws the
same batches in the same order, sends each batch through the ring as micro-batches, asks every stage
for one optimizer step per batch, and assembles the stages' parts into one adapter directory in
mlx-lm's format (adapters.safetensors, adapter_config.json, optimizer.safetensors) that
`together join --adapter`, `together lora --resume` and `mlx_lm.load(..., adapter_path=)` read."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Iterable, TypeVar

import grpc
import numpy as np

from apps.lora import (ADAPTER_FILE, CONFIG_FILE, OPTIMIZER_FILE, _settle_args, checked_datasets, mlx_model_dir,
                       read_splits)
from backends.errors import TogetherError
from backends.lora import MODULES
from backends.train import MicroBatch
from mesh.training import why_stopped
from protos import together_pb2 as pb
from protos import together_pb2_grpc as pbg

STEP_TIMEOUT_S = 1800.0
WATCH_S = 2.0  # how often the driver reads the plan while it trains
T = TypeVar("T")


class Stopped(Exception):
    """A stage failed or went away: the job stops (its last checkpoint stays usable)."""


@dataclass
class Ring:
    """The stages of the plan a job trains on, and a stub per stage."""

    hops: list[pb.TrainHop]
    names: list[str]
    backends: list[str]
    stubs: list[pbg.TogetherStub] = field(default_factory=list)
    channels: list[grpc.aio.Channel] = field(default_factory=list)

    def where(self, i: int) -> str:
        h = self.hops[i]
        return f"stage {i} ({self.names[i]}: layers [{h.start}, {h.end}) on {h.address})"


def run_lora_mesh(a: argparse.Namespace) -> int:
    """Train on the mesh's ring; the data, settings and output as `together lora`'s."""
    from mlx_lm.utils import load_tokenizer

    from backends.models import model_label

    if a.dropout:
        raise TogetherError("--dropout is not supported with --mesh (a stage recomputes its forward in the "
                            "backward pass, which must see the same dropout mask); leave it at 0")
    if a.micro_batches < 0:
        raise TogetherError("--micro-batches must be 0 (one per stage) or more")
    resume_dir, start_step, out = _settle_args(a)
    splits = read_splits(Path(a.data).expanduser(), a.mask_prompt)
    np.random.seed(a.seed)  # the batches' order, as `together lora` draws it
    path = mlx_model_dir(a.model)
    config = json.loads((path / "config.json").read_text())
    tokenizer = load_tokenizer(path, {}, eos_token_ids=config.get("eos_token_id"))
    data = checked_datasets(splits, tokenizer, a)  # bad data stops here, before the ring hears of the job
    n_layers = int(config["num_hidden_layers"])
    k = n_layers if a.layers < 0 else a.layers
    if not 1 <= k <= n_layers:
        raise TogetherError(f"--layers {a.layers}: the model has {n_layers} layers")
    cfg = {"fine_tune_type": "lora", "num_layers": k,
           "lora_parameters": {"rank": a.rank, "scale": a.scale, "dropout": 0.0, "keys": sorted(MODULES)},
           "name": out.name, "base_model": model_label(a.model), "model": str(path),
           "target_layers": [n_layers - k, n_layers], "iters": a.iters, "batch_size": a.batch_size,
           "learning_rate": a.learning_rate, "max_seq_length": a.max_seq_length, "mask_prompt": a.mask_prompt,
           "data": str(Path(a.data).expanduser().resolve()), "seed": a.seed, "created_by": "together lora --mesh"}
    job = Job(a, cfg, data, out, start_step, resume_dir)
    return asyncio.run(job.run())


async def find_ring(a: argparse.Namespace, label: str, who: str) -> Ring:
    """The ring of the mesh: the plan of the first peer that answers (--peer, then mDNS)."""
    from apps.join import peer_status
    from mesh.auth import make_channel

    tried: dict[str, str] = {}
    plan = await _first_plan(a, who, tried, peer_status)
    if plan is None:
        asked = "; ".join(f"{k}: {v}" for k, v in tried.items()) or "no peer answered"
        raise TogetherError(f"no peer of mesh {a.mesh or '(any)'} found ({asked}); start peers with "
                            f"`together join`, or name one with --peer HOST:PORT")
    if plan.model != label:
        raise TogetherError(f"the mesh serves {plan.model}, not {label}: pass --model {plan.model}")
    if not plan.complete or not plan.stages:
        raise TogetherError(f"the mesh's ring is not complete ({plan.missing or 'no stages'}); wait for peers")
    infos = {p.node_id: p for p in plan.peers}
    hops, names, backends = [], [], []
    for st in plan.stages:
        if st.tp_members:
            raise TogetherError("a tensor-parallel stage cannot train; train on a ring without --tp-group")
        info = infos.get(st.node_id)
        if info is None:
            raise TogetherError(f"the plan names a stage [{st.start}, {st.end}) whose peer it does not describe; "
                                f"try again in a moment")
        hops.append(pb.TrainHop(address=info.address, start=st.start, end=st.end, node_id=st.node_id))
        names.append(info.name)
        backends.append(info.backend)
    ring = Ring(hops, names, backends)
    for h in hops:
        ch = make_channel(h.address, a.mesh_key, who)
        ring.channels.append(ch)
        ring.stubs.append(pbg.TogetherStub(ch))
    return ring


async def _first_plan(a: argparse.Namespace, who: str, tried: dict[str, str], status: Any) -> pb.Plan | None:
    from mesh.discovery import Discovery

    disc = None
    if a.mesh and not a.peer:
        disc = Discovery(who, a.mesh, "0.0.0.0", 0, advertise=False)
        await disc.start()
    t0 = time.monotonic()
    try:
        while True:
            addrs = list(a.peer) + ([p.address for p in disc.peers.values()] if disc else [])
            for addr in dict.fromkeys(addrs):
                try:
                    st = await status(addr, a.mesh_key, who)
                except TogetherError as e:
                    tried[addr] = str(e)
                    continue
                if st.plan.complete:
                    return st.plan
                tried[addr] = f"its ring is not complete ({st.plan.missing})"
            if time.monotonic() - t0 > max(a.settle, 0.5):
                return None
            await asyncio.sleep(0.3)
    finally:
        if disc is not None:
            await disc.stop()


class Job:
    """One training job on a ring: open, the steps (each a batch in micro-batches), checkpoints, close."""

    def __init__(self, a: argparse.Namespace, cfg: dict[str, Any], data: dict[str, Any], out: Path,
                 start_step: int, resume_dir: Path | None) -> None:
        self.a, self.cfg, self.data, self.out = a, cfg, data, out
        self.start_step, self.resume_dir = start_step, resume_dir
        self.id = uuid.uuid4().hex[:12]
        self.step = start_step
        self.saved = start_step if resume_dir is not None else 0  # the step of the last checkpoint
        self.val_loss: float | None = None
        self.peaks: dict[str, int] = {}
        self.ring: Ring | None = None

    async def run(self) -> int:
        from backends.models import model_label

        a = self.a
        self.ring = ring = await find_ring(a, model_label(a.model), f"lora-{self.id}")
        try:
            await self._open(ring)
            t0 = time.perf_counter()
            await self._watched(self._loop(ring), ring)
            await self.save(a.iters, checkpoint=False)
            peaks = ", ".join(f"{n} {b / 1e9:.2f} GB" for n, b in self.peaks.items())
            print(f"saved adapter {self.out} (step {a.iters}, {time.perf_counter() - t0:.1f} s on {len(ring.hops)} "
                  f"stages; peak memory {peaks}); serve it with: together join --adapter {self.out}",
                  file=sys.stderr)
            return 0
        except Stopped as e:
            raise TogetherError(self._stopped(str(e))) from None
        finally:
            await self._close(ring)

    def _stopped(self, why: str) -> str:
        saved = (f"the last checkpoint is {self.out} (step {self.saved})" if self.saved else
                 f"nothing was saved yet (the first checkpoint comes at step {self.a.save_every})")
        a = self.a
        where = f"--mesh {a.mesh}" if a.mesh else " ".join(f"--peer {p}" for p in a.peer)
        resume = f"--resume {self.out}" if self.saved else f"--adapter-path {self.out}"
        return (f"training stopped at step {self.step + 1}: {why}. {saved}; once the ring is whole again, "
                f"continue with: together lora {where} --data {a.data} {resume} --iters {a.iters}")

    async def _on(self, i: int, call: Awaitable[T]) -> T:
        """The reply of a call to stage i; its failure, in words naming the stage, stops the job."""
        try:
            return await call
        except grpc.aio.AioRpcError as e:
            raise Stopped(why_stopped(e, self.ring.where(i) if self.ring else f"stage {i}")) from None

    async def _watched(self, work: Awaitable[None], ring: Ring) -> None:
        """`work`, stopped as soon as the mesh's plan no longer has the job's stages (a peer that hangs
        or is cut off answers no call, but the coordinator drops it within seconds)."""
        task, watch = asyncio.ensure_future(work), asyncio.ensure_future(self._watch(ring))
        try:
            done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (task, watch):
                t.cancel()
            await asyncio.gather(task, watch, return_exceptions=True)
        (task if task in done else watch).result()  # the work's outcome, or why the watch stopped it

    async def _watch(self, ring: Ring) -> None:
        want = [(h.node_id, h.start, h.end) for h in ring.hops]
        while True:
            await asyncio.sleep(WATCH_S)
            for stub in ring.stubs:  # the first stage that answers says what the plan is
                try:
                    plan = (await stub.Status(pb.StatusRequest(), timeout=5)).plan
                except grpc.aio.AioRpcError:
                    continue
                got = [(s.node_id, s.start, s.end) for s in plan.stages]
                if got != want:
                    gone = [ring.where(i) for i, h in enumerate(ring.hops) if (h.node_id, h.start, h.end) not in got]
                    raise Stopped(f"the ring changed: {', '.join(gone) or 'its stages moved'} left the ring")
                break

    async def _open(self, ring: Ring) -> None:
        a = self.a
        state = _read_state(self.resume_dir) if self.resume_dir is not None else {}
        lo = self.cfg["target_layers"][0]
        reqs = [pb.TrainOpenRequest(
            job=self.id, model=self.cfg["base_model"], ring=ring.hops, index=i, rank=a.rank, scale=a.scale,
            lora_start=lo, lora_end=self.cfg["target_layers"][1], keys=MODULES, seed=a.seed,
            learning_rate=a.learning_rate, dtype="float32" if a.dtype == "auto" else a.dtype, step=self.start_step,
            tensors=[pb.TrainTensor(name=n, shape=list(v.shape), data=v.tobytes())
                     for n, v in state.items() if h.start <= _layer(n) < h.end])
            for i, h in enumerate(ring.hops)]
        replies = await asyncio.gather(*(self._on(i, s.TrainOpen(r, timeout=600))
                                         for i, (s, r) in enumerate(zip(ring.stubs, reqs))))
        parts = ", ".join(f"{ring.where(i)} {r.backend} {r.dtype}: {r.trainable / 1e6:.3f}M trainable"
                          for i, r in enumerate(replies))
        train, valid = self.data["train"], self.data.get("valid")
        print(f"{self.data['train_format']} data: {len(train)} train"
              + (f", {len(valid)} valid" if valid is not None else ", no valid.jsonl")
              + f" | LoRA rank {a.rank} scale {a.scale} on layers [{lo}, {self.cfg['target_layers'][1]}) | "
              f"job {self.id} on {len(ring.hops)} stages: {parts}", file=sys.stderr)
        if self.resume_dir is not None:
            print(f"resuming {self.resume_dir} at step {self.start_step}", file=sys.stderr)

    async def _loop(self, ring: Ring) -> None:
        """mlx-lm's train loop, step for step: validation first, at every --val-every and at the end."""
        from mlx_lm.tuner.trainer import iterate_batches

        a = self.a
        remaining = a.iters - self.start_step
        valid = self.data.get("valid")
        losses, ntoks, steps, spent = 0.0, 0, 0, 0.0
        batches = iterate_batches(dataset=self.data["train"], batch_size=a.batch_size,
                                  max_seq_length=a.max_seq_length, loop=True)
        for it, (batch, lengths) in zip(range(1, remaining + 1), batches):
            if valid is not None and (it == 1 or it % a.val_every == 0 or it == remaining):
                await self._validate(ring, valid)
            tic = time.perf_counter()
            loss, n = await self._train_step(ring, np.array(batch), np.array(lengths))
            spent += time.perf_counter() - tic
            losses, ntoks, steps = losses + loss, ntoks + n, steps + 1
            if self.step % a.report_every == 0 or self.step == a.iters:
                self._report(losses / steps, ntoks / spent)
                losses, ntoks, steps, spent = 0.0, 0, 0, 0.0
            if self.step % a.save_every == 0 and self.step < a.iters:
                await self.save(self.step, checkpoint=True)

    def _micro(self, batch: np.ndarray, lengths: np.ndarray, norm: float | None = None) -> list[MicroBatch]:
        """The batch's rows in micro-batches, each cut to its longest row (causal: later columns of padding
        change nothing before them); each one's loss is over the whole batch's count of targets."""
        width = batch.shape[1] - 1
        full = MicroBatch(batch.astype(np.int32), lengths[:, 0], lengths[:, 1], 1.0)
        norm = norm or float(full.ntokens)
        n = self.a.micro_batches or (len(self.ring.hops) if self.ring else 1)
        out = []
        for rows in np.array_split(np.arange(batch.shape[0]), min(max(n, 1), batch.shape[0])):
            w = int(min(width, max(1, lengths[rows, 1].max())))
            out.append(MicroBatch(np.ascontiguousarray(batch[rows, :w + 1], np.int32), lengths[rows, 0],
                                  lengths[rows, 1], norm))
        return out

    async def _through(self, ring: Ring, mbs: list[MicroBatch], step: int, eval_: bool) -> tuple[float, int]:
        """Micro-batches into stage 0 at once (each stage runs them in arrival order): (loss, targets)."""
        reqs = [pb.TrainBatchRequest(job=self.id, step=step, micro=i, rows=m.shape[0], width=m.shape[1],
                                     tokens=m.tokens.ravel().tolist(), offsets=m.offsets.tolist(),
                                     lengths=m.lengths.tolist(), norm=m.norm, eval=eval_)
                for i, m in enumerate(mbs)]
        replies = await asyncio.gather(*(self._on(0, ring.stubs[0].TrainBatch(r, timeout=STEP_TIMEOUT_S))
                                         for r in reqs))
        return sum(r.loss for r in replies), sum(r.tokens for r in replies)

    async def _train_step(self, ring: Ring, batch: np.ndarray, lengths: np.ndarray) -> tuple[float, int]:
        loss, n = await self._through(ring, self._micro(batch, lengths), self.step + 1, False)
        self.step += 1
        progress = f"lora job {self.id}: step {self.step}/{self.a.iters} loss {loss:.3f}"
        step = pb.TrainStepRequest(job=self.id, step=self.step, progress=progress)
        replies = await asyncio.gather(*(self._on(i, s.TrainStep(step, timeout=600)) for i, s in enumerate(ring.stubs)))
        self.peaks = {r.name: r.peak_bytes for r in replies}
        return loss, n

    async def _validate(self, ring: Ring, valid: Any) -> None:
        """mlx-lm's evaluate: the mean loss over --val-batches batches of the valid set."""
        from mlx_lm.tuner.trainer import iterate_batches

        a, tic = self.a, time.perf_counter()
        total, count = 0.0, 0
        index = iter(range(a.val_batches)) if a.val_batches != -1 else iter(int, 1)
        for _, (batch, lengths) in zip(index, iterate_batches(dataset=valid, batch_size=a.batch_size,
                                                              max_seq_length=a.max_seq_length)):
            mbs = self._micro(np.array(batch), np.array(lengths))
            loss, n = await self._through(ring, mbs, self.step, True)
            total, count = total + loss * n, count + n
        self.val_loss = total / max(count, 1)
        print(f"step {self.step:>5}/{a.iters}  val loss {self.val_loss:.4f}  ({time.perf_counter() - tic:.1f} s)",
              file=sys.stderr)

    def _report(self, loss: float, tokens_s: float) -> None:
        val = f"{self.val_loss:.4f}" if self.val_loss is not None else "-"
        peaks = ", ".join(f"{n} {b / 1e9:.2f} GB" for n, b in self.peaks.items())
        print(f"step {self.step:>5}/{self.a.iters}  train loss {loss:.4f}  val loss {val}  {tokens_s:,.1f} tok/s  "
              f"peak memory {peaks}", file=sys.stderr)

    async def save(self, step: int, checkpoint: bool) -> None:
        """Every stage's part, assembled into one adapter directory (and the optimizer's state)."""
        import mlx.core as mx

        assert self.ring is not None
        replies = await asyncio.gather(*(self._on(i, s.TrainSave(pb.TrainSaveRequest(job=self.id), timeout=600))
                                         for i, s in enumerate(self.ring.stubs)))
        tensors = {t.name: np.frombuffer(t.data, np.float32).reshape(tuple(t.shape)) for r in replies
                   for t in r.tensors}
        weights = {n: mx.array(v) for n, v in tensors.items() if n.endswith((".lora_a", ".lora_b"))}
        state = {n: mx.array(v) for n, v in tensors.items() if n.endswith((".m", ".v"))}
        state["step"] = mx.array(step, mx.uint64)
        state["learning_rate"] = mx.array(self.a.learning_rate, mx.float32)
        out = self.out
        out.mkdir(parents=True, exist_ok=True)
        mx.save_safetensors(str(out / ADAPTER_FILE), weights)
        if checkpoint:
            mx.save_safetensors(str(out / f"{step:07d}_{ADAPTER_FILE}"), weights)
        mx.save_safetensors(str(out / OPTIMIZER_FILE), state)
        tmp = out / (CONFIG_FILE + ".tmp")
        tmp.write_text(json.dumps(dict(self.cfg, step=step), indent=2) + "\n")
        tmp.replace(out / CONFIG_FILE)
        self.saved = step

    async def _close(self, ring: Ring) -> None:
        for s in ring.stubs:
            try:
                await s.TrainClose(pb.TrainCloseRequest(job=self.id), timeout=5)
            except grpc.aio.AioRpcError:
                pass  # a lost stage: its job goes with it
        for ch in ring.channels:
            await ch.close(grace=None)


def _layer(name: str) -> int:
    return int(name.split(".")[2])


def _read_state(path: Path) -> dict[str, np.ndarray]:
    """A saved adapter's tensors and, when saved, its optimizer's moments, as float32 by global name."""
    import mlx.core as mx

    def load(f: Path) -> Iterable[tuple[str, np.ndarray]]:
        got = mx.load(str(f))
        assert isinstance(got, dict)  # a .safetensors file loads as a dict
        return ((n, np.array(v.astype(mx.float32))) for n, v in got.items() if n.startswith("model.layers."))

    out = dict(load(path / ADAPTER_FILE))
    if (path / OPTIMIZER_FILE).is_file():
        out.update(load(path / OPTIMIZER_FILE))
    return out
