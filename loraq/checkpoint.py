"""``save`` and ``load``: a compressed model as safetensors plus a JSON description.

A checkpoint is a folder with ``model.safetensors`` (the whole state dict: packed bases,
adapters and every other parameter and buffer) and ``loraq_config.json`` (format version,
each compressed layer's configuration, ``modules_to_save``, the tensors' shapes and the
file's SHA-256). ``load`` takes the *uncompressed* architecture, checks everything first and
only then rebuilds the layers, so a bad checkpoint leaves the model exactly as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Dict, Optional, Union

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ._version import __version__
from .api import CONFIG_ATTR, _inside, _set_submodule, module_names, set_trainable
from .formats import format_class
from .nn import META_KEY, LoraLinear
from .ops import BACKENDS

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "loraq_config.json"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, truncated, or made for another architecture."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _temporary_path(path: Path) -> Path:
    return path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp"


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (threads may be creating files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_temporary(path: Path, write) -> Path:
    """``write(tmp)`` to a new temporary file next to ``path``, flushed to disk; returns it. The
    file gets the default mode (0666 less the umask), as a plain ``open`` would give it (some
    writers, safetensors among them, create theirs private)."""
    tmp = _temporary_path(path)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        write(str(tmp))
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename: never a half-written file."""
    tmp = _write_temporary(Path(path), write)
    try:
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _unwrap_compiled(model: nn.Module) -> nn.Module:
    """The module ``torch.compile`` wrapped (its names carry an ``_orig_mod.`` prefix), or ``model``."""
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) and type(model).__name__ == "OptimizedModule" else model


def _tensors_to_save(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The model's state dict on the CPU, each tensor its own contiguous memory: safetensors refuses
    tensors that share memory (tied weights, two views of one buffer), so repeats are copied."""
    tensors: Dict[str, torch.Tensor] = {}
    seen = set()
    for k, v in model.state_dict().items():
        v = v.detach()
        storage = v.untyped_storage().data_ptr() if v.numel() else None
        tensors[k] = v.clone().contiguous() if storage in seen else v.contiguous()
        if storage is not None:
            seen.add(storage)
    return {k: v.cpu() for k, v in tensors.items()}


def save(model: nn.Module, path: Union[str, os.PathLike]) -> Path:
    """Save a compressed model to the folder ``path`` (created if needed; ``~`` is expanded); returns
    the folder.

    Both files are written in full to temporary files first and then renamed into place one after
    the other, so an interrupted save leaves the folder's previous checkpoint loadable (unless the
    interruption falls between the two renames).
    """
    folder = Path(path).expanduser()
    model = _unwrap_compiled(model)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = _tensors_to_save(model)
    weights = _write_temporary(folder / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    config = None
    try:
        meta = getattr(model, CONFIG_ATTR, {"config": None, "modules_to_save": []})
        description = {
            "format": "loraq",
            "format_version": FORMAT_VERSION,
            "loraq_version": __version__,
            "config": meta["config"],
            "modules_to_save": meta["modules_to_save"],
            "layers": {n: m.layer_config() for n, m in model.named_modules() if isinstance(m, LoraLinear)},
            "tensors": {k: [list(v.shape), str(v.dtype).replace("torch.", "")] for k, v in tensors.items()},
            "sha256": _sha256(weights),
        }
        text = json.dumps(description, indent=1)
        config = _write_temporary(folder / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))
        os.replace(weights, folder / WEIGHTS_NAME)
        os.replace(config, folder / CONFIG_NAME)
    finally:
        weights.unlink(missing_ok=True)
        if config is not None:
            config.unlink(missing_ok=True)
    return folder


def read_description(path: Union[str, os.PathLike]) -> dict:
    """The parsed ``loraq_config.json`` of a checkpoint folder (clear errors if it is unusable)."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a loraq checkpoint folder (it does not exist or is a file)")
    try:
        desc = json.loads((folder / CONFIG_NAME).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{folder} has no {CONFIG_NAME}; was it written by loraq.save?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{folder / CONFIG_NAME} is corrupt or truncated ({e})") from None
    if not isinstance(desc, dict) or desc.get("format") != "loraq":
        raise CheckpointError(f"{folder / CONFIG_NAME} is not a loraq checkpoint description")
    if desc.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint format version {desc.get('format_version')} is not supported "
                              f"(this loraq reads version {FORMAT_VERSION})")
    return desc


def _skeleton(cfg: dict, device: torch.device, backend: Optional[str] = None) -> LoraLinear:
    """An empty LoraLinear with the tensor shapes of the saved one, to load the tensors into."""
    dtype = getattr(torch, cfg["dtype"])
    shape = (cfg["out_features"], cfg["in_features"])
    options = {"group_size": cfg["group_size"], "scale": cfg["scale"]} if cfg["compression"] == "int1" else {}
    base = format_class(cfg["compression"]).empty(shape, dtype, device, **options)
    bias = torch.zeros(shape[0], dtype=dtype, device=device) if cfg["bias"] else None
    return LoraLinear(base, cfg["rank"], cfg["alpha"], cfg["rslora"], cfg["dropout"], bias, backend=backend)


def _describe(problems: list, what: str) -> str:
    return f"{what}: {', '.join(problems[:8])}{' ...' if len(problems) > 8 else ''}"


def load(model: nn.Module, path: Union[str, os.PathLike], backend: Optional[str] = None) -> nn.Module:
    """Restore a checkpoint written by :func:`save` into ``model`` (the architecture before compression).

    The compressed layers are rebuilt from the checkpoint alone (no dense weights needed) and
    every tensor is restored bit-exactly. ``backend`` is the rebuilt layers' kernel backend
    (``None``: ``LORAQ_BACKEND``, else auto; it is a choice of the machine that runs the model,
    not saved). Returns ``model``. Raises :class:`CheckpointError`, leaving ``model`` untouched,
    if the checkpoint is corrupt, truncated or for another model.
    """
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    outer, model = model, _unwrap_compiled(model)
    folder = Path(path).expanduser()
    desc = read_description(folder)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{folder} has no {WEIGHTS_NAME}")
    if _sha256(weights) != desc.get("sha256"):
        raise CheckpointError(f"{weights} is corrupt or truncated: its SHA-256 differs from the one saved with it")
    try:
        state = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{weights} cannot be read ({type(e).__name__}: {e})") from None

    # Build the new layers and check every name and shape before touching the model.
    modules = dict(model.named_modules())
    new_layers: Dict[str, LoraLinear] = {}
    for name, cfg in desc["layers"].items():
        old = modules.get(name)
        if not isinstance(old, (nn.Linear, LoraLinear)):
            found = "nothing" if old is None else type(old).__name__
            raise CheckpointError(f"checkpoint made for another architecture: it compresses {name!r}, "
                                  f"which is {found} in this model, not an nn.Linear")
        if (old.out_features, old.in_features) != (cfg["out_features"], cfg["in_features"]):
            raise CheckpointError(
                f"checkpoint made for another architecture: {name!r} is [{old.out_features}, {old.in_features}] "
                f"here but [{cfg['out_features']}, {cfg['in_features']}] in the checkpoint")
        device = next(iter(old.parameters()), torch.empty(0)).device
        try:
            new_layers[name] = _skeleton(cfg, device, backend)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CheckpointError(f"layer {name!r} has an unusable description in {CONFIG_NAME} ({e})") from None
    for name in desc.get("modules_to_save", []):
        if name not in modules:
            raise CheckpointError(f"checkpoint made for another architecture: modules_to_save {name!r} does not exist")
    # a layer registered under several names (tied) is replaced under each: keep the tie
    names = module_names(model)
    placed = {alias: layer for name, layer in new_layers.items() for alias in names[id(modules[name])]}

    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if not _inside(k.rsplit(".", 1)[0], placed)}
    for name, layer in placed.items():
        expected.update({f"{name}.{k}": tuple(v.shape) for k, v in layer.state_dict().items()})
    # the layers' metadata entries are optional: checkpoints saved before they existed lack them
    optional = {f"{name}.{META_KEY}" for name in placed}
    missing = sorted(set(expected) - set(state) - optional)
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(f"{k} {tuple(state[k].shape)} vs {expected[k]}" for k in set(expected) & set(state)
                        if tuple(state[k].shape) != expected[k])
    if missing or unexpected or mismatched:
        parts = [_describe(p, w) for p, w in ((missing, "missing"), (unexpected, "unexpected"),
                                               (mismatched, "shape mismatch (file vs model)")) if p]
        raise CheckpointError("checkpoint made for another architecture; " + "; ".join(parts))

    for name, layer in new_layers.items():  # the adapters and bias in their saved dtypes (fp32 masters)
        for k, p in list(layer.named_parameters(recurse=False)):
            saved = state[f"{name}.{k}"].dtype
            if saved != p.dtype and saved.is_floating_point:
                setattr(layer, k, nn.Parameter(p.detach().to(saved), requires_grad=p.requires_grad))

    originals = {name: model.get_submodule(name) for name in placed}
    try:
        for name, layer in placed.items():
            _set_submodule(model, name, layer.train(originals[name].training))
        model.load_state_dict(state, strict=True)
    except Exception:
        for name, old in originals.items():  # put the original layers back
            _set_submodule(model, name, old)
        raise
    set_trainable(model, desc.get("modules_to_save", []))
    setattr(model, CONFIG_ATTR, {"config": desc.get("config"), "modules_to_save": desc.get("modules_to_save", [])})
    return outer
