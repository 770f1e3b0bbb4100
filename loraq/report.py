"""Files a run leaves behind: atomic CSV/JSON writes and the plots people look at."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Dict, List, Sequence

from .checkpoint import atomic_write



def _plt():
    """matplotlib (an optional dependency: ``pip install 'loraq[sweep]'``), drawing to files only."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'loraq[sweep]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def atomic_write_text(path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and a rename: never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path


def write_json(path, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def write_csv(path, rows: Sequence[Dict], columns: Sequence[str] = None) -> Path:
    columns = list(columns or (rows[0].keys() if rows else []))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(path, buf.getvalue())


def read_csv(path) -> List[Dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _save(fig, path) -> Path:
    plt = _plt()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight", format=path.suffix[1:]))
    finally:
        plt.close(fig)
    return path


def plot_curves(metrics: Sequence[Dict], path, title: str = "") -> Path:
    """Loss and accuracy per epoch, train and validation, side by side."""
    plt = _plt()
    epochs = [int(m["epoch"]) for m in metrics]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    for split, style in (("train", "-o"), ("val", "-s")):
        ax_loss.plot(epochs, [float(m[f"{split}_loss"]) for m in metrics], style, label=split, markersize=3)
        ax_acc.plot(epochs, [float(m[f"{split}_acc"]) for m in metrics], style, label=split, markersize=3)
    from matplotlib.ticker import MaxNLocator

    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_accuracy_vs_rank(rows: Sequence[Dict], path, references: Dict[str, float]) -> Path:
    """Test accuracy against LoRA rank, one line per (compression, init); references as dashed levels."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    lines: Dict[tuple, List[tuple]] = {}
    for r in rows:
        lines.setdefault((r["compression"], r["init"]), []).append((int(r["rank"]), float(r["test_acc"])))
    for (comp, init), pts in sorted(lines.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", label=f"{comp} + LoRA ({init})", markersize=4)
    for i, (label, acc) in enumerate(references.items()):
        ax.axhline(acc, linestyle="--", color=f"C{(i + len(lines)) % 10}", alpha=0.8, label=f"{label}: {acc:.3f}")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="LoRA rank", ylabel="test accuracy", title="accuracy recovered by the adapters")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


def plot_confusion(matrix, path, title: str = "confusion matrix") -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4.8))
    im = ax.imshow(matrix, cmap="Blues")
    n = len(matrix)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, int(matrix[i][j]), ha="center", va="center", fontsize=7)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.colorbar(im, ax=ax)
    return _save(fig, path)
