"""What changes with the versions loraq supports (torch >= 2.4, triton >= 3.0, Python >= 3.9): each
version check against fakes of the versions this machine does not have, and the source rules
that keep the kernels compiling on the oldest Triton. ``bash .ci/floor`` runs the whole suite on
the floor itself."""

import ast
import sys
from pathlib import Path

import pytest
import torch

from loraq import compat, ops

ROOT = Path(__file__).resolve().parents[1]


def _jit_functions():
    """``(file, function)`` for every ``@triton.jit`` function of ``kernels/``."""
    for path in sorted((ROOT / "kernels").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and any("jit" in ast.unparse(d) for d in node.decorator_list):
                yield path, node


def test_no_kernel_chains_three_boolean_operands():
    """Triton before 3.4 refuses ``A and B and C`` in a kernel ("chained boolean operators"): the
    interpreter runs Python and accepts it, so only a compile for a GPU would tell."""
    functions = list(_jit_functions())
    assert len(functions) > 20
    chains = [f"{path.name}:{node.lineno} {fn.name}: {ast.unparse(node)}" for path, fn in functions
              for node in ast.walk(fn) if isinstance(node, ast.BoolOp) and len(node.values) > 2]
    assert not chains, chains


def test_the_chain_rule_sees_a_chain():
    tree = ast.parse("@triton.jit\ndef k(a, b, c):\n    if a and b and c:\n        pass\n")
    fn = tree.body[0]
    assert [len(n.values) for n in ast.walk(fn) if isinstance(n, ast.BoolOp)] == [3]


def test_release_reads_every_form_of_version():
    pytest.importorskip("triton")
    from loraq.kernels.triton_support import _release

    assert _release("3.0.0") == (3, 0) and _release("3.6.0+git1234abc") == (3, 6)
    assert _release("3.2.0rc1") == (3, 2) and _release("3") == (3, 0) and _release("10.11") == (10, 11)


@pytest.fixture
def triton_support(monkeypatch):
    """``kernels.triton_support`` with its answers forgotten before and after the test."""
    pytest.importorskip("triton")
    from loraq.kernels import triton_support

    for fn in (triton_support.gather_problem, triton_support.interpreter_problem):
        fn.cache_clear()
    yield triton_support
    for fn in (triton_support.gather_problem, triton_support.interpreter_problem):
        fn.cache_clear()


def test_without_tl_gather_the_lookup_gemv_is_refused_with_the_version(triton_support, monkeypatch):
    import triton
    import triton.language as tl

    monkeypatch.setattr(triton, "__version__", "3.2.0")
    monkeypatch.delattr(tl, "gather", raising=False)
    why = triton_support.gather_problem()
    assert "tl.gather" in why and "Triton 3.2.0 lacks" in why and ">= 3.3" in why
    from loraq.kernels.int1_gemv_lut import check_lut_config

    with pytest.raises(ValueError, match="cannot run here: the lookup GEMV reads its table with tl.gather"):
        check_lut_config((1, 256, 256, 4, 4, 1, 2))


def test_with_tl_gather_nothing_is_refused(triton_support, monkeypatch):
    import triton.language as tl

    monkeypatch.setattr(tl, "gather", lambda *a: None, raising=False)
    assert triton_support.gather_problem() == ""


def test_without_tl_gather_the_tuner_never_offers_the_lookup_gemv(monkeypatch):
    """The forward launcher leaves the lookup GEMV out (another cache key, no LUT candidate) and
    refuses a forced lookup config with the reason; the other GEMVs still run."""
    pytest.importorskip("triton")
    from test_triton_kernels import _kernel_args, problem, tuner_calls

    from loraq.kernels import autotune, lora_linear_fwd

    fwd = sys.modules["loraq.kernels.lora_linear_fwd"]
    why = "the lookup GEMV reads its table with tl.gather, which Triton 3.0.0 lacks (Triton >= 3.3)"
    monkeypatch.setattr(fwd, "gather_problem", lambda: why)
    w, x, A, B, b = problem("int1", torch.float16, 2, 16, 64, r=3)
    tensors, meta = _kernel_args(w)
    with tuner_calls(lora_linear_fwd) as seen:
        y = lora_linear_fwd(x, "int1", tensors, meta, A, B, 0.5, b)
    assert y.shape == (2, 16)
    (call,) = seen
    assert not call.op.endswith(":lut") and call.candidates
    assert not any(cfg[6] == autotune.LUT for cfg in call.candidates)
    with monkeypatch.context() as m:
        lut = sys.modules["loraq.kernels.int1_gemv_lut"]
        m.setattr(lut, "gather_problem", lambda: why)
        with pytest.raises(ValueError, match="cannot run here: the lookup GEMV reads its table with tl.gather"):
            lora_linear_fwd(x, "int1", tensors, meta, A, B, 0.5, b, config=autotune.LUT_M1[0])


@pytest.mark.parametrize("triton_version, numpy_version, refused", [
    ("3.0.0", "2.0.2", True), ("3.1.0", "2.4.6", True), ("3.1.0", "1.26.4", False), ("3.2.0", "2.4.6", False),
    ("3.6.0", "2.0.0", False)])
def test_the_interpreter_is_refused_where_it_writes_nothing(triton_support, monkeypatch, triton_version,
                                                            numpy_version, refused):
    """Triton 3.0 and 3.1's interpreter left every output unwritten under numpy 2 (seen here with
    numpy 2.0.2 and 2.4.6; 3.2 ran right)."""
    import numpy
    import triton

    monkeypatch.setattr(triton, "__version__", triton_version)
    monkeypatch.setattr(numpy, "__version__", numpy_version)
    why = triton_support.interpreter_problem()
    assert bool(why) == refused
    if refused:
        assert f"Triton {triton_version}'s interpreter" in why and f"numpy {numpy_version}" in why
        assert "numpy<2" in why and "Triton >= 3.2" in why


def test_backend_status_names_the_interpreter_problem(monkeypatch):
    """On the CPU with TRITON_INTERPRET=1 the triton backend is unavailable, with the reason, and
    asking for it by name raises that reason; on CUDA the interpreter is not involved."""
    pytest.importorskip("triton")
    why = "Triton 3.0.0's interpreter (TRITON_INTERPRET=1) leaves kernel outputs unwritten with numpy 2.0.2"
    monkeypatch.setattr(ops, "_INTERPRETER_PROBLEM", why)
    monkeypatch.setattr(ops, "_RESOLVED", {})
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert ops.backend_status(torch.device("cpu"))["triton"] == (False, why)
    with pytest.raises(RuntimeError, match="backend 'triton' is not available: Triton 3.0.0's interpreter"):
        ops.resolve_backend("triton", torch.device("cpu"), "int1")
    assert ops.backend_status(torch.device("cuda"))["triton"][0]


def test_trace_constant_marks_only_for_old_dynamo(monkeypatch):
    """Before torch 2.5 the function carries Dynamo's constant mark (and stays callable);
    from 2.5 it is returned as it is (the mark would import Dynamo for nothing)."""
    def answer():
        return 42

    monkeypatch.setattr(compat, "OLD_DYNAMO", False)
    assert compat.trace_constant(answer) is answer
    monkeypatch.setattr(compat, "OLD_DYNAMO", True)
    marked = compat.trace_constant(len)  # a C function: wrapped, since it cannot carry the mark
    assert marked is not len and marked([1, 2]) == 2 and getattr(marked, "_dynamo_marked_constant", False)


def test_old_dynamo_is_torch_before_2_5():
    assert compat.OLD_DYNAMO == (torch.__version__ < (2, 5))
    assert torch.torch_version.TorchVersion("2.4.1+cu121") < (2, 5)
    assert not torch.torch_version.TorchVersion("2.5.0") < (2, 5)


def test_getenv_reads_the_environment_now(monkeypatch):
    monkeypatch.setenv("LORAQ_TEST_GETENV", "x")
    assert compat.getenv("LORAQ_TEST_GETENV") == "x"
    monkeypatch.delenv("LORAQ_TEST_GETENV")
    assert compat.getenv("LORAQ_TEST_GETENV", "d") == "d"
