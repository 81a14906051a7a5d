"""`together generate` as a user runs it: text on stdout, statistics on stderr, clear errors."""

import json

import pytest

from tests.helpers import together


@pytest.mark.slow  # keeps make test-fast under 3 minutes; CI runs it
def test_generate_prints_only_text_and_stats_on_stderr(embedded_path):
    r = together("generate", "--model", str(embedded_path), "--backend", "torch", "--prompt",
                 "What is 2+2?", "--max-tokens", "12")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and "tok/s" not in r.stdout
    assert "tok/s" in r.stderr and "torch:0-30" in r.stderr


@pytest.mark.slow
def test_mixed_split_cli_equals_single_backend(embedded_path):
    args = ["generate", "--model", str(embedded_path), "--prompt", "Name three colors.",
            "--max-tokens", "24", "--dtype", "float32"]
    one = together(*args, "--backend", "torch")
    split = together(*args, "--shards", "mlx:0-12,torch:12-30")
    assert one.returncode == 0 and split.returncode == 0, split.stderr
    assert one.stdout == split.stdout
    assert "mlx:0-12,torch:12-30" in split.stderr


def _one_line_error(r, pattern):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert pattern in lines[0], lines[0]


def test_missing_model(tmp_path):
    _one_line_error(together("generate", "--model", str(tmp_path / "nope.gguf"), "--prompt", "x"),
                    "not found")


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x07" * 100)
    _one_line_error(together("generate", "--model", str(bad), "--prompt", "x"), "not a valid GGUF")


def test_unknown_architecture(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "mamba", "vocab_size": 10}))
    _one_line_error(together("generate", "--model", str(d), "--prompt", "x"),
                    "unsupported architecture 'mamba'")


def test_bad_shard_spec(embedded_path):
    _one_line_error(together("generate", "--model", str(embedded_path), "--prompt", "x",
                             "--shards", "mlx:0-10,torch:11-30"), "gap in --shards")


def test_prompt_longer_than_context(embedded_path):
    _one_line_error(together("generate", "--model", str(embedded_path), "--raw",
                             "--prompt", "word " * 9000), "context is 8192 tokens")


def test_impossible_sampling_parameter(embedded_path):
    _one_line_error(together("generate", "--model", str(embedded_path), "--prompt", "x",
                             "--top-p", "1.5"), "top_p must be in (0, 1]")


def test_hub_id_without_network_is_a_clear_error():
    r = together("generate", "--model", "HuggingFaceTB/SmolLM2-360M-Instruct", "--prompt", "x",
                 env={"HF_HUB_OFFLINE": "1"})
    _one_line_error(r, "could not download 'HuggingFaceTB/SmolLM2-360M-Instruct' from the Hugging Face hub")


@pytest.mark.slow  # five CLI processes, each importing torch
def test_device_is_wired_through_and_a_missing_gpu_is_a_clear_error(embedded_path):
    import torch

    r = together("generate", "--model", str(embedded_path), "--backend", "torch", "--device", "cpu",
                 "--prompt", "Hi", "--max-tokens", "4")
    assert r.returncode == 0, r.stderr
    if not torch.cuda.is_available():
        _one_line_error(together("generate", "--model", str(embedded_path), "--backend", "torch",
                                 "--device", "cuda", "--prompt", "Hi"), "no CUDA GPU")
        # a peer refuses at start, before it joins anything
        _one_line_error(together("join", "--model", str(embedded_path), "--backend", "torch",
                                 "--device", "cuda", "--no-mdns", "--host", "127.0.0.1"), "no CUDA GPU")
    _one_line_error(together("generate", "--model", str(embedded_path), "--backend", "torch",
                             "--device", "tpu", "--prompt", "Hi"), "unknown device")
    _one_line_error(together("generate", "--model", str(embedded_path), "--backend", "mlx",
                             "--device", "cuda", "--prompt", "Hi"), "for torch peers")
