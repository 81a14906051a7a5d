"""The training role (mesh/training.py) without gRPC: two peers' Trainers on a tiny model, the hop
between them a direct call, against one Trainer holding the whole model; and its refusals."""

import asyncio

import grpc
import numpy as np
import pytest

from mesh.metrics import PeerMetrics
from mesh.stage import Stage
from mesh.training import Trainer, TrainError
from mesh.view import PlanView
from protos import together_pb2 as pb

pytest.importorskip("torch")
pytest.importorskip("mlx.core")


class Hop:
    """The link to the next stage: its Trainer called directly (or a lost peer)."""

    def __init__(self, nxt=None):
        self.nxt = nxt

    def stub(self, address):
        return self

    async def TrainBatch(self, req, timeout=None):
        if self.nxt is None:
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                       details="connection refused")
        return await self.nxt.batch(req)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from backends.weights import open_checkpoint
    from tests.backends.test_tp import tiny_dir

    return open_checkpoint(tiny_dir(tmp_path_factory.mktemp("training") / "tiny-llama"))


def trainer(tiny, node, backend, start, end, nxt=None):
    from backends.shard import load_shard

    view = PlanView(node, node, "127.0.0.1", 3)
    stage = Stage(view, None, PeerMetrics(), deliver=lambda r: None, group_failed=lambda w: None)
    stage.shard = load_shard(backend, tiny, start, end, dtype="float32")
    return Trainer(view, Hop(nxt), stage, tiny, "tiny", backend, None)


def open_req(ring, index, **kw):
    hops = [pb.TrainHop(address=f"127.0.0.1:{5000 + i}", start=a, end=b, node_id=n) for i, (n, a, b) in enumerate(ring)]
    fields = dict(job="j1", model="tiny", ring=hops, index=index, rank=4, scale=10.0, lora_start=1, lora_end=3,
                  keys=["self_attn.q_proj", "mlp.down_proj"], seed=1, learning_rate=1e-2)
    return pb.TrainOpenRequest(**{**fields, **kw})


def batch_req(step, eval_=False):
    rng = np.random.default_rng(step)
    toks = rng.integers(1, 256, size=(2, 7)).astype(np.int32)
    return pb.TrainBatchRequest(job="j1", step=step, micro=0, rows=2, width=6, tokens=toks.ravel().tolist(),
                                offsets=[1, 2], lengths=[6, 5], norm=9.0, eval=eval_)


def test_a_two_stage_job_is_the_one_stage_job_and_refuses_what_it_cannot_do(tiny):
    async def go():
        whole = trainer(tiny, "w", "mlx", 0, 3)
        last = trainer(tiny, "b", "torch", 2, 3)
        first = trainer(tiny, "a", "mlx", 0, 2, nxt=last)
        await whole.open(open_req([("w", 0, 3)], 0))
        ring = [("a", 0, 2), ("b", 2, 3)]
        replies = await asyncio.gather(first.open(open_req(ring, 0)), last.open(open_req(ring, 1)))
        assert replies[0].trainable and replies[1].backend == "torch"
        for step in (1, 2):
            want, got = await whole.batch(batch_req(step)), await first.batch(batch_req(step))
            assert got.loss == pytest.approx(want.loss, rel=1e-4) and got.tokens == want.tokens == 10
            assert not got.data  # nobody before stage 0 trains: no gradient goes back to the driver
            for t in (whole, first, last):
                r = await t.step(pb.TrainStepRequest(job="j1", step=step, progress=f"step {step}"))
                assert r.step == step and r.peak_bytes > 0
        v = await first.batch(batch_req(3, eval_=True))
        assert v.loss == pytest.approx((await whole.batch(batch_req(3, eval_=True))).loss, rel=1e-4)
        assert first.progress == "step 2" and not first.job.slice.kept and not last.job.slice.kept
        saved = {t.name for r in [await first.save(pb.TrainSaveRequest(job="j1")),
                                  await last.save(pb.TrainSaveRequest(job="j1"))] for t in r.tensors}
        assert saved == {t.name for t in (await whole.save(pb.TrainSaveRequest(job="j1"))).tensors}
        assert "model.layers.1.mlp.down_proj.lora_b.m" in saved

        # refusals: out of step, a lost next stage, a ring this peer is not, another model, a gone job
        with pytest.raises(TrainError, match="is at step 2, asked for step 4"):
            await first.step(pb.TrainStepRequest(job="j1", step=4))
        first.links = Hop(None)
        with pytest.raises(TrainError, match=r"stage 1 \(layers \[2, 3\) on 127.0.0.1:5001\) is unreachable"):
            await first.batch(batch_req(3))
        assert not first.job.slice.kept  # the lost micro-batch's input is dropped
        with pytest.raises(TrainError, match=r"holds layers \[0, 2\), not stage 0's \[0, 3\)"):
            await first.open(open_req([("a", 0, 3)], 0))
        with pytest.raises(TrainError, match="serves tiny, not other"):
            await first.open(open_req(ring, 0, model="other"))
        last.close("j1")
        with pytest.raises(TrainError, match="has no training job 'j1'") as e:
            await last.batch(batch_req(3))
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and last.progress == ""
        bad = batch_req(3)
        del bad.tokens[-1]
        with pytest.raises(TrainError, match="needs 14 tokens, got 13"):
            await whole.batch(bad)
        whole.stage.close(), first.stage.close(), last.stage.close()

    asyncio.run(go())
