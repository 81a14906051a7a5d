"""The base package runs without torch or MLX (they come with the `torch` / `mlx` extras): importing
it pulls in neither, and asking for a backend that is not installed is a one-line error naming the
extra. Each case runs in a fresh interpreter with the frameworks blocked (None in sys.modules)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FRAMEWORKS = ("torch", "mlx", "mlx_lm")
BLOCK = "import sys\nfor m in {mods!r}: sys.modules[m] = None\n"


def _run(code: str, blocked: tuple[str, ...] = FRAMEWORKS) -> dict:
    """Run `code` (which leaves its answer in `out`) with `blocked` unimportable; `out` as JSON."""
    script = BLOCK.format(mods=blocked) + "import json\nout = {}\n" + code + "\nprint(json.dumps(out))\n"
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("blocked", [(), FRAMEWORKS], ids=["installed", "blocked"])
def test_base_imports_pull_in_no_framework(blocked):
    """Blocked: the base imports without them; installed: it still does not load them."""
    out = _run("""
import backends.weights, backends.config, backends.tokenizer, backends.sampling, backends.shard
import backends.wire, backends.models, backends.generation, backends.pipeline, backends.tp
import backends.lora, backends.convert, backends.net
import mesh.node, apps.api, apps.cli
out["loaded"] = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "mlx", "mlx_lm")
                       and sys.modules[m] is not None)
""", blocked)
    assert out["loaded"] == []


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_missing_backend_is_one_line_naming_the_extra(embedded_path, backend):
    out = _run(f"""
from backends.errors import BackendMissing, RequestError
from backends.shard import load_shard
from backends.weights import open_checkpoint
ck = open_checkpoint({str(embedded_path)!r})
for what, call in [("shard", lambda: load_shard({backend!r}, ck, 0, 2)),
                   ("tp", lambda: __import__("backends.tp").tp.TPGroup(ck, 0, 2, {backend!r}, 2))]:
    try:
        call()
        out[what] = None
    except RequestError as e:
        out[what] = [type(e).__name__, str(e)]
""")
    want = ["BackendMissing", f"the {backend} backend needs {backend}: pip install 'together[{backend}]'"]
    assert out == {"shard": want, "tp": want}
    assert "\n" not in want[1]


def test_convert_without_mlx_names_the_extra(tmp_path, embedded_path):
    out = _run(f"""
from backends.convert import gguf_to_mlx
from backends.errors import BackendMissing
try:
    gguf_to_mlx({str(embedded_path)!r}, {str(tmp_path / "out")!r})
except BackendMissing as e:
    out["error"] = str(e)
""")
    assert out == {"error": "the mlx backend needs mlx: pip install 'together[mlx]'"}


def test_only_the_missing_framework_is_named():
    """mlx-lm missing with mlx present names mlx-lm (both come with together[mlx])."""
    from backends.shard import missing_backend

    e = ModuleNotFoundError("No module named 'mlx_lm'", name="mlx_lm")
    assert str(missing_backend("mlx", e)) == "the mlx backend needs mlx-lm: pip install 'together[mlx]'"
    e = ModuleNotFoundError("No module named 'torch.cuda'", name="torch.cuda")
    assert str(missing_backend("torch", e)) == "the torch backend needs torch: pip install 'together[torch]'"
    other = ImportError("libfoo.so: cannot open shared object file")
    assert "could not be imported (libfoo.so" in str(missing_backend("torch", other))
