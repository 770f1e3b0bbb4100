"""``loraq.train``: (optionally pretrain dense,) compress, train the adapters, keep the best epoch.

A run folder holds everything needed to rerun or reload it: ``config.json``, ``metrics.csv``
(one row per epoch), ``curves.png``, ``checkpoint/`` (the best epoch, via :func:`loraq.save`)
and ``summary.json``.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, fields, replace
from datetime import datetime
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from . import ops
from .api import CompressionConfig, compress_, footprint, resolve_targets
from .checkpoint import save
from .formats import FORMATS
from .lora_init import INITS
from .nn import LoraLinear
from .report import plot_curves, write_csv, write_json

OPTIMIZERS = ("adam", "adamw", "sgd")
METRIC_COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "seconds")


@dataclass
class TrainConfig:
    """Every option of ``loraq train`` (validated on construction; saved as the run's config.json)."""

    model: str = "mlp"
    data: str = "digits"
    weights: Optional[str] = None
    hidden: Sequence[int] = (1000, 2000)
    limit: Optional[int] = None
    compression: str = "int1"
    targets: Optional[Sequence[str]] = None
    modules_to_save: Optional[Sequence[str]] = None
    rank: int = 8
    clip_rank: bool = False
    alpha: Optional[float] = None
    rslora: bool = False
    init: str = "gaussian"
    loftq_iters: int = 1
    group_size: Optional[int] = None
    pretrain_epochs: int = 0
    pretrain_lr: float = 1e-3
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 64
    epochs: int = 10
    patience: Optional[int] = None
    seed: int = 0
    device: str = "auto"

    def __post_init__(self):
        if self.compression not in FORMATS:
            raise ValueError(f"unknown compression {self.compression!r}; expected one of {sorted(FORMATS)}")
        if self.init not in INITS:
            raise ValueError(f"unknown init {self.init!r}; expected one of {INITS}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; expected one of {OPTIMIZERS}")
        for name in ("rank", "batch_size", "epochs", "loftq_iters"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        for name in ("lr", "pretrain_lr"):  # inf: training diverges silently
            if not (getattr(self, name) > 0 and math.isfinite(getattr(self, name))):
                raise ValueError(f"{name} must be > 0 and finite, got {getattr(self, name)!r}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ValueError(f"weight_decay must be >= 0 and finite, got {self.weight_decay!r}")
        if self.pretrain_epochs < 0:
            raise ValueError(f"pretrain_epochs must be >= 0, got {self.pretrain_epochs!r}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be >= 1 (or None), got {self.patience!r}")
        if self.limit is not None and (isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 1):
            raise ValueError(f"limit must be an integer >= 1 (or None), got {self.limit!r}")
        check_device(self.device)
        self.hidden = tuple(int(h) for h in self.hidden)
        if any(h < 1 for h in self.hidden):
            raise ValueError(f"hidden sizes must be >= 1, got {list(self.hidden)}")
        # Options that CompressionConfig checks (scale/group-size/init combinations) fail here, early.
        CompressionConfig(compression=self.compression, rank=self.rank, alpha=self.alpha, rslora=self.rslora,
                          init=self.init, loftq_iters=self.loftq_iters, group_size=self.group_size,
                          clip_rank=self.clip_rank)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def check_device(device: str) -> None:
    """Raise a clear ``ValueError`` unless ``device`` is ``auto``, ``cpu`` or a CUDA device this machine has."""
    if not isinstance(device, str) or (device not in ("auto", "cpu") and not device.startswith("cuda")):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but torch sees no CUDA GPU")
        try:
            index = torch.device(device).index
        except RuntimeError:
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}") from None
        if index is not None and index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} asked for, but torch sees {torch.cuda.device_count()} GPU(s)")


def absolute_paths(cfg: "TrainConfig") -> "TrainConfig":
    """``cfg`` with relative local paths (data ``mnist:``/``imagefolder:``/``hf:`` folders or files,
    ``hf:`` models, ``weights``) made absolute, so that the run folder's config.json means the same
    from any working directory. Hub names (no such local path) stay as given."""
    def spec(value: Optional[str]) -> Optional[str]:
        if value is None or ":" not in value:
            return value
        kind, _, path = value.partition(":")
        local = Path(path).expanduser()
        return f"{kind}:{local.resolve()}" if path and local.exists() else value

    weights = None if cfg.weights is None else str(Path(cfg.weights).expanduser().resolve())
    return replace(cfg, data=spec(cfg.data), model=spec(cfg.model), weights=weights)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA (the fused kernels' dtype); plain fp32 on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_optimizer(name: str, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)


def train_mode(model: nn.Module, freeze_frozen_norms: bool = True) -> None:
    """``model.train()``, except that batch-norm layers whose parameters are frozen (the compressed
    model's base) stay in eval mode: their running statistics are part of the frozen model, and
    updating them would change the base under the adapters (and off the saved best epoch)."""
    model.train()
    if freeze_frozen_norms:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(
                    p.requires_grad for p in m.parameters(recurse=False)):
                m.eval()


def run_epoch(model, loader, device, optimizer=None, desc: str = "", quiet: bool = True,
              freeze_frozen_norms: bool = True) -> Dict[str, float]:
    """One pass over ``loader``; trains when ``optimizer`` is given (see :func:`train_mode` for the
    batch-norm layers). Returns mean loss and accuracy."""
    from .models import forward_batch

    if optimizer is not None:
        train_mode(model, freeze_frozen_norms)
    else:
        model.eval()
    total_loss, correct, seen = 0.0, 0, 0
    grad = torch.enable_grad() if optimizer is not None else torch.no_grad()
    with grad:
        for batch in tqdm(loader, desc=desc, leave=False, disable=quiet):
            with autocast_for(device):
                logits, labels = forward_batch(model, batch, device)
                loss = nn.functional.cross_entropy(logits.float(), labels)
            if optimizer is not None:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            n = labels.shape[0]
            total_loss += float(loss.detach()) * n
            correct += int((logits.argmax(-1) == labels).sum())
            seen += n
    return {"loss": total_loss / max(seen, 1), "acc": correct / max(seen, 1)}


def _loaders(splits, batch_size: int, seed: int):
    from torch.utils.data import DataLoader

    g = torch.Generator().manual_seed(seed)
    kw = {"collate_fn": splits.collate_fn} if splits.collate_fn is not None else {}
    return (DataLoader(splits.train, batch_size=batch_size, shuffle=True, generator=g, **kw),
            DataLoader(splits.val, batch_size=256, **kw),
            DataLoader(splits.test, batch_size=256, **kw))


def prepare(cfg: TrainConfig, quiet: bool = True, init_state: Optional[dict] = None,
            check: Optional[Callable] = None):
    """Data, model (pretrained dense if asked) and device for ``cfg``: ``(splits, bundle, device)``.
    ``check(bundle)`` runs on the built model before any pretraining (to fail early)."""
    from .data import load_data
    from .models import build_model, load_tokenizer

    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    splits = load_data(cfg.data, seed=cfg.seed, tokenizer=load_tokenizer(cfg.model), limit=cfg.limit)
    empty = [name for name, part in zip(("train", "val", "test"), (splits.train, splits.val, splits.test))
             if len(part) == 0]
    if empty:  # an empty val/test split would report accuracy 0 on nothing
        raise ValueError(f"data {cfg.data!r} with limit {cfg.limit} leaves the {' and '.join(empty)} split(s) "
                         f"empty ({len(splits.train)}/{len(splits.val)}/{len(splits.test)} examples); use more data")
    bundle = build_model(cfg.model, splits, weights=cfg.weights, hidden=cfg.hidden, seed=cfg.seed)
    if check is not None:
        check(bundle)
    bundle.model.to(device)
    if init_state is not None:
        bundle.model.load_state_dict(init_state)
    elif cfg.pretrain_epochs > 0:
        pretrain(bundle.model, splits, cfg, device, quiet)
    return splits, bundle, device


def pretrain(model: nn.Module, splits, cfg: TrainConfig, device, quiet: bool = True) -> List[Dict]:
    """Train every parameter of the dense model for ``cfg.pretrain_epochs`` epochs."""
    train_loader, val_loader, _ = _loaders(splits, cfg.batch_size, cfg.seed)
    opt = make_optimizer("adam", [p for p in model.parameters() if p.requires_grad], cfg.pretrain_lr, 0.0)
    history = []
    for epoch in tqdm(range(1, cfg.pretrain_epochs + 1), desc="pretraining (dense)", disable=quiet, leave=False):
        tr = run_epoch(model, train_loader, device, opt, quiet=True, freeze_frozen_norms=False)
        history.append({"epoch": epoch, "train_loss": tr["loss"], "train_acc": tr["acc"]})
    return history


def compression_config(cfg: TrainConfig, bundle) -> CompressionConfig:
    return CompressionConfig(
        compression=cfg.compression, rank=cfg.rank, clip_rank=cfg.clip_rank, alpha=cfg.alpha, rslora=cfg.rslora, init=cfg.init,
        loftq_iters=cfg.loftq_iters, group_size=cfg.group_size, seed=cfg.seed,
        target_modules=cfg.targets if cfg.targets is not None else bundle.default_targets,
        exclude_modules=bundle.exclude_modules,
        modules_to_save=cfg.modules_to_save if cfg.modules_to_save is not None else bundle.default_modules_to_save,
    )


RUN_FILES = ("config.json", "metrics.csv", "curves.png", "summary.json", "checkpoint/model.safetensors",
             "checkpoint/loraq_config.json")
EVALUATION_FILES = tuple(f"{kind}_{split}.{ext}" for split in ("train", "val", "test")
                         for kind, ext in (("evaluation", "json"), ("confusion", "png")))


def clear_run(out: Path) -> None:
    """Remove an earlier run's outputs from ``out`` (a rerun into the same folder): only the files
    ``train`` and ``evaluate`` write, never anything else a user keeps there."""
    for name in (*RUN_FILES, *EVALUATION_FILES):
        p = out / name
        if p.is_file() or p.is_symlink():
            p.unlink()


def _snapshot(model: nn.Module) -> Dict[str, torch.Tensor]:
    """What training changes: the trainable parameters and the buffers (running statistics of
    trainable batch norms), to return to the best epoch."""
    state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    state.update({n: b.detach().clone() for n, b in model.named_buffers() if ".base_" not in f".{n}"})
    return state


def default_output(prefix: str) -> Path:
    return Path("loraq-runs") / f"{prefix}-{datetime.now():%Y%m%d-%H%M%S-%f}"


def train(
    config: Optional[TrainConfig] = None,
    output=None,
    quiet: bool = False,
    evaluate_test: bool = True,
    init_state: Optional[dict] = None,
    on_epoch: Optional[Callable[[int, Dict[str, float]], None]] = None,
    **options,
) -> dict:
    """Run ``loraq train``: returns the summary (also written to ``OUTPUT/summary.json``).

    ``options`` are :class:`TrainConfig` fields; with ``config`` too, they override its fields.
    ``init_state`` replaces pretraining with a ready dense state dict (sweeps pretrain once);
    ``on_epoch(epoch, metrics)`` is called after every validation (an Optuna pruning hook raises
    from it). Everything (data, model, targets) is checked before anything is written: a run that
    fails to start leaves ``output`` as it was. Once it starts, the outputs of an earlier run in the
    same folder are removed, so the folder never mixes two runs.
    """
    if config is not None:
        cfg = replace(config, **options) if options else config
    else:
        cfg = TrainConfig(**options)
    cfg = absolute_paths(cfg)
    out = Path(output) if output is not None else default_output("train")
    started = time.time()

    splits, bundle, device = prepare(cfg, quiet, init_state,
                                     check=lambda b: resolve_targets(b.model, compression_config(cfg, b)))
    model = bundle.model
    train_loader, val_loader, test_loader = _loaders(splits, cfg.batch_size, cfg.seed)
    report = compress_(model, compression_config(cfg, bundle), progress=not quiet)
    model.to(device)
    for layer in model.modules():  # an unusable backend (LORAQ_BACKEND=triton on a CPU) fails before writing
        if isinstance(layer, LoraLinear):
            ops.resolve_backend(layer.backend, device, layer.base.kind)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(cfg.optimizer, params, cfg.lr, cfg.weight_decay)

    out.mkdir(parents=True, exist_ok=True)
    clear_run(out)
    write_json(out / "config.json", cfg.to_dict())
    start_val = run_epoch(model, val_loader, device)
    best = {"epoch": 0, "val_acc": start_val["acc"], "val_loss": start_val["loss"]}
    best_state = _snapshot(model)
    metrics: List[Dict] = []
    bar = tqdm(range(1, cfg.epochs + 1), desc=f"{cfg.compression} r={cfg.rank} {cfg.init}", disable=quiet)
    for epoch in bar:
        t0 = time.time()
        tr = run_epoch(model, train_loader, device, opt, desc=f"epoch {epoch}", quiet=quiet)
        va = run_epoch(model, val_loader, device)
        row = {"epoch": epoch, "train_loss": tr["loss"], "train_acc": tr["acc"], "val_loss": va["loss"],
               "val_acc": va["acc"], "seconds": round(time.time() - t0, 3)}
        metrics.append(row)
        write_csv(out / "metrics.csv", metrics, METRIC_COLUMNS)
        bar.set_postfix(val_acc=f"{va['acc']:.4f}", best=f"{max(best['val_acc'], va['acc']):.4f}")
        # Better: higher accuracy, or the same accuracy with a clearly lower loss.
        if va["acc"] > best["val_acc"] or (va["acc"] == best["val_acc"] and va["loss"] < best["val_loss"] - 1e-4):
            best = {"epoch": epoch, "val_acc": va["acc"], "val_loss": va["loss"]}
            best_state = _snapshot(model)
        if on_epoch is not None:
            on_epoch(epoch, row)
        if cfg.patience is not None and epoch - best["epoch"] >= cfg.patience:
            break

    with torch.no_grad():  # back to the best epoch
        named = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        for n, v in best_state.items():
            named[n].copy_(v)
    save(model, out / "checkpoint")
    plot_curves(metrics, out / "curves.png", title=f"{cfg.model} on {cfg.data}: {cfg.compression}, rank {cfg.rank}, {cfg.init}")
    fp = footprint(model)
    summary = {
        "best_epoch": best["epoch"], "best_val_acc": best["val_acc"], "best_val_loss": best["val_loss"],
        "start_val_acc": start_val["acc"], "epochs_run": len(metrics),
        "trainable_params": report.trainable_params, "stored_bytes": fp.stored_bytes, "dense_bytes": fp.dense_bytes,
        "compression_ratio": fp.ratio, "device": str(device), "seconds": round(time.time() - started, 2),
        "checkpoint": str(out / "checkpoint"), "config": cfg.to_dict(),
        "classes": splits.classes,  # what each output means: evaluate on other data checks it
    }
    if evaluate_test:
        te = run_epoch(model, test_loader, device)
        summary.update(test_acc=te["acc"], test_loss=te["loss"])
    write_json(out / "summary.json", summary)
    summary["output"] = str(out)
    return summary
