"""loraq.sweep / loraq sweep / loraq demo: cells, outputs, resume after kill -9, bad input."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from loraq.cli import main
from loraq.report import read_csv
from loraq.sweep import HOST, Cell, SweepConfig, default_sweep_output, fail_dead_local_trials, open_storage, sweep

TINY = dict(model="mlp", data="digits", hidden=(48,), limit=400, pretrain_epochs=2, compressions=("int1",),
            ranks=(2, 4), inits=("gaussian", "svd"), trials=2, epochs=2, device="cpu",
            search_space={"batch_size": [64], "optimizer": ["adam", "sgd"]})
REPO = Path(__file__).resolve().parents[1]


def _study_states(url: str, cfg: SweepConfig):
    storage = optuna.storages.RDBStorage(url)
    out = {}
    for cell in cfg.cells():
        try:
            study = optuna.load_study(study_name=f"{cfg.prefix()}-{cell.name}", storage=storage)
        except KeyError:  # a cell the sweep has not reached yet
            out[cell.name] = []
            continue
        out[cell.name] = study.get_trials(deepcopy=False)
    return out


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    return out, sweep(output=out, quiet=True, **TINY)


def test_sweep_writes_every_output(tiny_sweep):
    out, result = tiny_sweep
    for name in ("sweep.json", "optuna.db", "pretrained.pt", "evaluation.csv", "accuracy_vs_rank.png", "summary.txt"):
        assert (out / name).is_file(), name
    rows = read_csv(out / "evaluation.csv")
    kinds = [r["kind"] for r in rows]
    assert kinds == ["dense", "no_lora", "lora", "lora", "lora", "lora"]
    cfg = SweepConfig(**TINY)
    lora = [r for r in rows if r["kind"] == "lora"]
    assert {(r["compression"], int(r["rank"]), r["init"]) for r in lora} == set(cfg.cells())
    for r in lora:
        assert 0 < float(r["test_acc"]) <= 1 and 0 < float(r["best_val_acc"]) <= 1
        assert int(r["trials_complete"]) + int(r["trials_pruned"]) == 2
        assert r["optimizer"] in ("adam", "sgd") and r["batch_size"] == "64"
        cell_dir = out / "cells" / f"{r['compression']}-r{r['rank']}-{r['init']}"
        for name in ("best.json", "evaluation_test.json", "confusion_test.png", "curves.png", "trials.png",
                     "history.png"):
            assert (cell_dir / name).is_file(), (cell_dir, name)
        best = json.loads((cell_dir / "best.json").read_text())
        assert best["best_trial"] == int(r["best_trial"])
        ev = json.loads((cell_dir / "evaluation_test.json").read_text())
        assert ev["accuracy"] == pytest.approx(float(r["test_acc"]))
        assert Path(r["checkpoint"], "checkpoint", "model.safetensors").is_file()
    # the trainable parameter count is the LoRA of both layers: r(64+48) + r(48+10)
    for r in lora:
        rank = int(r["rank"])
        assert int(r["trainable_params"]) == rank * (64 + 48) + rank * (48 + 10)
    no_lora = rows[1]
    assert no_lora["compression"] == "int1 (no LoRA)" and int(no_lora["trainable_params"]) == 0
    assert float(no_lora["compression_ratio"]) > 10
    assert result["table"].splitlines()[2].startswith("dense (original)")
    assert (out / "summary.txt").read_text().strip() == result["table"]


def test_best_trial_is_the_best_validation_accuracy(tiny_sweep):
    out, _ = tiny_sweep
    cfg = SweepConfig(**TINY)
    states = _study_states(f"sqlite:///{out / 'optuna.db'}", cfg)
    rows = {(r["compression"], int(r["rank"]), r["init"]): r for r in read_csv(out / "evaluation.csv") if r["kind"] == "lora"}
    for cell in cfg.cells():
        complete = [t for t in states[cell.name] if t.state == TrialState.COMPLETE]
        assert float(rows[tuple(cell)]["best_val_acc"]) == max(t.value for t in complete)
        for t in complete:  # every trial records where it ran and what it measured
            assert t.user_attrs["host"] == HOST and Path(t.user_attrs["folder"]).is_dir()
            assert 0 <= t.user_attrs["test_acc"] <= 1


def test_rerun_resumes_without_new_trials_and_more_trials_add_only_the_missing(tiny_sweep, tmp_path):
    out, first = tiny_sweep
    cfg = SweepConfig(**TINY)
    url = f"sqlite:///{out / 'optuna.db'}"
    before = {k: [(t.number, t.state, t.value) for t in v] for k, v in _study_states(url, cfg).items()}
    again = sweep(output=out, quiet=True, **TINY)
    after = {k: [(t.number, t.state, t.value) for t in v] for k, v in _study_states(url, cfg).items()}
    assert after == before
    assert again["table"] == first["table"]
    # a copy of the sweep with --trials 3 keeps the two finished trials of every cell and adds one
    import shutil

    copy_dir = tmp_path / "more"
    shutil.copytree(out, copy_dir)
    sweep(output=copy_dir, quiet=True, **{**TINY, "trials": 3})
    more = _study_states(f"sqlite:///{copy_dir / 'optuna.db'}", SweepConfig(**{**TINY, "trials": 3}))
    for name, trials in more.items():
        assert [(t.number, t.state, t.value) for t in trials][:2] == before[name]
        assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials) == 3


def test_default_output_is_stable_so_the_same_command_resumes():
    a, b = SweepConfig(**TINY), SweepConfig(**{**TINY, "trials": 7, "device": "auto"})
    assert default_sweep_output(a) == default_sweep_output(b)
    c = SweepConfig(**{**TINY, "epochs": 3})
    assert a.key() != c.key() and a.prefix() != c.prefix()


def _sqlite_states(db: Path):
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
            # a trial killed in the middle of training: it has reported a validation accuracy
            running = con.execute(
                "select count(distinct t.trial_id) from trials t join trial_intermediate_values v "
                "on v.trial_id = t.trial_id where t.state = 'RUNNING'").fetchone()[0]
            finished = con.execute("select count(*) from trials where state in ('COMPLETE', 'PRUNED')").fetchone()[0]
        return finished, running
    except sqlite3.Error:  # not created yet, or locked for a moment
        return 0, 0


def test_resume_after_kill_9_loses_no_finished_trial(tmp_path):
    options = {**TINY, "epochs": 4, "trials": 3}
    out = tmp_path / "killed"
    code = f"import loraq; loraq.sweep(output={str(out)!r}, quiet=True, **{options!r})"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO)
    deadline = time.time() + 240
    try:
        while True:
            finished, running = _sqlite_states(out / "optuna.db")
            if finished >= 1 and running >= 1:
                break
            assert proc.poll() is None, "the sweep ended before it could be killed"
            assert time.time() < deadline, "no trial started in time"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    cfg = SweepConfig(**options)
    url = f"sqlite:///{out / 'optuna.db'}"
    before = {k: {t.number: (t.state, t.value) for t in v} for k, v in _study_states(url, cfg).items()}
    killed = [(k, n) for k, v in before.items() for n, (s, _) in v.items() if s == TrialState.RUNNING]
    assert len(killed) == 1
    finished_before = {(k, n): v for k, trials in before.items() for n, v in trials.items()
                       if v[0] in (TrialState.COMPLETE, TrialState.PRUNED)}

    sweep(output=out, quiet=True, **options)  # the same command again

    after = _study_states(url, cfg)
    for (k, n), v in finished_before.items():  # nothing finished was lost or redone
        t = after[k][n]
        assert (t.state, t.value) == v
    for name, trials in after.items():
        assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials) == 3, name
    cell, number = killed[0]
    dead = after[cell][number]
    assert dead.state == TrialState.FAIL
    retried = [t for t in after[cell] if t.system_attrs.get("failed_trial") == number]
    assert len(retried) == 1 and retried[0].params == dead.params
    assert retried[0].state in (TrialState.COMPLETE, TrialState.PRUNED)
    rows = [r for r in read_csv(out / "evaluation.csv") if r["kind"] == "lora"]
    assert len(rows) == len(cfg.cells()) and all(r["test_acc"] for r in rows)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
@pytest.mark.parametrize("owner, expect_failed", [("dead", True), ("alive", False), ("other-host", False),
                                                  ("stale-start", False)])
def test_fail_dead_local_trials(tmp_path, owner, expect_failed):
    storage = open_storage(f"sqlite:///{tmp_path / 'o.db'}")
    study = optuna.create_study(storage=storage, study_name="s", direction="maximize")
    trial = study.ask({"lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)})
    pid = os.getppid() if owner == "alive" else _dead_pid()
    trial.set_user_attr("host", "elsewhere" if owner == "other-host" else HOST)
    trial.set_user_attr("pid", pid)
    frozen = study.get_trials(deepcopy=False)[0]
    started = frozen.datetime_start.isoformat() if owner != "stale-start" else "2000-01-01T00:00:00"
    trial.set_user_attr("started", started)

    assert fail_dead_local_trials(study) == int(expect_failed)
    trials = study.get_trials(deepcopy=False)
    if expect_failed:
        assert trials[0].state == TrialState.FAIL
        assert trials[1].state == TrialState.WAITING and trials[1].params == trials[0].params
    else:
        assert [t.state for t in trials] == [TrialState.RUNNING]


@pytest.mark.parametrize("bad, message", [
    ({"compressions": ("int3",)}, "unknown compression"),
    ({"inits": ("zeros",)}, "unknown init"),
    ({"ranks": (0,)}, "rank"),
    ({"ranks": ()}, "ranks"),
    ({"trials": 0}, "trials"),
    ({"epochs": 0}, "epochs"),
    ({"storage": "optuna.db"}, "database URL"),
    ({"study_prefix": "a b"}, "study_prefix"),
    ({"search_space": {"momentum": [0.9]}}, "unknown parameters"),
    ({"search_space": {"lr": {"low": 1e-2, "high": 1e-3}}}, "low"),
    ({"search_space": {"lr": {"low": 0, "high": 1e-3, "log": True}}}, "> 0"),
    ({"search_space": {"optimizer": ["lion"]}}, "optimizer"),
    ({"search_space": {"batch_size": [0]}}, "batch_size"),
    ({"search_space": {"batch_size": []}}, "empty"),
    ({"search_space": "{not json"}, "JSON"),
    ({"search_space": "/does/not/exist.json"}, "does not exist"),
])
def test_bad_sweep_config_raises(bad, message):
    with pytest.raises(ValueError, match=message):
        SweepConfig(**{**TINY, **bad})


def test_rank_too_large_fails_before_writing_anything(tmp_path):
    out = tmp_path / "never"
    with pytest.raises(ValueError, match=r"layer '\d+'.*\[10, 48\]"):
        sweep(output=out, quiet=True, **{**TINY, "ranks": (2, 16)})
    assert not out.exists()


def test_clip_rank_gives_narrow_layers_a_full_rank_adapter(tmp_path):
    result = sweep(output=tmp_path / "clip", quiet=True, **{**TINY, "ranks": (16,), "inits": ("gaussian",),
                                                            "clip_rank": True, "trials": 1, "epochs": 1})
    row = [r for r in result["rows"] if r["kind"] == "lora"][0]
    assert row["trainable_params"] == 16 * (64 + 48) + 10 * (48 + 10)


def test_search_space_from_a_json_file(tmp_path):
    f = tmp_path / "space.json"
    f.write_text(json.dumps({"lr": 0.003, "optimizer": ["adamw"]}))
    cfg = SweepConfig(**{**TINY, "search_space": str(f)})
    tc = cfg.train_config(Cell("int1", 4, "svd"), {"optimizer": "adamw", "alpha_factor": 2.0, "batch_size": 64})
    assert tc.lr == 0.003 and tc.optimizer == "adamw" and tc.alpha == 8.0 and tc.rank == 4 and tc.init == "svd"


def test_dense_compression_runs_plain_lora_with_the_gaussian_init_only():
    cfg = SweepConfig(**{**TINY, "compressions": ("dense", "int1")})
    assert [c for c in cfg.cells() if c.compression == "dense"] == [Cell("dense", 2, "gaussian"), Cell("dense", 4, "gaussian")]


def test_cli_sweep_runs_and_prints_the_table(tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(["sweep", "--hidden", "32", "--limit", "300", "--compressions", "sparse4x4", "--ranks", "2",
               "--inits", "svd", "--trials", "1", "--epochs", "1", "--device", "cpu", "--search-space",
               '{"optimizer": ["adam"], "batch_size": [64]}', "--output", str(out), "--quiet"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "sparse4x4 (no LoRA)" in text and "dense (original)" in text and str(out) in text
    rows = read_csv(out / "evaluation.csv")
    assert [r["kind"] for r in rows] == ["dense", "no_lora", "lora"]


@pytest.mark.parametrize("argv, message", [
    (["--ranks", "0"], "rank"),
    (["--compressions", "int2"], "unknown compression"),
    (["--storage", "nowhere"], "database URL"),
    (["--search-space", '{"lr": -1}'], "lr"),
    (["--ranks", "64"], "rank must be between"),
    (["--data", "mnist:/does/not/exist"], "does/not/exist"),
    (["--storage", "sqlite:////does/not/exist/x.db"], "cannot be opened"),
    (["--storage", "postgresql://nobody@127.0.0.1:1/x"], "cannot be opened"),
    (["--search-space", '{"lr": {"low": 1e-3, "high": Infinity}}'], "lr"),
])
def test_cli_sweep_bad_input_exits_2_with_one_line(tmp_path, capsys, argv, message):
    out = tmp_path / "bad"
    rc = main(["sweep", "--hidden", "32", "--limit", "200", "--device", "cpu", "--output", str(out), "--quiet", *argv])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("loraq sweep: error:") and message in err
    assert not out.exists()


def test_demo_configs_match_the_issue():
    from loraq.demo import demo_config

    full, quick = demo_config(), demo_config(quick=True)
    assert full.hidden == (1000, 2000) and full.data == "digits" and full.model == "mlp"
    assert set(full.compressions) == {"int1", "sparse4x4"} and set(full.inits) == {"gaussian", "svd", "loftq"}
    assert full.ranks == (2, 4, 8, 16, 32, 64, 128) and full.targets is None and full.clip_rank
    assert len(quick.cells()) < len(full.cells()) and quick.trials <= full.trials


def test_a_folder_of_other_settings_is_refused_and_left_as_it_was(tiny_sweep):
    out, _ = tiny_sweep
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match=r"other settings \(pretrain_epochs differ\)"):
        sweep(output=out, quiet=True, **{**TINY, "pretrain_epochs": 3})
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before


def test_a_new_study_in_the_folder_is_evaluated_afresh(tiny_sweep, tmp_path):
    """Another study (here: another --study-prefix) writing into a sweep folder: its best trial
    may have the same number as the old best, and must not take the old one's evaluation."""
    import shutil

    out, _ = tiny_sweep
    copy_dir = tmp_path / "copy"
    shutil.copytree(out, copy_dir)
    for best in copy_dir.glob("cells/*/best.json"):  # mark the old evaluations: they must not survive
        old = json.loads(best.read_text())
        best.write_text(json.dumps({**old, "evaluation": {**old["evaluation"], "accuracy": -1.0}}))
    result = sweep(output=copy_dir, quiet=True, **{**TINY, "study_prefix": "other"})
    for row in (r for r in result["rows"] if r.get("kind") == "lora"):
        cell = copy_dir / "cells" / f"{row['compression']}-r{row['rank']}-{row['init']}"
        best = json.loads((cell / "best.json").read_text())
        summary = json.loads((Path(best["checkpoint"]) / "summary.json").read_text())
        assert best["evaluation"]["accuracy"] == pytest.approx(summary["test_acc"])


def test_parallel_workers_draw_different_sampler_seeds(monkeypatch):
    """Workers started together have consecutive pids: pid p at k + 1 trials and pid p + 1 at k
    trials drew the same seed (so the same parameters) when the seed was a sum."""
    import importlib

    sweep_module = importlib.import_module("loraq.sweep")  # the module: loraq.sweep is also a function
    seeds = []
    monkeypatch.setattr(optuna.samplers, "TPESampler", lambda seed, **_: seeds.append(seed))
    cfg = SweepConfig(**TINY)
    for pid, n in [(1000, 5), (1001, 4), (1002, 3), (1000, 4), (1001, 5)]:
        monkeypatch.setattr(sweep_module.os, "getpid", lambda pid=pid: pid)
        sweep_module._sampler(cfg, 0, n, parallel=True)
    assert len(set(seeds)) == len(seeds)
    monkeypatch.setattr(sweep_module.os, "getpid", lambda: 1)
    sweep_module._sampler(cfg, 0, 4, parallel=False)
    monkeypatch.setattr(sweep_module.os, "getpid", lambda: 2)
    sweep_module._sampler(cfg, 0, 4, parallel=False)
    assert seeds[-1] == seeds[-2]  # a lone worker is reproducible


def test_a_trial_stopped_by_ctrl_c_is_not_reported_with_a_traceback():
    """Optuna logged a Ctrl-C'd trial as a failure with the KeyboardInterrupt's whole traceback;
    other failures are still reported."""
    import importlib
    import logging

    import optuna

    sweep_module = importlib.import_module("loraq.sweep")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    optuna_logger = logging.getLogger("optuna")
    optuna_logger.addHandler(handler)
    try:
        sweep_module._quiet_interrupts(logging.getLogger("optuna.study._optimize"))
        study = optuna.create_study()

        def interrupted(trial):
            raise KeyboardInterrupt

        def failing(trial):
            raise ValueError("bad trial")

        with pytest.raises(KeyboardInterrupt):
            study.optimize(interrupted, n_trials=1)
        study.optimize(failing, n_trials=1, catch=(ValueError,))
    finally:
        optuna_logger.removeHandler(handler)
    messages = [r.getMessage() for r in records]
    assert not any("Trial 0 failed" in m or "KeyboardInterrupt" in m for m in messages), messages
    assert any("Trial 1 failed" in m and "bad trial" in m for m in messages), messages
