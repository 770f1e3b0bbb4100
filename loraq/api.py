"""Model-level API: ``CompressionConfig``, ``compress_``, ``footprint``."""

from __future__ import annotations

import math
import numbers
import re
import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn
from tqdm.auto import tqdm

from .formats import FORMATS, check_dense_weight
from .formats.int1 import SCALE_MODES
from .lora_init import INITS
from .nn import LoraLinear, check_rank, format_bytes
from .ops import BACKENDS

CONFIG_ATTR = "_loraq_config"


def _as_tuple(value, name: str) -> Optional[Tuple[str, ...]]:
    if value is None:
        return None
    if isinstance(value, str):
        value = (value,)
    value = tuple(value)
    for v in value:
        if not isinstance(v, str) or not v:
            raise TypeError(f"{name} must hold non-empty module names or regexes, got {v!r}")
        try:
            re.compile(v)
        except re.error as e:
            raise ValueError(f"{name}: {v!r} is neither a module name nor a valid regex ({e})") from None
    return value


@dataclass
class CompressionConfig:
    """What :func:`compress_` does to a model; validated on construction.

    Attributes:
        compression: ``"int1"``, ``"sparse4x4"`` or ``"dense"`` (plain LoRA).
        rank, alpha, rslora: LoRA rank, alpha (default ``rank``) and rsLoRA scaling.
        init, loftq_iters: ``"gaussian"``, ``"svd"`` or ``"loftq"`` and its alternation steps.
        dropout: LoRA dropout.
        group_size, scale: int1 options (inputs per scale; ``"mean_abs"`` or ``"onebit"``).
        target_modules: names or regexes of the ``nn.Linear`` layers to compress (``None``: all).
            A name matches itself and any module whose dotted name ends with it.
        exclude_modules: names or regexes never compressed.
        modules_to_save: modules left dense and trainable (e.g. a new classifier head).
        backend: kernel backend for the new layers (``None`` follows ``LORAQ_BACKEND``).
        seed: seeds the gaussian init, so the same config gives the same adapters.
        clip_rank: a layer narrower than ``rank`` gets a full-rank adapter, ``min(out, in)``,
            instead of an error (sweeps over large ranks on models with a small head).
    """

    compression: str = "int1"
    rank: int = 8
    alpha: Optional[float] = None
    rslora: bool = False
    init: str = "gaussian"
    loftq_iters: int = 1
    dropout: float = 0.0
    group_size: Optional[int] = None
    scale: str = "mean_abs"
    target_modules: Optional[Sequence[str]] = None
    exclude_modules: Sequence[str] = field(default_factory=tuple)
    modules_to_save: Sequence[str] = field(default_factory=tuple)
    backend: Optional[str] = None
    seed: int = 0
    clip_rank: bool = False

    def __post_init__(self):
        if self.compression not in FORMATS:
            raise ValueError(f"compression must be one of {sorted(FORMATS)}, got {self.compression!r}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank must be an int >= 1, got {self.rank!r}")
        if self.alpha is not None and not (isinstance(self.alpha, (int, float)) and not isinstance(self.alpha, bool)
                                           and math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha must be a positive finite number or None, got {self.alpha!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.init != "gaussian" and self.compression == "dense":
            raise ValueError(f"init={self.init!r} needs a compressed base; use init='gaussian' with compression='dense'")
        if isinstance(self.loftq_iters, bool) or not isinstance(self.loftq_iters, int) or self.loftq_iters < 1:
            raise ValueError(f"loftq_iters must be an int >= 1, got {self.loftq_iters!r}")
        if not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.group_size is not None:
            if (isinstance(self.group_size, bool) or not isinstance(self.group_size, numbers.Integral)
                    or self.group_size < 1):
                raise ValueError(f"group_size must be a positive int or None, got {self.group_size!r}")
            self.group_size = int(self.group_size)  # a numpy integer too (the config is saved as JSON)
            if self.compression != "int1" or self.scale != "mean_abs":
                raise ValueError("group_size applies to compression='int1' with scale='mean_abs' only")
        if self.scale not in SCALE_MODES:
            raise ValueError(f"scale must be one of {SCALE_MODES}, got {self.scale!r}")
        if self.scale != "mean_abs" and self.compression != "int1":
            raise ValueError(f"scale={self.scale!r} applies to compression='int1' only")
        if not isinstance(self.clip_rank, bool):
            raise TypeError(f"clip_rank must be a bool, got {self.clip_rank!r}")
        if self.backend is not None and self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or None, got {self.backend!r}")
        self.target_modules = _as_tuple(self.target_modules, "target_modules")
        self.exclude_modules = _as_tuple(self.exclude_modules, "exclude_modules") or ()
        self.modules_to_save = _as_tuple(self.modules_to_save, "modules_to_save") or ()

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("target_modules", "exclude_modules", "modules_to_save"):
            d[k] = None if d[k] is None else list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CompressionConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown CompressionConfig fields {unknown}")
        return cls(**d)


def _layer_rank(config: CompressionConfig, linear: nn.Linear) -> int:
    return min(config.rank, *linear.weight.shape) if config.clip_rank else config.rank


def matches(name: str, patterns: Iterable[str]) -> bool:
    """``name`` equals a pattern, ends with ``.pattern``, or fully matches it as a regex."""
    for p in patterns:
        if name == p or name.endswith("." + p) or re.fullmatch(p, name):
            return True
    return False


def _inside(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks")


def _carry_hooks(old: nn.Module, new: nn.Module) -> None:
    """Give ``new`` the forward / backward hooks registered on ``old`` (activation capture,
    feature extraction): the same dicts, so the handles the user holds still remove them."""
    for attr in _HOOK_DICTS:
        hooks, own = getattr(old, attr, None), getattr(new, attr, None)
        if hooks and own is not None:
            hooks.update(own)
            setattr(new, attr, hooks)
    if getattr(old, "_backward_hooks", None):
        new._is_full_backward_hook = old._is_full_backward_hook


def module_names(model: nn.Module) -> Dict[int, List[str]]:
    """Every name of each submodule, by ``id``: a module registered twice (tied, shared) has two,
    and replacing it must replace it under both or the tie breaks."""
    names: Dict[int, List[str]] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        names.setdefault(id(m), []).append(n)
    return names


def set_trainable(model: nn.Module, modules_to_save: Iterable[str]) -> None:
    """Freeze everything except the LoRA adapters and the parameters of ``modules_to_save``."""
    for p in model.parameters():
        p.requires_grad_(False)
    for m in model.modules():
        if isinstance(m, LoraLinear):
            m.lora_A.requires_grad_(True)
            m.lora_B.requires_grad_(True)
    for name in modules_to_save:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)


@dataclass
class LayerReport:
    name: str
    shape: Tuple[int, int]
    compression: str
    rank: int
    dense_bytes: int
    base_bytes: int
    base_rel_error: float
    init_rel_error: float


@dataclass
class CompressionReport:
    """What :func:`compress_` replaced, with the relative weight error before and after the LoRA init."""

    layers: List[LayerReport]
    modules_to_save: List[str]
    untouched_linear: List[str]
    trainable_params: int

    def __str__(self) -> str:
        rows = [f"{'layer':<40} {'shape':>14} {'stored':>10} {'dense':>10} {'‖W−Ŵ‖/‖W‖':>10} {'+LoRA init':>10}"]
        for r in self.layers:
            rows.append(f"{r.name:<40} {str(r.shape):>14} {format_bytes(r.base_bytes):>10} "
                        f"{format_bytes(r.dense_bytes):>10} {r.base_rel_error:>10.4f} {r.init_rel_error:>10.4f}")
        rows.append(f"{len(self.layers)} layer(s) compressed, {len(self.untouched_linear)} Linear layer(s) left dense, "
                    f"modules_to_save={self.modules_to_save}, trainable parameters: {self.trainable_params:,}")
        return "\n".join(rows)


def _weights_read_directly(model: nn.Module) -> set:
    """Names of the ``nn.Linear`` layers whose owner reads ``.weight``/``.bias`` instead of calling
    them (``nn.MultiheadAttention``'s ``out_proj``): a ``LoraLinear`` there would break the model."""
    return {f"{n}.{c}" if n else c for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)
            for c, child in m.named_children() if isinstance(child, nn.Linear)}


def resolve_targets(model: nn.Module, config: CompressionConfig) -> Tuple[List[str], List[str]]:
    """The names of the ``nn.Linear`` layers ``config`` compresses in ``model``, and of its modules to save.

    Checks everything :func:`compress_` needs (a match for every pattern, finite float weights,
    a rank each layer can hold) and raises ``ValueError`` otherwise; changes nothing.
    """
    if any(isinstance(m, LoraLinear) for m in model.modules()):
        raise ValueError("model already holds LoraLinear layers; compress_ the original model")
    all_names = [n for n, _ in model.named_modules()]
    for pattern in config.modules_to_save:
        if not any(matches(n, [pattern]) for n in all_names if n):
            raise ValueError(f"modules_to_save: no module matches {pattern!r}")
    save_names = [n for n in all_names if n and matches(n, config.modules_to_save)]
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    read_directly = _weights_read_directly(model)
    candidates = [n for n in linears if not _inside(n, save_names) and not matches(n, config.exclude_modules)]
    if config.target_modules is not None:
        candidates = [n for n in candidates if matches(n, config.target_modules)]
        if any(n in read_directly for n in candidates):
            warnings.warn(f"{[n for n in candidates if n in read_directly]} match target_modules but are left dense: "
                          "nn.MultiheadAttention reads their weight itself instead of calling them", stacklevel=3)
    targets = [n for n in candidates if n not in read_directly]
    if not targets:
        listed = ", ".join(list(linears)[:40]) + (" ..." if len(linears) > 40 else "")
        raise ValueError(
            f"no nn.Linear layer matches target_modules={config.target_modules} "
            f"(exclude_modules={config.exclude_modules}, modules_to_save={config.modules_to_save}); "
            f"the model's Linear layers are: {listed or '(none)'}"
        )
    for n in targets:
        check_dense_weight(linears[n].weight.detach(), f"{n}.weight")
        check_rank(_layer_rank(config, linears[n]), *linears[n].weight.shape, name=n)
    return targets, save_names


def compress_(model: nn.Module, config: Optional[CompressionConfig] = None, progress: Optional[bool] = None,
              **overrides) -> CompressionReport:
    """Replace the matching ``nn.Linear`` layers of ``model`` in place by :class:`LoraLinear`.

    Everything is checked and every new layer is built before the first replacement, so a bad
    input raises and leaves ``model`` exactly as it was. A layer registered under several names
    (tied) is replaced under each by one ``LoraLinear``, which keeps the layer's forward and backward
    hooks; ``nn.MultiheadAttention``'s ``out_proj``
    is left dense (that module reads its weight directly; listed in ``untouched_linear``). Afterwards only the LoRA adapters and
    ``modules_to_save`` are trainable. ``overrides`` update fields of ``config`` (or build one).
    """
    config = CompressionConfig(**{**(config.to_dict() if config else {}), **overrides})
    targets, save_names = resolve_targets(model, config)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}

    generator = torch.Generator().manual_seed(config.seed)
    new_layers: Dict[str, LoraLinear] = {}
    reports: List[LayerReport] = []
    for n in tqdm(targets, desc=f"compressing to {config.compression}",
                  disable=None if progress is None else not progress, leave=False):
        lin = linears[n]
        layer = LoraLinear.from_linear(
            lin, config.compression, _layer_rank(config, lin), config.alpha, config.rslora, config.init, config.loftq_iters,
            config.dropout, config.group_size, config.scale, config.backend, generator,
        )
        with torch.no_grad():
            W = lin.weight.float()
            norm = float(W.norm()) or 1.0
            base_err = float((W - layer.base.dequantize().float()).norm()) / norm
            init_err = float((W - layer.merged_weight().float()).norm()) / norm
        reports.append(LayerReport(n, tuple(lin.weight.shape), config.compression, layer.rank,
                                   layer.base.dense_nbytes, layer.base.nbytes, base_err, init_err))
        new_layers[n] = layer.train(lin.training)
        _carry_hooks(lin, layer)

    names = module_names(model)
    for n, layer in new_layers.items():
        for alias in names[id(linears[n])]:  # a shared layer stays shared
            _set_submodule(model, alias, layer)
    set_trainable(model, save_names)
    setattr(model, CONFIG_ATTR, {"config": config.to_dict(), "modules_to_save": save_names})
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return CompressionReport(reports, save_names, [n for n in linears if n not in new_layers], trainable)


@dataclass
class LayerFootprint:
    name: str
    compression: str
    shape: Tuple[int, int]
    dense_bytes: int  # the weight as a dense matrix in its dtype
    fp16_bytes: int  # the weight as a dense fp16 matrix
    base_bytes: int  # the compressed weight as stored
    lora_bytes: int


@dataclass
class Footprint:
    """Memory of a (compressed) model: what it would take dense and what it really stores."""

    dense_bytes: int
    stored_bytes: int
    trainable_params: int
    total_params: int
    layers: List[LayerFootprint]

    @property
    def ratio(self) -> float:
        """``dense_bytes / stored_bytes``: how many times smaller the model is."""
        return self.dense_bytes / max(self.stored_bytes, 1)

    def __str__(self) -> str:
        rows = [f"{'layer':<40} {'kind':>9} {'shape':>14} {'dense':>10} {'stored':>10} {'vs fp16':>8} {'LoRA':>10}"]
        for l in self.layers:
            rows.append(f"{l.name:<40} {l.compression:>9} {str(l.shape):>14} {format_bytes(l.dense_bytes):>10} "
                        f"{format_bytes(l.base_bytes):>10} {l.fp16_bytes / max(l.base_bytes, 1):>7.1f}x "
                        f"{format_bytes(l.lora_bytes):>10}")
        rows.append(f"model: dense {format_bytes(self.dense_bytes)}, stored {format_bytes(self.stored_bytes)} "
                    f"({self.ratio:.2f}x smaller); trainable parameters {self.trainable_params:,} "
                    f"of {self.total_params:,}")
        return "\n".join(rows)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def footprint(model: nn.Module) -> Footprint:
    """Dense bytes, stored bytes, ratio and trainable parameter count of ``model``, per compressed layer too."""
    dense = stored = 0
    layers: List[LayerFootprint] = []
    lora_modules = {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}
    for n, m in lora_modules.items():
        base = m.base
        lora = _nbytes(m.lora_A) + _nbytes(m.lora_B)
        bias = 0 if m.bias is None else _nbytes(m.bias)
        N, K = base.shape
        layers.append(LayerFootprint(n, m.compression, (N, K), base.dense_nbytes, N * K * 2, base.nbytes, lora))
        dense += base.dense_nbytes + bias
        stored += base.nbytes + lora + bias
    seen = set()
    for n, m in model.named_modules():
        if _inside(n, lora_modules):
            continue
        for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
            if id(t) not in seen:  # tied weights count once
                seen.add(id(t))
                dense += _nbytes(t)
                stored += _nbytes(t)
    params = {id(p): p for p in model.parameters()}.values()
    return Footprint(dense, stored, sum(p.numel() for p in params if p.requires_grad),
                     sum(p.numel() for p in params), layers)
