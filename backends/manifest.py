"""What a model or adapter is made of, byte for byte, and a peer's (possibly partial) copy of it.

A `Manifest` lists the files of a model (a .gguf file; or a directory's safetensors files and its
small files: config, tokenizer, index...) or of an adapter directory, each with its header length
(GGUF header + tensor infos + padding; safetensors' 8-byte length + JSON), and every tensor as
stored: file, absolute offset, length and SHA-256 (computed when first asked, cached by file
identity). A `LocalCopy` is a receiver's copy in the same format under `cache_dir()/"mesh"/<what>`:
every file at its full size, holes where the tensors it does not hold lie, so the existing lazy
readers (`backends.weights.open_checkpoint`, `backends.lora.open_adapter`) open it and read the
tensors it holds. A sidecar records which tensors are verified; readers must only be handed those
(`LocalCopy.missing`).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

from backends.errors import ModelError
from backends.lora import ADAPTER_FILE, CONFIG_FILE
from backends.models import cache_dir
from backends.weights import _LAYER, Checkpoint, _gguf_hf_name, _gguf_index, write_json

SIDECAR = ".together-copy.json"
# the small files of a model directory that travel whole (the weights travel by tensor)
SMALL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "tokenizer.model", "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
               "chat_template.jinja", "chat_template.json", "model.safetensors.index.json")
_SAFE = re.compile(r"[^A-Za-z0-9._+-]")
_HASH_BLOCK = 1 << 22


@dataclass
class FileEntry:
    path: str  # relative to the model's directory (no separators: a flat directory)
    size: int
    header: int  # the first `header` bytes always travel (a small file: all of it)
    header_sha256: str = ""


@dataclass
class Span:
    """Bytes [offset, offset + length) of one file: a tensor (`name` as stored) or a file's header
    (`name` = "<file>#header")."""

    name: str
    file: str
    offset: int
    length: int
    sha256: str = ""
    hf_name: str = ""  # the HF name of the weight it belongs to ('' for headers and unused tensors)

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass
class Manifest:
    """The files and tensors of a model or adapter (`kind`: gguf, hf, mlx or adapter)."""

    what: str
    kind: str
    num_layers: int
    tied_head: bool
    files: list[FileEntry]
    tensors: dict[str, Span]
    root: Path | None = field(default=None, compare=False)  # the owner's directory (None on the wire)

    def file(self, path: str) -> FileEntry | None:
        return next((f for f in self.files if f.path == path), None)

    def headers(self) -> list[Span]:
        return [Span(f"{f.path}#header", f.path, 0, f.header, f.header_sha256) for f in self.files]

    def span(self, name: str) -> Span:
        if name.endswith("#header"):
            h = next((s for s in self.headers() if s.name == name), None)
            if h is not None:
                return h
        t = self.tensors.get(name)
        if t is None:
            raise ModelError(f"{self.what}: no tensor {name!r} in its manifest")
        return t

    def same_files(self, other: "Manifest") -> bool:
        """The same model: the same files with the same headers (so the same tensor layout)."""
        key = lambda m: sorted((f.path, f.size, f.header, f.header_sha256) for f in m.files)
        return self.kind == other.kind and key(self) == key(other)

    def to_dict(self) -> dict:
        return {"what": self.what, "kind": self.kind, "num_layers": self.num_layers, "tied_head": self.tied_head,
                "files": [asdict(f) for f in self.files], "tensors": [asdict(t) for t in self.tensors.values()]}

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        return cls(d["what"], d["kind"], int(d["num_layers"]), bool(d["tied_head"]),
                   [FileEntry(**f) for f in d["files"]], {t["name"]: Span(**t) for t in d["tensors"]})

    def hash(self, names: Iterable[str]) -> None:
        """Fill in the SHA-256 of these tensors (owner side: reads them from `root`), cached by the
        files' size and mtime under the cache dir, never next to the model."""
        if self.root is None:
            raise ModelError(f"{self.what}: only the owner of the files can hash them")
        todo = [self.tensors[n] for n in names if n in self.tensors and not self.tensors[n].sha256]
        if not todo:
            return
        cache = self._hash_cache()
        known = _read_json(cache).get("sha256", {}) if cache else {}
        for t in todo:
            t.sha256 = known.get(t.name) or sha256_of(self.root / t.file, t.offset, t.length)
            known[t.name] = t.sha256
        if cache:
            write_json(cache, {"identity": self._identity(), "sha256": known})

    def _identity(self) -> list:
        assert self.root is not None
        return [[f.path, *((st := (self.root / f.path).stat()).st_size, st.st_mtime_ns)] for f in self.files]

    def _hash_cache(self) -> Path | None:
        assert self.root is not None
        # one cache per model (a directory may hold several .gguf files)
        key = hashlib.sha1(repr([str(self.root.resolve()), *(f.path for f in self.files)]).encode()).hexdigest()[:16]
        path = cache_dir() / "manifests" / f"{key}.json"
        d = _read_json(path)
        if d and d.get("identity") != self._identity():
            d.clear()  # the files changed: every hash is stale
            path.unlink(missing_ok=True)
        return path


def sha256_of(path: Path, offset: int, length: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        left = length
        while left > 0:
            b = f.read(min(left, _HASH_BLOCK))
            if not b:
                break  # short: the hash will not match
            h.update(b)
            left -= len(b)
    return h.hexdigest()


def _read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}


# ---------------------------------------------------------------- building a manifest


def _inside(root: Path, p: Path) -> bool:
    """p (resolved) lies in root, or, for a hub snapshot (…/models--x/snapshots/rev/), in its repo dir:
    the hub keeps files as links into ../../blobs."""
    real, base = p.resolve(), root.resolve()
    if real.is_relative_to(base):
        return True
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith("models--"):
        return real.is_relative_to(root.parent.parent.resolve() / "blobs")
    return False


def _st_header(path: Path) -> tuple[int, dict]:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return 8 + n, json.loads(f.read(n))


def build_manifest(path: str | Path, label: str) -> Manifest:
    """The manifest of a model (a .gguf file, or an HF / MLX safetensors directory) or of an adapter
    directory (adapters.safetensors + adapter_config.json), as its owner has it. Tensor hashes are
    left empty: `Manifest.hash(names)` computes the ones asked for."""
    p = Path(path).expanduser()
    if p.is_dir() and (p / ADAPTER_FILE).is_file():
        return _safetensors_manifest(p, label, "adapter", [ADAPTER_FILE], [CONFIG_FILE], 0, False)
    if p.is_dir() and not (p / "config.json").exists() and len(g := sorted(p.glob("*.gguf"))) == 1:
        p = g[0]
    if p.is_file() and p.suffix == ".gguf":
        return _gguf_manifest(p, label)
    if not p.is_dir():
        raise ModelError(f"{p}: not a model (.gguf file or safetensors directory) or adapter directory")
    from backends.weights import open_checkpoint

    ck = open_checkpoint(p)
    weights = [f.name for f in sorted(p.glob("*.safetensors"))]
    small = [n for n in SMALL_FILES if (p / n).is_file()]
    return _safetensors_manifest(p, label, ck.kind, weights, small, ck.config.num_hidden_layers, ck.tied_head)


def _gguf_manifest(path: Path, label: str) -> Manifest:
    index = _gguf_index(path)
    size = path.stat().st_size
    ends = sorted(t["offset"] for t in index["tensors"]) + [size]
    tensors: dict[str, Span] = {}
    for t in sorted(index["tensors"], key=lambda t: t["offset"]):
        # a tensor's bytes: its data array (gguf's reader shape), up to the next tensor at most
        import numpy as np

        n = int(np.prod(t["data_shape"])) * np.dtype(t["data_dtype"]).itemsize
        nxt = ends[ends.index(t["offset"]) + 1]
        tensors[t["name"]] = Span(t["name"], path.name, t["offset"], min(n, nxt - t["offset"]),
                                  hf_name=_gguf_hf_name(t["name"]) or "")
    header = min(t.offset for t in tensors.values()) if tensors else size
    f = FileEntry(path.name, size, header, sha256_of(path, 0, header))
    cfg = index["config"]
    tied = bool(cfg.get("tie_word_embeddings")) or not any(t.hf_name == "lm_head.weight" for t in tensors.values())
    return Manifest(label, "gguf", int(cfg["num_hidden_layers"]), tied, [f], tensors, root=path.parent)


def _safetensors_manifest(root: Path, label: str, kind: str, weights: list[str], small: list[str],
                          num_layers: int, tied: bool) -> Manifest:
    files: list[FileEntry] = []
    tensors: dict[str, Span] = {}
    for name in [*weights, *small]:
        if not _inside(root, root / name):
            raise ModelError(f"{root / name}: links outside the model directory; it will not be served")
        size = (root / name).stat().st_size
        if name not in weights:
            files.append(FileEntry(name, size, size, sha256_of(root / name, 0, size)))
            continue
        header, meta = _st_header(root / name)
        files.append(FileEntry(name, size, header, sha256_of(root / name, 0, header)))
        for tn, v in meta.items():
            if tn == "__metadata__":
                continue
            a, b = v["data_offsets"]
            hf = tn[: -len(".scales")] + ".weight" if tn.endswith(".scales") else \
                tn[: -len(".biases")] + ".weight" if tn.endswith(".biases") else tn
            tensors[tn] = Span(tn, name, header + a, b - a, hf_name=hf)
    return Manifest(label, kind, num_layers, tied, files, tensors, root=root)


def tensor_names(m: Manifest | Checkpoint, start: int, end: int, num_layers: int) -> list[str]:
    """The tensors a slice [start, end) reads: its layers, plus the embedding if it is first, the norm
    and the head (or the tied embedding) if it is last. For a Manifest, names as stored (a quantized
    weight's scales and biases included); for a Checkpoint, its HF names (`Checkpoint.slice_names`)."""
    if isinstance(m, Checkpoint):
        return m.slice_names(start, end)
    want: set[str] = set()
    if start == 0:
        want.add("model.embed_tokens.weight")
    if end == num_layers:
        want.update({"model.norm.weight", "model.embed_tokens.weight" if m.tied_head else "lm_head.weight"})
    if m.kind == "adapter":
        want.clear()  # an adapter has layers only
    return [n for n, t in m.tensors.items()
            if t.hf_name in want or ((k := _LAYER.match(t.hf_name)) and start <= int(k.group(1)) < end)]


# ---------------------------------------------------------------- a peer's copy


def copy_dir(what: str) -> Path:
    """Where a copy of `what` (a model label or label+ADAPTER) lives: cache_dir()/mesh/<what>."""
    safe = _SAFE.sub("_", what).strip(".") or "_"
    return cache_dir() / "mesh" / safe


class LocalCopy:
    """A peer's copy of a model or adapter in its own format, possibly partial: every file at full
    size, the headers and small files whole, the tensors it holds at their offsets, the rest holes.
    The sidecar (SIDECAR in the directory) keeps the manifest, the verified spans and the bytes
    written of partial ones, so a restart and a resumed transfer continue from disk."""

    def __init__(self, path: Path):
        self.path = path  # the directory: pass it to open_checkpoint / open_adapter
        self.manifest: Manifest | None = None
        self.verified: set[str] = set()
        self.written: dict[str, int] = {}  # span name -> contiguous bytes written from its start
        d = _read_json(path / SIDECAR)
        if d.get("manifest"):
            self.manifest = Manifest.from_dict(d["manifest"])
            self.verified = set(d.get("verified", []))
            self.written = {k: int(v) for k, v in d.get("written", {}).items()}

    @classmethod
    def of(cls, what: str) -> "LocalCopy":
        """The copy of `what` in this peer's cache (empty if there is none yet)."""
        return cls(copy_dir(what))

    def begin(self, manifest: Manifest) -> None:
        """Take `manifest` as the layout, creating every file at its full size (sparse). A copy of other
        files (another model under the same name) is discarded."""
        if self.manifest is not None and not self.manifest.same_files(manifest):
            for f in self.manifest.files:
                (self.path / f.path).unlink(missing_ok=True)
            self.manifest, self.verified, self.written = None, set(), {}
        if self.manifest is None:
            self.manifest = Manifest.from_dict(manifest.to_dict())
        else:
            self.learn(manifest)
        self.path.mkdir(parents=True, exist_ok=True)
        for f in self.manifest.files:
            p = self.path / f.path
            if not p.exists() or p.stat().st_size != f.size:
                with open(p, "ab") as fh:
                    fh.truncate(f.size)
        self.save()

    def learn(self, manifest: Manifest) -> bool:
        """Take the tensor hashes `manifest` knows that this copy's lacks; False (nothing taken) when it
        describes other files."""
        if self.manifest is None or not self.manifest.same_files(manifest):
            return False
        for n, t in manifest.tensors.items():
            if t.sha256 and n in self.manifest.tensors and not self.manifest.tensors[n].sha256:
                self.manifest.tensors[n].sha256 = t.sha256
        return True

    def save(self) -> None:
        if self.manifest is not None:
            write_json(self.path / SIDECAR, {"manifest": self.manifest.to_dict(), "verified": sorted(self.verified),
                                              "written": {k: v for k, v in self.written.items() if v}})

    def missing(self, names: Iterable[str]) -> list[str]:
        """Which of these spans (tensor names, or "<file>#header") are not verified here; with no
        manifest yet, all of them."""
        return [n for n in names if n not in self.verified]

    def headers_missing(self) -> list[str]:
        return [] if self.manifest is None else self.missing(h.name for h in self.manifest.headers())

    def complete(self, names: Iterable[str]) -> bool:
        """Every header and every one of these tensors is verified: a reader may load them."""
        return self.manifest is not None and not self.headers_missing() and not self.missing(names)

    def write(self, file: str, offset: int, data: bytes | memoryview) -> None:
        with open(self.path / file, "r+b") as f:
            f.seek(offset)
            f.write(data)

    def verify(self, name: str) -> bool:
        """Hash the span on disk against the manifest and record the outcome (`matches` + `record`)."""
        return self.record(name, self.matches(name))

    def matches(self, name: str) -> bool:
        """The span's bytes on disk have the manifest's SHA-256 (reads only: safe in a worker thread)."""
        assert self.manifest is not None
        s = self.manifest.span(name)
        return bool(s.sha256) and sha256_of(self.path / s.file, s.offset, s.length) == s.sha256

    def record(self, name: str, ok: bool) -> bool:
        """A span checked: verified, or its bytes forgotten (fetched again from its start)."""
        assert self.manifest is not None
        s = self.manifest.span(name)
        if ok:
            self.verified.add(name)
            self.written[name] = s.length
        else:
            self.verified.discard(name)
            self.written[name] = 0
        return ok

    def covered(self, file: str, offset: int, length: int) -> bool:
        """Bytes [offset, offset + length) of `file` lie within verified spans (what a copy may serve)."""
        if self.manifest is None:
            return False
        spans = sorted((s.offset, s.end) for s in [*self.manifest.headers(), *self.manifest.tensors.values()]
                       if s.file == file and s.name in self.verified)
        pos, end = offset, offset + length
        for a, b in spans:
            if a <= pos < b:
                pos = b
            if pos >= end:
                return True
        return pos >= end
