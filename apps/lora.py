"""`together lora`: fine-tune LoRA adapters on MLX with mlx-lm's tuner (its LoRA layers, datasets
and training loop); quantized models (the embedded Q4_1 GGUF) train as QLoRA. The adapter
directory it writes is what `together join/generate --adapter` serve, on MLX and torch peers."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import types
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, TextIO, cast

from backends.errors import TogetherError
from backends.lora import ADAPTER_FILE, CONFIG_FILE

if TYPE_CHECKING:
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx_lm.tokenizer_utils import TokenizerWrapper

OPTIMIZER_FILE = "optimizer.safetensors"
TRAIN_DEFAULTS = {"batch_size": 4, "learning_rate": 1e-5, "max_seq_length": 2048, "mask_prompt": False}
FORMATS = {"chat": ("messages",), "completions": ("prompt", "completion"), "text": ("text",)}


class DataError(TogetherError):
    pass


def require_mlx() -> None:
    try:
        import mlx.core  # noqa: F401
        import mlx_lm  # noqa: F401
    except ImportError as e:
        raise TogetherError(
            f"training needs MLX, which is not installed here ({e}): pip install 'together[train]' "
            f"(MLX and mlx-lm; on Linux MLX's CPU build). Torch-only peers can still serve a "
            f"trained adapter with --adapter.") from None


# ------------------------------------------------------------------------------------ data

def _record_format(rec: Any, where: str) -> str:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) \
                    or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: messages[{i}] needs a string 'role' and 'content'")
        return "chat"
    if "prompt" in rec or "completion" in rec:
        for k in ("prompt", "completion"):
            if not isinstance(rec.get(k), str):
                raise DataError(f"{where}: a completions record needs string 'prompt' and 'completion'")
        return "completions"
    if "text" in rec:
        if not isinstance(rec["text"], str) or not rec["text"]:
            raise DataError(f"{where}: 'text' must be a non-empty string")
        return "text"
    raise DataError(f"{where}: unknown record (keys {sorted(rec)}); use one of: "
                    f"{{\"messages\": [...]}}, {{\"prompt\": ..., \"completion\": ...}}, {{\"text\": ...}}")


def read_jsonl(path: Path) -> tuple[list[dict], str, list[int]]:
    """Records of one .jsonl file, their common format and their line numbers; errors name the line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None
    recs, nums, fmt, first = [], [], "", 0
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path.name} line {n}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        f = _record_format(rec, where)
        if fmt and f != fmt:
            raise DataError(f"{where}: a {f} record, but line {first} made this a {fmt} file; "
                            f"one format per file")
        if not fmt:
            fmt, first = f, n
        recs.append(rec)
        nums.append(n)
    if not recs:
        raise DataError(f"{path}: no records (expected one JSON object per line)")
    return recs, fmt, nums


def read_splits(data_dir: Path, mask_prompt: bool) -> Splits:
    """train.jsonl (required) and valid.jsonl (optional), checked record by record."""
    if not data_dir.is_dir():
        raise DataError(f"--data {data_dir}: no such directory (it should hold train.jsonl and "
                        f"optionally valid.jsonl)")
    if not (data_dir / "train.jsonl").is_file():
        raise DataError(f"{data_dir}: train.jsonl is missing")
    out = {}
    for split in ("train", "valid"):
        path = data_dir / f"{split}.jsonl"
        if path.is_file():
            out[split] = read_jsonl(path)
            if out[split][1] == "text" and mask_prompt:
                raise DataError(f"{path.name}: --mask-prompt needs chat or completions records, not text")
    return out


Splits = dict[str, tuple[list[dict], str, list[int]]]


def make_datasets(splits: Splits, tokenizer: TokenizerWrapper, max_len: int,
                  mask_prompt: bool) -> dict[str, Any]:
    """mlx-lm datasets of the splits, after tokenizing every record once to check its length."""
    from mlx_lm.tuner.datasets import CacheDataset, create_dataset

    out: dict[str, Any] = {}
    for split, (recs, fmt, nums) in splits.items():
        # mlx-lm annotates a transformers tokenizer but passes its own wrapper here too (mlx_lm.lora)
        opts = types.SimpleNamespace(mask_prompt=mask_prompt)
        ds = create_dataset(recs, tokenizer, opts)  # type: ignore[arg-type]
        for i, n in enumerate(nums):
            where = f"{split}.jsonl line {n}"
            try:
                tokens, offset = ds.process(ds[i])
            except Exception as e:  # the chat template refuses a conversation, for one
                raise DataError(f"{where}: cannot be tokenized ({e})") from None
            if len(tokens) > max_len:
                raise DataError(f"{where}: {len(tokens)} tokens, longer than --max-seq-length {max_len}; "
                                f"shorten or split the record, or raise the limit")
            if offset >= len(tokens):
                raise DataError(f"{where}: nothing to learn after the prompt (empty completion)")
        out[split] = CacheDataset(ds)
        out[split + "_format"] = fmt
    return out


# ------------------------------------------------------------------------------------ model

def mlx_model_dir(model: str) -> Path:
    """A directory mlx_lm.load reads: GGUF files are converted once into the cache (quantized
    tensors stay packed, so the embedded Q4_1 model trains as QLoRA)."""
    import mlx.core as mx

    from backends.convert import gguf_to_mlx
    from backends.models import cache_dir, resolve_model

    path = resolve_model(model)
    if path.is_dir():
        return path
    if path.suffix != ".gguf":
        raise TogetherError(f"{path}: train from a model directory or a .gguf file")
    dtype = "float16" if mx.default_device().type == mx.gpu else "float32"
    out = cache_dir() / "mlx" / f"{path.stem}-{dtype}"
    if not (out / "config.json").is_file():
        print(f"converting {path.name} to an MLX directory (once): {out}", file=sys.stderr)
        tmp = out.with_name(out.name + ".tmp")
        gguf_to_mlx(path, tmp, dtype=dtype)
        tmp.replace(out)
    return out


class ProgressUI:
    """Stands in for mlx-lm's TrainUI: one bar with the step, train/validation loss, tokens/s and
    peak memory; a line per report; steps counted from the resumed step."""

    def __init__(self, total_iters: int, rank: int = 0, *, offset: int = 0, total: int = 0,
                 report_every: int = 10, out: TextIO = sys.stderr):
        from tqdm import tqdm

        self.offset, self.total, self.report_every, self.out = offset, total or total_iters, report_every, out
        # a live bar on a terminal; in a log only the report lines
        self.bar = tqdm(total=self.total, initial=offset, desc="lora", unit="it", file=out,
                        dynamic_ncols=True, disable=rank != 0 or not out.isatty(), leave=True)
        self.val_loss: float | None = None

    def __enter__(self) -> "ProgressUI":
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()

    def advance(self) -> None:
        self.bar.update(1)

    def report_train(self, it: int, train_loss: float, tokens_sec: float, trained_tokens: float) -> None:
        import mlx.core as mx

        step = self.offset + it
        peak = mx.get_peak_memory() / 1e9
        val = f"{self.val_loss:.3f}" if self.val_loss is not None else "-"
        self.bar.set_postfix_str(f"loss {train_loss:.3f} val {val} {tokens_sec:.0f} tok/s peak {peak:.2f} GB")
        if step % self.report_every == 0 or step == self.total:
            self.bar.write(f"step {step:>5}/{self.total}  train loss {train_loss:.4f}  val loss {val}  "
                           f"{tokens_sec:,.0f} tok/s  peak memory {peak:.2f} GB", file=self.out)

    @contextmanager
    def val_task(self, total: int) -> Iterator[Callable[[], None]]:
        yield lambda: None

    def report_val(self, it: int, val_loss: float, val_time: float) -> None:
        self.val_loss = val_loss
        self.bar.write(f"step {self.offset + it - 1:>5}/{self.total}  val loss {val_loss:.4f}  "
                       f"({val_time:.1f} s)", file=self.out)

    def report_save(self, path: str) -> None:
        pass


@contextmanager
def _progress_ui(**kw: Any) -> Iterator[None]:
    from mlx_lm.tuner import trainer

    old = getattr(trainer, "TrainUI", None)
    if old is None:  # an mlx-lm without the UI hook: keep its own output
        yield
        return
    # ProgressUI has TrainUI's methods, not its type: setattr says the swap is on purpose
    setattr(trainer, "TrainUI", lambda total_iters, rank=0: ProgressUI(total_iters, rank, **kw))
    try:
        yield
    finally:
        setattr(trainer, "TrainUI", old)


def _read_resume(path: Path) -> tuple[Path, dict]:
    if path.is_file():
        path = path.parent
    cfg_path = path / CONFIG_FILE
    if not (path / ADAPTER_FILE).is_file() or not cfg_path.is_file():
        raise TogetherError(f"--resume {path}: expected an adapter directory with {ADAPTER_FILE} "
                            f"and {CONFIG_FILE} (as `together lora` saves them)")
    return path, json.loads(cfg_path.read_text())


def _flat(tree: Any) -> dict[str, Any]:
    """mlx's tree_flatten as a dict of dotted names (its annotation allows a list or a dict)."""
    from mlx.utils import tree_flatten

    return dict(cast("list[tuple[str, Any]]", tree_flatten(tree)))


def save_adapter(out: Path, model: nn.Module, optimizer: optim.Optimizer, cfg: dict[str, Any], step: int,
                 checkpoint: bool) -> None:
    """adapters.safetensors + adapter_config.json (+ the optimizer state, to resume exactly)."""
    import mlx.core as mx

    out.mkdir(parents=True, exist_ok=True)
    weights = _flat(model.trainable_parameters())
    mx.save_safetensors(str(out / ADAPTER_FILE), weights)
    if checkpoint:
        mx.save_safetensors(str(out / f"{step:07d}_{ADAPTER_FILE}"), weights)
    state = _flat(optimizer.state)
    mx.save_safetensors(str(out / OPTIMIZER_FILE), state)
    cfg = dict(cfg, step=step)
    tmp = out / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(cfg, indent=2) + "\n")
    tmp.replace(out / CONFIG_FILE)


def _settle_args(a: argparse.Namespace) -> tuple[Path | None, int, Path]:
    """Fills `a` from the resumed run where not given and checks it: (the resumed adapter directory,
    its step, the output directory)."""
    from backends.models import model_label

    resume_dir, resume_cfg = (None, {}) if not a.resume else _read_resume(Path(a.resume).expanduser())
    for key, default in TRAIN_DEFAULTS.items():  # given > the resumed run's > the default
        if getattr(a, key) is None:
            setattr(a, key, resume_cfg.get(key, default))
    if resume_cfg:
        lp = resume_cfg.get("lora_parameters", {})
        a.rank, a.scale = int(lp.get("rank", a.rank)), float(lp.get("scale", a.scale))
        a.dropout = float(lp.get("dropout", a.dropout))
        a.layers = int(resume_cfg.get("num_layers", a.layers))
        base = resume_cfg.get("base_model")
        if base and base != model_label(a.model):
            raise TogetherError(f"--resume {resume_dir} was trained on {base}, not {model_label(a.model)}; "
                                f"pass --model {base}")
    out = Path(a.adapter_path).expanduser() if a.adapter_path else (resume_dir or Path("adapters"))
    start_step = int(resume_cfg.get("step", 0))
    if start_step >= a.iters:
        raise TogetherError(f"the adapter in {resume_dir} has already trained {start_step} steps; "
                            f"ask for more with --iters (e.g. --iters {start_step + a.iters})")
    for name, v, lo in (("--iters", a.iters, 1), ("--batch-size", a.batch_size, 1), ("--rank", a.rank, 1),
                        ("--max-seq-length", a.max_seq_length, 2), ("--save-every", a.save_every, 1),
                        ("--val-every", a.val_every, 1)):
        if v < lo:
            raise TogetherError(f"{name} must be at least {lo}")
    if not (a.learning_rate > 0 and math.isfinite(a.learning_rate)):
        raise TogetherError("--learning-rate must be a positive number")
    return resume_dir, start_step, out


def _add_lora(model: nn.Module, a: argparse.Namespace, k: int, resume_dir: Path | None) -> optim.Adam:
    """Freezes the model, puts LoRA layers on its last k layers and returns their optimizer, both
    as the resumed run left them."""
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx.utils import tree_unflatten
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from backends.train import init_lora

    model.freeze()
    linear_to_lora_layers(model, k, {"rank": a.rank, "scale": a.scale, "dropout": a.dropout})
    # mlx-lm's distribution, drawn per weight name from the seed (backends/train.py), so a ring of
    # peers (`--mesh`) starts from the very adapter this process would
    start = [(n, mx.array(init_lora(n, v.shape[0], a.rank, a.seed)))
             for n, v in _flat(model.trainable_parameters()).items() if n.endswith(".lora_a")]
    model.load_weights(start, strict=False)
    optimizer = optim.Adam(learning_rate=a.learning_rate)
    if resume_dir is not None:
        model.load_weights(str(resume_dir / ADAPTER_FILE), strict=False)
        opt_file = resume_dir / OPTIMIZER_FILE
        if opt_file.is_file():
            optimizer.init(model.trainable_parameters())
            state = mx.load(str(opt_file))
            assert isinstance(state, dict)  # a .safetensors file loads as a dict
            optimizer.state = tree_unflatten(list(state.items()))
            optimizer.learning_rate = a.learning_rate  # the moments resume; the rate is this run's
    return optimizer


def _load(a: argparse.Namespace) -> tuple[Path, nn.Module, dict[str, Any]]:
    """The model's MLX directory, the model (seeded) and the checked datasets of --data."""
    import mlx.core as mx
    import numpy as np
    from mlx_lm.utils import load

    splits = read_splits(Path(a.data).expanduser(), a.mask_prompt)
    np.random.seed(a.seed)
    mx.random.seed(a.seed)
    path = mlx_model_dir(a.model)
    print(f"loading {path}", file=sys.stderr)
    model, tokenizer = load(str(path))[:2]
    if a.dtype != "auto":
        model.set_dtype(getattr(mx, a.dtype))
    return path, model, checked_datasets(splits, tokenizer, a)


def checked_datasets(splits: Splits, tokenizer: TokenizerWrapper, a: argparse.Namespace) -> dict[str, Any]:
    """The datasets of the splits, refused (DataError) unless every record fits and each split fills a batch."""
    data = make_datasets(splits, tokenizer, a.max_seq_length, a.mask_prompt)
    train_set, valid_set = data["train"], data.get("valid")
    if len(train_set) < a.batch_size:
        raise DataError(f"train.jsonl has {len(train_set)} records but --batch-size is {a.batch_size}; "
                        f"add records or lower --batch-size")
    if valid_set is not None and len(valid_set) < a.batch_size:
        raise DataError(f"valid.jsonl has {len(valid_set)} records but --batch-size is {a.batch_size}")
    return data


def run_lora(a: argparse.Namespace) -> int:
    require_mlx()
    if a.mesh or a.peer:
        from apps.lora_mesh import run_lora_mesh

        return run_lora_mesh(a)
    import mlx.core as mx
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm.tuner.trainer import TrainingArgs, train

    from backends.models import model_label

    resume_dir, start_step, out = _settle_args(a)
    path, model, data = _load(a)
    train_set, valid_set = data["train"], data.get("valid")
    n_layers = len(model.layers)
    k = n_layers if a.layers < 0 else a.layers
    if not 1 <= k <= n_layers:
        raise TogetherError(f"--layers {a.layers}: the model has {n_layers} layers")
    optimizer = _add_lora(model, a, k, resume_dir)
    if resume_dir is not None:
        print(f"resuming {resume_dir} at step {start_step}", file=sys.stderr)
    tuned = _flat(model.trainable_parameters())
    trainable = sum(v.size for v in tuned.values())
    total = sum(v.size for v in _flat(model.parameters()).values())
    keys = sorted({name.split(".lora_a")[0].split(".", 3)[3] for name in tuned if name.endswith("lora_a")})
    print(f"{data['train_format']} data: {len(train_set)} train"
          + (f", {len(valid_set)} valid" if valid_set is not None else ", no valid.jsonl")
          + f" | LoRA rank {a.rank} scale {a.scale} on the last {k} of {n_layers} layers "
          f"({', '.join(keys)}) | {trainable / 1e6:.3f}M trainable of {total / 1e6:.1f}M parameters",
          file=sys.stderr)

    lora_params = {"rank": a.rank, "scale": a.scale, "dropout": a.dropout, "keys": keys}
    cfg = {"fine_tune_type": "lora", "num_layers": k, "lora_parameters": lora_params,
           "name": out.name, "base_model": model_label(a.model), "model": str(path),
           "target_layers": [n_layers - k, n_layers], "iters": a.iters, "batch_size": a.batch_size,
           "learning_rate": a.learning_rate, "max_seq_length": a.max_seq_length,
           "mask_prompt": a.mask_prompt, "data": str(Path(a.data).expanduser().resolve()),
           "seed": a.seed, "created_by": "together lora"}
    remaining = a.iters - start_step

    class Saver(TrainingCallback):
        def on_train_loss_report(self, info: dict) -> None:
            step = start_step + info["iteration"]
            if step % a.save_every == 0 and step < a.iters:
                save_adapter(out, model, optimizer, cfg, step, checkpoint=True)

    report = math.gcd(a.report_every, a.save_every)  # the callback sees every save step
    targs = TrainingArgs(batch_size=a.batch_size, iters=remaining, val_batches=a.val_batches,
                         steps_per_report=report, steps_per_eval=a.val_every,
                         steps_per_save=remaining + 1, max_seq_length=a.max_seq_length,
                         adapter_file=str(out / ADAPTER_FILE), grad_checkpoint=a.grad_checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with _progress_ui(offset=start_step, total=a.iters, report_every=a.report_every):
        train(model, optimizer, train_set, valid_set, args=targs, training_callback=Saver())
    save_adapter(out, model, optimizer, cfg, a.iters, checkpoint=False)
    print(f"saved adapter {out} (step {a.iters}, {time.perf_counter() - t0:.1f} s, peak memory "
          f"{mx.get_peak_memory() / 1e9:.2f} GB); serve it with: together join --adapter {out}",
          file=sys.stderr)
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("lora", help="fine-tune a LoRA adapter on MLX (QLoRA for quantized models)",
                       description="Fine-tune a LoRA adapter with mlx-lm's tuner. --data DIR holds "
                                   "train.jsonl (and optionally valid.jsonl): chat ({\"messages\": "
                                   "[...]}), completions ({\"prompt\", \"completion\"}) or text "
                                   "({\"text\"}) records, one per line.")
    p.add_argument("--model", default="smollm2-135m",
                   help="smollm2-135m (embedded), a local HF/MLX dir or .gguf, or an HF hub id")
    p.add_argument("--data", required=True, help="directory with train.jsonl [and valid.jsonl]")
    p.add_argument("--iters", type=int, default=1000, help="total training steps (counting resumed ones)")
    p.add_argument("--batch-size", type=int, default=None, help="default 4 (or the resumed run's)")
    p.add_argument("--learning-rate", type=float, default=None, help="default 1e-5 (or the resumed run's)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--scale", type=float, default=20.0)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--layers", type=int, default=16, help="adapt the last K layers (-1: all)")
    p.add_argument("--max-seq-length", type=int, default=None, help="default 2048 (or the resumed run's)")
    p.add_argument("--val-every", type=int, default=200, help="steps between validations")
    p.add_argument("--val-batches", type=int, default=25, help="-1: the whole valid set")
    p.add_argument("--report-every", type=int, default=10, help="steps between progress lines")
    p.add_argument("--save-every", type=int, default=100, help="steps between saved checkpoints")
    p.add_argument("--resume", default=None, metavar="PATH", help="continue a saved adapter from its step")
    p.add_argument("--adapter-path", default=None, metavar="OUT",
                   help="where to save (default: ./adapters, or the --resume directory)")
    p.add_argument("--mask-prompt", action="store_true", default=None,
                   help="train on the completions only (chat and completions data)")
    p.add_argument("--grad-checkpoint", action="store_true", help="less memory, more compute")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="compute dtype (auto: as the converted model: float32 on a CPU, float16 on Metal)")
    p.add_argument("--seed", type=int, default=0)
    m = p.add_argument_group("training across a ring of peers (each trains the LoRA weights of its own layers)")
    m.add_argument("--mesh", default=None, metavar="NAME",
                   help="train on the ring of this mesh (found over mDNS, or through --peer)")
    m.add_argument("--peer", action="append", default=[], metavar="HOST:PORT",
                   help="a peer of the mesh to ask for its ring (repeatable; where multicast is blocked)")
    m.add_argument("--mesh-key", default=None, help="the mesh's key (prefer TOGETHER_MESH_KEY or --mesh-key-file)")
    m.add_argument("--mesh-key-file", default=None, metavar="PATH", help="read the mesh key from this file")
    m.add_argument("--micro-batches", type=int, default=0, metavar="N",
                   help="split each batch into N micro-batches that follow each other through the ring, so "
                        "its stages work at once (gradients add up over them; default 0: one per stage; 1: none)")
    m.add_argument("--settle", type=float, default=3.0, metavar="S", help="seconds to look for the mesh's peers")
    p.set_defaults(func=lambda a: run_lora(a))
