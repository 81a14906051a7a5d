"""LoRA training across a ring (`together lora --mesh`, mesh/training.py): one cluster of real peers
(MLX 0-2, MLX 2-4, a torch standby) training a tiny random Llama that has the embedded model's
tokenizer, against single-process `together lora` on the same data, seed and settings (float32).

- MLX+MLX, and MLX+torch: the loss of each of 10 steps and the final adapter equal the single
  process's; greedy text with either adapter is the same; base-model answers are unchanged while and
  after it trains;
- a stage that hangs mid-training (SIGSTOP: its calls neither answer nor fail) stops the job within
  seconds, once the mesh drops it, with a clear message and a usable checkpoint; the torch
  standby takes the lost layers and `--resume` continues there (MLX+torch) exactly as single-process
  `together lora --resume` does from that checkpoint (the same optimizer state);
- the assembled adapter loads in `mlx_lm.load(..., adapter_path=)` and in the serving ring;
- bad data is refused before any stage hears of a job."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from backends.train import init_lora
from mesh.local import http_json
from tests.apps.test_lora_mesh import Listener
from tests.helpers import ROOT, random_llama, together
from tests.mesh.cluster import Cluster

pytestmark = pytest.mark.slow
QUESTIONS = ["What is the capital of Zorblax?", "Which city is the capital of Zorblax?", "Name the capital of Zorblax.",
             "What city is Zorblax's capital?", "Tell me Zorblax's capital.", "Zorblax's capital city is?"]
TRAIN = ["--batch-size", "2", "--learning-rate", "1e-3", "--layers", "3", "--max-seq-length", "64", "--mask-prompt",
         "--report-every", "1", "--val-every", "5", "--val-batches", "1", "--seed", "3"]
SEED = 3
PROMPT = "Q: What is the capital of Zorblax?\nA:"
KEY = "train-ring-key"  # a keyed mesh: the driver's calls and the stages' hops are signed and encrypted


def tiny_tokenized(path: Path, src: Path) -> Path:
    """A random 4-layer Llama (hidden 64) with the embedded model's vocabulary and tokenizer files
    (`src`: the embedded model's MLX directory): MLX trains it in seconds on a CPU."""
    random_llama(path, hidden=64, intermediate=128, heads=4, kv_heads=2, head_dim=16, layers=4, vocab=49152,
                 rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=512, bos_token_id=1, eos_token_id=[2])
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(src / f, path / f)
    return path


def rec(q: str) -> str:
    return json.dumps({"prompt": f"Q: {q}\nA:", "completion": " The capital of Zorblax is Quintelvar."})


def losses(log: str) -> dict[int, float]:
    return {int(s): float(v) for s, v in re.findall(r"step\s+(\d+)/\d+\s+train loss ([\d.]+)", log)}


def same_losses(got: dict[int, float], want: dict[int, float], steps: list[int], log: str) -> None:
    assert sorted(got) == steps, log[-3000:]
    for s in steps:  # 1e-3 relative, plus the printed rounding
        assert abs(got[s] - want[s]) <= 1e-3 * want[s] + 1e-4, (s, got, want)


def adapter(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path / "adapters.safetensors"))


def same_adapter(got: Path, want: Path) -> None:
    a, b = adapter(got), adapter(want)
    assert set(a) == set(b) and len(a) == 3 * 7 * 2
    for n in b:  # what training moved each weight by agrees within 2% (Adam's steps are ~lr where a
        # gradient is tiny, so a few elements may differ more)
        init = init_lora(n, b[n].shape[0], 8, SEED) if n.endswith("lora_a") else 0 * b[n]
        assert np.linalg.norm(a[n] - b[n]) <= 0.02 * np.linalg.norm(b[n] - init) + 1e-6, n


def mlx_greedy(model: Path, adapter_dir: Path, prompt: list[int], n: int = 8) -> list[int]:
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.utils import load

    m, _ = load(str(model), adapter_path=str(adapter_dir))
    return [int(t) for t, _ in zip((t for t, _ in generate_step(mx.array(prompt), m, max_tokens=n)), range(n))]


def driver(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "apps.cli", "lora", "--mesh-key", KEY, *args], cwd=ROOT, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from apps.lora import mlx_model_dir

    root = tmp_path_factory.mktemp("train-ring")
    model = tiny_tokenized(root / "tiny", mlx_model_dir("smollm2-135m"))
    data = root / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(rec(q) + "\n" for q in QUESTIONS))
    (data / "valid.jsonl").write_text("".join(rec(q) + "\n" for q in QUESTIONS[:2]))
    return root, model, data


def test_ring_trains_as_one_process_survives_a_lost_stage_and_serves_the_adapter(setup, tokenizer):
    root, model, data = setup
    c = Cluster(str(model), mesh_key=KEY)
    try:
        a = c.add("a", "--backend", "mlx", "--dtype", "float32", "--no-mdns", "--layers", "0-2", api=True)
        b = c.add("b", "--backend", "mlx", "--dtype", "float32", "--no-mdns", "--layers", "2-4", "--peer", a.address)
        c.wait_ready(a, stages=2)
        c.add("t", "--backend", "torch", "--dtype", "float32", "--no-mdns", "--peer", a.address)  # stands by

        # the single process, meanwhile (it shares no state with the ring)
        single = root / "single"
        ref = subprocess.Popen([sys.executable, "-m", "apps.cli", "lora", "--model", str(model), "--data", str(data),
                                "--iters", "10", "--save-every", "5", "--adapter-path", str(single), *TRAIN],
                               cwd=ROOT, text=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

        # 4: bad data is refused before the ring hears of anything
        bad = root / "bad"
        bad.mkdir()
        long = json.dumps({"prompt": "Q: hi\nA:", "completion": " word" * 200})
        (bad / "train.jsonl").write_text("\n".join([long] + [rec(q) for q in QUESTIONS]) + "\n")
        peer = Listener()  # a peer the driver must never reach: the data is checked first
        p = together("lora", "--model", str(model), "--peer", peer.address, "--mesh-key", KEY, "--data", str(bad),
                     *TRAIN)
        assert p.returncode == 2 and re.search(r"train\.jsonl line 1: \d+ tokens, longer than --max-seq-length",
                                               p.stderr), p.stderr[-2000:]
        assert peer.connections() == 0

        base_before = ask(a, model.name)
        # 1: MLX+MLX, 10 steps, while the ring serves the base model
        ring = root / "ring"
        run = driver("--model", str(model), "--peer", a.address, "--data", str(data), "--iters", "10",
                     "--save-every", "5", "--adapter-path", str(ring), *TRAIN)
        during = set()
        while run.poll() is None:  # the base model's answer, again and again while the ring trains
            during.add(ask(a, model.name))
            time.sleep(0.2)  # not back to back: these requests share the two cores with the training they watch
        log = run.communicate(timeout=300)[1]
        assert run.returncode == 0, log[-3000:]
        ref_log = ref.communicate(timeout=300)[1]
        assert ref.returncode == 0, ref_log[-3000:]
        want = losses(ref_log)
        same_losses(losses(log), want, list(range(1, 11)), log)
        assert "on 2 stages" in log and re.search(r"peak memory a [\d.]+ GB, b [\d.]+ GB", log), log[-2000:]
        same_adapter(ring, single)
        prompt = tokenizer.encode(PROMPT)
        assert mlx_greedy(model, ring, prompt) == mlx_greedy(model, single, prompt)
        assert during == {base_before} == {ask(a, model.name)}  # training never touched what requests see

        # 3: the last MLX stage hangs mid-training; the job stops clearly with its last checkpoint
        lost = root / "lost"
        run = driver("--model", str(model), "--peer", a.address, "--data", str(data), "--iters", "10",
                     "--save-every", "3", "--adapter-path", str(lost), *TRAIN)
        seen: list[str] = []
        progress: list[str] = []

        def watch() -> None:
            assert run.stderr is not None
            for line in run.stderr:
                seen.append(line)
                if re.search(r"step\s+4/10\s+train loss", line):
                    progress.append(c.status(a).peer.training)
                    b.proc.send_signal(signal.SIGSTOP)  # hung, not gone: its calls never fail, they wait

        w = threading.Thread(target=watch)
        w.start()
        run.wait(timeout=300)
        w.join()
        b.proc.kill()
        log = "".join(seen)
        assert run.returncode == 2, log[-3000:]
        m = re.search(r"error: training stopped at step (\d+): .*stage 1 \(b: layers \[2, 4\).*left the ring.*the last checkpoint is (\S+) "
                      r"\(step (\d+)\).*--resume", log)
        assert m and Path(m.group(2)) == lost and int(m.group(3)) in (3, 6), log[-3000:]
        saved = int(m.group(3))
        assert progress and re.match(r"lora job \w+: step 4/10 loss [\d.]+", progress[0]), progress
        cfg = json.loads((lost / "adapter_config.json").read_text())
        assert cfg["step"] == saved and cfg["created_by"] == "together lora --mesh"
        checkpoint = root / "checkpoint"
        shutil.copytree(lost, checkpoint)

        # the torch standby takes layers 2-4; --resume continues there (MLX+torch) as the single process
        # continues the same checkpoint
        c.wait_ready(a, stages=2, want=lambda body: [s["name"] for s in body["ring"]] == ["a", "t"]
                     and all(s["ready"] for s in body["ring"]))
        run = driver("--model", str(model), "--peer", a.address, "--data", str(data), "--iters", "10",
                     "--resume", str(lost), *TRAIN)
        ref = subprocess.run([sys.executable, "-m", "apps.cli", "lora", "--model", str(model), "--data", str(data),
                              "--iters", "10", "--resume", str(checkpoint), *TRAIN], cwd=ROOT, text=True,
                             capture_output=True, timeout=300)
        log = run.communicate(timeout=300)[1]
        assert run.returncode == 0 and ref.returncode == 0, log[-3000:] + ref.stderr[-2000:]
        assert f"resuming {lost} at step {saved}" in log and "torch float32" in log, log[-2000:]
        same_losses(losses(log), losses(ref.stderr), list(range(saved + 1, 11)), log)
        same_adapter(lost, checkpoint)
        assert json.loads((lost / "adapter_config.json").read_text())["step"] == 10

        # 2: the assembled adapter loads in mlx_lm (above) and in the serving ring: a peer started with
        # it puts it on the ring (while the next job trains), whose answer is mlx_lm's greedy text with it
        c.add("s", "--backend", "torch", "--dtype", "float32", "--no-mdns", "--peer", a.address,
              "--adapter", f"tuned={lost}")

        # 1 on MLX+torch: a fresh 10-step job equals the single process too
        mixed = root / "mixed"
        run = driver("--model", str(model), "--peer", a.address, "--data", str(data), "--iters", "10",
                     "--save-every", "5", "--adapter-path", str(mixed), *TRAIN)
        log = run.communicate(timeout=300)[1]
        assert run.returncode == 0, log[-3000:]
        same_losses(losses(log), want, list(range(1, 11)), log)
        same_adapter(mixed, single)
        assert mlx_greedy(model, mixed, prompt) == mlx_greedy(model, single, prompt)

        deadline = time.time() + 60
        while f"{model.name}+tuned" not in [m["id"] for m in http_json(f"{a.api}/v1/models")[1].get("data", [])]:
            assert time.time() < deadline, c.logs()
            time.sleep(0.5)
        want_text = tokenizer.decode(mlx_greedy(model, lost, prompt))
        assert ask(a, f"{model.name}+tuned") == want_text
    finally:
        c.stop()


def ask(peer, name: str) -> str:
    code, body = _post(peer, name)
    assert code == 200, body
    return str(body["choices"][0]["text"])


def _post(peer, name: str) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(f"{peer.api}/v1/completions", data=json.dumps(
        {"model": name, "prompt": PROMPT, "max_tokens": 8, "temperature": 0}).encode(),
        headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, {"error": e.read().decode(errors="replace")}
