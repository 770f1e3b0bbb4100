import json
import subprocess
import sys

import pytest
import torch

import loraq
from loraq.report import read_csv

TINY = dict(model="mlp", data="digits", hidden=(32, 24), limit=400, rank=3, epochs=3, batch_size=32, lr=3e-3)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    summary = loraq.train(output=out, quiet=True, pretrain_epochs=2, init="svd", compression="sparse4x4", **TINY)
    return out, summary


def test_run_folder_holds_everything(run):
    out, summary = run
    for name in ("config.json", "metrics.csv", "curves.png", "summary.json", "checkpoint/model.safetensors"):
        assert (out / name).is_file(), name
    rows = read_csv(out / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert set(rows[0]) == {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "seconds"}
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["best_val_acc"] == summary["best_val_acc"]
    assert 0 <= summary["test_acc"] <= 1 and summary["trainable_params"] > 0
    assert summary["compression_ratio"] > 1
    cfg = loraq.TrainConfig.from_dict(json.loads((out / "config.json").read_text()))
    assert cfg.compression == "sparse4x4" and cfg.rank == 3


def test_checkpoint_is_the_best_epoch(run):
    out, summary = run
    result = loraq.evaluate(out, split="val")
    assert result["accuracy"] == pytest.approx(summary["best_val_acc"])
    best = max(float(r["val_acc"]) for r in read_csv(out / "metrics.csv"))
    assert summary["best_val_acc"] >= best


def test_evaluate_reports_metrics_plots_and_costs(run):
    out, _ = run
    r = loraq.evaluate(out / "checkpoint", split="test")
    cm = torch.tensor(r["confusion_matrix"])
    assert cm.shape == (10, 10) and int(cm.sum()) == r["examples"] == 60
    assert r["accuracy"] == pytest.approx(float(cm.diag().sum()) / 60)
    for k in ("macro_precision", "macro_recall", "macro_f1"):
        assert 0 <= r[k] <= 1
    assert r["median_latency_ms_per_batch"] > 0 and r["peak_rss_bytes"] > 0
    assert r["footprint"]["ratio"] > 1
    assert (out / "confusion_test.png").is_file() and (out / "evaluation_test.json").is_file()


def test_training_improves_the_adapters_and_respects_seed(tmp_path):
    a = loraq.train(output=tmp_path / "a", quiet=True, seed=5, **TINY)
    b = loraq.train(output=tmp_path / "b", quiet=True, seed=5, **TINY)
    assert a["best_val_acc"] == b["best_val_acc"] and a["test_acc"] == b["test_acc"]
    assert a["best_val_acc"] >= a["start_val_acc"]


def test_early_stopping(tmp_path):
    s = loraq.train(output=tmp_path, quiet=True, **{**TINY, "epochs": 30, "patience": 1, "lr": 1e-6})
    assert s["epochs_run"] < 30


@pytest.mark.parametrize("bad, match", [
    (dict(rank=0), "rank must be an integer >= 1"),
    (dict(lr=-1.0), "lr must be > 0"),
    (dict(batch_size=0), "batch_size must be an integer >= 1"),
    (dict(compression="int3"), "unknown compression"),
    (dict(optimizer="lion"), "unknown optimizer"),
    (dict(device="tpu"), "device must be"),
    (dict(limit=0), "limit must be"),
    (dict(hidden=(16, 0)), "hidden sizes must be"),
    (dict(lr=float("inf")), "lr must be > 0 and finite"),
    (dict(weight_decay=float("nan")), "weight_decay must be >= 0 and finite"),
])
def test_bad_options_raise_before_any_work(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        loraq.train(output=tmp_path / "x", quiet=True, **{**TINY, **bad})
    assert not (tmp_path / "x").exists()


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "loraq", *args], capture_output=True, text=True, timeout=300)


def test_cli_train_and_evaluate(tmp_path):
    out = _cli("train", "--hidden", "16,16", "--limit", "200", "--epochs", "1", "--rank", "2", "--quiet",
               "--output", str(tmp_path / "r"))
    assert out.returncode == 0, out.stderr
    assert "best epoch" in out.stdout and (tmp_path / "r" / "checkpoint").is_dir()
    ev = _cli("evaluate", str(tmp_path / "r"), "--split", "val")
    assert ev.returncode == 0, ev.stderr
    assert "accuracy" in ev.stdout and (tmp_path / "r" / "confusion_val.png").is_file()


@pytest.mark.parametrize("args, match", [
    (["train", "--rank", "0"], "rank must be an integer >= 1"),
    (["train", "--lr", "-0.1"], "lr must be > 0"),
    (["train", "--batch-size", "0"], "batch_size must be"),
    (["train", "--compression", "int3"], "unknown compression"),
    (["train", "--data", "mnist:/does/not/exist", "--limit", "10"], "/does/not/exist"),
    (["train", "--model", "vgg99", "--limit", "10"], "vgg99"),
    (["train", "--limit", "200", "--hidden", "8,8", "--rank", "9"], "rank must be between 1 and min"),
    (["evaluate", "/does/not/exist"], "not a loraq run folder"),
    (["evaluate", "/does/not/exist", "--device", "foo"], "device must be"),
])
def test_cli_bad_input_is_one_clear_error(args, match):
    out = _cli(*args)
    assert out.returncode == 2
    assert match in out.stderr and "Traceback" not in out.stderr


def test_train_mode_keeps_frozen_batch_norms_in_eval():
    from loraq.train import train_mode

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.BatchNorm1d(4))
    model[1].requires_grad_(False)  # part of the frozen base; model[2] trainable (modules_to_save)
    train_mode(model)
    assert model.training and model[0].training and not model[1].training and model[2].training
    train_mode(model, freeze_frozen_norms=False)  # dense pretraining
    assert model[1].training


def test_resnet_base_statistics_stay_frozen_and_the_checkpoint_is_the_best_epoch(tmp_path):
    """resnet18's batch norms are part of the frozen base: training the fc adapters must not move
    their running statistics, and the saved checkpoint reproduces the reported best accuracy."""
    from test_data import _fake_mnist

    _fake_mnist(tmp_path / "mnist", n_train=64, n_test=16)
    s = loraq.train(output=tmp_path / "run", quiet=True, model="resnet18", data=f"mnist:{tmp_path / 'mnist'}",
                    pretrain_epochs=1, epochs=2, batch_size=32, rank=2, lr=0.05, targets=["fc"], clip_rank=True)
    assert loraq.evaluate(tmp_path / "run", split="val")["accuracy"] == pytest.approx(s["best_val_acc"])
    pretrained = loraq.train(output=tmp_path / "run0", quiet=True, model="resnet18",
                             data=f"mnist:{tmp_path / 'mnist'}", pretrain_epochs=1, epochs=1, batch_size=32,
                             rank=2, lr=1e-12, targets=["fc"], clip_rank=True)
    from safetensors.torch import load_file
    a = load_file(str(tmp_path / "run" / "checkpoint" / "model.safetensors"))
    b = load_file(str(tmp_path / "run0" / "checkpoint" / "model.safetensors"))
    assert pretrained["config"]["seed"] == s["config"]["seed"]
    for k in a:
        if "running_" in k:
            assert torch.equal(a[k], b[k]), k  # the same pretrained statistics, untouched by either run


def test_a_run_that_cannot_start_leaves_the_folder_as_it_was(tmp_path):
    out = tmp_path / "r"
    loraq.train(output=out, quiet=True, **{**TINY, "epochs": 1})
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match="nosuch"):
        loraq.train(output=out, quiet=True, **{**TINY, "seed": 1, "targets": ["nosuch"]})
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    with pytest.raises(FileNotFoundError):
        loraq.train(output=tmp_path / "fresh", quiet=True, **{**TINY, "data": "mnist:/does/not/exist"})
    assert not (tmp_path / "fresh").exists()


def test_a_rerun_replaces_the_earlier_runs_outputs(tmp_path):
    out = tmp_path / "r"
    loraq.train(output=out, quiet=True, **{**TINY, "epochs": 2})
    loraq.evaluate(out, split="val")
    loraq.train(output=out, quiet=True, **{**TINY, "epochs": 1, "seed": 3})
    assert not (out / "evaluation_val.json").exists() and not (out / "confusion_val.png").exists()
    assert len(read_csv(out / "metrics.csv")) == 1
    assert json.loads((out / "config.json").read_text())["seed"] == 3


def test_options_override_the_config(tmp_path):
    s = loraq.train(loraq.TrainConfig(**{**TINY, "epochs": 3}), output=tmp_path, quiet=True, epochs=1, rank=2, seed=5)
    assert (s["epochs_run"], s["config"]["rank"], s["config"]["seed"]) == (1, 2, 5)


def test_relative_paths_are_saved_absolute(tmp_path, monkeypatch):
    from loraq.train import absolute_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "mn").mkdir()
    (tmp_path / "w.pt").write_bytes(b"")
    cfg = absolute_paths(loraq.TrainConfig(data="mnist:mn", model="hf:some-org/some-model", weights="w.pt"))
    assert cfg.data == f"mnist:{tmp_path / 'mn'}" and cfg.weights == str(tmp_path / "w.pt")
    assert cfg.model == "hf:some-org/some-model"  # a hub name, not a local path: as given


def test_a_rerun_leaves_the_users_own_files(tmp_path):
    out = tmp_path / "r"
    (out / "checkpoint").mkdir(parents=True)
    keep = [out / "checkpoint" / "my_model.pt", out / "evaluation_notes.json", out / "notes.txt"]
    for p in keep:
        p.write_text("mine")
    loraq.train(output=out, quiet=True, **{**TINY, "epochs": 1})
    loraq.train(output=out, quiet=True, **{**TINY, "epochs": 1})
    assert all(p.read_text() == "mine" for p in keep)


def test_a_rerun_through_a_symlinked_checkpoint_folder(tmp_path):
    out, elsewhere = tmp_path / "r", tmp_path / "elsewhere"
    elsewhere.mkdir()
    out.mkdir()
    (out / "checkpoint").symlink_to(elsewhere, target_is_directory=True)
    for _ in range(2):
        loraq.train(output=out, quiet=True, **{**TINY, "epochs": 1})
    assert (elsewhere / "model.safetensors").is_file() and (out / "checkpoint").is_symlink()


def test_an_unusable_backend_fails_before_the_run_folder_is_written(tmp_path, monkeypatch):
    """LORAQ_BACKEND=cuda on a CPU failed in the first forward, after config.json was written."""
    monkeypatch.setenv("LORAQ_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
        loraq.train(output=tmp_path / "x", quiet=True, **{**TINY, "device": "cpu"})
    assert not (tmp_path / "x").exists()
