"""The tuner's check of each candidate against the reference (``loraq/tuning_check.py``, used by
``kernels/autotune.py``): it accepts right answers in every dtype and format, refuses wrong ones,
and a config that fails it is never picked, however fast. ``CompressedWeight.rows``, which it
dequantizes by, is checked here too. No GPU: the tuner runs on a faked CUDA device with the
tests' own ``run`` and ``bench``."""

import logging

import pytest
import torch

from loraq import reference, tuning_check
from loraq.formats import DenseWeight, Int1Weight, Sparse4x4Weight
from loraq.kernels import autotune

CUDA_DEV = torch.device("cuda")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def make(fmt: str, N: int, K: int, dtype=torch.float32):
    W = torch.randn(N, K)
    w = {"int1": lambda: Int1Weight.from_dense(W),
         "int1_group": lambda: Int1Weight.from_dense(W, group_size=12),
         "int1_onebit": lambda: Int1Weight.from_dense(W, scale="onebit"),
         "sparse4x4": lambda: Sparse4x4Weight.from_dense(W),
         "dense": lambda: DenseWeight.from_dense(W)}[fmt]()
    return w.to(dtype)


def launcher_args(w):
    """``(fmt, tensors, meta)`` as the launchers get them (``custom_ops._meta``)."""
    from loraq.custom_ops import _meta

    return w.kind, w.tensors(), _meta(w)


FORMATS = ["int1", "int1_group", "int1_onebit", "sparse4x4"]


@pytest.mark.parametrize("fmt", FORMATS + ["dense"])
def test_rows_are_the_dequantized_rows(fmt):
    w = make(fmt, 37, 45)
    full = w.dequantize()
    step = 4 if fmt == "sparse4x4" else 1
    for start, stop in [(0, 37), (step, 9), (8, 37), (36 if step == 1 else 36, 37), (12, 13), (0, 1)]:
        part = w.rows(start, stop)
        assert part.shape == (stop - start, 45) and type(part) is type(w)
        assert torch.equal(part.dequantize(), full[start:stop]), (start, stop)
    assert w.rows(0, 37).tensors().keys() == w.tensors().keys()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("start, stop", [(-1, 3), (3, 3), (5, 2), (0, 38), (0.0, 3), (None, 3)])
def test_rows_refuses_a_bad_range(fmt, start, stop):
    with pytest.raises(ValueError, match="rows: need 0 ≤ start < stop ≤ 37"):
        make(fmt, 37, 45).rows(start, stop)


def test_sparse_rows_start_on_a_tile_row():
    with pytest.raises(ValueError, match="start a multiple of 4"):
        make("sparse4x4", 37, 45).rows(2, 9)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lora, bias", [(False, False), (True, True)])
def test_forward_check_accepts_the_reference_and_refuses_a_wrong_value(fmt, dtype, lora, bias, monkeypatch):
    monkeypatch.setattr(tuning_check, "CHUNK_ELEMENTS", 45 * 5)  # several blocks of rows (4 or 8 rows)
    M, N, K, r = 9, 37, 45, 3
    w = make(fmt, N, K, dtype)
    x = torch.randn(M, K, dtype=dtype)
    A, B = (torch.randn(r, K, dtype=dtype), torch.randn(N, r, dtype=dtype)) if lora else (None, None)
    b = torch.randn(N, dtype=dtype) if bias else None
    check = tuning_check.forward_check(x, *launcher_args(w), A, B, 0.7, b)
    y = reference.lora_linear_ref(x, w, A, B, 0.7, b)
    assert check(y) is None
    for row in tuning_check.checked_rows(0, M):  # each row checked: one value off is refused
        bad = y.clone()
        bad[row, 17] += 0.5 * float(y.float().abs().max())
        assert "max |error|" in check(bad)
    bad = y.clone()
    bad[M - 1, 0] = float("nan")
    assert "inf or NaN where the reference is finite" in check(bad)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dx_check_accepts_the_reference_and_refuses_a_wrong_value(fmt, dtype, monkeypatch):
    monkeypatch.setattr(tuning_check, "CHUNK_ELEMENTS", 45 * 5)
    M, N, K, r = 7, 37, 45, 5
    w = make(fmt, N, K, dtype)
    dy = torch.randn(M, N, dtype=dtype)
    A, dyB = torch.randn(r, K, dtype=dtype), torch.randn(M, r, dtype=dtype)
    check = tuning_check.dx_check(dy, *launcher_args(w), A, dyB, -1.5)
    dx = reference.lora_linear_dx_ref(dy, w, A, dyB, -1.5)
    assert check(dx) is None
    bad = dx.clone()
    bad[0, K - 1] -= float(dx.float().abs().max())
    assert check(bad)
    base = tuning_check.dx_check(dy, *launcher_args(w))  # no LoRA: dY·Ŵ alone
    assert base(reference.lora_linear_dx_ref(dy, w, None, None, 1.0)) is None
    assert base(dx)  # the LoRA term is not part of that answer


def test_a_block_of_rows_is_checked_against_its_own_rows():
    """A launcher that splits the batch passes each block's check (``rows_from``)."""
    w = make("int1", 37, 45)
    x = torch.randn(20, 45)
    check = tuning_check.forward_check(x, *launcher_args(w))
    y = reference.lora_linear_ref(x, w, None, None, 1.0)
    assert autotune.rows_from(check, 5)(y[5:12]) is None
    assert autotune.rows_from(check, 6)(y[5:12])
    assert autotune.rows_from(autotune.rows_from(check, 2), 3)(y[5:12]) is None
    assert check(y) is None
    assert autotune.rows_from(None, 3) is None
    assert autotune.rows_from(lambda out: None, 3) is None  # a plain function cannot be shifted


def test_outputs_whose_reference_is_not_finite_are_not_judged():
    w = make("int1", 16, 32)
    x = torch.randn(3, 32)
    x[1, 4] = float("inf")
    check = tuning_check.forward_check(x, *launcher_args(w))
    y = reference.lora_linear_ref(x, w, None, None, 1.0)
    y[1] = float("nan")  # whatever a kernel makes of an infinite input
    assert check(y) is None


def test_checked_rows_cover_the_edges():
    assert tuning_check.checked_rows(0, 1) == [0]
    assert tuning_check.checked_rows(0, 2) == [0, 1]
    assert tuning_check.checked_rows(10, 110) == [10, 43, 76, 109]
    assert len(tuning_check.checked_rows(0, 4096)) == tuning_check.ROWS_CHECKED


def test_the_reference_is_computed_once_a_tuning(monkeypatch):
    w = make("sparse4x4", 37, 45)
    x = torch.randn(6, 45)
    made = []
    real = tuning_check.weight_from_args
    monkeypatch.setattr(tuning_check, "weight_from_args", lambda *a: made.append(1) or real(*a))
    check = tuning_check.forward_check(x, *launcher_args(w))
    y = reference.lora_linear_ref(x, w, None, None, 1.0)
    for _ in range(5):
        assert check(y) is None
    assert len(made) == 1


def test_when_the_reference_cannot_be_computed_tuning_goes_on_unchecked(monkeypatch, caplog):
    w = make("int1", 16, 32)
    x = torch.randn(3, 32)

    def no_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(tuning_check, "weight_from_args", no_memory)
    check = tuning_check.forward_check(x, *launcher_args(w))
    with caplog.at_level(logging.WARNING, logger="loraq"):
        assert check(torch.zeros(3, 16)) is None
    assert "could not run (OutOfMemoryError" in caplog.text


# -- the tuner (fake_gpu: conftest.py) ---------------------------------------------------------
def candidates_with_wrong(wrong):
    """``(run, bench, check)``: each config's output is its own index among the small-batch
    configs, timed at that index (the first is fastest); ``check`` refuses the configs in
    ``wrong``."""
    order = autotune.configs_for(1)

    def run(cfg):
        return order.index(cfg)

    def bench(fn):
        return float(fn())

    def check(out):
        return f"config {out} is off" if order[out] in wrong else None

    return order, run, bench, check


def test_a_fast_wrong_config_is_never_picked_and_is_warned_about(fake_gpu):
    order, run, bench, check = candidates_with_wrong({autotune.configs_for(1)[0], autotune.configs_for(1)[3]})
    with pytest.warns(RuntimeWarning, match=r"2 of 9 configs of op .* gave wrong results on this GPU"):
        got = autotune.pick_config("op", 1, 64, 64, torch.float16, CUDA_DEV, run, bench, check=check)
    assert got == order[1]  # the fastest right one
    assert autotune.pick_config("op", 1, 64, 64, torch.float16, CUDA_DEV, run, bench, check=check) == order[1]


def test_time_candidates_runs_the_check_before_timing():
    order, run, bench, check = candidates_with_wrong({autotune.configs_for(1)[2]})
    timed = []
    failures = {}
    timings = autotune.time_candidates(order, run, lambda fn: timed.append(fn()) or bench(fn), failures,
                                       check=check)
    assert order[2] not in timings and 2 not in timed
    assert isinstance(failures[order[2]], autotune.WrongOutput)
    assert "wrong output: config 2 is off" in str(failures[order[2]])
    assert set(timings) == set(order) - {order[2]}


def test_when_every_config_is_wrong_the_error_says_so_and_nothing_is_cached(fake_gpu):
    order, run, bench, check = candidates_with_wrong(set(autotune.configs_for(1)))
    refused = r"no kernel config of op runs .*9 failed.*WrongOutput: wrong output"
    with pytest.raises(RuntimeError, match=refused):
        with pytest.warns(RuntimeWarning, match="9 of 9 configs"):
            autotune.pick_config("op", 1, 64, 64, torch.float16, CUDA_DEV, run, bench, check=check)
    assert not autotune.cache_file(CUDA_DEV).exists()


def test_without_a_check_nothing_is_run_before_timing(fake_gpu):
    runs = []
    order = autotune.configs_for(1)
    autotune.pick_config("op", 1, 64, 64, torch.float16, CUDA_DEV, runs.append,
                         lambda fn: (fn(), float(order.index(runs[-1])))[1])
    assert len(runs) == len(order) + autotune.RETIME_TOP  # each timed once, the best three again


@pytest.mark.parametrize("launcher_name", ["lora_linear_fwd", "lora_linear_dx"])
@pytest.mark.parametrize("fmt", ["int1", "sparse4x4"])
def test_the_launchers_pass_a_check_that_judges_their_candidates(launcher_name, fmt, monkeypatch):
    """Through ``ops`` (the direct path and the custom op's): the tuner gets a check, which accepts
    what the Triton kernels (interpreted) return and refuses it altered."""
    import importlib

    from loraq import ops

    module = importlib.import_module(f"loraq.kernels.{launcher_name}")
    verdicts = []

    def tune(op, M, N, K, dtype, device, run, bench=None, extra=None, variant=(), check=None):
        cfg = autotune.configs_for(M)[0]
        out = run(cfg)
        bad = out.clone()
        bad[0, 0] += 1 + 4 * float(out.float().abs().max())
        verdicts.append((check(out), check(bad)))
        return cfg

    monkeypatch.setattr(module, "pick_config", tune)
    w = make(fmt, 21, 19, torch.float16)
    A, B = torch.randn(3, 19, dtype=torch.float16), torch.randn(21, 3, dtype=torch.float16)
    for grad in (False, True):  # the direct launch, then the custom op (a gradient wanted)
        if launcher_name == "lora_linear_fwd":
            x = torch.randn(5, 19, dtype=torch.float16, requires_grad=grad)
            ops.lora_linear(x, w, A, B, 0.5, backend="triton")
        else:
            dy = torch.randn(5, 21, dtype=torch.float16, requires_grad=grad)
            ops.lora_linear_dx(dy, w, A, dy.detach() @ B, 0.5, backend="triton")
    assert len(verdicts) == 2
    for right, wrong in verdicts:
        assert right is None and wrong
