"""``loraq.evaluate``: a saved run's checkpoint on a data split, with metrics, plots and costs."""

from __future__ import annotations

import json
import resource
import statistics
import time
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import DataLoader

from .api import footprint
from .checkpoint import load
from .report import plot_confusion, write_json
from .train import TrainConfig, autocast_for, check_device, resolve_device

SPLITS = ("train", "val", "test")


def _run_folder(path) -> Path:
    """The run folder of a run folder or of its ``checkpoint/`` folder."""
    path = Path(path)
    for folder in (path, path.parent):
        if (folder / "config.json").is_file() and (folder / "checkpoint").is_dir():
            return folder
    raise FileNotFoundError(f"{path} is not a loraq run folder (expected config.json and checkpoint/ in it, "
                            "as written by loraq train)")


def _shown(classes: list, most: int = 12) -> str:
    return repr(list(classes)[:most])[:-1] + (f", ... ({len(classes)} in all)]" if len(classes) > most else "]")


def classification_metrics(confusion: torch.Tensor) -> dict:
    """Accuracy and macro precision / recall / F1 from a confusion matrix (rows: true class).

    As ``sklearn.metrics.precision_recall_fscore_support(average="macro", zero_division=0)``: the
    macro averages run over the classes that occur among the true labels or the predictions (a
    class absent from both, e.g. from a small test split, would count as 0 and drag them down),
    and a 0/0 precision or recall counts as 0.
    """
    confusion = confusion.double()
    tp = confusion.diag()
    predicted, true = confusion.sum(0), confusion.sum(1)
    seen = (predicted + true) > 0
    precision = (tp / predicted.clamp(min=1))[seen]
    recall = (tp / true.clamp(min=1))[seen]
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall), torch.zeros_like(precision))

    def mean(t):
        return float(t.mean()) if t.numel() else 0.0

    return {"accuracy": float(tp.sum() / confusion.sum().clamp(min=1)), "macro_precision": mean(precision),
            "macro_recall": mean(recall), "macro_f1": mean(f1)}


def evaluate(run, split: str = "test", data: Optional[str] = None, output=None, device: str = "auto",
             batch_size: int = 256) -> dict:
    """Evaluate the checkpoint of the run folder ``run`` on ``split`` of its data set (or of ``data``).

    Returns (and writes to ``OUTPUT/evaluation_<split>.json``) accuracy, macro precision / recall /
    F1, the confusion matrix (also drawn as ``confusion_<split>.png``), median latency per batch,
    peak memory and the model's footprint. Latency is the median time of one forward (moving the
    inputs to the device included) over the batches of ``batch_size`` examples, after an untimed
    warm-up forward; a smaller last batch is timed only when it is the only one, and the
    ``batch_size`` reported is the number of examples in a timed batch.
    """
    from .data import load_data
    from .models import build_model, forward_batch, load_tokenizer

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    check_device(device)
    folder = _run_folder(run)
    # the device asked for here, not the training one: a run trained on cuda evaluates on a CPU-only machine
    cfg = TrainConfig.from_dict({**json.loads((folder / "config.json").read_text()), "device": device})
    dev = resolve_device(device)
    splits = load_data(data or cfg.data, seed=cfg.seed, tokenizer=load_tokenizer(cfg.model), limit=cfg.limit)
    summary = folder / "summary.json"
    trained = json.loads(summary.read_text()).get("classes") if summary.is_file() else None
    if trained is not None and splits.classes is not None and list(splits.classes) != trained:
        # another labelling would score predictions against the wrong classes, silently
        raise ValueError(f"data {data or cfg.data!r} has the classes {_shown(splits.classes)}, the run was trained "
                         f"on {_shown(trained)}: its outputs would be scored against other labels")
    dataset = dict(zip(SPLITS, (splits.train, splits.val, splits.test)))[split]
    if len(dataset) == 0:  # metrics of nothing would read as accuracy 0 and no latency
        raise ValueError(f"the {split} split of {data or cfg.data!r} (limit {cfg.limit}) has no examples; "
                         "evaluate another split or use more data")
    with warnings.catch_warnings():  # "random init" is expected: every weight comes from the checkpoint
        warnings.simplefilter("ignore")
        bundle = build_model(cfg.model, splits, hidden=cfg.hidden, seed=cfg.seed)
    model = load(bundle.model, folder / "checkpoint").to(dev).eval()
    # batch_size applies to every split (the training loaders batch val/test by 256), in order
    kw = {"collate_fn": splits.collate_fn} if splits.collate_fn is not None else {}
    loader = DataLoader(dataset, batch_size=batch_size, **kw)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    confusion = torch.zeros(splits.num_classes, splits.num_classes, dtype=torch.int64)
    latencies = {}  # examples in the batch -> seconds per forward

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    with torch.no_grad():
        for i, batch in enumerate(loader):
            if i == 0:  # warm-up, untimed: lazy initialisation, kernel compilation and autotuning
                with autocast_for(dev):
                    forward_batch(model, batch, dev)
            sync()
            t0 = time.perf_counter()
            with autocast_for(dev):
                logits, labels = forward_batch(model, batch, dev)
            sync()
            latencies.setdefault(labels.shape[0], []).append(time.perf_counter() - t0)
            pred = logits.argmax(-1).cpu()
            confusion += torch.bincount(labels.cpu() * splits.num_classes + pred,
                                        minlength=splits.num_classes ** 2).view_as(confusion)
    timed_rows = max(latencies)  # full batches; the last, smaller one only if it is the only one
    out = Path(output) if output is not None else folder
    result = {"run": str(folder), "data": data or cfg.data, "split": split, "examples": int(confusion.sum()),
              **classification_metrics(confusion), "confusion_matrix": confusion.tolist(),
              "median_latency_ms_per_batch": 1e3 * statistics.median(latencies[timed_rows]),
              "batch_size": timed_rows, "device": str(dev)}
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
