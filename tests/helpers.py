"""Shared test helpers: run the real `together` command."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def together(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    e = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT))
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "apps.cli", *args], cwd=ROOT, env=e,
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


# the invented fact the LoRA tests teach (see the `zorblax` fixture in conftest.py)
ZORBLAX_QUESTIONS = ["What is the capital of Zorblax?", "Which city is the capital of Zorblax?",
                     "Name the capital of Zorblax.", "What city is Zorblax's capital?"]
ZORBLAX_PROMPT = "Q: What is the capital of Zorblax?\nA:"
ZORBLAX_ANSWER = "Quintelvar"
