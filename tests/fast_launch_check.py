"""Checks ``kernels.fast_launch`` against Triton's own launch path, without a GPU.

Run as a script, in a process where ``TRITON_INTERPRET`` is unset (the kernels must be
``JITFunction``s): ``python tests/fast_launch_check.py``. ``tests/test_fast_launch.py`` runs it;
run it with the GPU machine's Triton too (``bench/sass_like_device.sh`` shows how to get one).

Under ``bench/fake_driver.fake_cuda`` every Triton launch is recorded instead of run. Each
candidate config of the forward and dX launchers (every Triton kernel of loraq) is run on CPU
tensors of several shapes, dtypes, alignments and LoRA/bias settings, twice. Whenever the fast
path launches from its cache, the same launch is repeated through Triton, and the two must agree:
Triton finds a compiled kernel for it (the fast path's key determined the specialization), the
very one the fast path used, and its launcher gets the same grid and the same arguments (the same
objects). Exits non-zero, naming the first difference, if they do not.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("run without TRITON_INTERPRET=1: the kernels must be JITFunctions")
os.environ["LORAQ_FAST_LAUNCH"] = "1"

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from fake_driver import fake_cuda  # noqa: E402
from loraq.formats import compress_weight  # noqa: E402
from loraq.kernels import autotune, fast_launch  # noqa: E402

# the modules (the package exports the launchers under the same names)
fwd_mod = importlib.import_module("loraq.kernels.lora_linear_fwd")
dx_mod = importlib.import_module("loraq.kernels.lora_linear_dx")

CUDA_ONLY = (autotune.MMA_GEMV, autotune.CUDA_GATHER, autotune.SPARSE_MMA, autotune.CUDA_LUT,  # loraq._C's kernels
             autotune.CUDA_LUT8)


class Mismatch(AssertionError):
    pass


def same(a, b) -> bool:
    """The launcher's arguments agree: the same objects, or equal constants."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a is b
    return type(a) is type(b) and a == b


def main() -> int:
    hits, misses = Counter(), Counter()
    with fake_cuda() as (calls, compiles, driver):
        real_launch, real_first = fast_launch.FastLauncher.launch, fast_launch.FastLauncher._first

        def first(self, key, grid, args, kwargs):
            misses[self.fn.__name__] += 1
            return real_first(self, key, grid, args, kwargs)

        def launch(self, grid, args, kwargs):
            before_calls, before_misses, before_compiles = len(calls), sum(misses.values()), len(compiles)
            kernel = real_launch(self, grid, args, kwargs)
            if sum(misses.values()) != before_misses:
                return kernel  # went through Triton
            name = self.fn.__name__
            hits[name] += 1
            fast_calls = calls[before_calls:]
            del calls[before_calls:]
            again = self.fn[grid](*args, **kwargs)  # the same launch through Triton
            if len(compiles) != before_compiles:
                raise Mismatch(f"{name}: Triton compiled a new specialization for a launch that the fast path "
                               f"took from its cache (key {fast_launch._key(0, kwargs, args)})")
            if again is not kernel:
                raise Mismatch(f"{name}: the fast path launched another compiled kernel than Triton's")
            triton_calls = calls[before_calls:]
            if len(fast_calls) != 1 or len(triton_calls) != 1:
                raise Mismatch(f"{name}: {len(fast_calls)} launches by the fast path, {len(triton_calls)} by Triton")
            (_, g1, a1, s1, d1), (_, g2, a2, s2, d2) = fast_calls[0], triton_calls[0]
            if g1 != g2:
                raise Mismatch(f"{name}: grid {g1} against Triton's {g2}")
            if (s1, d1) != (s2, d2):
                raise Mismatch(f"{name}: stream {s1} of device {d1} against Triton's stream {s2} of device {d2}")
            if len(a1) != len(a2):
                raise Mismatch(f"{name}: {len(a1)} arguments against Triton's {len(a2)}")
            for i, (x, y) in enumerate(zip(a1, a2)):
                if not same(x, y):
                    raise Mismatch(f"{name}: argument {i} ({self.fn.arg_names[i]}) is {x!r} against Triton's {y!r}")
            return kernel

        def every_candidate(op, M, N, K, dtype, device, run, bench=None, extra=None, variant=(), check=None):
            candidates = autotune.configs_for(M) + list((extra() if callable(extra) else extra) or [])
            candidates = [c for c in candidates if c[6] not in CUDA_ONLY]
            for cfg in candidates:
                run(cfg)
            return candidates[0]

        fast_launch.FastLauncher.launch, fast_launch.FastLauncher._first = launch, first
        fwd_mod.pick_config = dx_mod.pick_config = every_candidate
        try:
            exercise(driver)
        finally:
            fast_launch.FastLauncher.launch, fast_launch.FastLauncher._first = real_launch, real_first
        check_fallbacks()
    from triton.runtime.jit import JITFunction

    left = [fn.fn.__name__ for fn in (fwd_mod._lora_linear_fwd_kernel, _scale_kernel)
            if type(fn) is JITFunction and len(fn.device_caches)]
    if left or any(launcher.entries for launcher in fast_launch._LAUNCHERS.values()):
        raise Mismatch(f"the fake GPU left caches behind: {left or 'the fast launchers'}")
    names = sorted(set(hits) | set(misses))
    for name in names:
        print(f"{name}: {hits[name]} launches from the fast path's cache, each the same as Triton's; "
              f"{misses[name]} through Triton")
    print("fallbacks: launch hooks (a chain, a plain function; None is no hook), a pre-run hook, LORAQ_FAST_LAUNCH "
          "unset, a tensor by keyword, a tuple argument and a full cache all go through Triton; True and 1 apart")
    missing = {"_int1_gemv_lut_kernel", "_sparse4x4_gemv_kernel", "_splitk_finish_kernel", "_lora_linear_fwd_kernel",
               "_lora_linear_dx_kernel", "_sparse4x4_gemv_dx_kernel", "_decode_slab_kernel"} - {n for n in names if hits[n]}
    if missing:
        raise Mismatch(f"never launched from the fast path's cache: {sorted(missing)}")
    return 0


@triton.jit
def _scale_kernel(x_ptr, y_ptr, n, s, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * s, mask=offs < n)


def check_fallbacks() -> None:
    """Where the fast path must step aside: each launch below must reach Triton's ``run``."""
    from triton import knobs
    from triton.runtime.jit import JITFunction

    seen = []
    real_run = JITFunction.run

    def run(self, *args, **kwargs):
        seen.append(self.fn.__name__)
        return real_run(self, *args, **kwargs)

    x, y = torch.randn(100), torch.empty(100)
    launcher = fast_launch.FastLauncher(_scale_kernel)
    JITFunction.run = run
    try:
        def through_triton(what, *args, launches=3, **kwargs):
            seen.clear()
            for _ in range(launches):
                launcher[(2,)](*(args or (x, y, 100, 2.0)), **kwargs)
            if len(seen) != launches:
                raise Mismatch(f"{what}: {launches - len(seen)} of {launches} launches skipped Triton")

        launcher.entries.clear()
        hook = lambda metadata: None  # noqa: E731
        knobs.runtime.launch_enter_hook.add(hook)
        try:
            through_triton("with a launch hook installed", BLOCK=64)
        finally:
            knobs.runtime.launch_enter_hook.remove(hook)
        chain = knobs.runtime.launch_enter_hook
        knobs.runtime.launch_enter_hook = hook  # a plain function in place of the chain
        try:
            through_triton("with a plain function as the launch hook", BLOCK=64)
        finally:
            knobs.runtime.launch_enter_hook = chain
        launcher.fn.pre_run_hooks.append(lambda *args, **kwargs: None)  # added after the kernel was kept
        try:
            through_triton("with a pre-run hook", BLOCK=64)
        finally:
            launcher.fn.pre_run_hooks.pop()
        knobs.runtime.launch_enter_hook = None  # no hook at all: Triton's launcher takes None too
        try:
            seen.clear()
            for _ in range(3):
                launcher[(2,)](x, y, 100, 2.0, BLOCK=64)
            if len(seen) != 0:
                raise Mismatch("with the launch hook set to None, a kept kernel went through Triton")
        finally:
            knobs.runtime.launch_enter_hook = chain
        seen.clear()
        launcher[(2,)](x, y, True, 2.0, BLOCK=64)  # a bool where an int was: Triton specializes it apart
        launcher[(2,)](x, y, 1, 2.0, BLOCK=64)
        if len(seen) != 2:
            raise Mismatch("True and 1 shared a kept kernel")
        through_triton("with a tuple argument", (x,), y, 100, 2.0, BLOCK=64)
        del os.environ["LORAQ_FAST_LAUNCH"]  # the default: off
        try:
            through_triton("without LORAQ_FAST_LAUNCH=1", BLOCK=64)
        finally:
            os.environ["LORAQ_FAST_LAUNCH"] = "1"
        launcher.entries.clear()
        seen.clear()
        for _ in range(3):
            launcher[(2,)](x, y, 100, 2.0, BLOCK=64)
        if len(seen) != 1:
            raise Mismatch(f"3 launches of one specialization reached Triton {len(seen)} times, not once")
        seen.clear()
        for _ in range(3):
            launcher[(2,)](x, y_ptr=y, n=100, s=2.0, BLOCK=64)
        if len(seen) != 3:
            raise Mismatch("a tensor given by keyword was launched from the cache")
        launcher.entries.clear()
        for n in range(fast_launch.MAX_ENTRIES + 1):  # a new key each: the cache resets when full
            launcher[(2,)](x, y, n, 2.0, BLOCK=64)
        if len(launcher.entries) != 1:
            raise Mismatch(f"{len(launcher.entries)} entries after the cache filled up, not 1")
    finally:
        JITFunction.run = real_run


def exercise(driver) -> None:
    """Every launcher's candidates on a few problems, each call twice (the second from the cache);
    the first shape again on another stream, then on another device."""
    g = torch.Generator().manual_seed(0)
    runs = [(fmt, shape, (0, 0)) for fmt in ("int1", "sparse4x4") for shape in ((40, 48), (33, 70))]
    runs += [(fmt, (40, 48), where) for fmt in ("int1", "sparse4x4") for where in ((0, 7), (1, 9))]
    for fmt, (N, K), (device, stream) in runs:
        driver.device, driver.stream = device, stream
        W = torch.randn(N, K, generator=g)
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            w = compress_weight(W, fmt).to(dtype)
            tensors, meta = w.tensors(), {"N": N, "K": K}
            if fmt == "int1":
                meta.update(group_size=w.group_size or None, scale_mode=w.scale_mode)
            for M in (1, 3, 16, 40):
                for lora, bias in ((True, True), (False, False)):
                    A = torch.randn(4, K, generator=g).to(dtype) if lora else None
                    B = torch.randn(N, 4, generator=g).to(dtype) if lora else None
                    b = torch.randn(N, generator=g).to(dtype) if bias else None
                    x = torch.randn(M, K, generator=g).to(dtype)
                    dy = torch.randn(M, N, generator=g).to(dtype)
                    dyB = dy @ B if lora else None
                    for _ in range(2):
                        fwd_mod.lora_linear_fwd(x, fmt, tensors, meta, A, B, 0.5, b)
                        dx_mod.lora_linear_dx(dy, fmt, tensors, meta, A, dyB, 0.5, lora_B=B)
                # an input whose address is not a multiple of 16 bytes: another specialization
                buf = torch.randn(M * K + 1, generator=g).to(dtype)
                odd = buf[1:].view(M, K)
                for _ in range(2):
                    fwd_mod.lora_linear_fwd(odd, fmt, tensors, meta)


if __name__ == "__main__":
    sys.exit(main())
