"""Weights from peers: peers with empty caches (`TOGETHER_CACHE` each their own) join a mesh where only
one peer has the model, receive exactly the tensors of their slices (and of the one layer they time),
and the ring answers as one process; a restart reads from disk; a standby with an empty cache takes a
killed stage's layers from a live peer mid-stream; an adapter one peer serves reaches the whole ring."""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import pytest

from mesh.local import http_json
from tests.mesh.cluster import Cluster, wait_log

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m"
QUESTION = "What is the capital of France?"


def caches(tmp_path: Path, embedded_path: Path, names: str, seeded: str = "a") -> dict[str, dict[str, str]]:
    """Each peer's environment: its own cache dir, only `seeded`'s holding the model (a link)."""
    out = {}
    for n in names:
        d = tmp_path / f"cache-{n}"
        d.mkdir()
        if n == seeded:
            (d / "models").mkdir()
            (d / "models" / embedded_path.name).symlink_to(embedded_path)
        out[n] = {"TOGETHER_CACHE": str(d)}
    return out


def reference(embedded, tokenizer, question: str, max_tokens: int, adapter_dir: str | None = None) -> str:
    from backends.lora import open_adapter
    from backends.pipeline import Pipeline, SliceSpec
    from backends.sampling import SamplingParams

    pipe = Pipeline.load(embedded, [SliceSpec("torch", 0, 30)], dtype="float32")
    if adapter_dir:
        pipe.load_adapter(open_adapter(adapter_dir))
    prompt = tokenizer.encode(question) if adapter_dir else tokenizer.apply_chat([{"role": "user", "content": question}])
    return "".join(d.text for d in pipe.generate(prompt, SamplingParams(max_tokens=max_tokens), tokenizer,
                                                 adapter="zorblax" if adapter_dir else ""))


def client(peer):
    from openai import OpenAI

    return OpenAI(base_url=f"{peer.api}/v1", api_key="x", max_retries=0, timeout=300)


def ask(peer, max_tokens: int = 24) -> str:
    r = client(peer).chat.completions.create(model=MODEL, temperature=0, max_tokens=max_tokens,
                                             messages=[{"role": "user", "content": QUESTION}])
    return r.choices[0].message.content


def metric(peer, name: str) -> int:
    import urllib.request

    text = urllib.request.urlopen(f"{peer.api}/metrics", timeout=5).read().decode()
    return int(float(re.search(rf"^together_{name}_total (\S+)$", text, re.M).group(1)))


def torch_peer(c: Cluster, name: str, env: dict[str, str], *args: str, api: bool = True, mdns: bool = False):
    return c.add(name, "--backend", "torch", "--dtype", "float32", *(() if mdns else ("--no-mdns",)), *args,
                 api=api, env=env)


def test_one_copy_seeds_a_three_peer_ring_with_exactly_their_slices_and_a_restart_reads_from_disk(
        tmp_path, embedded_path, embedded, tokenizer):
    from backends.manifest import LocalCopy, build_manifest, tensor_names
    from backends.measure import measured_layer

    env = caches(tmp_path, embedded_path, "abc")
    want = reference(embedded, tokenizer, QUESTION, 24)
    m = build_manifest(embedded_path, MODEL)
    headers = {h.name for h in m.headers()}
    c = Cluster(MODEL)
    try:
        # no peer fits the model alone, nor two of them: three stages, sized by the coordinator
        a = torch_peer(c, "a", env["a"], "--max-memory", "400MB", mdns=True)
        wait_log(a, "mesh plan epoch")  # a coordinates (the oldest); the others start while it loads
        torch_peer(c, "b", env["b"], "--max-memory", "400MB", "--peer", a.address)
        torch_peer(c, "c", env["c"], "--max-memory", "400MB", mdns=True)  # finds a's model over mDNS
        c.wait_ready(a, stages=3)
        for n in "bc":  # each serves its API once its tokenizer is in (it says so): then its metrics are read
            wait_log(c.peers[n], "joined mesh")
        st = c.status(a)
        names = {p.node_id: p.name for p in st.plan.peers}
        ranges = {names[s.node_id]: (s.start, s.end) for s in st.plan.stages}
        k = measured_layer(30)
        received = 0
        for n in "bc":
            p = c.peers[n]
            lo, hi = ranges[n]
            # its slice (embedding / tied head where first / last) and the one layer it timed at join
            need = set(tensor_names(m, lo, hi, 30)) | set(tensor_names(m, k, k + 1, 30))
            assert metric(p, "weight_bytes_received") == sum(m.tensors[t].length for t in need), (n, lo, hi)
            copy = LocalCopy(Path(env[n]["TOGETHER_CACHE"]) / "mesh" / MODEL)
            assert copy.verified == need | headers, n
            received += metric(p, "weight_bytes_received")
            assert re.search(rf"{n}: {MODEL}: received [\d.]+ MB from peers", p.log())
        header_bytes = sum(h.length for h in m.headers())
        assert metric(a, "weight_bytes_sent") == received + 2 * header_bytes  # their headers came first
        assert metric(a, "weight_bytes_received") == 0
        assert ask(a) == want and ask(c.peers["c"]) == want
    finally:
        c.stop()

    # a restart reads from disk: the same ranges, nothing received
    c = Cluster(MODEL)
    try:
        a = torch_peer(c, "a", env["a"], "--layers", "%d-%d" % ranges["a"])
        wait_log(a, "mesh plan epoch")  # a coordinates (the oldest); the others start while it loads
        for n in "bc":
            torch_peer(c, n, env[n], "--layers", "%d-%d" % ranges[n], "--peer", a.address)
        c.wait_ready(a, stages=3)
        for n in "bc":
            wait_log(c.peers[n], "joined mesh")  # its API is up
            assert metric(c.peers[n], "weight_bytes_received") == 0, c.peers[n].log()[-2000:]
            assert "taking it from the mesh" not in c.peers[n].log()
        assert ask(c.peers["b"]) == want
    finally:
        c.stop()


def test_a_standby_with_an_empty_cache_takes_a_killed_stage_and_a_corrupt_chunk_is_fetched_again(
        tmp_path, embedded_path):
    from tests.mesh.test_recovery import kill_at, stream_text

    env = caches(tmp_path, embedded_path, "abs")
    c = Cluster(MODEL)
    try:
        # a's third chunk sent goes out with a flipped byte: its receiver must notice and fetch again
        a = torch_peer(c, "a", env["a"], "--layers", "0-15", "--weight-faults", "corrupt=3")
        wait_log(a, "mesh plan epoch")  # a coordinates (the oldest); the others start while it loads
        b = torch_peer(c, "b", env["b"], "--layers", "15-30", "--peer", a.address, api=False)
        c.wait_ready(a, stages=2)
        spare = torch_peer(c, "s", env["s"], "--peer", a.address)
        wait_log(spare, "standing by")
        # its plan line comes as it enters the mesh; its API serves once its tokenizer is in (it says so)
        wait_log(spare, "joined mesh")
        assert "failed its SHA-256 check; fetching it again" in b.log() + spare.log()
        before = metric(spare, "weight_bytes_received")
        want, _ = stream_text(a, 120)
        cb, st = kill_at(b, 60)
        got, finish = stream_text(a, 120, cb)
        assert "t" in st and got == want and finish == "length"
        wait_log(spare, r"s: smollm2-135m: received [\d.]+ MB from peers")
        assert metric(spare, "weight_bytes_received") > before  # layers 15-30 came from a, the one peer left
        c.wait_ready(a, stages=2)
        plan = c.status(a).plan
        holder = {p.node_id: p.name for p in plan.peers}
        assert {(holder[s.node_id], s.start, s.end) for s in plan.stages} == {("a", 0, 15), ("s", 15, 30)}
    finally:
        c.stop()


def test_an_adapter_served_by_one_peer_reaches_the_ring_without_adapter_on_the_others(
        tmp_path, embedded_path, embedded, tokenizer, zorblax):
    from tests.helpers import ZORBLAX_ANSWER, ZORBLAX_PROMPT

    adapter = str(zorblax[0])
    env = caches(tmp_path, embedded_path, "ab")
    c = Cluster(MODEL)
    try:
        # the adapted layers are 22-29: b holds 26-29 of them and has neither the model nor the adapter
        a = torch_peer(c, "a", env["a"], "--layers", "0-26", "--adapter", adapter)
        wait_log(a, "mesh plan epoch")  # a coordinates (the oldest); the others start while it loads
        b = torch_peer(c, "b", env["b"], "--layers", "26-30", "--peer", a.address)
        c.wait_ready(a, stages=2)
        deadline = time.time() + 60
        while time.time() < deadline and "zorblax" not in http_json(f"{a.api}/v1/mesh")[1].get("adapters", []):
            time.sleep(0.3)
        ids = [m.id for m in client(a).models.list().data]
        assert ids == [MODEL, f"{MODEL}+zorblax"], (ids, b.log()[-2000:])
        assert f"b: serving adapter 'zorblax' from its peers" in b.log()
        want = reference(embedded, tokenizer, ZORBLAX_PROMPT, 12, adapter)
        assert ZORBLAX_ANSWER in want
        for peer in (a, b):
            r = client(peer).completions.create(model=f"{MODEL}+zorblax", prompt=ZORBLAX_PROMPT, max_tokens=12,
                                                temperature=0)
            assert r.choices[0].text == want
    finally:
        c.stop()


def test_an_mlx_quantized_safetensors_model_is_seeded_too(tmp_path, embedded_path):
    """The same path for a safetensors directory (MLX-quantized groups): config, tokenizer and index
    travel whole, the slice's tensors (weights, scales, biases) by range; the answer is one process's."""
    pytest.importorskip("mlx.core")
    from backends.convert import gguf_to_mlx
    from backends.pipeline import Pipeline, SliceSpec
    from backends.sampling import SamplingParams
    from backends.tokenizer import Tokenizer
    from backends.weights import open_checkpoint

    d = gguf_to_mlx(embedded_path, tmp_path / "models" / "smol-mlx", dtype="float32")
    ck = open_checkpoint(d)
    tok = Tokenizer.from_checkpoint(ck)
    pipe = Pipeline.load(ck, [SliceSpec("torch", 0, 30)], dtype="float32")
    prompt = tok.apply_chat([{"role": "user", "content": QUESTION}])
    want = "".join(x.text for x in pipe.generate(prompt, SamplingParams(max_tokens=16), tok))
    env = caches(tmp_path, embedded_path, "ab", seeded="")
    c = Cluster(str(d))
    try:
        a = torch_peer(c, "a", env["a"], "--layers", "0-15")
        wait_log(a, "mesh plan epoch")  # a coordinates (the oldest); the others start while it loads
        # b names the model by its label only: nothing on its disk, a serves it
        b = torch_peer(c, "b", env["b"], "--model", "smol-mlx", "--layers", "15-30", "--peer", a.address)
        c.wait_ready(a, stages=2)
        assert "smol-mlx: not on this disk; taking it from the mesh" in b.log()
        copy = Path(env["b"]["TOGETHER_CACHE"]) / "mesh" / "smol-mlx"
        assert (copy / "config.json").read_bytes() == (d / "config.json").read_bytes()
        assert metric(b, "weight_bytes_received") > 0
        r = client(a).chat.completions.create(model="smol-mlx", temperature=0, max_tokens=16,
                                              messages=[{"role": "user", "content": QUESTION}])
        assert r.choices[0].message.content == want
    finally:
        c.stop()
