"""`together plan`: placements for described machines (config only, no weights) and for a live mesh."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from apps.cli import main
from apps.plan import FORMAT_BYTES, KV_RESERVE_TOKENS, head_bytes, load_model

LLAMA3_8B = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
             "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
             "max_position_embeddings": 8192, "rope_theta": 500000.0, "tie_word_embeddings": False}

MACHINES = """
[[machines]]
name = "mac16"
memory = "16GB"
backend = "mlx"
dtype = "float16"
bandwidth_gbs = 100
tflops = 7
api = true

[[machines]]
name = "laptop"
memory = "8GB"
bandwidth_gbs = 50
tflops = 2

[[machines]]
name = "wifi"
memory = "8GB"
bandwidth_gbs = 50
tflops = 2

[default_link]
rtt_ms = 1
mbps = 1000

[[links]]
between = ["wifi", "mac16"]
rtt_ms = 40
mbps = 30

[[links]]
between = ["wifi", "laptop"]
rtt_ms = 40
mbps = 30
"""


@pytest.fixture
def llama_dir(tmp_path: Path) -> Path:
    d = tmp_path / "llama3-8b"  # the config alone: no weights anywhere
    d.mkdir()
    (d / "config.json").write_text(json.dumps(LLAMA3_8B))
    return d


def plan_json(capsys, *args: str) -> dict:
    assert main(["plan", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def fits(model_dir: Path | str, out: dict, memory: dict[str, int], fmt: dict[str, str]) -> None:
    cfg = load_model(str(model_dir)).config
    kv = cfg.kv_bytes_per_token(4) * KV_RESERVE_TOKENS
    assert out["stages"][0]["start"] == 0 and out["stages"][-1]["end"] == cfg.num_hidden_layers
    for st, nxt in zip(out["stages"], out["stages"][1:]):
        assert st["end"] == nxt["start"]
    for st in out["stages"]:
        f = fmt[st["peer"]]
        used = (st["end"] - st["start"]) * (cfg.layer_bytes(FORMAT_BYTES[f]) + kv) + head_bytes(cfg, f)
        assert used <= memory[st["peer"]], st


def test_plan_for_llama3_8b_on_a_mac_and_two_laptops_fits_memory(tmp_path, llama_dir, capsys) -> None:
    machines = tmp_path / "m.toml"
    machines.write_text(MACHINES)
    out = plan_json(capsys, "--model", str(llama_dir), "--machines", str(machines))
    memory = {"mac16": 16 * 10**9, "laptop": 8 * 10**9, "wifi": 8 * 10**9}
    fits(llama_dir, out, memory, {"mac16": "float16", "laptop": "bfloat16", "wifi": "bfloat16"})
    layers = {s["peer"]: s["end"] - s["start"] for s in out["stages"]}
    assert layers.get("wifi", 0) < layers["laptop"] < layers["mac16"]  # fewer layers behind the slow link
    assert 0 < out["decode_tokens_per_s"] < out["prefill_tokens_per_s"]
    assert {h["bytes"] for h in out["hops"]} & {4096 * 2 + 160}  # float16 / bfloat16 hidden states per token
    assert out["limit"].split(":")[0] in ("compute", "link", "memory")
    # the table names the same things
    assert main(["plan", "--model", str(llama_dir), "--machines", str(machines)]) == 0
    text = capsys.readouterr().out
    for want in ("mac16", "memory used of free", "predicted decode", "predicted prefill", "limit:", "bytes"):
        assert want in text


def test_plan_for_the_embedded_model_reads_no_weights(tmp_path, capsys, monkeypatch) -> None:
    from backends import weights

    def no(*a, **k):
        raise AssertionError("together plan read weights")

    for name in ("numpy", "affine", "part", "_stored_dense", "_stored_affine"):
        monkeypatch.setattr(weights.TensorRef, name, no)
    machines = tmp_path / "m.json"
    machines.write_text(json.dumps({"machines": [
        {"name": "a", "memory": "200MB", "layer_ms": 0.4, "prefill_ms": 0.05, "dtype": "float32", "api": True},
        {"name": "b", "memory": "100MB", "layer_ms": 0.4, "prefill_ms": 0.05, "dtype": "float32"}]}))
    out = plan_json(capsys, "--model", "smollm2-135m", "--machines", str(machines))
    fits("smollm2-135m", out, {"a": 200 * 10**6, "b": 100 * 10**6}, {"a": "int4", "b": "int4"})
    assert len(out["stages"]) == 2 and out["standby"] == []
    assert any("not measured" in n for n in out["notes"])  # no links given: a LAN is assumed, and said


def test_plan_refuses_an_impossible_set_with_the_reason(tmp_path, llama_dir, capsys) -> None:
    machines = tmp_path / "small.toml"
    machines.write_text("\n".join(f'[[machines]]\nname = "p{i}"\nmemory = "3GB"\nbandwidth_gbs = 50\n'
                                  for i in range(3)))
    assert main(["plan", "--model", str(llama_dir), "--machines", str(machines)]) == 1
    err = capsys.readouterr().err
    assert "impossible: not enough memory" in err and "short by" in err and "add a peer or memory" in err


def test_plan_explains_a_machine_without_a_speed(tmp_path, llama_dir, capsys) -> None:
    machines = tmp_path / "m.toml"
    machines.write_text('[[machines]]\nname = "x"\nmemory = "64GB"\n')
    assert main(["plan", "--model", str(llama_dir), "--machines", str(machines)]) == 2
    assert "give `layer_ms`" in capsys.readouterr().err


@pytest.mark.slow
def test_plan_on_a_live_two_peer_mesh(embedded_path, capsys) -> None:
    from mesh.local import LocalMesh

    mesh = LocalMesh(str(embedded_path))
    try:
        a = mesh.add("a", "--backend", "torch", api=True)
        mesh.add("b", "--backend", "torch")
        mesh.wait_complete(a, timeout=180)
        out = plan_json(capsys, "--model", str(embedded_path), "--peer", a.address)
    finally:
        mesh.stop()
    assert [s["peer"] for s in out["stages"]] and out["stages"][-1]["end"] == 30
    assert {s["peer"] for s in out["stages"]} | set(out["standby"]) == {"a", "b"}
    assert out["decode_tokens_per_s"] > 0
    # the peers' measured prefill_ms came through their PeerInfo (a token of a chunk through a layer costs
    # a fraction of a one-token step: the weights are read once for the chunk); without it a prefill token
    # would be counted at a decode step's cost, and prefill predicted no faster than decode
    speeds = {p["peer"]: p for p in out["peers"]}
    assert set(speeds) == {"a", "b"}
    assert all(0 < s["prefill_ms"] < s["layer_ms"] and not s["estimated"] for s in speeds.values()), speeds
    assert out["prefill_tokens_per_s"] > out["decode_tokens_per_s"]
