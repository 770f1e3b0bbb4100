"""The autotuner (``kernels/autotune.py``): which config a problem gets, how winners are cached
in memory and on disk, and what happens when configs fail, files are damaged or several
processes and threads tune at once. No GPU: the device is a ``torch.device("cuda")`` object that
nothing runs on, the GPU's name is faked, and ``run``/``bench`` are the tests' own."""

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from loraq.kernels import autotune

CUDA_DEV = torch.device("cuda")


def by_rank(order):
    """``(run, bench)``: ``bench`` times the config ``run`` last saw at its index in ``order``
    (earlier is faster; configs not in it, 100)."""
    seen = []

    def run(cfg):
        seen.append(cfg)

    def bench(fn):
        fn()
        return float(order.index(seen[-1])) if seen[-1] in order else 100.0

    return run, bench


def cache_entries(folder: Path) -> dict:
    files = list((folder / "autotune").glob("Fake_GPU_80GB-*.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text())



def test_autotune_caches_the_winner_on_disk_per_gpu(tmp_path, monkeypatch):
    """A second process (a cleared memory cache) reads the winner instead of timing again."""
    from loraq.kernels import autotune

    monkeypatch.setenv("LORAQ_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(autotune, "gpu_name", lambda device: "Fake GPU 80GB")
    monkeypatch.setattr(autotune, "_MEMORY", {})
    monkeypatch.setattr(autotune, "_PICKED", {})
    timed = []
    fastest = autotune.SMALL_M[3]

    def bench(fn):
        fn()
        return 1.0 if timed[-1] == fastest else 2.0

    def run(cfg):
        timed.append(cfg)

    dev = torch.device("cuda")
    assert autotune.pick_config("op", 3, 4096, 4096, torch.float16, dev, run, bench) == fastest
    retimed = [fastest, autotune.SMALL_M[0], autotune.SMALL_M[1]]  # the fastest three, timed again
    assert timed == autotune.SMALL_M + retimed
    files = list((tmp_path / "autotune").glob("Fake_GPU_80GB-triton*-v*.json"))
    assert len(files) == 1 and "op|M4|N4096|K4096|float16" in files[0].read_text()
    monkeypatch.setattr(autotune, "_MEMORY", {})  # a new process
    monkeypatch.setattr(autotune, "_PICKED", {})
    timed.clear()
    assert autotune.pick_config("op", 4, 4096, 4096, torch.float16, dev, run, bench) == fastest  # same M bucket
    assert timed == []
    # another bucket is tuned (and appended to the same file)
    autotune.pick_config("op", 300, 4096, 4096, torch.float16, dev, run, bench)
    assert timed == autotune.LARGE_M + autotune.LARGE_M[:3]
    assert "op|M512|" in files[0].read_text() and "op|M4|" in files[0].read_text()
    # a changed candidate list (here: extra GEMV configs) is tuned again, not read from the cache
    monkeypatch.setattr(autotune, "_MEMORY", {})
    monkeypatch.setattr(autotune, "_PICKED", {})
    timed.clear()
    extra = [(1, 256, 256, 4, 4, 1, autotune.LUT)]
    autotune.pick_config("op", 4, 4096, 4096, torch.float16, dev, run, bench, extra=extra)
    assert timed == autotune.SMALL_M + extra + retimed
    # extra may be a function: called when the answer is not in memory, never on a hit
    monkeypatch.setattr(autotune, "CHECK_HITS", False)  # which the tests' check of hits would
    monkeypatch.setattr(autotune, "_MEMORY", {})
    monkeypatch.setattr(autotune, "_PICKED", {})
    made = []
    assert autotune.pick_config("op", 4, 4096, 4096, torch.float16, dev, run, bench,
                                extra=lambda: made.append(1) or extra) == fastest
    assert autotune.pick_config("op", 4, 4096, 4096, torch.float16, dev, run, bench,
                                extra=lambda: made.append(1) or extra) == fastest
    assert made == [1]


def test_autotune_times_the_fastest_again_and_skips_configs_that_fail():
    """One slow timing of the best config (a clock dip) is corrected by its second timing; a
    config that raises (more shared memory than the GPU has) is left out."""
    from loraq.kernels.autotune import RETIME_TOP, time_candidates

    first = {"a": 3.0, "b": 1.0, "c": 2.0, "d": 9.0}
    second = {"a": 0.5, "b": 1.1, "c": 2.5}
    seen = []

    def bench(fn):
        name = fn()
        seen.append(name)
        return (first if seen.count(name) == 1 else second)[name]

    def run(name):
        if name == "x":
            raise RuntimeError("out of resources: shared memory")
        return name

    timings = time_candidates(["a", "b", "x", "c", "d"], run, bench)
    assert RETIME_TOP == 3 and seen == ["a", "b", "c", "d", "b", "c", "a"]
    assert timings == {"a": 0.5, "b": 1.0, "c": 2.0, "d": 9.0}
    assert min(timings, key=timings.get) == "a"


def test_candidates_are_timed_under_a_cuda_graph_and_eagerly_only_if_capture_fails(monkeypatch):
    """gpu_time takes the CUDA-graph time (the GPU's alone: eager timing of a small problem is the
    launcher's Python), and falls back to do_bench, host time included, when capture raises; a
    call that fails in both ways still raises, so time_candidates leaves the config out."""
    import triton.testing

    from loraq.kernels.autotune import gpu_time, time_candidates

    used = []

    def graph(fn, rep, return_mode):
        used.append(("graph", rep, return_mode))
        if fn() == "uncapturable":
            raise RuntimeError("operation not permitted when stream is capturing")
        return 0.010

    def eager(fn, warmup, rep, return_mode):
        used.append(("eager", rep, return_mode))
        fn()
        return 0.150

    def run(config):
        if config == "broken":
            raise RuntimeError("out of resources: shared memory")
        return config

    monkeypatch.setattr(triton.testing, "do_bench_cudagraph", graph)
    monkeypatch.setattr(triton.testing, "do_bench", eager)
    assert gpu_time(lambda: "fine") == 0.010 and used == [("graph", 20, "median")]
    used.clear()
    assert gpu_time(lambda: "uncapturable") == 0.150
    assert used == [("graph", 20, "median"), ("eager", 20, "median")]
    timings = time_candidates(["fine", "broken", "uncapturable"], run, gpu_time)
    assert timings == {"fine": 0.010, "uncapturable": 0.150}


def test_autotune_off_the_gpu_uses_the_first_config_untimed():
    from loraq.kernels import autotune

    def never(_):
        raise AssertionError("timed off the GPU")

    assert autotune.pick_config("op", 1, 8, 8, torch.float16, torch.device("cpu"), never) == autotune.SMALL_M[0]
    assert autotune.pick_config("op", 99, 8, 8, torch.float16, torch.device("cpu"), never) == autotune.MID_M[0]
    assert autotune.pick_config("op", 300, 8, 8, torch.float16, torch.device("cpu"), never) == autotune.LARGE_M[0]
    assert [autotune.m_bucket(m) for m in (1, 2, 3, 16, 17, 4096, 9000)] == [1, 2, 4, 16, 32, 4096, 4096]


def test_picked_reports_the_chosen_kernel(monkeypatch):
    """A benchmark reads which config (and kernel) the autotuner chose for an op and problem."""
    from loraq.kernels import autotune

    monkeypatch.setattr(autotune, "_PICKED", {
        ("lora_linear_fwd:int1:0:1:lut", 1, 4096, 4096, torch.float16, 0): (1, 256, 256, 4, 4, 1, autotune.LUT),
        ("lora_linear_fwd:int1:0:1", 16, 4096, 4096, torch.float16, 0): (16, 128, 128, 4, 4, 3, 1),
        ("lora_linear_dx:int1:0:1", 1, 4096, 4096, torch.float16, 0): (16, 64, 256, 4, 4, 3, 0)})
    got = autotune.picked("lora_linear_fwd:int1:", 1, 4096, 4096, torch.float16)
    assert got == [("lora_linear_fwd:int1:0:1:lut", (1, 256, 256, 4, 4, 1, autotune.LUT))]
    assert autotune.describe(got[0][1]) == "lookup GEMV (1, 256, 256, 4, 4, 1, 2)"
    assert autotune.describe((16, 128, 128, 4, 4, 3, 1)) == "tiled, swapped (16, 128, 128, 4, 4, 3, 1)"
    assert autotune.picked("lora_linear_fwd:int1:", 9, 4096, 4096, torch.float16)[0][1][0] == 16  # bucket 16
    assert autotune.picked("lora_linear_fwd:sparse4x4:", 1, 4096, 4096, torch.float16) == []


def test_in_memory_answers_are_keyed_by_the_variant(fake_gpu, monkeypatch):
    """Two calls that differ only in what their extra candidates depend on (``variant``: the
    rank, the bias, a setting) get their own tuning; with ``CHECK_HITS`` a remembered answer that
    is not among the call's candidates is an error (a caller's variant missing a dependency)."""
    slab_a, slab_b = (32, 256, 512, 1, 4, 1, autotune.DENSE_SLAB), (32, 256, 1024, 1, 4, 1, autotune.DENSE_SLAB)
    run, bench = by_rank([slab_a, slab_b])
    pick = lambda extra, variant: autotune.pick_config("op", 64, 256, 256, torch.float16, CUDA_DEV, run, bench,  # noqa: E731
                                                       extra=extra, variant=variant)
    assert pick([slab_a], (5, 128)) == slab_a
    assert pick([slab_b], (6, 128)) == slab_b  # another variant: tuned on its own list
    assert pick(lambda: [], (0, 0)) == autotune.MID_M[0]  # the slabs turned off
    assert pick([slab_a], (5, 128)) == slab_a  # each remembered
    monkeypatch.setattr(autotune, "CHECK_HITS", True)
    assert pick([slab_a], (5, 128)) == slab_a
    with pytest.raises(AssertionError, match="not among this call's candidates"):
        pick([slab_b], (5, 128))


@pytest.mark.parametrize("launcher_name", ["lora_linear_fwd", "lora_linear_dx"])
def test_the_launchers_variants_determine_their_candidates(launcher_name, monkeypatch):
    """Whatever a launcher's candidate list depends on is in its tuning key: any two calls with the
    same op, batch bucket, N, K, dtype and variant pass the same candidates (formats, batch sizes,
    dtypes, ranks, bias, ``lora_B``, the dense-slab cap and the CUDA GEMVs' setting)."""
    import importlib

    module = importlib.import_module(f"loraq.kernels.{launcher_name}")
    launcher = getattr(module, launcher_name)
    from test_triton_kernels import _kernel_args
    from weights import make_weight

    class Recorded(Exception):
        pass

    seen = {}

    def record(op, M, N, K, dtype, device, run, bench=None, extra=None, variant=(), check=None):
        candidates = autotune.configs_for(M) + list((extra() if callable(extra) else extra) or [])
        key = (op, autotune.m_bucket(M), N, K, dtype, variant)
        assert seen.setdefault(key, candidates) == candidates, f"{key}: two candidate lists"
        raise Recorded  # nothing to run: only the question asked

    monkeypatch.setattr(module, "pick_config", record)
    if launcher_name == "lora_linear_fwd":  # the CUDA GEMVs as on a GPU with loraq._C (fp16; int1 groups of 32s)
        def usable(x, meta=None):
            ok = x.dtype == torch.float16 and not (meta and meta.get("group_size") and meta["group_size"] % 32)
            return ok, "" if ok else "not here"

        monkeypatch.setattr(module, "mma_gemv_status", usable)
        monkeypatch.setattr(module, "sparse_cuda_status", usable)
    N, K = 2048, 1024  # large enough for the slabs' sizes to depend on the rank and the cap (nothing runs)
    W = torch.randn(N, K)
    calls = 0
    for fmt in ("int1", "int1_g8", "int1_g16", "int1_g32", "int1_onebit", "sparse4x4"):
        for dtype in (torch.float16, torch.float32):
            w = make_weight(fmt, W).to(dtype)
            tensors, meta = _kernel_args(w)
            A, B, b = torch.randn(40, K, dtype=dtype), torch.randn(N, 40, dtype=dtype), torch.randn(N, dtype=dtype)
            for M in (1, 3, 5, 16, 33, 64, 300):
                x = dy = torch.randn(M, max(N, K), dtype=dtype)
                for r in (0, 4, 40):
                    lora = (A[:r], B[:, :r]) if r else (None, None)
                    for bias in (False, True):
                        for cap in ("128", "1", "0"):
                            for gemv in ("0", "1"):
                                monkeypatch.setenv("LORAQ_DENSE_SLAB_MIB", cap)
                                monkeypatch.setenv("LORAQ_CUDA_GEMV", gemv)
                                with pytest.raises(Recorded):
                                    if launcher_name == "lora_linear_fwd":
                                        launcher(x[:, :K], fmt.split("_")[0], tensors, meta, *lora, 0.5,
                                                 b if bias else None)
                                    else:  # bias stands for passing lora_B (the merged slab)
                                        dyb = dy[:, :N] @ lora[1] if r else None
                                        launcher(dy[:, :N], fmt.split("_")[0], tensors, meta, lora[0], dyb, 0.5,
                                                 lora_B=lora[1] if r and bias else None)
                                calls += 1
    assert calls == 6 * 2 * 7 * 3 * 2 * 3 * 2
    assert len(seen) > 100  # distinct questions: the loop really varied them


@pytest.mark.parametrize("content", [b"[]", b"null", b'{"k": 5}', b'{"k": [1, 2]}', b'{"op|M1', b"\x00\xff\xfe",
                                     b'{"k": [1, 2, 3, 4, 5, 6, "7"]}'])
def test_a_damaged_cache_file_is_ignored_and_rewritten(fake_gpu, content):
    path = autotune.cache_file(CUDA_DEV)
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    run, bench = by_rank([autotune.SMALL_M[2]])
    with pytest.warns(RuntimeWarning, match=r"cache file .*Fake_GPU_80GB.* tuned again") as warned:
        got = autotune.pick_config("op", 1, 64, 64, torch.float16, CUDA_DEV, run, bench)
        assert got == autotune.SMALL_M[2]
        path.write_bytes(content)  # damaged again (by hand): the warning is not repeated
        autotune._MEMORY.clear()
        autotune.pick_config("op", 1, 65, 64, torch.float16, CUDA_DEV, run, bench)
    assert len(warned) == 1
    entries = cache_entries(fake_gpu)
    assert list(entries.values()) == [list(autotune.SMALL_M[2])]


def test_a_cached_answer_that_is_not_a_candidate_is_tuned_again(fake_gpu):
    run, bench = by_rank([autotune.SMALL_M[1]])
    autotune.pick_config("op", 1, 64, 64, torch.float16, CUDA_DEV, run, bench)
    path = autotune.cache_file(CUDA_DEV)
    (key,) = json.loads(path.read_text())
    path.write_text(json.dumps({key: [9, 9, 9, 9, 9, 9, 9]}))  # edited by hand, or an old layout
    autotune._MEMORY.clear()
    autotune._PICKED.clear()
    assert autotune.pick_config("op", 1, 64, 64, torch.float16, CUDA_DEV, run, bench) == autotune.SMALL_M[1]
    assert json.loads(path.read_text()) == {key: list(autotune.SMALL_M[1])}


def test_an_unwritable_cache_folder_warns_once_and_tuning_goes_on(fake_gpu, monkeypatch):
    """A LORAQ_CACHE_DIR that cannot be written (here a file, as a read-only folder would be for
    root): the winners stay in memory, and the user is told once why every process tunes again."""
    blocker = fake_gpu / "not_a_folder"
    blocker.write_text("")
    monkeypatch.setenv("LORAQ_CACHE_DIR", str(blocker))
    run, bench = by_rank([autotune.SMALL_M[3]])
    match = r"cannot write the cache file .*not_a_folder.*LORAQ_CACHE_DIR"
    with pytest.warns(RuntimeWarning, match=match) as warned:
        for n in (64, 65, 66):
            got = autotune.pick_config("op", 1, n, 64, torch.float16, CUDA_DEV, run, bench)
            assert got == autotune.SMALL_M[3]
    assert len(warned) == 1


def test_a_cache_folder_with_a_tilde_or_a_relative_path(fake_gpu, monkeypatch):
    """``~`` that no shell expanded (a .env file, Docker's ENV) is the home folder, not a folder
    named ``~`` in the working directory; a relative folder is made absolute."""
    home, cwd = fake_gpu / "home", fake_gpu / "cwd"
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("LORAQ_CACHE_DIR", "~/cache")
    assert autotune.cache_file(CUDA_DEV).parent == home / "cache" / "autotune"
    run, bench = by_rank([])
    autotune.pick_config("op", 1, 64, 64, torch.float16, CUDA_DEV, run, bench)
    assert list((home / "cache" / "autotune").glob("*.json")) and list(cwd.iterdir()) == []
    monkeypatch.setenv("LORAQ_CACHE_DIR", "rel")
    assert autotune.cache_file(CUDA_DEV).parent == cwd / "rel" / "autotune"


def test_an_unknown_verbose_value_is_warned_about(fake_gpu, monkeypatch, capsys):
    monkeypatch.setattr("loraq.kernels.env._WARNED", set())
    monkeypatch.setenv("LORAQ_AUTOTUNE_VERBOSE", "yes")
    run, bench = by_rank([])
    match = r"LORAQ_AUTOTUNE_VERBOSE='yes' is not understood: set LORAQ_AUTOTUNE_VERBOSE=1"
    with pytest.warns(RuntimeWarning, match=match):
        autotune.pick_config("op", 1, 64, 64, torch.float16, CUDA_DEV, run, bench)
    assert capsys.readouterr().out == ""


def test_without_a_home_directory_the_cache_folder_or_memory_is_used(fake_gpu, monkeypatch):
    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    assert autotune.cache_file(CUDA_DEV).parent == fake_gpu / "autotune"  # LORAQ_CACHE_DIR set
    for unset in ("", None):  # empty counts as unset
        if unset is None:
            monkeypatch.delenv("LORAQ_CACHE_DIR")
        else:
            monkeypatch.setenv("LORAQ_CACHE_DIR", unset)
        assert autotune.cache_file(CUDA_DEV) is None
        run, bench = by_rank([autotune.SMALL_M[4]])
        autotune._PICKED.clear()
        assert autotune.pick_config("op", 1, 64, 64, torch.float16, CUDA_DEV, run, bench) == autotune.SMALL_M[4]
    assert not (fake_gpu / "autotune").exists()


@pytest.mark.parametrize("failing", ["flock", "open"])
def test_without_file_locks_the_winners_are_written_unlocked(fake_gpu, monkeypatch, failing):
    """A file system without locks (NFS without lockd) or a lock file that cannot be opened
    (another user's): the file is still written, as it was before locking."""
    import builtins
    import errno

    import fcntl

    if failing == "flock":
        def no_lock(f, op):
            raise OSError(errno.ENOLCK, "No locks available")

        monkeypatch.setattr(fcntl, "flock", no_lock)
    else:
        real_open = builtins.open

        def no_lock_file(name, *args, **kwargs):
            if str(name).endswith(".lock"):
                raise PermissionError(errno.EACCES, "Permission denied", str(name))
            return real_open(name, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", no_lock_file)
    run, bench = by_rank([autotune.SMALL_M[5]])
    assert autotune.pick_config("op", 1, 64, 64, torch.float16, CUDA_DEV, run, bench) == autotune.SMALL_M[5]
    assert list(cache_entries(fake_gpu).values()) == [list(autotune.SMALL_M[5])]


def test_another_users_lock_file_still_locks(fake_gpu, monkeypatch):
    """A shared cache folder: the lock file another user created (0644) cannot be opened for
    writing, but flock needs only a read handle, so the merge is still locked."""
    import builtins
    import errno

    import fcntl

    real_open, real_flock, locked = builtins.open, fcntl.flock, []

    def not_ours(name, mode="r", *args, **kwargs):
        if str(name).endswith(".lock") and mode != "r":
            raise PermissionError(errno.EACCES, "Permission denied", str(name))
        return real_open(name, mode, *args, **kwargs)

    path = autotune.cache_file(CUDA_DEV)
    path.parent.mkdir(parents=True)
    Path(f"{path}.lock").touch()
    monkeypatch.setattr(builtins, "open", not_ours)
    monkeypatch.setattr(fcntl, "flock", lambda f, op: locked.append((f.mode, op)) or real_flock(f, op))
    run, bench = by_rank([autotune.SMALL_M[6]])
    assert autotune.pick_config("op", 1, 64, 64, torch.float16, CUDA_DEV, run, bench) == autotune.SMALL_M[6]
    assert locked == [("r", fcntl.LOCK_EX), ("r", fcntl.LOCK_UN)]
    assert list(cache_entries(fake_gpu).values()) == [list(autotune.SMALL_M[6])]


def test_the_cache_file_is_readable_by_the_other_users_of_its_folder(fake_gpu):
    run, bench = by_rank([])
    autotune.pick_config("op", 1, 64, 64, torch.float16, CUDA_DEV, run, bench)
    assert autotune.cache_file(CUDA_DEV).stat().st_mode & 0o777 == 0o644
    assert [p.name for p in (fake_gpu / "autotune").iterdir() if p.suffix == ".tmp"] == []


WRITER = """
import sys, torch
from loraq.kernels import autotune
autotune.gpu_name = lambda device: "Fake GPU 80GB"
tag, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    autotune.pick_config(tag, 1, 64 + i, 64, torch.float16, torch.device("cuda"), lambda c: None, lambda fn: 1.0)
"""


def test_processes_tuning_at_once_keep_each_others_winners(fake_gpu):
    """Each process merges its winners into the file under a lock: none is lost."""
    env = {**os.environ, "LORAQ_CACHE_DIR": str(fake_gpu)}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, tag, "150"], env=env, stderr=subprocess.PIPE, text=True)
             for tag in ("a", "b")]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()[-2000:]
    entries = cache_entries(fake_gpu)
    assert sum(k.startswith("a|") for k in entries) == 150 and sum(k.startswith("b|") for k in entries) == 150


def test_threads_tuning_at_once_tune_each_shape_once(fake_gpu):
    runs, errors = [], []

    def worker(tag):
        try:
            for i in range(60):
                autotune.pick_config(f"{tag}", 1, 64 + i % 20, 64, torch.float16, CUDA_DEV,
                                     lambda c: runs.append((tag, i % 20)), lambda fn: (fn(), 1.0)[1])
        except Exception as e:  # reported below
            errors.append(repr(e))

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=worker, args=(t,)) for t in ("a", "a", "b", "b")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(switch)
    assert errors == []
    per_tuning = len(autotune.SMALL_M) + autotune.RETIME_TOP
    assert len(runs) == 2 * 20 * per_tuning  # two ops x 20 shapes, each tuned once
    assert len(cache_entries(fake_gpu)) == 40


def test_when_no_config_runs_the_error_says_why(fake_gpu):
    def broken(cfg):
        raise TypeError(f"launcher bug in {cfg[1]}")

    with pytest.raises(RuntimeError, match=r"no kernel config of op runs .*9 failed.*TypeError: launcher bug") as info:
        autotune.pick_config("op", 1, 64, 64, torch.float16, CUDA_DEV, broken, lambda fn: (fn(), 1.0)[1])
    assert isinstance(info.value.__cause__, TypeError)
    assert not autotune.cache_file(CUDA_DEV).exists()  # nothing cached: the next call tries again


def test_a_config_that_fails_when_timed_again_is_dropped(fake_gpu, capsys, monkeypatch, caplog):
    """Tuning is logged (``loraq.autotune``, INFO) and, with ``LORAQ_AUTOTUNE_VERBOSE=1``, every
    candidate's time and every failure is printed."""
    history = []
    first, second = autotune.SMALL_M[0], autotune.SMALL_M[1]

    def run(cfg):
        history.append(cfg)
        if cfg == first and history.count(cfg) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (second timing)")
        if cfg == autotune.SMALL_M[8]:
            raise RuntimeError("out of resources: shared memory")

    monkeypatch.setenv("LORAQ_AUTOTUNE_VERBOSE", "1")
    order = autotune.SMALL_M
    with caplog.at_level("INFO", logger="loraq.autotune"):
        got = autotune.pick_config("op", 1, 64, 64, torch.float16, CUDA_DEV, run,
                                   lambda fn: (fn(), float(order.index(history[-1])))[1])
    assert got == second
    out = capsys.readouterr().out
    assert "OutOfMemoryError" in out and "out of resources: shared memory" in out
    assert "timing 9 configs of op (M=1, N=64, K=64" in caplog.text



def test_a_long_tuning_shows_a_progress_bar_on_a_terminal(monkeypatch):
    """Only with a label, on a terminal (tqdm's ``disable=None``) and after two seconds."""
    import tqdm.auto

    made = []
    monkeypatch.setattr(tqdm.auto, "tqdm", lambda items, **kw: made.append(kw) or iter(items))
    items = list(autotune.SMALL_M)
    assert autotune._progress(items, None) is items and made == []
    assert list(autotune._progress(items, "loraq autotune op")) == items
    assert made == [{"desc": "loraq autotune op", "delay": 2.0, "leave": False, "disable": None, "unit": "config"}]


def test_a_config_wrong_on_the_gpu_is_never_offered_to_its_kernel(fake_gpu):
    """The sparse4x4 dX tile that computed wrong answers on an H100 is not timed (nor picked when
    it would be fastest) for that kernel; other kernels still get it."""
    (bad,) = autotune.WRONG_ON_GPU["lora_linear_dx:sparse4x4"]
    assert bad in autotune.configs_for(256)
    run, bench = by_rank([bad])  # it would win
    timed = []

    def recorded(cfg):
        timed.append(cfg)
        run(cfg)

    got = autotune.pick_config("lora_linear_dx:sparse4x4:0:0", 256, 4096, 14336, torch.float16, CUDA_DEV, recorded,
                               bench)
    assert got != bad and timed and bad not in timed
    run, bench = by_rank([bad])
    assert autotune.pick_config("lora_linear_dx:int1:0:0", 256, 4096, 14336, torch.float16, CUDA_DEV, run,
                                bench) == bad
    assert autotune.wrong_on_gpu("lora_linear_fwd:sparse4x4:0:0") == ()


def test_a_problem_first_met_inside_a_cuda_graph_capture_is_not_tuned(fake_gpu, monkeypatch, caplog):
    """While the stream captures a CUDA graph nothing is run, timed or stored: the first candidate
    comes back with one warning per problem; a winner already on disk is used; once the capture is
    over the same problem is tuned as usual."""
    capturing = [True]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    fastest = autotune.SMALL_M[4]
    run, bench = by_rank([fastest])
    calls = []

    def recorded(cfg):
        calls.append(cfg)
        run(cfg)

    args = ("lora_linear_fwd:int1:1:1", 3, 4096, 4096, torch.float16, CUDA_DEV, recorded, bench)
    extra = [(1, 512, 256, 4, 4, 1, autotune.LUT)]
    with pytest.warns(RuntimeWarning, match="while a CUDA graph was being captured") as caught:
        got = autotune.pick_config(*args, extra=extra)
        assert autotune.pick_config(*args, extra=extra) == got  # a second call: no second warning
    assert len(caught) == 1 and "M=3, N=4096, K=4096, float16" in str(caught[0].message)
    assert got == autotune.configs_for(3)[0] and calls == []
    assert not (fake_gpu / "autotune").exists() or not list((fake_gpu / "autotune").glob("*.json"))
    assert autotune._PICKED == {}

    capturing[0] = False  # after the capture: tuned, stored on disk
    assert autotune.pick_config(*args, extra=extra) == fastest and calls
    assert len(cache_entries(fake_gpu)) == 1

    autotune._PICKED.clear()  # another process: inside a capture the disk's winner is used, untimed
    capturing[0] = True
    calls.clear()
    assert autotune.pick_config(*args, extra=extra) == fastest and calls == []


def test_the_capture_check_is_false_without_a_cuda_runtime(monkeypatch):
    """A torch whose CUDA query raises (no driver) counts as not capturing."""
    def broken():
        raise RuntimeError("no CUDA driver")

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", broken)
    assert autotune.capturing() is False
