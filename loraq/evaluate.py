"""``loraq.evaluate``: a saved run's checkpoint on a data split, with metrics, plots and costs."""

from __future__ import annotations

import json
import resource
import time
import warnings
from pathlib import Path
from typing import Optional

import torch

from .api import footprint
from .checkpoint import load
from .report import plot_confusion, write_json
from .train import TrainConfig, _loaders, autocast_for, check_device, resolve_device

SPLITS = ("train", "val", "test")


def _run_folder(path) -> Path:
    """The run folder of a run folder or of its ``checkpoint/`` folder."""
    path = Path(path)
    for folder in (path, path.parent):
        if (folder / "config.json").is_file() and (folder / "checkpoint").is_dir():
            return folder
    raise FileNotFoundError(f"{path} is not a loraq run folder (expected config.json and checkpoint/ in it, "
                            "as written by loraq train)")


def classification_metrics(confusion: torch.Tensor) -> dict:
    """Accuracy and macro precision / recall / F1 from a confusion matrix (rows: true class)."""
    confusion = confusion.double()
    tp = confusion.diag()
    precision = tp / confusion.sum(0).clamp(min=1)
    recall = tp / confusion.sum(1).clamp(min=1)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall), torch.zeros_like(tp))
    return {"accuracy": float(tp.sum() / confusion.sum().clamp(min=1)), "macro_precision": float(precision.mean()),
            "macro_recall": float(recall.mean()), "macro_f1": float(f1.mean())}


def evaluate(run, split: str = "test", data: Optional[str] = None, output=None, device: str = "auto",
             batch_size: int = 256) -> dict:
    """Evaluate the checkpoint of the run folder ``run`` on ``split`` of its data set (or of ``data``).

    Returns (and writes to ``OUTPUT/evaluation_<split>.json``) accuracy, macro precision / recall /
    F1, the confusion matrix (also drawn as ``confusion_<split>.png``), median latency per batch,
    peak memory and the model's footprint.
    """
    from .data import load_data
    from .models import build_model, forward_batch, load_tokenizer

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    check_device(device)
    folder = _run_folder(run)
    cfg = TrainConfig.from_dict(json.loads((folder / "config.json").read_text()))
    cfg.device = device
    dev = resolve_device(device)
    splits = load_data(data or cfg.data, seed=cfg.seed, tokenizer=load_tokenizer(cfg.model), limit=cfg.limit)
    with warnings.catch_warnings():  # "random init" is expected: every weight comes from the checkpoint
        warnings.simplefilter("ignore")
        bundle = build_model(cfg.model, splits, hidden=cfg.hidden, seed=cfg.seed)
    model = load(bundle.model, folder / "checkpoint").to(dev).eval()
    loader = dict(zip(SPLITS, _loaders(splits, batch_size, cfg.seed)))[split]
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    confusion = torch.zeros(splits.num_classes, splits.num_classes, dtype=torch.int64)
    latencies = []
    with torch.no_grad():
        for batch in loader:
            t0 = time.perf_counter()
            with autocast_for(dev):
                logits, labels = forward_batch(model, batch, dev)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            latencies.append(time.perf_counter() - t0)
            pred = logits.argmax(-1).cpu()
            confusion += torch.bincount(labels.cpu() * splits.num_classes + pred,
                                        minlength=splits.num_classes ** 2).view_as(confusion)
    out = Path(output) if output is not None else folder
    result = {"run": str(folder), "data": data or cfg.data, "split": split, "examples": int(confusion.sum()),
              **classification_metrics(confusion), "confusion_matrix": confusion.tolist(),
              "median_latency_ms_per_batch": 1e3 * float(torch.tensor(latencies).median()) if latencies else None,
              "batch_size": batch_size, "device": str(dev)}
    if dev.type == "cuda":
        result["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(dev))
    else:  # the process's peak resident set size (ru_maxrss is in KiB on Linux)
        result["peak_rss_bytes"] = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    fp = footprint(model)
    result["footprint"] = {"dense_bytes": fp.dense_bytes, "stored_bytes": fp.stored_bytes, "ratio": fp.ratio,
                           "trainable_params": fp.trainable_params}
    plot_confusion(confusion.tolist(), out / f"confusion_{split}.png", title=f"{split}: accuracy {result['accuracy']:.3f}")
    write_json(out / f"evaluation_{split}.json", result)
    return result
