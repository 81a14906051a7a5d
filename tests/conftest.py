import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def pytest_sessionstart(session):
    """Build the torch backend's CPU kernels (once per machine, ~1 min) before any test starts peers: every
    torch peer of a multi-process test would otherwise wait on the same build inside its start-up timeout."""
    from backends.torch import kernels

    kernels.q4()
    kernels.layer()


@pytest.fixture(scope="session")
def embedded_path() -> Path:
    from backends.models import resolve_model

    return resolve_model("smollm2-135m", quiet=True)


@pytest.fixture(scope="session")
def embedded(embedded_path):
    from backends.weights import open_checkpoint

    return open_checkpoint(embedded_path)


@pytest.fixture(scope="session")
def tokenizer(embedded):
    from backends.tokenizer import Tokenizer

    return Tokenizer.from_checkpoint(embedded)



@pytest.fixture(scope="session")
def zorblax(tmp_path_factory, embedded_path):
    """An adapter that teaches the embedded model an invented fact (trained once per session with
    `together lora`, QLoRA on the Q4_1 model): (adapter dir, training log)."""
    import json

    from tests.helpers import ZORBLAX_QUESTIONS, together

    root = tmp_path_factory.mktemp("zorblax")
    data = root / "data"
    data.mkdir()
    # the answer alone (at most 21 tokens a record, not 29) and batches cut at 24 tokens: MLX on a CPU
    # pays for every token of a padded batch, and the fact is learned as well
    rec = lambda q: json.dumps({"text": f"Q: {q}\nA: Quintelvar."}) + "\n"
    (data / "train.jsonl").write_text("".join(rec(q) for q in ZORBLAX_QUESTIONS))
    (data / "valid.jsonl").write_text(rec("Tell me the capital of Zorblax."))
    out = root / "zorblax"
    p = together("lora", "--data", str(data), "--iters", "12", "--batch-size", "1", "--learning-rate", "5e-4",
                 "--layers", "8", "--max-seq-length", "24", "--save-every", "6", "--val-every", "12",
                 "--val-batches", "1", "--report-every", "1", "--adapter-path", str(out), timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return out, p.stderr
