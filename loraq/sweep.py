"""``loraq.sweep``: compressions × ranks × inits, an Optuna study per cell, one evaluation table.

Each cell (compression, rank, init) is an Optuna study named ``<prefix>-<cell>`` in one storage
(SQLite in the output folder by default, or any SQLAlchemy URL such as ``postgresql://...``).
A study runs until it holds ``trials`` finished trials (complete or pruned), so rerunning the
same command after an interruption resumes: finished trials are kept, and a trial left running
by a dead process is marked failed and redone with the same parameters (on the same host at
once, by its process id; from any host after the heartbeat's grace period). Several workers,
on one machine or on several, may run the same command against one storage at the same time.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
import warnings
import zlib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Sequence

import torch
from tqdm.auto import tqdm

from .api import compress_, footprint, resolve_targets
from .checkpoint import atomic_write
from .formats import FORMATS
from .lora_init import INITS
from .report import atomic_write_text, plot_accuracy_vs_rank, plot_study, plot_trials, write_csv, write_json
from .search_space import parse_search_space, suggest
from .train import TrainConfig, _loaders, compression_config, prepare, pretrain, run_epoch, train

DEFAULT_RANKS = (2, 4, 8, 16, 32, 64, 128)
HEARTBEAT_INTERVAL = 10  # seconds between a running trial's heartbeats
GRACE_PERIOD = 30  # a running trial without a heartbeat for this long is dead (any host)
MAX_RETRY = 3  # a trial whose process dies this many times is left failed
WAIT_POLL = 2.0  # seconds between checks while other workers finish a cell's last trials
HOST = socket.gethostname()
# What a trial records besides its value; "folder"/"host" say where its checkpoint lives.
RESULT_ATTRS = ("best_val_loss", "best_epoch", "test_acc", "trainable_params", "stored_bytes", "compression_ratio",
                "seconds")
EVALUATION_COLUMNS = ("kind", "compression", "rank", "init", "test_acc", "best_val_acc", "trainable_params",
                      "stored_bytes", "compression_ratio", "trials_complete", "trials_pruned", "best_trial",
                      "optimizer", "lr", "batch_size", "alpha", "weight_decay", "checkpoint")


class Cell(NamedTuple):
    compression: str
    rank: int
    init: str

    @property
    def name(self) -> str:
        return f"{self.compression}-r{self.rank}-{self.init}"


def _names(value, known: Sequence[str], what: str) -> tuple:
    value = (value,) if isinstance(value, str) else tuple(value)
    if not value:
        raise ValueError(f"{what}: give at least one")
    for v in value:
        if v not in known:
            raise ValueError(f"unknown {what[:-1]} {v!r}; expected one of {sorted(known)}")
    return tuple(dict.fromkeys(value))


@dataclass
class SweepConfig:
    """Every option of ``loraq sweep``; model/data/LoRA fields mean what they mean in :class:`TrainConfig`.

    ``search_space`` updates :data:`loraq.search_space.DEFAULT_SEARCH_SPACE` (a dict, JSON text or
    a JSON file). ``storage`` is an Optuna storage URL (default: ``sqlite:///OUTPUT/optuna.db``).
    ``study_prefix`` names the studies (default: ``loraq-<key>``, where the key hashes every
    setting that changes what a trial means, so different sweeps never share a study).
    """

    model: str = "mlp"
    data: str = "digits"
    weights: Optional[str] = None
    hidden: Sequence[int] = (1000, 2000)
    limit: Optional[int] = None
    pretrain_epochs: int = 0
    pretrain_lr: float = 1e-3
    compressions: Sequence[str] = ("int1", "sparse4x4")
    ranks: Sequence[int] = DEFAULT_RANKS
    inits: Sequence[str] = INITS
    targets: Optional[Sequence[str]] = None
    modules_to_save: Optional[Sequence[str]] = None
    clip_rank: bool = False
    rslora: bool = False
    loftq_iters: int = 1
    group_size: Optional[int] = None
    trials: int = 10
    epochs: int = 10
    patience: Optional[int] = None
    seed: int = 0
    device: str = "auto"
    search_space: Optional[Any] = None
    storage: Optional[str] = None
    study_prefix: Optional[str] = None
    _space: Dict[str, Any] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        self.compressions = _names(self.compressions, FORMATS, "compressions")
        self.inits = _names(self.inits, INITS, "inits")
        self.ranks = tuple(dict.fromkeys(self.ranks))
        if not self.ranks:
            raise ValueError("ranks: give at least one")
        for name in ("trials", "epochs"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if self.storage is not None and "://" not in self.storage:
            raise ValueError(f"storage must be a database URL such as sqlite:///sweep.db or "
                             f"postgresql://user@host/db, got {self.storage!r}")
        if self.study_prefix is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+", self.study_prefix):
            raise ValueError(f"study_prefix may hold letters, digits, '_', '.', '-' only, got {self.study_prefix!r}")
        self.hidden = tuple(int(h) for h in self.hidden)
        self._space = parse_search_space(self.search_space)
        for cell in self.cells():  # every rank, compression and init is checked here, before any work
            self.train_config(cell, {})
        if not self.cells():
            raise ValueError("no cell to run: 'dense' takes init 'gaussian' only")

    def cells(self) -> List[Cell]:
        """Compressions × inits × ranks; plain LoRA on a dense base has one init (gaussian)."""
        return [Cell(c, r, i) for c in self.compressions for i in self.inits for r in self.ranks
                if c != "dense" or i == "gaussian"]

    def train_config(self, cell: Cell, params: Dict[str, Any]) -> TrainConfig:
        """The :class:`TrainConfig` of one trial: the cell, the sampled ``params``, the shared settings."""
        p = {k: (v if not isinstance(v, (list, dict)) else None) for k, v in self._space.items()}
        p.update(params)
        alpha = None if p.get("alpha_factor") is None else p["alpha_factor"] * cell.rank
        return TrainConfig(
            model=self.model, data=self.data, weights=self.weights, hidden=self.hidden, limit=self.limit,
            compression=cell.compression, targets=self.targets, modules_to_save=self.modules_to_save,
            rank=cell.rank, clip_rank=self.clip_rank, alpha=alpha, rslora=self.rslora, init=cell.init,
            loftq_iters=self.loftq_iters, group_size=self.group_size, pretrain_epochs=self.pretrain_epochs,
            pretrain_lr=self.pretrain_lr, optimizer=p.get("optimizer") or "adam", lr=p.get("lr") or 1e-3,
            weight_decay=p.get("weight_decay") or 0.0, batch_size=p.get("batch_size") or 64, epochs=self.epochs,
            patience=self.patience, seed=self.seed, device=self.device,
        )

    def fingerprint(self) -> Dict[str, Any]:
        """The settings that change what a trial means (not how many trials, where, or which cells)."""
        skip = {"trials", "storage", "device", "compressions", "ranks", "inits", "study_prefix", "search_space"}
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.init and f.name not in skip}
        d["search_space"] = self._space
        return json.loads(json.dumps(d, default=list))

    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.fingerprint(), sort_keys=True).encode()).hexdigest()[:10]

    def prefix(self) -> str:
        return self.study_prefix or f"loraq-{self.key()}"

    def to_dict(self) -> Dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        d["search_space"] = self._space
        return json.loads(json.dumps(d, default=list))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", Path(text).name if ":" in text else text).strip("_")[:24] or "x"


def default_sweep_output(cfg: SweepConfig) -> Path:
    """The same command always gets the same folder, so rerunning it resumes."""
    return Path("loraq-runs") / f"sweep-{_slug(cfg.model)}-{_slug(cfg.data)}-{cfg.key()}"


def _retry_callback():
    """Optuna's callback that re-queues a dead trial with its parameters (renamed in optuna 4.9)."""
    import optuna

    cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or optuna.storages.RetryFailedTrialCallback
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return cls(max_retry=MAX_RETRY)


def _with_driver(url: str) -> str:
    """``postgresql://`` with the PostgreSQL driver that is installed (SQLAlchemy's default differs by version)."""
    if not url.startswith("postgresql://"):
        return url
    import importlib.util

    for module, dialect in (("psycopg", "psycopg"), ("psycopg2", "psycopg2")):
        if importlib.util.find_spec(module) is not None:
            return f"postgresql+{dialect}://" + url[len("postgresql://"):]
    raise ImportError("a postgresql:// storage needs a PostgreSQL driver: pip install 'loraq[postgres]'")


def open_storage(url: str):
    """An Optuna RDB storage with heartbeats; trials found dead are retried with the same parameters."""
    import optuna

    url = _with_driver(url)
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    callback = ("heartbeat_stale_trial_callback" if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback")
                else "failed_trial_callback")
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    for attempt in range(5):
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" in optuna
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs,
                                                  heartbeat_interval=HEARTBEAT_INTERVAL, grace_period=GRACE_PERIOD,
                                                  **{callback: _retry_callback()})
        except (IntegrityError, ProgrammingError):
            # Workers started together on an empty database race to create its tables: the loser
            # retries and finds them made.
            if attempt == 4:
                raise
            time.sleep(0.5 * (attempt + 1))


def open_storage_checked(url: str):
    """:func:`open_storage`, with a clear ``ValueError`` when the URL is unusable (a wrong scheme,
    a host that does not answer, a folder that does not exist)."""
    from sqlalchemy.exc import ArgumentError, OperationalError

    try:
        return open_storage(url)
    except (ArgumentError, OperationalError, ModuleNotFoundError) as e:
        reason = str(e).strip().splitlines()[0]
        raise ValueError(f"storage {url!r} cannot be opened: {reason}") from None


def _check_same_settings(cfg: "SweepConfig", out: Path) -> None:
    """A sweep folder belongs to one set of settings (its ``key``): its pretrained model, studies
    and trial folders mean nothing for others. Refuse to mix them."""
    previous = out / "sweep.json"
    if not previous.is_file():
        return
    try:
        saved = json.loads(previous.read_text())
    except (OSError, ValueError):
        raise ValueError(f"{previous} is unreadable; use another output folder") from None
    if saved.get("key") != cfg.key():
        differ = sorted(k for k, v in cfg.fingerprint().items() if saved.get(k) != v)
        raise ValueError(f"{out} holds a sweep made with other settings ({', '.join(differ) or 'its key'} differ); "
                         "rerun with the same settings to resume it, or give another --output")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def fail_dead_local_trials(study) -> int:
    """Mark failed (and queue for a retry) the running trials whose process on this host is gone.

    The heartbeat finds dead trials from any host but only after its grace period; this finds
    the ones a killed local process left behind at once. A trial's ``pid`` counts only while its
    ``started`` attribute matches its start time (a retried trial copies its predecessor's attributes).
    """
    from optuna.trial import TrialState

    retry = _retry_callback()
    failed = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        a = t.user_attrs
        if (a.get("host") == HOST and a.get("pid") not in (None, os.getpid())
                and t.datetime_start is not None and a.get("started") == t.datetime_start.isoformat()
                and not _alive(a["pid"])):
            try:
                study.tell(t.number, state=TrialState.FAIL)
            except (RuntimeError, ValueError):  # another worker got there first
                continue
            retry(study, study.get_trials(deepcopy=False)[t.number])
            failed += 1
    return failed


def _counts(study) -> Dict[str, int]:
    c = {s: 0 for s in ("complete", "pruned", "running", "waiting", "fail")}
    for t in study.get_trials(deepcopy=False):
        name = t.state.name.lower()
        if name in c:
            c[name] += 1
    c["total"] = sum(c.values())
    c["finished"] = c["complete"] + c["pruned"]
    return c


def _sampler(cfg: SweepConfig, cell_index: int, n_trials: int, parallel: bool):
    """TPE seeded by (seed, cell, trials so far): a lone worker is reproducible; parallel ones differ."""
    import optuna

    # hashed, not summed: with a sum, workers with consecutive pids (started together) at k + 1 and
    # k trials drew the same seed, so the same parameters
    seed = zlib.crc32(repr((cfg.seed, cell_index, n_trials, os.getpid() if parallel else 0)).encode()) % 2**31
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(2, min(10, cfg.trials // 2)))


class _Runner:
    """Runs the trials of one sweep in one process (one worker)."""

    def __init__(self, cfg: SweepConfig, out: Path, storage, state: Dict[str, torch.Tensor], bar):
        self.cfg, self.out, self.storage, self.state, self.bar = cfg, out, storage, state, bar
        self.finished: Dict[str, int] = {}

    def study(self, cell: Cell):
        import optuna

        study = optuna.create_study(
            storage=self.storage, study_name=f"{self.cfg.prefix()}-{cell.name}", direction="maximize",
            load_if_exists=True, pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1),
        )
        if "loraq_sweep" not in study.user_attrs:
            study.set_user_attr("loraq_sweep", {"cell": cell._asdict(), **self.cfg.fingerprint()})
        return study

    def _progress(self, cell: Cell, counts: Dict[str, int]) -> None:
        self.finished[cell.name] = min(counts["finished"], self.cfg.trials)
        self.bar.n = sum(self.finished.values())
        self.bar.set_postfix_str(cell.name)
        self.bar.refresh()

    def objective(self, cell: Cell):
        import optuna

        def run(trial) -> float:
            trial.set_user_attr("host", HOST)
            trial.set_user_attr("pid", os.getpid())
            trial.set_user_attr("started", trial.datetime_start.isoformat())
            folder = self.out / "cells" / cell.name / f"trial-{trial.number:04d}"
            trial.set_user_attr("folder", str(folder.resolve()))
            tcfg = self.cfg.train_config(cell, suggest(trial, self.cfg._space))

            def on_epoch(epoch: int, row: Dict[str, float]) -> None:
                trial.report(row["val_acc"], epoch)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"validation accuracy {row['val_acc']:.4f} after epoch {epoch}")

            s = train(tcfg, output=folder, quiet=True, evaluate_test=True, init_state=self.state, on_epoch=on_epoch)
            for k in RESULT_ATTRS:
                trial.set_user_attr(k, s[k])
            trial.set_user_attr("alpha", tcfg.alpha)
            return s["best_val_acc"]

        return run

    def run_cell(self, index: int, cell: Cell, wait: bool) -> None:
        """Run trials until the cell's study holds ``trials`` finished ones (or, without ``wait``,
        until the trials still missing are all running in other workers)."""
        import optuna

        study = self.study(cell)
        while True:
            fail_dead_local_trials(study)
            c = _counts(study)
            self._progress(cell, c)
            if c["finished"] >= self.cfg.trials:
                return
            if c["finished"] + c["running"] < self.cfg.trials:
                study.sampler = _sampler(self.cfg, index, c["total"], parallel=c["running"] > 0)
                study.optimize(self.objective(cell), n_trials=1)
            elif wait:
                time.sleep(WAIT_POLL)
                optuna.storages.fail_stale_trials(study)
            else:
                return


def _state_path(out: Path) -> Path:
    return out / "pretrained.pt"


def _base_model(cfg: SweepConfig, out: Path, quiet: bool):
    """The dense model every trial starts from: pretrained once, saved, and reloaded on a rerun.

    Every compression's widest rank is checked against the model's layers first, so an
    impossible rank fails before any training.
    """
    path = _state_path(out)
    tcfg = cfg.train_config(cfg.cells()[0], {})
    saved = torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None
    untrained = copy.copy(tcfg)
    untrained.pretrain_epochs = 0
    splits, bundle, device = prepare(untrained, quiet=quiet, init_state=saved)
    for comp in cfg.compressions:
        widest = copy.copy(tcfg)
        widest.compression, widest.rank = comp, max(cfg.ranks)
        resolve_targets(bundle.model, compression_config(widest, bundle))
    if saved is None and tcfg.pretrain_epochs > 0:
        pretrain(bundle.model, splits, tcfg, device, quiet)
    state = {k: v.detach().cpu().clone() for k, v in bundle.model.state_dict().items()}
    if saved is None:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: torch.save(state, tmp))
    return tcfg, splits, bundle, device, state


def _reference_rows(cfg: SweepConfig, tcfg: TrainConfig, splits, bundle, device) -> List[Dict[str, Any]]:
    """The original dense model, and each compression with no adapter (rank 1 with B = 0 adds nothing)."""
    _, val_loader, test_loader = _loaders(splits, 256, cfg.seed)
    model = bundle.model
    fp = footprint(model)
    rows = [{"kind": "dense", "compression": "dense (original)", "test_acc": run_epoch(model, test_loader, device)["acc"],
             "best_val_acc": run_epoch(model, val_loader, device)["acc"], "trainable_params": 0,
             "stored_bytes": fp.stored_bytes, "compression_ratio": 1.0}]
    for comp in cfg.compressions:
        if comp == "dense":
            continue
        m = copy.deepcopy(model)
        one = copy.copy(tcfg)
        one.compression, one.rank, one.init = comp, 1, "gaussian"
        compress_(m, compression_config(one, bundle), progress=False)
        m.to(device)
        fpc = footprint(m)
        stored = fpc.stored_bytes - sum(l.lora_bytes for l in fpc.layers)
        rows.append({"kind": "no_lora", "compression": f"{comp} (no LoRA)", "test_acc": run_epoch(m, test_loader, device)["acc"],
                     "best_val_acc": run_epoch(m, val_loader, device)["acc"], "trainable_params": 0,
                     "stored_bytes": stored, "compression_ratio": fpc.dense_bytes / max(stored, 1)})
    return rows


def _cell_row(runner: _Runner, cell: Cell) -> Dict[str, Any]:
    """The best complete trial of a cell (by validation accuracy, then loss), evaluated on the test split."""
    from optuna.trial import TrialState

    from .evaluate import evaluate

    study = runner.study(cell)
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    c = _counts(study)
    row: Dict[str, Any] = {"kind": "lora", "compression": cell.compression, "rank": cell.rank, "init": cell.init,
                           "trials_complete": c["complete"], "trials_pruned": c["pruned"]}
    cell_dir = runner.out / "cells" / cell.name
    series = [{"number": t.number, "state": t.state.name.lower(), "values": dict(t.intermediate_values)}
              for t in trials if t.intermediate_values]
    if not complete:
        return row
    best = max(complete, key=lambda t: (t.value, -t.user_attrs.get("best_val_loss", 0.0), -t.number))
    a = best.user_attrs
    row.update(best_val_acc=best.value, best_trial=best.number, test_acc=a.get("test_acc"),
               trainable_params=a.get("trainable_params"), stored_bytes=a.get("stored_bytes"),
               compression_ratio=a.get("compression_ratio"), alpha=a.get("alpha"), checkpoint=a.get("folder"),
               **{k: best.params.get(k, runner.cfg._space.get(k)) for k in ("optimizer", "lr", "batch_size",
                                                                            "weight_decay")})
    plot_trials(series, cell_dir / "trials.png", best.number, title=f"{cell.name}: validation accuracy per trial")
    plot_study(study, cell_dir)
    folder = Path(a.get("folder", ""))
    if (folder / "checkpoint").is_dir():  # the best trial ran here: full evaluation and its curves
        done = cell_dir / "best.json"
        previous = json.loads(done.read_text()) if done.is_file() else {}
        started = str(best.datetime_start)  # with the number: another study's trial 3 is not this one
        row["best_trial_started"] = started
        if (previous.get("best_trial"), previous.get("best_trial_started")) != (best.number, started) \
                or "evaluation" not in previous:
            ev = evaluate(folder, split="test", output=cell_dir, device=runner.cfg.device)
            shutil.copyfile(folder / "curves.png", cell_dir / "curves.png")
            row["evaluation"] = {k: ev[k] for k in ("accuracy", "macro_precision", "macro_recall", "macro_f1")}
        else:
            row["evaluation"] = previous["evaluation"]
        row["test_acc"] = row["evaluation"]["accuracy"]
    write_json(cell_dir / "best.json", {**row, "params": best.params})
    return row


def format_table(rows: Sequence[Dict[str, Any]]) -> str:
    """The rows of ``evaluation.csv`` as a fixed-width text table."""
    head = f"{'model':<22} {'rank':>4} {'init':<8} {'test acc':>8} {'val acc':>8} {'trainable':>10} {'stored':>10} " \
           f"{'ratio':>6} {'trials':>7}"
    lines = [head, "-" * len(head)]

    def num(v, fmt):
        return format(float(v), fmt) if v not in (None, "") else "-"

    for r in rows:
        trials = f"{r['trials_complete']}+{r['trials_pruned']}p" if r.get("kind") == "lora" else ""
        lines.append(f"{r['compression']:<22} {r.get('rank', ''):>4} {r.get('init', ''):<8} {num(r.get('test_acc'), '.4f'):>8} "
                     f"{num(r.get('best_val_acc'), '.4f'):>8} {num(r.get('trainable_params'), ',.0f'):>10} "
                     f"{num(r.get('stored_bytes'), ',.0f'):>10} {num(r.get('compression_ratio'), '.2f'):>6} {trials:>7}")
    return "\n".join(lines)


class _InterruptFilter(logging.Filter):
    """Drops Optuna's report of a trial stopped by Ctrl-C (a warning with the KeyboardInterrupt's
    traceback, then "failed with value None"): the CLI says in one line that it was interrupted."""

    def __init__(self):
        super().__init__()
        self.trial = None  # the interrupted trial whose second line is still to come

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[0] if record.exc_info else None
        message = record.getMessage()
        if exc is not None and issubclass(exc, KeyboardInterrupt):
            self.trial = message.split(" failed", 1)[0]
            return False
        if self.trial is not None and message.startswith(f"{self.trial} failed with value"):
            self.trial = None
            return False
        return True


def _quiet_interrupts(logger: logging.Logger) -> None:
    if not any(isinstance(f, _InterruptFilter) for f in logger.filters):
        logger.addFilter(_InterruptFilter())


def sweep(config: Optional[SweepConfig] = None, output=None, quiet: bool = False, **options) -> Dict[str, Any]:
    """Run ``loraq sweep`` (resuming what the output folder's storage already holds).

    ``options`` are :class:`SweepConfig` fields (or give ``config``). Writes to ``output``
    (default: ``./loraq-runs/sweep-<model>-<data>-<key>``): ``sweep.json``, ``optuna.db``
    (unless ``storage`` is given), ``pretrained.pt``, ``cells/<cell>/`` (each trial's run folder,
    and for the best trial ``best.json``, its test evaluation, ``curves.png``; ``trials.png``,
    the Optuna history and importance plots), ``evaluation.csv``, ``accuracy_vs_rank.png`` and
    ``summary.txt``. Returns ``{"output", "rows", "table"}``.
    """
    cfg = config if config is not None else SweepConfig(**options)
    out = Path(output) if output is not None else default_sweep_output(cfg)
    _check_same_settings(cfg, out)
    url = cfg.storage or f"sqlite:///{(out / 'optuna.db').resolve()}"
    storage = open_storage_checked(url) if cfg.storage else None  # a bad URL fails before any work
    tcfg, splits, bundle, device, state = _base_model(cfg, out, quiet)  # raises before writing anything
    write_json(out / "sweep.json", {**cfg.to_dict(), "key": cfg.key()})
    references = _reference_rows(cfg, tcfg, splits, bundle, device)
    del bundle

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    _quiet_interrupts(logging.getLogger("optuna.study._optimize"))
    cells = cfg.cells()
    with warnings.catch_warnings(), tqdm(total=len(cells) * cfg.trials, desc="sweep trials", disable=quiet) as bar:
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats, matplotlib plots
        runner = _Runner(cfg, out, storage or open_storage_checked(url), state, bar)
        for wait in (False, True):  # first start every missing trial, then wait for other workers' last ones
            for i, cell in enumerate(cells):
                runner.run_cell(i, cell, wait)
        bar.close()
        cell_rows = [_cell_row(runner, cell) for cell in tqdm(cells, desc="evaluating best trials", disable=quiet)]
    rows = references + cell_rows
    write_csv(out / "evaluation.csv", rows, EVALUATION_COLUMNS)
    plot_accuracy_vs_rank([r for r in cell_rows if r.get("test_acc") is not None], out / "accuracy_vs_rank.png",
                          {r["compression"]: r["test_acc"] for r in references})
    table = format_table(rows)
    atomic_write_text(out / "summary.txt", table + "\n")
    return {"output": str(out), "rows": rows, "table": table, "storage": url}
