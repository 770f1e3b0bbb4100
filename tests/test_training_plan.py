"""Training steps through kept plans: ``LoraLinear``'s forward with gradients wanted runs its kept
``ops.forward_plan`` inside ``PlannedLoraLinearFunction``, whose backward computes ``dX`` through
kept ``ops.dx_plan`` s. Every output and gradient must be the full path's, bit for bit, step after
step with the parameters updated in place; anything a plan cannot serve takes the full path. Tiny
shapes under the Triton interpreter without a GPU; the ``gpu`` test runs the real kernels."""

import copy
import importlib

import pytest
import torch

pytest.importorskip("triton")

from loraq import LoraLinear, ops  # noqa: E402
from loraq.formats import compress_weight  # noqa: E402

fwd_mod = importlib.import_module("loraq.kernels.lora_linear_fwd")
dx_mod = importlib.import_module("loraq.kernels.lora_linear_dx")
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
N, K = 40, 24


def make_layer(fmt="int1", dtype=torch.float16, bias=True, rank=4, n=N, k=K, dropout=0.0, **kw):
    base = compress_weight(torch.randn(n, k), fmt, **kw)
    layer = LoraLinear(base, rank=rank, backend="triton", bias=torch.randn(n) if bias else None,
                       dropout=dropout).to(DEV, dtype)
    with torch.no_grad():
        layer.lora_A.normal_(std=0.3)
        layer.lora_B.normal_()
    return layer


@pytest.fixture
def planned(monkeypatch):
    """``{"forward": n, "dx": n}``: the calls of kept forward and dX plans."""
    calls = {"forward": 0, "dx": 0}
    real_fwd, real_dx = fwd_mod.ForwardPlan.__call__, dx_mod.DxPlan.__call__

    def fwd(self, x):
        calls["forward"] += 1
        return real_fwd(self, x)

    def dx(self, dy, dy_B=None):
        calls["dx"] += 1
        return real_dx(self, dy, dy_B)

    monkeypatch.setattr(fwd_mod.ForwardPlan, "__call__", fwd)
    monkeypatch.setattr(dx_mod.DxPlan, "__call__", dx)
    return calls


def sgd(layer, lr=0.05):
    """An optimizer step in place (the plans read the new values) and the gradients cleared."""
    with torch.no_grad():
        for p in layer.parameters():
            if p.grad is not None:
                p.sub_(lr * p.grad)
                p.grad = None


def without_plans(layer):
    """A copy of ``layer`` that always takes the full path."""
    twin = copy.deepcopy(layer)
    twin._planned = lambda x: None
    return twin


def step(layer, x, dy, autocast=None, seed=0):
    """One forward (under ``autocast``, a dtype, if given; the RNG seeded with ``seed`` for LoRA
    dropout) and backward: ``(y, dX, {name: grad})``, the parameters' grads cleared after."""
    x = x.detach().clone().requires_grad_(x.requires_grad)
    torch.manual_seed(seed)
    if autocast is None:
        y = layer(x)
    else:
        with torch.autocast(DEV.type, dtype=autocast):
            y = layer(x)
    y.backward(dy.to(y.dtype))
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    return y.detach(), None if x.grad is None else x.grad.clone(), grads


def assert_steps_match(layer, shapes, steps=4, x_grad=True, planned=None, expect_plans=True, autocast=()):
    """``steps`` training steps of ``layer`` (plans) and of a copy (the full path), each with fresh
    inputs and an in-place update: outputs and every gradient equal bit for bit. ``autocast``: the
    dtypes each step runs a forward under in turn (none: one forward without autocast)."""
    twin = without_plans(layer)
    dtype = layer.lora_A.dtype
    for i in range(steps):
        for shape, cast in ((shape, cast) for shape in shapes for cast in (autocast or (None,))):
            x = torch.randn(shape, device=DEV, dtype=dtype).requires_grad_(x_grad)
            dy = torch.randn(*shape[:-1], layer.out_features, device=DEV, dtype=dtype)
            seed = torch.randint(1 << 30, ()).item()
            got, want = step(layer, x, dy, cast, seed), step(twin, x, dy, cast, seed)
            assert got[0].dtype == (cast or dtype)
            assert torch.equal(got[0], want[0]), f"step {i}, {shape}: y"
            assert (got[1] is None) == (want[1] is None)
            assert got[1] is None or torch.equal(got[1], want[1]), f"step {i}, {shape}: dX"
            assert got[2].keys() == want[2].keys()
            for name in got[2]:
                assert torch.equal(got[2][name], want[2][name]), f"step {i}, {shape}: d{name}"
        sgd(layer)
        sgd(twin)
    if planned is not None and expect_plans:
        assert planned["forward"] > 0, "no kept forward plan was used"
        if x_grad:
            assert planned["dx"] > 0, "no kept dX plan was used"


@pytest.mark.parametrize("fmt, kw", [("int1", {}), ("int1", {"group_size": 8}), ("int1", {"scale": "onebit"}),
                                     ("sparse4x4", {})], ids=["int1", "int1_g8", "int1_onebit", "sparse4x4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_training_steps_through_plans_give_the_full_paths_answers_bit_for_bit(fmt, kw, dtype, planned):
    layer = make_layer(fmt, dtype, **kw)
    assert_steps_match(layer, [(3, K), (2, 1, K)], planned=planned)


@pytest.mark.parametrize("case", ["no bias", "trainable bias", "frozen adapter", "adapter disabled",
                                  "parameters only", "odd sizes"])
def test_every_kind_of_step_through_plans(case, planned):
    """Which inputs want a gradient (x, the factors, the bias) and which paths the step takes."""
    layer = make_layer(bias=case != "no bias", **({"n": 37, "k": 52} if case == "odd sizes" else {}))
    if case == "trainable bias":
        layer.bias.requires_grad_(True)
    elif case == "frozen adapter":
        layer.lora_A.requires_grad_(False)
        layer.lora_B.requires_grad_(False)
    elif case == "adapter disabled":  # dX without the LoRA term, through its own plan
        layer.disable_adapter()
    k = layer.in_features
    assert_steps_match(layer, [(5, k), (1, k)], x_grad=case != "parameters only", planned=planned)


@pytest.mark.parametrize("fmt", ["int1", "sparse4x4"])
@pytest.mark.parametrize("casts", [(torch.bfloat16,), (torch.float16,), (torch.float16, torch.bfloat16)],
                         ids=["bf16", "fp16", "fp16_and_bf16"])
@pytest.mark.parametrize("bias", ["frozen bias", "trainable bias", "no bias"])
def test_autocast_steps_through_plans_give_the_full_paths_answers_bit_for_bit(fmt, casts, bias, planned):
    """An fp32 layer under autocast (as ``loraq train`` runs on CUDA): plans read copies of the
    factors and bias in the autocast dtype, copied again after each in-place update; the
    factors' gradients come back in fp32."""
    layer = make_layer(fmt, torch.float32, bias=bias != "no bias")
    if bias == "trainable bias":
        layer.bias.requires_grad_(True)
    assert_steps_match(layer, [(3, K), (2, 1, K)], planned=planned, autocast=casts)
    assert layer.lora_A.dtype == torch.float32 and layer.lora_A.grad is None


def test_eval_under_autocast_reads_the_factors_as_they_are_now(planned):
    """No grad, autocast: a kept plan; ``load_state_dict`` and in-place edits reach it."""
    layer, other = make_layer(dtype=torch.float32), make_layer(dtype=torch.float32)
    twin = without_plans(layer)
    x = torch.randn(3, K, device=DEV)
    with torch.no_grad(), torch.autocast(DEV.type, dtype=torch.bfloat16):
        for _ in range(3):
            assert torch.equal(layer(x), twin(x))
        assert planned["forward"] == 1
        for edit in (lambda m: m.load_state_dict(other.state_dict()), lambda m: m.lora_B.mul_(-2),
                     lambda m: m.bias.add_(1)):
            edit(layer)
            edit(twin)
            y = layer(x)
            assert y.dtype == torch.bfloat16 and torch.equal(y, twin(x))
        assert planned["forward"] == 4


@pytest.mark.parametrize("cast", [None, torch.bfloat16], ids=["no_autocast", "bf16_autocast"])
def test_a_layer_called_twice_before_the_backward(cast, planned):
    """A shared encoder (both sentences of a pair through the same layers, then one loss): the
    second forward must not disturb what the first one's backward reads."""
    layer = make_layer(dtype=torch.float32)
    twin = without_plans(layer)
    for i in range(4):
        a, b = (torch.randn(3, K, device=DEV, requires_grad=True) for _ in range(2))
        grads = []
        for m in (layer, twin):
            xa, xb = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
            with torch.autocast(DEV.type, dtype=cast or torch.bfloat16, enabled=cast is not None):
                loss = (m(xa).float() * m(xb).float()).sum()
            loss.backward()
            grads.append((xa.grad, xb.grad, m.lora_A.grad.clone(), m.lora_B.grad.clone()))
            m.zero_grad()
        for g, w in zip(*grads):
            assert torch.equal(g, w), f"step {i}"
        sgd(layer)
        sgd(twin)
    assert planned["forward"] > 0 and planned["dx"] > 0


@pytest.mark.parametrize("grad", [False, True], ids=["eval", "training"])
def test_writes_through_data_reach_the_autocast_copies(grad, planned):
    """``p.data.zero_()`` moves no version counter: the copies are made again on every call."""
    layer = make_layer(dtype=torch.float32)
    twin = without_plans(layer)
    x = torch.randn(3, K, device=DEV)
    with torch.set_grad_enabled(grad), torch.autocast(DEV.type, dtype=torch.bfloat16):
        for edit in (lambda m: None, lambda m: None, lambda m: m.lora_B.data.mul_(-3),
                     lambda m: m.lora_A.data.zero_(), lambda m: m.bias.data.fill_(2)):
            edit(layer)
            edit(twin)
            assert torch.equal(layer(x), twin(x))
    assert planned["forward"] == 3


def test_autocast_plans_made_under_inference_mode_serve_training_after(planned):
    """Validation under inference_mode and autocast (as Lightning's sanity check runs) before
    training: the autocast copies are normal tensors, written in place in either mode."""
    layer = make_layer(dtype=torch.float32)
    twin = without_plans(layer)
    x = torch.randn(3, K, device=DEV)
    with torch.inference_mode(), torch.autocast(DEV.type, dtype=torch.bfloat16):
        for _ in range(3):
            assert torch.equal(layer(x), twin(x))
    with torch.no_grad(), torch.autocast(DEV.type, dtype=torch.bfloat16):
        assert torch.equal(layer(x), twin(x))
    assert_steps_match(layer, [(3, K)], autocast=(torch.bfloat16,))
    with torch.inference_mode(), torch.autocast(DEV.type, dtype=torch.bfloat16):
        assert torch.equal(layer(x), without_plans(layer)(x))
    assert planned["forward"] > 0 and planned["dx"] > 0


@pytest.mark.parametrize("cast", [None, torch.bfloat16], ids=["no_autocast", "bf16_autocast"])
def test_saved_tensor_hooks_that_move_the_factors_keep_no_dx_plans(cast, planned):
    """A hook that unpacks saved tensors elsewhere (``save_on_cpu`` on a GPU, offloading): dX
    takes the full path, with the right gradients, and no plan is kept for memory the next step
    will not have."""
    layer = make_layer(dtype=torch.float32)
    twin = without_plans(layer)
    for i in range(5):
        x = torch.randn(3, K, device=DEV, requires_grad=True)
        dy = torch.randn(3, N, device=DEV)
        got = []
        for m in (layer, twin):
            xi = x.detach().clone().requires_grad_()
            with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t), \
                    torch.autocast(DEV.type, dtype=cast or torch.bfloat16, enabled=cast is not None):
                y = m(xi)
            y.backward(dy.to(y.dtype))
            got.append((xi.grad, m.lora_A.grad, m.lora_B.grad))
            m.zero_grad()
        for a, b in zip(*got):
            assert torch.equal(a, b), f"step {i}"
    (plans,) = layer.__dict__["_plans"][1].values()
    if cast is None:  # the saved factors were moved: no dX plan
        assert planned["dx"] == 0 and not plans._dx
    else:  # the backward reads the autocast copies, which no hook moves
        assert planned["dx"] > 0 and len(plans._dx) == 1
    assert planned["forward"] > 0


def test_a_dx_plan_is_not_kept_as_none_from_a_capture(planned):
    """A dX problem first met while a CUDA graph is captured gets no plan (the tuner gives an
    untuned config there): no "no plan" answer is kept, and the next step makes one."""
    import loraq.autograd as lag

    layer = make_layer()
    assert_steps_match(layer, [(2, K)], steps=2)  # the forward plan is made
    with pytest.MonkeyPatch.context() as capture:
        capture.setattr(lag, "_capturing", lambda t: True)
        capture.setattr(dx_mod, "autotune_capturing", lambda: True)
        assert_steps_match(layer, [(2, K)], steps=1)
    (plans,) = layer.__dict__["_plans"][1].values()
    assert not plans._dx
    assert_steps_match(layer, [(2, K)], steps=2)
    assert len(plans._dx) == 1 and planned["dx"] == 1


@pytest.mark.parametrize("fmt", ["int1", "sparse4x4"])
@pytest.mark.parametrize("dtype, casts", [(torch.float32, ()), (torch.float16, ()), (torch.bfloat16, ()),
                                          (torch.float32, (torch.bfloat16,))], ids=["fp32", "fp16", "bf16", "autocast"])
@pytest.mark.parametrize("x_grad", [True, False], ids=["x_grad", "factors_only"])
def test_lora_dropout_steps_through_plans(fmt, dtype, casts, x_grad, planned):
    """LoRA dropout in training: the plan computes the base and bias, the adapter's path is added
    on the dropped-out input as the full path adds it, with the same random numbers."""
    layer = make_layer(fmt, dtype, dropout=0.3)
    assert_steps_match(layer, [(3, K), (2, 2, K)], x_grad=x_grad, planned=planned, autocast=casts)


def test_lora_dropout_on_an_x_that_other_layers_read_too(planned):
    """A 3-D x also read by other ops (a residual, q/k/v projections of one hidden state): dX sums
    the gradients of x's uses in the full path's order, bit for bit (a scaling that rounds)."""
    layer = LoraLinear(compress_weight(torch.randn(N, K), "int1"), rank=4, alpha=1.3, backend="triton",
                       bias=torch.randn(N), dropout=0.3).to(DEV)
    with torch.no_grad():
        layer.lora_A.normal_(std=0.3)
        layer.lora_B.normal_()
    twin = without_plans(layer)
    W = torch.randn(N, K, device=DEV)
    for i in range(4):
        x = torch.randn(2, 3, K, device=DEV)
        dy = torch.randn(2, 3, N, device=DEV)
        grads = []
        for m in (layer, twin):
            xx = x.clone().requires_grad_()
            torch.manual_seed(i)
            (m(xx) + xx @ W.t()).backward(dy)
            grads.append((xx.grad, m.lora_A.grad.clone(), m.lora_B.grad.clone()))
            m.zero_grad()
        for a, b in zip(*grads):
            assert torch.equal(a, b), f"call {i}"
    assert planned["forward"] > 0 and planned["dx"] > 0


@pytest.mark.parametrize("how", ["p=0", "dropout module in eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_dropout_that_returns_its_input_takes_the_full_paths_computation(how, dtype, planned):
    """``nn.Dropout(p=0)`` (as training libraries switch dropout off) or the dropout module alone
    in eval: the full path sees the adapter's input is x and fuses it into the kernel, and so do
    the planned calls."""
    layer = make_layer(dtype=dtype, dropout=0.1)
    if how == "p=0":
        layer.lora_dropout.p = 0.0
    else:
        layer.lora_dropout.eval()
    assert_steps_match(layer, [(3, K), (2, 3, K)])
    with torch.no_grad():
        x = torch.randn(2, 3, K, device=DEV, dtype=dtype)
        assert torch.equal(layer(x), without_plans(layer)(x))


def test_a_dropout_layer_in_eval_and_under_no_grad(planned):
    """Training mode without gradients drops out too (through the base's plan); eval mode fuses
    the adapter into the kernel (another plan)."""
    layer = make_layer(dtype=torch.float32, dropout=0.5)
    twin = without_plans(layer)
    x = torch.randn(4, K, device=DEV)
    with torch.no_grad():
        for mode in ("train", "eval", "train"):
            layer.train(mode == "train")
            twin.train(mode == "train")
            for i in range(3):
                torch.manual_seed(i)
                y = layer(x)
                torch.manual_seed(i)
                assert torch.equal(y, twin(x)), f"{mode} {i}"
    # two plans (the keys end with "dropout or not"), each used from the third call of its
    # signature: training's once, eval's once, then training's three times
    assert sorted(key[-1] for key in layer.__dict__["_plans"][1]) == [False, True]
    assert planned["forward"] == 1 + 1 + 3


@pytest.mark.parametrize("cast", [None, torch.bfloat16], ids=["no_autocast", "bf16_autocast"])
def test_double_backward_takes_the_custom_op(cast, planned):
    """``create_graph=True``: the planned forward's backward computes dX through the op, which
    has a backward of its own, from the factors cast again (not the autocast copies, which have
    no graph), and the second-order gradients are the full path's."""
    layer = make_layer(dtype=torch.float32)
    twin = without_plans(layer)
    for i in range(4):
        x = torch.randn(3, K, device=DEV, requires_grad=True)
        out = []
        for m in (layer, twin):
            xi = x.detach().clone().requires_grad_()
            with torch.autocast(DEV.type, dtype=cast or torch.bfloat16, enabled=cast is not None):
                y = m(xi).float()
            before = planned["dx"]
            (gx,) = torch.autograd.grad(y.square().sum(), xi, create_graph=True)
            assert planned["dx"] == before  # with create_graph: the op
            # (the second backward runs the planned function's backward again, without a graph)
            gx.square().sum().backward()
            out.append((gx.detach(), m.lora_A.grad.clone(), m.lora_B.grad.clone()))
            m.zero_grad()
        for a, b in zip(*out):
            assert torch.equal(a, b), f"step {i}"
    assert planned["forward"] > 0


def test_a_replaced_parameter_between_steps_means_new_plans(planned):
    layer = make_layer()
    assert_steps_match(layer, [(3, K)])
    layer.lora_B = torch.nn.Parameter(torch.randn(N, 4, device=DEV, dtype=torch.float16))
    before = dict(planned)
    assert_steps_match(layer, [(3, K)])  # the first steps after it take the full path
    assert planned["forward"] > before["forward"] and planned["dx"] > before["dx"]


def test_gradient_checkpointing_recomputes_through_the_plans(planned):
    from torch.utils.checkpoint import checkpoint

    layer = make_layer()
    twin = without_plans(layer)
    for _ in range(4):
        x = torch.randn(4, K, device=DEV, dtype=torch.float16, requires_grad=True)
        dy = torch.randn(4, N, device=DEV, dtype=torch.float16)
        x2 = x.detach().clone().requires_grad_()
        checkpoint(layer, x, use_reentrant=False).backward(dy)
        twin(x2).backward(dy)
        assert torch.equal(x.grad, x2.grad)
        assert torch.equal(layer.lora_A.grad, twin.lora_A.grad) and torch.equal(layer.lora_B.grad, twin.lora_B.grad)
        sgd(layer)
        sgd(twin)
    assert planned["forward"] > 0 and planned["dx"] > 0


def test_ops_dx_plan_is_lora_linear_dx_prepared():
    for fmt in ("int1", "sparse4x4"):
        base = compress_weight(torch.randn(N, K), fmt).to(DEV, torch.float16)
        A = torch.randn(4, K, device=DEV, dtype=torch.float16) / 5
        B = torch.randn(N, 4, device=DEV, dtype=torch.float16)
        dy = torch.randn(5, N, device=DEV, dtype=torch.float16)
        with_lora = ops.dx_plan(dy, base, A, dy @ B, 0.5, backend="triton", lora_B=B)
        plain = ops.dx_plan(dy, base, backend="triton")
        for _ in range(2):  # fresh values through the plans
            dy = torch.randn(5, N, device=DEV, dtype=torch.float16)
            dyB = dy @ B
            assert torch.equal(with_lora(dy, dyB), ops.lora_linear_dx(dy, base, A, dyB, 0.5, "triton", lora_B=B))
            assert torch.equal(plain(dy), ops.lora_linear_dx(dy, base, backend="triton"))
        assert with_lora.current() and plain.current()
    with pytest.raises(ValueError, match=r"this plan takes dy of shape \(5, 40\)"):
        plain(torch.randn(4, N, device=DEV, dtype=torch.float16))
    with pytest.raises(ValueError, match="made without the LoRA term"):
        plain(dy, dyB)
    with pytest.raises(ValueError, match="made with the LoRA term"):
        with_lora(dy)
    for bad in (dyB[:2], dyB[:, :3], dyB.unsqueeze(0)):  # rows, rank, dims
        with pytest.raises(ValueError, match=r"dy_B must be \[5, 4\]"):
            with_lora(dy, bad)
    with pytest.raises(ValueError, match="2-D"):
        ops.dx_plan(dy.unsqueeze(0), base, backend="triton")
    with pytest.raises(ValueError, match="lora_A and dy_B"):
        ops.dx_plan(dy, base, A, None, backend="triton")
    # no plan: the reference backend, a factor the kernels would cast, no rows, a gradient wanted
    assert ops.dx_plan(dy, base, A, dyB, 0.5, backend="reference") is None
    assert ops.dx_plan(dy, base, A.float(), dyB, 0.5, backend="triton") is None
    assert ops.dx_plan(dy[:0], base, backend="triton") is None
    with torch.enable_grad():
        assert ops.dx_plan(dy.clone().requires_grad_(), base, backend="triton") is None


def test_a_changed_switch_remakes_the_dx_plan(monkeypatch, planned):
    layer = make_layer()
    assert_steps_match(layer, [(2, K)], steps=3)
    (plans,) = layer.__dict__["_plans"][1].values()
    (old,) = plans._dx.values()
    monkeypatch.setenv("LORAQ_ONE_LAUNCH", "1")
    assert not old.current()
    assert_steps_match(layer, [(2, K)], steps=3)  # the full path, then new plans made under it
    (plans,) = layer.__dict__["_plans"][1].values()
    assert all(p is not old and p.current() for p in plans._dx.values())


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["int1", "sparse4x4"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M", [1, 16, 300])
def test_gpu_training_steps_through_plans_at_real_sizes(fmt, dtype, M, planned):
    """The real kernels (and the CUDA GEMVs where built) through kept plans in training steps."""
    layer = make_layer(fmt, dtype, rank=16, n=1000, k=1537)
    assert_steps_match(layer, [(M, 1537)], planned=planned)
