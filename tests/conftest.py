import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


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
