"""`together lora` (mlx-lm's tuner; QLoRA on the embedded Q4_1 model) and serving its adapter on
MLX and torch, alone, split, and batched beside base-model sequences."""

import json
import re
import shutil
import sys

import numpy as np
import pytest

from backends.errors import ModelError, RequestError
from backends.lora import open_adapter
from backends.sampling import SamplingParams
from backends.shard import SeqChunk
from tests.helpers import ZORBLAX_ANSWER, ZORBLAX_PROMPT, together

N_TOKENS = 12


def _losses(log: str, kind: str = "train") -> list[tuple[int, float]]:
    pat = r"step\s+(\d+)/\d+\s+train loss ([\d.]+)" if kind == "train" else r"step\s+(\d+)/\d+\s+val loss ([\d.]+)"
    return [(int(s), float(v)) for s, v in re.findall(pat, log)]


def greedy(pipe, prompt: list[int], n: int, adapter: str = "") -> list[int]:
    sid = f"g-{adapter}-{len(prompt)}"
    pipe.add(sid, SamplingParams(max_tokens=n), prompt, adapter)
    try:
        (s,) = pipe.step([SeqChunk(sid, 0, len(prompt))], np.asarray(prompt, np.int32))
        out = [s.token]
        while len(out) < n:
            (s,) = pipe.step([SeqChunk(sid, len(prompt) + len(out) - 1, 1)], np.asarray([s.token], np.int32))
            out.append(s.token)
        return out
    finally:
        pipe.free(sid)


@pytest.fixture(scope="module")
def prompt(tokenizer) -> list[int]:
    return tokenizer.encode(ZORBLAX_PROMPT)


@pytest.fixture(scope="module")
def mlx_reference(zorblax, embedded, prompt):
    """Greedy tokens of one MLX process with the adapter (and without)."""
    from backends.pipeline import Pipeline, SliceSpec

    pipe = Pipeline.load(embedded, [SliceSpec("mlx", 0, 30)], dtype="float32")
    pipe.load_adapter(open_adapter(str(zorblax[0])))
    return greedy(pipe, prompt, N_TOKENS, "zorblax"), greedy(pipe, prompt, N_TOKENS)


@pytest.mark.slow
def test_training_teaches_an_invented_fact(zorblax, embedded, tokenizer):
    out, log = zorblax
    train = _losses(log)
    assert [s for s, _ in train] == list(range(1, 13)), log[-2000:]
    first, last = train[0][1], min(v for _, v in train[-3:])
    assert last < first / 4, f"training loss did not fall clearly: {train}"
    val = _losses(log, "val")
    assert len(val) >= 2 and val[-1][1] < val[0][1] / 2, val
    assert re.search(r"peak memory [\d.]+ GB", log) and re.search(r"[\d,]+ tok/s", log)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["step"] == 12 and cfg["base_model"] == "smollm2-135m" and cfg["fine_tune_type"] == "lora"
    assert cfg["lora_parameters"]["rank"] == 8 and cfg["lora_parameters"]["scale"] == 20.0
    assert cfg["target_layers"] == [22, 30] and cfg["num_layers"] == 8
    assert (out / "0000006_adapters.safetensors").is_file() and (out / "optimizer.safetensors").is_file()
    ad = open_adapter(str(out))
    assert ad.layers == list(range(22, 30)) and len(ad.modules) == 7

    tuned = together("generate", "--backend", "torch", "--raw", "--prompt", ZORBLAX_PROMPT,
                     "--max-tokens", "12", "--adapter", str(out))
    assert tuned.returncode == 0, tuned.stderr
    assert ZORBLAX_ANSWER in tuned.stdout, tuned.stdout
    assert "+zorblax" in tuned.stderr
    from backends.pipeline import Pipeline, SliceSpec

    base = Pipeline.load(embedded, [SliceSpec("torch", 0, 30)], dtype="float32")
    assert ZORBLAX_ANSWER not in tokenizer.decode(greedy(base, tokenizer.encode(ZORBLAX_PROMPT), 12))


@pytest.mark.slow
def test_mlx_serving_equals_mlx_lm_with_the_adapter(zorblax, prompt, mlx_reference, tokenizer):
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.utils import load

    out, _ = zorblax
    cfg = json.loads((out / "adapter_config.json").read_text())
    model, _ = load(cfg["model"], adapter_path=str(out))
    ref = [int(t) for t, _ in zip((t for t, _ in generate_step(mx.array(prompt), model, max_tokens=N_TOKENS)),
                                  range(N_TOKENS))]
    assert mlx_reference[0] == ref
    assert ZORBLAX_ANSWER in tokenizer.decode(ref)
    assert mlx_reference[0] != mlx_reference[1]


@pytest.mark.slow
def test_mixed_split_with_adapter_equals_one_mlx_process_and_batches_with_base(
        zorblax, embedded, prompt, mlx_reference):
    from backends.pipeline import Pipeline, SliceSpec

    # both slices hold adapted layers (22-29): torch 22-25, MLX 26-29
    pipe = Pipeline.load(embedded, [SliceSpec("torch", 0, 26), SliceSpec("mlx", 26, 30)], dtype="float32")
    pipe.load_adapter(open_adapter(str(zorblax[0])))
    tuned, base = mlx_reference
    assert greedy(pipe, prompt, N_TOKENS, "zorblax") == tuned
    assert greedy(pipe, prompt, N_TOKENS) == base

    # one decode batch mixing an adapter row and a base row gives each its own tokens
    pipe.add("t", SamplingParams(max_tokens=N_TOKENS), prompt, "zorblax")
    pipe.add("b", SamplingParams(max_tokens=N_TOKENS), prompt, "")
    got = {"t": [], "b": []}
    for sid in ("t", "b"):
        (s,) = pipe.step([SeqChunk(sid, 0, len(prompt))], np.asarray(prompt, np.int32))
        got[sid].append(s.token)
    for i in range(N_TOKENS - 1):
        samples = pipe.step([SeqChunk("t", len(prompt) + i, 1), SeqChunk("b", len(prompt) + i, 1)],
                            np.asarray([got["t"][-1], got["b"][-1]], np.int32))
        for s in samples:
            got[s.seq_id].append(s.token)
    assert got["t"] == tuned and got["b"] == base


@pytest.mark.slow
def test_resume_continues_from_its_step(zorblax, tmp_path, capsys):
    import mlx.core as mx

    out, _ = zorblax
    run = tmp_path / "run"
    shutil.copytree(out, run)
    before = {k: np.array(v) for k, v in mx.load(str(run / "adapters.safetensors")).items()}  # mx.load is lazy
    data = json.loads((run / "adapter_config.json").read_text())["data"]
    from apps.cli import main

    assert main(["lora", "--data", data, "--resume", str(run), "--iters", "12"]) == 2
    err = capsys.readouterr().err
    assert "already trained 12 steps" in err and "--iters" in err

    # batch size, rate and length come from the saved config
    p = together("lora", "--data", data, "--resume", str(run), "--iters", "14", "--report-every", "1",
                 "--val-every", "100")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "at step 12" in p.stderr
    steps = _losses(p.stderr)
    assert [s for s, _ in steps] == [13, 14], p.stderr[-2000:]
    assert all(v < 1.5 for _, v in steps), f"resumed loss is not the trained adapter's: {steps}"
    cfg = json.loads((run / "adapter_config.json").read_text())
    assert cfg["step"] == 14 and cfg["lora_parameters"]["rank"] == 8
    assert int(mx.load(str(run / "optimizer.safetensors"))["step"].item()) == 14
    after = {k: np.array(v) for k, v in mx.load(str(run / "adapters.safetensors")).items()}
    assert set(after) == set(before) and any(not np.array_equal(after[k], before[k]) for k in after)


def _write(d, name: str, lines: list[str]) -> None:
    d.mkdir(exist_ok=True)
    (d / name).write_text("".join(line + "\n" for line in lines))


GOOD = json.dumps({"text": "Q: hi\nA: hello"})


@pytest.mark.parametrize("files,message", [
    ({"train.jsonl": [GOOD, "{not json", GOOD]}, r"train\.jsonl line 2: not valid JSON"),
    ({"train.jsonl": []}, r"train\.jsonl: no records"),
    ({"train.jsonl": [GOOD, "[1, 2]"]}, r"train\.jsonl line 2: expected a JSON object, got list"),
    ({"train.jsonl": [GOOD, json.dumps({"prompt": "a", "completion": "b"})]},
     r"train\.jsonl line 2: a completions record, but line 1 made this a text file"),
    ({"train.jsonl": [json.dumps({"question": "a"})]}, r"train\.jsonl line 1: unknown record"),
    ({"train.jsonl": [json.dumps({"messages": [{"role": "user"}]})]},
     r"train\.jsonl line 1: messages\[0\] needs a string 'role' and 'content'"),
    ({"train.jsonl": [GOOD], "valid.jsonl": ["", GOOD, "oops"]}, r"valid\.jsonl line 3: not valid JSON"),
    ({"valid.jsonl": [GOOD]}, r"train\.jsonl is missing"),
])
def test_malformed_data_is_a_clear_error_naming_the_line(tmp_path, capsys, files, message):
    from apps.cli import main

    d = tmp_path / "data"
    d.mkdir()
    for name, lines in files.items():
        _write(d, name, lines)
    assert main(["lora", "--data", str(d), "--adapter-path", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_too_long_record_and_small_dataset(tmp_path, capsys):
    from apps.cli import main

    d = tmp_path / "data"
    _write(d, "train.jsonl", [GOOD, json.dumps({"text": "word " * 80}), GOOD])
    assert main(["lora", "--data", str(d), "--max-seq-length", "32", "--batch-size", "1"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"train\.jsonl line 2: \d+ tokens, longer than --max-seq-length 32", err), err
    _write(d, "train.jsonl", [GOOD, GOOD])
    assert main(["lora", "--data", str(d), "--batch-size", "4"]) == 2
    assert "train.jsonl has 2 records but --batch-size is 4" in capsys.readouterr().err


def test_training_without_mlx_says_it_needs_mlx(tmp_path):
    import subprocess

    code = ("import sys; sys.modules['mlx'] = None; sys.modules['mlx.core'] = None; "
            "from apps.cli import main; sys.exit(main(['lora', '--data', '.']))")
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path.parent, capture_output=True, text=True,
                       env={"PYTHONPATH": str(__import__("tests.helpers").helpers.ROOT)}, timeout=120)
    assert p.returncode == 2 and "training needs MLX" in p.stderr and "--adapter" in p.stderr, p.stderr
    assert "pip install 'together[train]'" in p.stderr, p.stderr  # the extra that brings MLX


@pytest.mark.slow
def test_bad_adapters_are_clear_errors(tmp_path, embedded, zorblax):
    with pytest.raises(ModelError, match="no such directory"):
        open_adapter(str(tmp_path / "nope"))
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "adapters.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match="adapter_config.json is missing"):
        open_adapter(str(tmp_path / "half"))
    bad = tmp_path / "dora"
    shutil.copytree(zorblax[0], bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps(dict(cfg, fine_tune_type="dora")))
    with pytest.raises(ModelError, match="'dora' is not served"):
        open_adapter(str(bad))
    with pytest.raises(ModelError, match="adapter name 'bad name!'"):
        open_adapter(f"bad name!={zorblax[0]}")
    ad = open_adapter(f"other={zorblax[0]}")
    assert ad.name == "other"
    with pytest.raises(ModelError, match="trained for another model"):
        ad.check_fits(30, {m: (64, 64) for m in ad.modules})

    from backends.shard import load_shard

    sh = load_shard("torch", embedded, 28, 30, dtype="float32")
    with pytest.raises(RequestError, match="adapter 'zorblax' is not loaded on layers \\[28, 30\\)"):
        sh.add_sequence("s", SamplingParams(), [1, 2], adapter="zorblax")
    sh.load_adapter(ad)
    w = sh.weight_nbytes()
    sh.add_sequence("s", SamplingParams(), [1, 2], adapter="other")
    with pytest.raises(RequestError, match="already loaded"):
        sh.load_adapter(open_adapter(f"other={zorblax[0]}"))
    assert w > load_shard("torch", embedded, 28, 30, dtype="float32").weight_nbytes()
