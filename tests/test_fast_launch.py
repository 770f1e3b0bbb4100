"""``kernels.fast_launch``: launches from its cache must be Triton's launches, argument for argument."""

import os
import subprocess
import sys
from pathlib import Path

import torch

from loraq.kernels import fast_launch

REPO = Path(__file__).resolve().parents[1]
KERNELS = ("_int1_gemv_lut_kernel", "_sparse4x4_gemv_kernel", "_splitk_finish_kernel", "_lora_linear_fwd_kernel",
           "_lora_linear_dx_kernel", "_sparse4x4_gemv_dx_kernel", "_decode_slab_kernel")


def test_fast_path_passes_the_launcher_what_triton_passes():
    """tests/fast_launch_check.py, in a process where the kernels are JITFunctions (no interpreter)
    and Triton's launches are recorded by a fake driver: every kernel, many specializations."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(REPO / "tests" / "fast_launch_check.py")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    for name in KERNELS:
        line = next(line for line in out.stdout.splitlines() if line.startswith(name + ":"))
        assert int(line.split(": ")[1].split()[0]) > 0, line  # launches from the cache
    assert "fallbacks:" in out.stdout


def test_key_separates_what_triton_specializes_on():
    buf = torch.zeros(64, dtype=torch.float16)
    aligned, shifted = buf[:32], buf[1:33]
    key = lambda *args, **kw: fast_launch._key(0, kw, args)  # noqa: E731
    assert key(aligned, 5) == key(buf[8:40], 5)  # 16 bytes further: the same specialization
    assert key(aligned, 5) != key(shifted, 5)  # 2 bytes: not a multiple of 16
    assert key(aligned, 5) != key(aligned.float(), 5)
    assert key(aligned, 1) != key(aligned, 2) and key(aligned, 16) != key(aligned, 32)
    assert key(aligned, 0.5) == key(aligned, 2.0)  # floats are passed, never specialized on
    assert key(aligned, 5, BLOCK=16) != key(aligned, 5, BLOCK=32)
    assert key(torch.nn.Parameter(aligned.float())) == key(aligned.float())
    assert key(aligned, None) != key(aligned, 0)


def test_interpreted_kernels_are_launched_by_the_interpreter(monkeypatch):
    """Under TRITON_INTERPRET=1 (these tests) the fast path steps aside: same results, nothing kept."""
    from loraq.kernels import lora_linear_fwd
    from loraq.formats import compress_weight
    from loraq.reference import lora_linear_ref

    monkeypatch.setenv("LORAQ_FAST_LAUNCH", "1")
    fast_launch.forget()
    w = compress_weight(torch.randn(24, 40), "int1")
    x = torch.randn(3, 40)
    meta = {"N": 24, "K": 40, "group_size": None, "scale_mode": w.scale_mode}
    y = lora_linear_fwd(x, "int1", w.tensors(), meta)
    torch.testing.assert_close(y, lora_linear_ref(x, w, None, None, 1.0, None), rtol=1e-4, atol=1e-4)
    assert not any(launcher.entries for launcher in fast_launch._LAUNCHERS.values())
