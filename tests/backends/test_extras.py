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


def test_an_mlx_peer_and_a_gguf_tokenizer_import_neither_torch_nor_the_auto_classes(embedded_path, tokenizer):
    """An MLX peer's backend and a GGUF model's tokenizer (converted once, then cached: the `tokenizer`
    fixture) start without torch or transformers' auto classes (seconds at every peer's start):
    mlx-lm's package __init__, which imports both, is deferred (next test)."""
    pytest.importorskip("mlx_lm")
    out = _run(f"""
import backends.mlx.shard
from backends.tokenizer import Tokenizer
from backends.weights import open_checkpoint
tok = Tokenizer.from_checkpoint(open_checkpoint({str(embedded_path)!r}))
out["ids"] = tok.encode("Hello world")
out["loaded"] = [m for m in ("torch", "transformers.models.auto", "mlx_lm.utils") if m in sys.modules]
""", blocked=())
    assert out == {"ids": tokenizer.encode("Hello world"), "loaded": []}


def test_a_deferred_package_runs_its_init_once_on_first_use_of_its_names(tmp_path, monkeypatch):
    """What the MLX backend does to mlx-lm: its submodules import without the package's __init__, which
    runs once, on the first name asked of the package (also through `from PKG import NAME`)."""
    from backends.mlx import defer_init

    pkg = tmp_path / "deferpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("RUNS.append(1)\nfrom .sub import VALUE as ALIAS\n")
    (pkg / "sub.py").write_text("VALUE = 42\n")
    runs: list[int] = []
    monkeypatch.setattr("builtins.RUNS", runs, raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "deferpkg", raising=False)
    monkeypatch.delitem(sys.modules, "deferpkg.sub", raising=False)
    defer_init("deferpkg")
    from deferpkg.sub import VALUE

    assert VALUE == 42 and runs == []
    from deferpkg import ALIAS

    import deferpkg

    assert ALIAS == 42 and deferpkg.sub.VALUE == 42 and runs == [1]
    with pytest.raises(AttributeError):
        deferpkg.missing  # noqa: B018
    assert runs == [1] and type(deferpkg) is type(sys)


def test_a_torch_peer_starts_without_importing_mlx_or_torch_dynamo(embedded_path):
    """A torch peer's start: `--backend auto` takes torch off a Mac without importing MLX too, and its
    warm-up, loading its slice and a forward never import torch._dynamo (nothing of ours uses it; ~1 s
    of every start): no op runs on the meta device."""
    pytest.importorskip("torch")
    out = _run(f"""
import numpy as np
from apps.join import _auto_backend
from backends.shard import SeqChunk, load_shard
from backends.torch.model import warm
from backends.weights import open_checkpoint
from backends.wire import Hidden
out["auto"] = _auto_backend() if sys.platform != "darwin" else "torch"
ck = open_checkpoint({str(embedded_path)!r})
warm()
first, mid = load_shard("torch", ck, 0, 1, dtype="float32"), load_shard("torch", ck, 1, 2, dtype="bfloat16")
first.add_sequence("s")
mid.add_sequence("s")
h = first.forward([SeqChunk("s", 0, 3)], np.array([1, 2, 3], np.int32))
out["shape"] = list(mid.forward([SeqChunk("s", 0, 3)], Hidden(bytes(h.data), h.dtype, h.shape)).shape)
out["loaded"] = [m for m in ("torch._dynamo", "mlx.core") if m in sys.modules]
""", blocked=())
    assert out == {"auto": "torch", "shape": [3, 576], "loaded": []}


def test_join_auto_takes_mlx_where_torch_is_missing():
    """`together join --backend auto` (the default) without torch: MLX (torch taken where installed,
    without importing MLX: the test above)."""
    pytest.importorskip("mlx.core")
    out = _run("""
from apps.join import _auto_backend
out["backend"] = _auto_backend()
""", blocked=("torch",))
    assert out == {"backend": "mlx"}
