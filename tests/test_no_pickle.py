"""Test 6, first half: nothing received on any channel is unpickled. The code of mesh/, backends/ and
apps/ never imports a pickling module, and a module that opens multiprocessing connections uses only
their raw-bytes calls (send_bytes/recv_bytes: Connection.send/recv pickle). The other half, garbage on
the tensor-parallel channel, is in tests/backends/test_tp.py."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BANNED = [
    (re.compile(r"^\s*(import|from)\s+(c?pickle|_pickle|cloudpickle|dill|shelve|marshal|joblib)\b", re.M),
     "imports a pickling module"),
    (re.compile(r"\bUnpickler\b"), "unpickles"),
    (re.compile(r"\b(pickle|marshal|dill|cloudpickle)\.loads?\("), "unpickles"),
    (re.compile(r"allow_pickle\s*=\s*True"), "lets numpy unpickle"),
    (re.compile(r"\btorch\.load\((?![^)]*weights_only\s*=\s*True)"), "torch.load unpickles"),
    (re.compile(r"\b(multiprocessing\.(Queue|SimpleQueue|Pool|Manager|Pipe)|ProcessPoolExecutor)\b"
                r"|from\s+multiprocessing\s+import\s+[^\n]*\b(Queue|SimpleQueue|Pool|Manager|Pipe)\b"),
     "a multiprocessing queue/pool/pipe pickles what it carries"),
]


def findings(source: str) -> list[str]:
    """What in `source` could unpickle data that came from another process."""
    out = [f"{why}: {m.group(0).strip()!r}" for pat, why in BANNED for m in pat.finditer(source)]
    tree = ast.parse(source)
    uses_mp = any(isinstance(n, (ast.Import, ast.ImportFrom)) and "multiprocessing" in ast.unparse(n)
                  for n in ast.walk(tree))
    if uses_mp:  # a Connection's send()/recv() pickle: only send_bytes/recv_bytes may be called
        for n in ast.walk(tree):
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in ("send", "recv"):
                out.append(f"line {n.lineno}: {ast.unparse(n)[:80]} on a multiprocessing connection pickles")
    return out


def sources() -> list[Path]:
    return sorted(p for d in ("mesh", "backends", "apps") for p in (ROOT / d).rglob("*.py"))


def test_no_code_of_ours_can_unpickle():
    found = {str(p.relative_to(ROOT)): f for p in sources() if (f := findings(p.read_text()))}
    assert not found, found
    assert len(sources()) > 30  # the walk found the code


def test_the_check_catches_what_it_looks_for():
    """The check is not vacuous: each pattern, and the old pickling TP channel, is caught."""
    for bad in ("import pickle", "from pickle import loads", "x = pickle.loads(b)", "u = Unpickler(f)",
                "np.load(p, allow_pickle=True)", "torch.load(p)", "q = multiprocessing.Queue()",
                "from multiprocessing import Pipe",
                "from multiprocessing.connection import Client\nc = Client(a)\nmsg = c.recv()",
                "import multiprocessing.connection as m\nconn.send(('go', {}))"):
        assert findings(bad), bad
    for ok in ("torch.load(p, weights_only=True)", "json.loads(raw)",
               "from multiprocessing.connection import Client\nc.send_bytes(b)\nc.recv_bytes(1 << 20)",
               "await self.links.stream(a, 'Forward').send(frame)"):  # no multiprocessing here
        assert not findings(ok), ok
    old = subprocess.run(["git", "show", "HEAD~0:backends/tp.py"], cwd=ROOT, capture_output=True, text=True)
    if old.returncode == 0 and "c.recv()" in old.stdout:  # the channel before issue 12 pickled
        assert findings(old.stdout)
