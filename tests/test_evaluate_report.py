"""loraq.evaluate's metrics and timing: classes absent from a split, the batch size, warm-up."""

import importlib
import warnings
from types import SimpleNamespace

import pytest
import torch

import loraq
from loraq.evaluate import classification_metrics

evaluate_module = importlib.import_module("loraq.evaluate")  # loraq.evaluate is also the function


def _confusion(true, pred, n):
    c = torch.zeros(n, n, dtype=torch.int64)
    for t, p in zip(true, pred):
        c[t, p] += 1
    return c


@pytest.mark.parametrize("true, pred, n", [
    ([0, 1, 2, 0, 1], [0, 1, 2, 0, 1], 4),  # perfect, class 3 absent from the split
    ([0, 1, 1, 0], [0, 1, 3, 0], 5),  # class 3 predicted but absent; 2 and 4 absent from both
    ([0, 0, 1], [0, 0, 0], 3),  # class 1 never predicted
    ([2, 2], [2, 2], 3),
])
def test_macro_metrics_match_sklearn_when_classes_are_absent(true, pred, n):
    sklearn = pytest.importorskip("sklearn.metrics")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p, r, f, _ = sklearn.precision_recall_fscore_support(true, pred, average="macro", zero_division=0)
    m = classification_metrics(_confusion(true, pred, n))
    assert (m["macro_precision"], m["macro_recall"], m["macro_f1"]) == pytest.approx((p, r, f))
    assert m["accuracy"] == pytest.approx(sklearn.accuracy_score(true, pred))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    loraq.train(output=out, quiet=True, model="mlp", data="digits", hidden=(16, 16), limit=200, rank=2, epochs=1)
    return out  # 200 examples: 30 in the test split


@pytest.fixture
def fake_clock(monkeypatch):
    """A clock that each forward advances by 1 ms per example, plus 1 s on the very first (cold) call."""
    models = importlib.import_module("loraq.models")
    now, rows = [0.0], []
    real = models.forward_batch

    def forward_batch(model, batch, device):
        now[0] += 1e-3 * len(batch[1]) + (1.0 if not rows else 0.0)
        rows.append(len(batch[1]))
        return real(model, batch, device)

    monkeypatch.setattr(models, "forward_batch", forward_batch)
    monkeypatch.setattr(evaluate_module, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    return rows


def test_evaluate_batches_by_batch_size_and_times_only_full_batches(run, fake_clock):
    r = loraq.evaluate(run, split="test", batch_size=8)
    assert fake_clock[1:] == [8, 8, 8, 6]  # after the warm-up forward
    assert r["batch_size"] == 8 and r["median_latency_ms_per_batch"] == pytest.approx(8.0)
    assert r["examples"] == 30


def test_evaluate_latency_skips_the_cold_call_and_names_the_rows_timed(run, fake_clock):
    r = loraq.evaluate(run, split="test", batch_size=256)  # one batch of 30
    assert r["batch_size"] == 30 and r["median_latency_ms_per_batch"] == pytest.approx(30.0)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_evaluate_refuses_a_bad_batch_size(run, bad):
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        loraq.evaluate(run, split="test", batch_size=bad)


def test_evaluate_refuses_an_empty_split_before_writing(run, monkeypatch, tmp_path):
    """A split with no examples (tiny --limit) gave accuracy 0.0, latency None, and a crash in the CLI."""
    import dataclasses

    from torch.utils.data import Subset

    data = importlib.import_module("loraq.data")
    real = data.load_data
    monkeypatch.setattr(data, "load_data", lambda *a, **k: dataclasses.replace(
        real(*a, **k), test=Subset(real(*a, **k).test, [])))
    with pytest.raises(ValueError, match="test split of 'digits'.*has no examples"):
        loraq.evaluate(run, split="test", output=tmp_path / "ev")
    assert not (tmp_path / "ev").exists()


def test_a_run_trained_on_cuda_evaluates_on_the_device_asked_for(run, tmp_path):
    """config.json's training device was validated on load: 'cuda:0' failed on a CPU-only machine
    even with device='cpu'."""
    import json
    import shutil

    copy = tmp_path / "gpu-run"
    shutil.copytree(run, copy)
    cfg = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**cfg, "device": "cuda:0"}))
    r = loraq.evaluate(copy, split="val", device="cpu")
    assert r["device"] == "cpu" and r["examples"] == 30


def test_evaluate_on_data_labelled_otherwise_is_refused(run, monkeypatch, tmp_path):
    """Data whose labels number other classes (a {a, c, d} set for a run trained on {a, b, c}) was
    scored against the run's outputs silently."""
    import dataclasses
    import json

    assert json.loads((run / "summary.json").read_text())["classes"] == list(range(10))
    data = importlib.import_module("loraq.data")
    real = data.load_data
    monkeypatch.setattr(data, "load_data", lambda *a, **k: dataclasses.replace(
        real(*a, **k), classes=[str(c) for c in "abcdefghij"]))
    with pytest.raises(ValueError, match=r"classes \['a', 'b'.*trained on \[0, 1, 2"):
        loraq.evaluate(run, split="test", data="digits", output=tmp_path / "ev")
    assert not (tmp_path / "ev").exists()


def test_train_refuses_a_limit_that_leaves_a_split_empty(tmp_path):
    """limit=2 trained and reported validation and test accuracy 0.0 on splits with no examples."""
    with pytest.raises(ValueError, match=r"leaves the val and test split\(s\) empty \(2/0/0"):
        loraq.train(output=tmp_path / "run", quiet=True, model="mlp", data="digits", hidden=(8, 8), limit=2,
                    rank=2, epochs=1)
    assert not (tmp_path / "run").exists()
