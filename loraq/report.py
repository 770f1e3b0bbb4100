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

    plt.style.use("default")  # optuna's matplotlib plots switch the global style to ggplot
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
    """Test accuracy against LoRA rank: one colour per compression, one line style per init.

    ``references`` (label → accuracy) are drawn as horizontal levels, in the colour of the
    compression their label starts with (black for anything else); a level far below every
    LoRA point is listed in the legend instead of stretching the axis.
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.8))
    lines: Dict[tuple, List[tuple]] = {}
    for r in rows:
        lines.setdefault((r["compression"], r["init"]), []).append((int(r["rank"]), float(r["test_acc"])))
    comps = sorted({c for c, _ in lines})
    color = {c: f"C{i % 10}" for i, c in enumerate(comps)}
    styles = {i: s for i, s in zip(sorted({i for _, i in lines}), [("-", "o"), ("--", "s"), (":", "^"), ("-.", "D")] * 4)}
    for (comp, init), pts in sorted(lines.items()):
        pts.sort()
        ls, marker = styles[init]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], linestyle=ls, marker=marker, color=color[comp],
                label=f"{comp} + LoRA ({init})", markersize=5)
    accs = [a for pts in lines.values() for _, a in pts]
    lo = min(accs) if accs else min(references.values(), default=0.0)
    for label, acc in references.items():
        c = next((color[k] for k in comps if label.startswith(k)), "black")
        if acc < lo - 0.1:  # would squash every LoRA line into the top of the plot
            ax.plot([], [], linestyle=(0, (1, 1)), color=c, label=f"{label}: {acc:.3f} (below the axis)")
        else:
            ax.axhline(acc, linestyle=(0, (1, 1)) if c != "black" else "--", color=c, alpha=0.9,
                       label=f"{label}: {acc:.3f}")
            lo = min(lo, acc)
    ax.set_ylim(max(0.0, lo - 0.02), min(1.0, max(accs + list(references.values()), default=1.0) + 0.01))
    ax.set_xscale("log", base=2)
    ranks = sorted({p[0] for pts in lines.values() for p in pts})
    ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.set(xlabel="LoRA rank", ylabel="test accuracy", title="accuracy the adapters win back")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
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


def plot_trials(series: Sequence[Dict], path, best: int = None, title: str = "") -> Path:
    """Validation accuracy per epoch of every trial of a cell: pruned trials dotted, the best one bold.

    ``series`` holds ``{"number", "state", "values": {epoch: accuracy}}`` per trial.
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for s in series:
        pts = sorted((int(k), float(v)) for k, v in s["values"].items())
        is_best = s["number"] == best
        ax.plot([p[0] for p in pts], [p[1] for p in pts], ":" if s["state"] == "pruned" else "-",
                marker="o", markersize=3, linewidth=2.5 if is_best else 1, alpha=1 if is_best else 0.6,
                label=f"trial {s['number']} ({'best' if is_best else s['state']})")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="epoch", ylabel="validation accuracy", title=title)
    ax.grid(alpha=0.3)
    if len(series) <= 12:
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_study(study, folder) -> List[Path]:
    """Optuna's optimisation history and parameter importances of ``study``: interactive HTML when
    plotly is installed, PNG otherwise. Importances need two complete trials and are skipped before."""
    import warnings

    folder = Path(folder)
    try:
        import plotly  # noqa: F401

        from optuna import visualization as vis

        def write(fig, name):
            path = folder / f"{name}.html"
            atomic_write(path, lambda tmp: fig.write_html(tmp, include_plotlyjs="cdn"))
            return path
    except ImportError:
        from optuna.visualization import matplotlib as vis

        def write(ax, name):
            return _save(ax.figure, folder / f"{name}.png")

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    with warnings.catch_warnings():  # optuna's matplotlib backend is marked experimental
        warnings.simplefilter("ignore")
        written.append(write(vis.plot_optimization_history(study), "history"))
        complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
        if len(complete) >= 2 and any(len({repr(t.params.get(k)) for t in complete}) > 1 for k in complete[0].params):
            written.append(write(vis.plot_param_importances(study), "importance"))
    return written
