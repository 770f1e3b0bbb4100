"""Prepared forwards (``ops.forward_plan``, ``kernels.lora_linear_fwd.ForwardPlan``) and
``LoraLinear``'s eager inference through them: the same answers as the full path, bit for bit,
and a new plan (or the full path) whenever anything a plan was made with changes. Tiny shapes
under the Triton interpreter without a GPU; the ``gpu`` tests run the real kernels."""

import gc
import importlib
import weakref

import pytest
import torch

pytest.importorskip("triton")

from loraq import LoraLinear, ops  # noqa: E402
from loraq.custom_ops import _meta  # noqa: E402
from loraq.formats import compress_weight  # noqa: E402
from loraq.kernels import autotune  # noqa: E402
from test_triton_kernels import with_gather_marks  # noqa: E402

fwd_mod = importlib.import_module("loraq.kernels.lora_linear_fwd")
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
N, K = 40, 24


def make_layer(fmt="int1", dtype=torch.float16, bias=True, rank=4, **kw):
    base = compress_weight(torch.randn(N, K), fmt, **kw)
    layer = LoraLinear(base, rank=rank, backend="triton", bias=torch.randn(N) if bias else None).to(DEV, dtype)
    with torch.no_grad():
        layer.lora_A.normal_(std=0.3)
        layer.lora_B.normal_()
    return layer.eval()


def full(layer, x):
    """The forward without a plan (``LoraLinear._forward``: the full path, the kept plans untouched)."""
    return layer._forward(x)


def warm(layer, x):
    """Calls until the layer keeps a plan for ``x``: the first call of new tensors makes none (a
    layer whose tensors change on every call never makes one), the next makes it."""
    layer(x)
    layer(x)


@pytest.fixture
def plan_calls(monkeypatch):
    """The inputs' shapes of every call of a kept plan."""
    calls = []
    real = fwd_mod.ForwardPlan.__call__

    def counted(self, x):
        calls.append(tuple(x.shape))
        return real(self, x)

    monkeypatch.setattr(fwd_mod.ForwardPlan, "__call__", counted)
    return calls


@pytest.mark.parametrize("fmt, kw", [("int1", {}), ("int1", {"group_size": 8}), ("int1", {"scale": "onebit"}),
                                     ("sparse4x4", {})], ids=["int1", "int1_g8", "int1_onebit", "sparse4x4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("lora, bias", [(True, True), (False, False), (True, False)], ids=["lora+bias", "plain", "lora"])
def test_planned_calls_give_the_full_paths_answer_bit_for_bit(fmt, kw, dtype, lora, bias, plan_calls):
    layer = make_layer(fmt, dtype, bias, **kw)
    if not lora:
        layer.disable_adapter()
    with torch.no_grad():
        for shape in [(1, K), (3, K), (2, 3, K), (K,)]:
            warm(layer, torch.randn(shape, device=DEV, dtype=dtype))
            x = torch.randn(shape, device=DEV, dtype=dtype)  # fresh values through the kept plan
            before = len(plan_calls)
            got = layer(x)
            assert len(plan_calls) == before + 1, f"{shape}: the kept plan was not used"
            expected = full(layer, x)
            assert got.shape == expected.shape == (*shape[:-1], N) and got.dtype == dtype
            assert torch.equal(got, expected), f"{shape}: planned {got} != full {expected}"


# a config of each small-batch launcher a plan can bind (lookup, gather, split and unsplit tiles)
BOUND_CONFIGS = [("int1", (1, 32, 32, 8, 4, 1, autotune.LUT)), ("int1", (4, 32, 64, 4, 4, 1, autotune.LUT)),
                 ("int1", (16, 32, 32, 4, 4, 2, autotune.DOT)), ("int1", (16, 32, 32, 1, 4, 2, autotune.DOT_SWAP)),
                 ("sparse4x4", (1, 16, 32, 4, 4, 2, autotune.GATHER)),
                 ("sparse4x4", (4, 16, 32, 2, 4, 2, autotune.GATHER_T_X4)),
                 ("sparse4x4", (16, 32, 32, 4, 4, 2, autotune.DOT))]


@pytest.mark.parametrize("one_launch", ["0", "1"], ids=["two_launches", "one_launch"])
@pytest.mark.parametrize("fmt, cfg", with_gather_marks(BOUND_CONFIGS))
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "plain"])
def test_a_plan_bound_to_any_config_gives_its_launchers_answer(monkeypatch, one_launch, fmt, cfg, lora):
    """A plan binds whichever config the tuner picked (its grid, arguments and finish) once; called
    again on fresh inputs (also a 1-row x with an odd row stride) it gives that config's launch
    answer bit for bit, and it keeps no input alive."""
    monkeypatch.setenv("LORAQ_ONE_LAUNCH", one_launch)
    monkeypatch.setattr(fwd_mod, "pick_config", lambda *a, **k: cfg)
    n, k, dt = 40, 128, torch.float16
    w = compress_weight(torch.randn(n, k), fmt).to(dt).to(DEV)
    tensors, meta = w.tensors(), _meta(w)
    A = torch.randn(5, k, device=DEV, dtype=dt) / 5 if lora else None
    B = torch.randn(n, 5, device=DEV, dtype=dt) if lora else None
    b = torch.randn(n, device=DEV, dtype=dt)
    for M in (1, 3):
        first = torch.randn(M, k, device=DEV, dtype=dt)
        plan = fwd_mod.forward_plan(first, fmt, tensors, meta, A, B, 0.7, b)
        assert plan is not None and plan.cfg == cfg
        gone = weakref.ref(first)
        del first
        gc.collect()
        assert gone() is None, "the plan keeps the input it was made with alive"
        wide = torch.randn(3, k + 7, device=DEV, dtype=dt)
        for x in (torch.randn(M, k, device=DEV, dtype=dt), wide[1:2, :k] if M == 1 else wide[:, :k].contiguous()):
            expected = fwd_mod.lora_linear_fwd(x, fmt, tensors, meta, A, B, 0.7, b, config=cfg)
            assert torch.equal(plan(x), expected), f"M={M}, stride {x.stride()}"


@pytest.mark.parametrize("fmt, cfg", with_gather_marks(BOUND_CONFIGS[:2] + BOUND_CONFIGS[4:6]))
def test_the_gemv_launchers_take_a_row_strided_x(fmt, cfg):
    """``launch_lut``/``launch_gather`` (whose bound forms step K elements a row) give a slice of
    wider rows the answer of its contiguous copy."""
    from loraq.kernels.decode import lora_and_bias_args, weight_args

    launch = (importlib.import_module("loraq.kernels.int1_gemv_lut").launch_lut if fmt == "int1"
              else importlib.import_module("loraq.kernels.sparse4x4_gemv").launch_gather)
    n, k, dt = 40, 128, torch.float16
    w = compress_weight(torch.randn(n, k), fmt).to(dt).to(DEV)
    ptrs, ints, mode = weight_args(fmt, w.tensors(), _meta(w))
    x = torch.randn(3, k + 16, device=DEV, dtype=dt)[:, :k]
    A, B, b = lora_and_bias_args(x, torch.randn(5, k, device=DEV, dtype=dt) / 5,
                                 torch.randn(n, 5, device=DEV, dtype=dt), torch.randn(n, device=DEV, dtype=dt))
    args = (ptrs, ints, mode, n) if fmt == "int1" else (ptrs, ints, n)
    assert torch.equal(launch(x, *args, A, B, 0.7, b, cfg), launch(x.contiguous(), *args, A, B, 0.7, b, cfg))


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "plain"])
def test_a_bound_split_finishes_as_finish_does(monkeypatch, lora):
    """``bind_split``'s finish launch is ``finish()``'s for the same problem: the same grid,
    scalars and constexprs (without LoRA: one slot, so no other specialization compiles)."""
    sf = importlib.import_module("loraq.kernels.splitk_finish")
    launched = []

    class Recorder:
        def launch(self, grid, args, meta):
            launched.append((grid, [a for a in args if not isinstance(a, torch.Tensor)], meta))

    monkeypatch.setattr(sf, "fast", lambda fn: Recorder())
    M, n, slots, R = 2, 8, 6, 3
    B = torch.randn(n, R) if lora else None
    bias = torch.randn(n)
    sf.bind_split(lambda x, ws, parts: None, M, n, slots, B, R, 0.5, bias, torch.float32, torch.device("cpu"))(
        torch.randn(M, 4))
    ws = sf.zeroed_workspace(M, n, torch.device("cpu"))
    parts = sf.xa_slots(slots, M, R, torch.device("cpu"))[0] if lora else None
    sf.finish(ws, parts, B, R, 0.5, bias, torch.float32)
    assert len(launched) == 2 and launched[0] == launched[1]
    with pytest.raises(ValueError, match="parts and lora_B together"):
        sf.finish(ws, None if lora else torch.zeros(slots, M, 16), B if lora else None, R, 0.5, bias, torch.float32)
    assert len(launched) == 2


def test_values_changed_in_place_are_read_by_the_kept_plan(plan_calls):
    layer, other = make_layer(), make_layer()
    x = torch.randn(3, K, device=DEV, dtype=torch.float16)
    with torch.no_grad():
        warm(layer, x)
        layer.lora_B.mul_(-2.0)  # an optimizer step, in place
        layer.bias.add_(1.0)
        calls = len(plan_calls)
        assert torch.equal(layer(x), full(layer, x)) and len(plan_calls) == calls + 1
        expected = other(x)
        layer.load_state_dict(other.state_dict())  # copies into the same tensors
        calls = len(plan_calls)
        assert torch.equal(layer(x), expected) and len(plan_calls) == calls + 1


@pytest.mark.parametrize("change", ["new lora_A", ".data of another dtype", "half()", "new base", "scaling",
                                    "disable_adapter", "to(float32)", "transposed view, same address",
                                    "load_state_dict(assign=True)"])
def test_a_replaced_tensor_or_setting_means_a_new_plan(change, plan_calls):
    layer = make_layer()
    x = torch.randn(2, K, device=DEV, dtype=torch.float16)
    with torch.no_grad():
        warm(layer, x)
        layer(x)
        assert plan_calls
        if change == "new lora_A":
            layer.lora_A = torch.nn.Parameter(torch.randn_like(layer.lora_A))
        elif change == ".data of another dtype":
            layer.lora_B.data = torch.randn(N, 4, device=DEV, dtype=torch.float32)  # a cast: no plan
        elif change == "half()":
            layer.float()
            layer.half()  # the same Parameter objects, new storages
        elif change == "new base":
            layer.base = compress_weight(torch.randn(N, K), "int1").to(DEV, torch.float16)
        elif change == "scaling":
            layer.scaling = 0.25
        elif change == "disable_adapter":
            layer.disable_adapter()
        elif change == "to(float32)":
            layer.float()
            x = x.float()
        elif change == "transposed view, same address":  # the same storage read as [r, N]ᵀ
            B, at = layer.lora_B, layer.lora_B.data_ptr()
            B.data = B.data.view(4, N).t()
            assert B.data_ptr() == at and B.shape == (N, 4) and not B.is_contiguous()
        elif change == "load_state_dict(assign=True)":
            layer.load_state_dict(make_layer().state_dict(), assign=True)
            assert "_plans" not in layer.__dict__  # the old tensors are not kept alive by plans
        got = layer(x)
        assert torch.equal(got, full(layer, x))
        assert torch.equal(layer(x), full(layer, x))  # and through the new plan, if there is one


def test_a_changed_switch_takes_the_full_path_then_a_new_plan(monkeypatch, plan_calls):
    layer = make_layer()
    x = torch.randn(2, K, device=DEV, dtype=torch.float16)
    key = (x.shape, x.dtype, x.device, False, False)  # (not under autocast, no LoRA dropout)
    with torch.no_grad():
        warm(layer, x)
        layer(x)
        assert len(plan_calls) == 1
        old = layer.__dict__["_plans"][1][key]
        monkeypatch.setenv("LORAQ_ONE_LAUNCH", "1")
        assert not old.current()
        got = layer(x)  # the stale plan is dropped: the full path answers
        assert len(plan_calls) == 1 and not isinstance(layer.__dict__["_plans"][1][key], type(old))
        layer(x)  # a new plan, made under the new switch
        new = layer.__dict__["_plans"][1][key]
        assert new is not old and new.current()
        assert torch.equal(layer(x), got) and len(plan_calls) == 2
        assert torch.equal(got, full(layer, x))


def test_no_plan_is_asked_again_when_a_switch_changes(monkeypatch, plan_calls):
    """A shape that got no plan (LORAQ_BACKEND=reference) gets one once the switch is back."""
    layer = make_layer()
    layer.backend = None
    x = torch.randn(2, K, device=DEV, dtype=torch.float16)
    with torch.no_grad():
        monkeypatch.setenv("LORAQ_BACKEND", "reference")
        warm(layer, x)
        layer(x)
        assert not plan_calls and not layer.__dict__["_plans"][1][(x.shape, x.dtype, x.device, False, False)].runs
        monkeypatch.setenv("LORAQ_BACKEND", "triton")
        warm(layer, x)
        expected = layer(x)
        assert len(plan_calls) == 1 and torch.equal(expected, full(layer, x))


def test_a_layer_whose_tensors_change_every_call_makes_no_plan(monkeypatch):
    """Offloading hooks put new tensors in before each call: no plan is made (it would cost a
    preparation every call and keep the last tensors alive)."""
    made = []
    real = ops.forward_plan
    monkeypatch.setattr(ops, "forward_plan", lambda *a, **k: made.append(1) or real(*a, **k))
    layer = make_layer()
    x = torch.randn(2, K, device=DEV, dtype=torch.float16)
    with torch.no_grad():
        for _ in range(4):
            layer._parameters["lora_B"] = torch.nn.Parameter(layer.lora_B.detach().clone())
            assert torch.equal(layer(x), full(layer, x))
    assert not made


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "training"])
def test_shapes_met_once_make_no_plan(monkeypatch, grad, plan_calls):
    """Dynamic padding: a batch shape that never comes again costs no plan (making one costs
    about as much host time as the full path); one that comes again gets its plan then."""
    made = []
    real = ops.forward_plan
    monkeypatch.setattr(ops, "forward_plan", lambda *a, **k: made.append(1) or real(*a, **k))
    layer = make_layer()
    if grad:
        layer.train()
    with torch.set_grad_enabled(grad):
        for M in range(1, 12):
            x = torch.randn(M, K, device=DEV, dtype=torch.float16, requires_grad=grad)
            y = layer(x)
            assert torch.equal(y, full(layer, x))
            if grad:
                y.sum().backward()
        assert not made and not plan_calls
        for _ in range(2):
            layer(x)
        assert len(made) == 1 and len(plan_calls) == 1


def test_calls_that_need_the_full_path_never_use_a_plan(plan_calls):
    """torch.func transforms (training steps, LoRA dropout and autocast through plans:
    tests/test_training_plan.py)."""
    layer = make_layer(dtype=torch.float32)
    x = torch.randn(3, K, device=DEV)
    with torch.no_grad():
        xg = x.clone().requires_grad_()  # under no_grad a leaf needing a gradient is fine
        warm(layer, xg)
        assert torch.equal(layer(xg), full(layer, x)) and len(plan_calls) == 1
    with torch.no_grad():
        batched = torch.func.vmap(layer)(torch.randn(2, 3, K, device=DEV))
    assert len(plan_calls) == 1 and batched.shape == (2, 3, N)


def test_a_bad_input_raises_the_full_paths_error_with_plans_kept():
    layer = make_layer()
    with torch.no_grad():
        layer(torch.randn(2, K, device=DEV, dtype=torch.float16))
        with pytest.raises(ValueError, match="expected last dimension 24"):
            layer(torch.randn(2, K + 1, device=DEV, dtype=torch.float16))
        with pytest.raises(TypeError, match="floating point"):
            layer(torch.ones(2, K, device=DEV, dtype=torch.int64))


def test_the_kept_plans_are_bounded_least_recently_used_first_out(plan_calls):
    layer = make_layer()
    busy = torch.randn(1, K, device=DEV, dtype=torch.float16)  # a decode step between prompts
    with torch.no_grad():
        warm(layer, busy)
        for M in range(2, LoraLinear._MAX_PLANS + 8):
            x = torch.randn(M, K, device=DEV, dtype=torch.float16)
            warm(layer, x)
            assert torch.equal(layer(x), full(layer, x))
            calls = len(plan_calls)
            layer(busy)
            assert len(plan_calls) == calls + 1, f"M={M}: the busy shape's plan was dropped"
            assert len(layer.__dict__["_plans"][1]) <= LoraLinear._MAX_PLANS


def test_ops_forward_plan_is_lora_linear_prepared():
    base = compress_weight(torch.randn(N, K), "sparse4x4").to(DEV, torch.float16)
    A = torch.randn(4, K, device=DEV, dtype=torch.float16) / 5
    B = torch.randn(N, 4, device=DEV, dtype=torch.float16)
    b = torch.randn(N, device=DEV, dtype=torch.float16)
    x = torch.randn(5, K, device=DEV, dtype=torch.float16)
    plan = ops.forward_plan(x, base, A, B, 0.5, b, backend="triton")
    for _ in range(2):
        x = torch.randn(5, K, device=DEV, dtype=torch.float16)
        assert torch.equal(plan(x), ops.lora_linear(x, base, A, B, 0.5, b, backend="triton"))
    assert plan.current()
    with pytest.raises(ValueError, match=r"this plan takes x of shape \(5, 24\)"):
        plan(torch.randn(4, K, device=DEV, dtype=torch.float16))
    with pytest.raises(ValueError, match="2-D"):
        ops.forward_plan(x.unsqueeze(0), base, A, B, 0.5, b, backend="triton")
    with pytest.raises(ValueError, match="lora_A and lora_B"):
        ops.forward_plan(x, base, A, None, backend="triton")
    # no plan: the reference backend, a factor the kernels would cast, no rows
    assert ops.forward_plan(x, base, A, B, 0.5, b, backend="reference") is None
    assert ops.forward_plan(x, base, A.float(), B, 0.5, b, backend="triton") is None
    assert ops.forward_plan(x[:0], base, A, B, 0.5, b, backend="triton") is None
    with torch.enable_grad():  # a gradient wanted: the custom op's path
        assert ops.forward_plan(x, base, A.requires_grad_(), B, 0.5, b, backend="triton") is None


def test_a_plan_is_not_made_while_a_cuda_graph_is_captured(monkeypatch):
    """A problem first met in a capture gets an untuned config, which a plan must not keep."""
    from loraq.kernels import autotune

    monkeypatch.setattr(autotune, "capturing", lambda: True)
    monkeypatch.setattr(fwd_mod, "autotune_capturing", lambda: True)
    base = compress_weight(torch.randn(N, K), "int1").to(DEV, torch.float16)
    x = torch.randn(2, K, device=DEV, dtype=torch.float16)
    assert ops.forward_plan(x, base, backend="triton") is None


@pytest.mark.gpu
def test_gpu_no_plan_is_kept_for_a_shape_first_met_in_a_capture(plan_calls):
    """After the capture the shape is asked again, and gets its plan."""
    layer = make_layer()
    x = torch.randn(2, K, device=DEV, dtype=torch.float16)
    with torch.no_grad():
        warm(layer, torch.randn(1, K, device=DEV, dtype=torch.float16))  # the layer's tensors are known
        graph = torch.cuda.CUDAGraph()
        with pytest.warns(RuntimeWarning, match="captured"), torch.cuda.graph(graph):
            layer(x)
        assert (x.shape, x.dtype, x.device) not in layer.__dict__["_plans"][1]
        warm(layer, x)
        expected = layer(x)
    assert plan_calls and torch.equal(expected, full(layer, x))


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["int1", "sparse4x4"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M", [1, 16, 300])
def test_gpu_planned_calls_at_real_sizes(fmt, dtype, M, plan_calls):
    """The real kernels (the CUDA GEMVs too where built) through kept plans: the full path's
    answers, new inputs every call, on the default stream and a side stream."""
    base = compress_weight(torch.randn(1000, 1537), fmt)
    layer = LoraLinear(base, rank=16, backend="triton", bias=torch.randn(1000)).to(DEV, dtype).eval()
    with torch.no_grad():
        layer.lora_B.normal_()
        warm(layer, torch.randn(M, 1537, device=DEV, dtype=dtype))
        for _ in range(3):
            x = torch.randn(M, 1537, device=DEV, dtype=dtype)
            assert torch.equal(layer(x), full(layer, x))
            layer(x)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            on_side = layer(x)
        torch.cuda.current_stream().wait_stream(side)
        assert torch.equal(on_side, full(layer, x))
    assert plan_calls


def test_a_layer_with_plans_pickles_and_copies(tmp_path, plan_calls):
    """Plans hold launch closures bound to the layer's tensors: pickling, ``torch.save`` of the
    whole module and ``deepcopy`` leave them out, and the copy makes its own."""
    import copy
    import pickle

    layer = make_layer()
    x = torch.randn(2, K, device=DEV, dtype=torch.float16)
    with torch.no_grad():
        warm(layer, x)
        expected = layer(x)
        assert plan_calls
        twin = copy.deepcopy(layer)
        loaded = pickle.loads(pickle.dumps(layer))
        torch.save(layer, tmp_path / "layer.pt")
        saved = torch.load(tmp_path / "layer.pt", weights_only=False)
        for other in (twin, loaded, saved):
            assert "_plans" not in other.__dict__
            warm(other, x)
            calls = len(plan_calls)
            assert torch.equal(other(x), expected) and len(plan_calls) == calls + 1
        twin.lora_B.zero_()  # the copy's own tensors: the original is unchanged
        assert torch.equal(layer(x), expected)


def test_a_layer_on_the_meta_device_takes_the_full_path():
    """Shapes only (the custom op's fake), also under no_grad and with the interpreter's plans."""
    layer = make_layer().to("meta")
    x = torch.randn(3, K, device="meta", dtype=torch.float16)
    with torch.no_grad():
        for _ in range(3):
            y = layer(x)
            assert y.shape == (3, N) and y.device.type == "meta"
