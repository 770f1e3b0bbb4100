"""The kernel benchmark harness runs on a CPU (reference and interpreter providers, tiny shapes);
the other libraries' providers pack exactly our weights."""

import csv
import re
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))  # bench/baselines.py


def test_bench_kernels_writes_csv_and_plot(tmp_path):
    pytest.importorskip("triton")
    csv_path, png = tmp_path / "bench.csv", tmp_path / "bench.png"
    out = subprocess.run(
        [sys.executable, "bench/bench_kernels.py", "--shapes", "40x24", "--batches", "1,3", "--formats",
         "int1,sparse4x4", "--providers", "cublas,cublas_lora,naive,triton", "--reps", "2", "--backward",
         "--csv", str(csv_path), "--plot", str(png), "--markdown", str(tmp_path / "bench.md")],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "measured copy bandwidth" in out.stdout
    rows = list(csv.DictReader(csv_path.open()))
    # 2 formats x 2 batches x (4 forward providers + 3 backward ones: no unfused-LoRA dX)
    assert len(rows) == 2 * 2 * (4 + 3)
    for r in rows:
        assert r["K"] == "40" and r["N"] == "24" and int(r["bytes"]) > 0
        if r["provider"] in ("cublas", "naive"):
            assert float(r["median_us"]) > 0 and float(r["GBps"]) >= 0
    triton_rows = [r for r in rows if r["provider"] == "triton"]
    assert triton_rows and all("interpreter" in r["note"] for r in triton_rows)
    assert png.stat().st_size > 1000
    report = (tmp_path / "bench.md").read_text()
    # a CPU run measures none of the GPU targets, and says so
    assert "int1 + LoRA, M=1, 8192→28672 ≤ 15 µs | not measured" in report
    assert "| sparse4x4 4096→14336 backward_dx, M=4096 ≤ 1.25x cuBLAS | not measured |" in report
    assert "| forward | int1 | 40→24 | 1 | cublas |" in report
    # the plot can be redrawn from the CSV alone (a GPU run's table, on any machine)
    png.unlink()
    again = subprocess.run([sys.executable, "bench/bench_kernels.py", "--from-csv", str(csv_path), "--plot", str(png)],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert png.stat().st_size > 1000 and "measured copy bandwidth" not in again.stdout
    no_plot = subprocess.run([sys.executable, "bench/bench_kernels.py", "--from-csv", str(csv_path)],
                             cwd=REPO, capture_output=True, text=True, timeout=120)
    assert no_plot.returncode == 2 and "--plot" in no_plot.stderr
    # two runs merged: the later one's rows replace the earlier one's for the same op, format, shape and M
    later = tmp_path / "later.csv"
    changed = [dict(r, median_us="1.5", graph_us="") if (r["M"], r["op"]) == ("1", "forward") else r
               for r in rows if r["M"] == "1" and r["format"] == "int1"]
    with later.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(changed)
    merged_md = tmp_path / "merged.md"
    merged = subprocess.run([sys.executable, "bench/bench_kernels.py", "--from-csv", f"{csv_path},{later}", "--csv",
                             str(tmp_path / "merged.csv"), "--markdown", str(merged_md)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert merged.returncode == 0, merged.stderr
    merged_rows = list(csv.DictReader((tmp_path / "merged.csv").open()))
    assert len(merged_rows) == len(rows)
    fwd_int1_m1 = [r for r in merged_rows if (r["M"], r["op"], r["format"]) == ("1", "forward", "int1")]
    assert fwd_int1_m1 and all(r["median_us"] == "1.5" and r["graph_us"] == "" for r in fwd_int1_m1)
    text = merged_md.read_text()
    assert f"{later} (2 groups of op, format, shape and M)" in text and "| forward | int1 | 40→24 | 1 | cublas | 1.5 |" in text
    # the printed log alone rebuilds the same rows (a run killed before it wrote its files)
    log = tmp_path / "bench.txt"
    log.write_text(out.stdout)
    rebuilt_csv = tmp_path / "rebuilt.csv"
    again = subprocess.run([sys.executable, "bench/bench_kernels.py", "--from-log", str(log), "--csv", str(rebuilt_csv),
                            "--markdown", str(tmp_path / "rebuilt.md")], cwd=REPO, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr
    rebuilt = list(csv.DictReader(rebuilt_csv.open()))
    assert len(rebuilt) == len(rows)
    for a, b in zip(rows, rebuilt):
        for k in ("device", "op", "format", "K", "N", "M", "rank", "dtype", "provider", "bytes", "note"):
            assert a[k] == b[k], (k, a, b)
        assert abs(float(a["median_us"]) - float(b["median_us"])) <= 0.05 + 1e-9
    assert "rebuilt from the printed log" in (tmp_path / "rebuilt.md").read_text()


def test_bench_kernels_times_dx_with_the_lora_term(tmp_path):
    """``--backward-lora``: ``dY·Ŵ + s·(dY·B)·A`` for each provider, the Triton one checked against
    the reference before it is timed (it would be refused, not timed, if it disagreed)."""
    pytest.importorskip("triton")
    csv_path = tmp_path / "dx.csv"
    out = subprocess.run(
        [sys.executable, "bench/bench_kernels.py", "--shapes", "40x24", "--batches", "3", "--formats", "int1",
         "--providers", "cublas,cublas_lora,naive,triton", "--reps", "2", "--backward-lora", "--csv", str(csv_path)],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    rows = [r for r in csv.DictReader(csv_path.open()) if r["op"] == "backward_dx_lora"]
    assert [r["provider"] for r in rows] == ["cublas", "cublas_lora", "naive", "triton"]
    assert all(float(r["median_us"]) > 0 for r in rows)
    triton_row = rows[-1]
    assert "REFUSED" not in triton_row["note"] and "interpreter" in triton_row["note"]
    # the packed weight, A, B, dY and dX: what the dequantize-then-matmul row moves too, and more than
    # cuBLAS's dense dY·W less its dense weight
    assert int(triton_row["bytes"]) == int(rows[2]["bytes"]) > int(rows[0]["bytes"]) - 24 * 40 * 2
    # the LoRA term reads A [16, 40] and the given dY·B [3, 16] (fp16), not B
    assert int(rows[1]["bytes"]) - int(rows[0]["bytes"]) == 2 * (16 * 40 + 3 * 16)


def test_bench_kernels_from_log_refuses_a_log_without_rows(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("device cpu; nothing else\n")
    out = subprocess.run([sys.executable, "bench/bench_kernels.py", "--from-log", str(empty), "--csv",
                          str(tmp_path / "x.csv")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "no benchmark rows" in out.stderr and not (tmp_path / "x.csv").exists()
    needs_output = subprocess.run([sys.executable, "bench/bench_kernels.py", "--from-log", str(empty)], cwd=REPO,
                                  capture_output=True, text=True, timeout=120)
    assert needs_output.returncode == 2 and "--from-log needs" in needs_output.stderr


def test_bench_kernels_rejects_bad_shapes():
    out = subprocess.run([sys.executable, "bench/bench_kernels.py", "--shapes", "40by24"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "KxN" in out.stderr


def test_targets_report_met_missed_and_not_measured():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import bench_kernels as bk
    finally:
        sys.path.pop(0)

    def row(fmt, K, N, M, provider, us, op="forward", device="NVIDIA H100", dtype="fp16", rank=16):
        return {"device": device, "op": op, "format": fmt, "K": K, "N": N, "M": M, "provider": provider,
                "median_us": us, "graph_us": None, "dtype": dtype, "rank": rank}

    rows = [row("int1", 8192, 28672, 1, "triton", 12.0), row("int1", 8192, 28672, 16, "triton", 30.0),
            row("int1", 4096, 4096, 1, "triton", 9.0),
            row("int1", 4096, 4096, 4096, "triton", 500.0), row("int1", 4096, 4096, 4096, "cublas", 450.0),
            row("int1", 4096, 4096, 4096, "triton", 600.0, op="backward_dx_lora"),
            row("int1", 4096, 4096, 4096, "cublas", 400.0, op="backward_dx_lora"),
            row("sparse4x4", 8192, 28672, 1, "triton", 1.0, device="cpu")]  # interpreter rows never count
    got = dict(bk.targets(rows))
    assert got["int1 + LoRA, M=1, 8192→28672 ≤ 15 µs"] == "12.0 µs: met"
    assert got["int1 + LoRA, M=1, 4096² ≤ 6 µs"] == "9.0 µs: missed by 1.50x"
    assert got["sparse4x4 + LoRA, M=1, 8192→28672 ≤ 20 µs"] == "not measured"
    assert got["int1 8192→28672: M=16 ≤ 1.5x M=1 (12.0 µs)"] == "30.0 µs: missed by 1.67x"
    assert got["int1 4096→4096 forward, M=4096 ≤ 1.25x cuBLAS (450.0 µs)"] == "500.0 µs: met"
    assert got["int1 4096→4096 backward_dx_lora, M=4096 ≤ 1.25x cuBLAS (400.0 µs)"] == "600.0 µs: missed by 1.20x"
    # the targets are fp16, rank 16: a bf16 or rank-64 run is not judged against them
    for other in (dict(dtype="bf16"), dict(rank=64)):
        got = dict(bk.targets([row("sparse4x4", 8192, 28672, 1, "triton", 10.0, **other)]))
        assert got["sparse4x4 + LoRA, M=1, 8192→28672 ≤ 20 µs"] == "not measured"


BAD_OPTIONS = [(["--formats", "int1,int4"], ["'int4'", "dense, int1, sparse4x4"]),
               (["--shapes", "0x37"], ["'0x37'", "at least 1"]),
               (["--batches", "0"], ["--batches", "'0'"]),
               (["--batches", "-1"], ["--batches", "'-1'"]),
               (["--reps", "0"], ["--reps", "'0'"]),
               (["--device", "cuda"], ["--device cuda", "no CUDA GPU", "cpu or auto"]),
               (["--providers", "triton,foo"], ["'foo'", "cublas, cublas_lora, naive, triton"]),
               # a repeat timed the same problem twice and listed it twice in the report
               (["--shapes", "40x24,8x8,40x24"], ["--shapes repeats 40x24"]),
               (["--batches", "1,3,1"], ["--batches repeats 1"]),
               (["--formats", "int1,int1"], ["--formats repeats int1"]),
               (["--providers", "triton,cublas,triton"], ["--providers repeats triton"]),
               # an empty --from-csv "$UNSET" started a whole measuring run; both inputs, one was ignored
               (["--from-csv", ""], ["--from-csv ''", "CSV files"]),
               (["--from-log", ""], ["--from-log ''"]),
               (["--from-csv", "a.csv", "--from-log", "b.txt"], ["--from-csv and --from-log"])]


@pytest.mark.parametrize("bad, says", BAD_OPTIONS, ids=[" ".join(bad) for bad, _ in BAD_OPTIONS])
def test_bench_kernels_refuses_bad_options_before_it_measures_or_writes(bad, says, tmp_path, monkeypatch, capsys):
    """Each bad option is one argparse error (exit 2) naming the value and what is valid, before
    the copy bandwidth is measured and before any file is written."""
    import bench_kernels as bk

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # --device cuda on any machine
    monkeypatch.setattr(bk, "copy_bandwidth", lambda *_: pytest.fail("measured before the options were checked"))
    files = ["--csv", str(tmp_path / "b.csv"), "--markdown", str(tmp_path / "b.md"), "--plot", str(tmp_path / "b.png")]
    with pytest.raises(SystemExit) as e:
        bk.main(bad + files)
    err = capsys.readouterr().err
    assert e.value.code == 2 and all(s in err.splitlines()[-1] for s in says), err
    assert list(tmp_path.iterdir()) == []


def test_bench_kernels_run_stopped_by_an_error_keeps_its_rows_and_fails_with_none(tmp_path, monkeypatch, capsys):
    """An error in the middle of a run (the machine's, hours in) ends it with the partial report
    (exit 0); one before the first row writes nothing and exits 1."""
    import signal

    import bench_kernels as bk

    monkeypatch.setattr(bk, "copy_bandwidth", lambda *_: 1e9)
    real, calls = bk.providers_for, []

    def fails_after(n):
        def providers_for(*a):
            calls.append(a)
            if len(calls) > n:
                raise RuntimeError("CUDA out of memory")
            return real(*a)
        return providers_for

    argv = ["--shapes", "40x24", "--batches", "1,3", "--formats", "int1", "--providers", "cublas,naive", "--reps", "1",
            "--device", "cpu", "--csv", str(tmp_path / "b.csv"), "--markdown", str(tmp_path / "b.md")]
    sigterm = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(bk, "providers_for", fails_after(0))
    assert bk.main(argv) == 1
    out = capsys.readouterr()
    assert "STOPPED by RuntimeError: CUDA out of memory after 0 rows" in out.out and "no row was measured" in out.err
    assert list(tmp_path.iterdir()) == [] and signal.getsignal(signal.SIGTERM) == sigterm
    calls.clear()
    monkeypatch.setattr(bk, "providers_for", fails_after(1))
    assert bk.main(argv) == 0
    assert [r["M"] for r in csv.DictReader((tmp_path / "b.csv").open())] == ["1", "1"]
    assert "STOPPED by RuntimeError: CUDA out of memory after 2 rows (this report is partial)" in (
        tmp_path / "b.md").read_text()


def test_bench_kernels_with_no_timed_row_skips_the_plot_and_fails(tmp_path, capsys):
    """Every provider skipped (no GPU, no extension): the rows say why, the plot is skipped with a
    message (matplotlib cannot draw an empty grid), and the exit status is 1."""
    import bench_kernels as bk

    png = tmp_path / "b.png"
    assert bk.main(["--shapes", "40x24", "--batches", "1", "--formats", "int1", "--providers", "cuda,gemlite",
                    "--reps", "1", "--device", "cpu", "--plot", str(png), "--markdown", str(tmp_path / "b.md")]) == 1
    out = capsys.readouterr()
    assert "plot: skipped, no timed rows" in out.out and "no row was timed" in out.err and not png.exists()
    assert "Not run: cuda (" in (tmp_path / "b.md").read_text()
    bk.plot([], str(png))
    assert not png.exists() and "plot: skipped" in capsys.readouterr().out


def test_bench_kernels_from_csv_refuses_what_is_not_its_csv(tmp_path, capsys):
    """A missing file, a file without the columns (the Markdown report) or with a bad number: an
    error naming the file (and the missing columns), a non-zero exit, nothing written."""
    import bench_kernels as bk

    out = tmp_path / "out.csv"
    md = subprocess.run([sys.executable, "bench/bench_kernels.py", "--from-csv", "bench/results/h100.md", "--csv",
                         str(out)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert md.returncode == 1 and "Traceback" not in md.stderr, md.stderr
    assert "bench/results/h100.md is not a CSV of bench_kernels.py --csv: it has no column device, op," in md.stderr
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("device,op,format\ncpu,forward,int1\n")
    bad_number = tmp_path / "bad.csv"
    bad_number.write_text(",".join(bk.COLUMNS) + "\n" + ",".join(["x"] * len(bk.COLUMNS)) + "\n")
    for path, says in [(tmp_path / "missing.csv", "No such file"), (wrong, "no column K, N, M, rank"),
                       (bad_number, "line 2")]:
        with pytest.raises(SystemExit) as e:
            bk.main(["--from-csv", str(path), "--csv", str(out), "--plot", str(tmp_path / "out.png")])
        assert isinstance(e.value.code, str) and str(path) in e.value.code and says in e.value.code, e.value.code
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.csv", "wrong.csv"]


def test_bench_kernels_from_csv_writes_the_same_bytes_every_run(tmp_path):
    """Merged rows come in one total order (shape, format, M, then forward, dX, dX with LoRA, then
    provider), whatever the input's order and the string hash seed."""
    import bench_kernels as bk

    src = tmp_path / "runs.csv"
    rows = [dict(device="NVIDIA H100", op=op, format=fmt, K=64, N=48, M=M, rank=16, dtype="fp16", provider=p,
                 median_us=1.0, bytes=1, GBps=1.0, pct_copy_bw=1.0, note="")
            for fmt in ("sparse4x4", "int1") for M in (3, 1) for op in ("backward_dx_lora", "backward_dx", "forward")
            for p in ("triton", "cublas")]
    bk.write_csv(rows, str(src), quiet=True)
    outs = []
    for seed in ("1", "2", "3"):
        out = tmp_path / f"merged{seed}.csv"
        run = subprocess.run([sys.executable, "bench/bench_kernels.py", "--from-csv", str(src), "--csv", str(out)],
                             cwd=REPO, capture_output=True, text=True, timeout=120,
                             env=dict(__import__("os").environ, PYTHONHASHSEED=seed))
        assert run.returncode == 0, run.stderr
        outs.append(out.read_bytes())
    assert outs[0] == outs[1] == outs[2]
    merged = [(r["format"], r["M"], r["op"], r["provider"]) for r in csv.DictReader(outs[0].decode().splitlines())]
    assert merged == [(fmt, M, op, p) for fmt in ("int1", "sparse4x4") for M in ("1", "3")
                      for op in ("forward", "backward_dx", "backward_dx_lora") for p in ("cublas", "triton")]


def test_bench_kernels_speedups_whatever_the_provider_order(tmp_path, capsys):
    """vs cuBLAS is filled in once every provider of a problem is timed, so cuBLAS may come last;
    with no cuBLAS row it is "-" (printed, and in the report), never 0.00, and the printed log
    reads back."""
    pytest.importorskip("triton")
    import bench_kernels as bk

    common = ["--shapes", "40x24", "--batches", "1", "--formats", "int1", "--reps", "1", "--device", "cpu"]
    with_cublas = tmp_path / "with.csv"
    assert bk.main(common + ["--providers", "triton,naive,cublas", "--csv", str(with_cublas)]) == 0
    printed = capsys.readouterr().out
    rows = list(csv.DictReader(with_cublas.open()))
    assert [r["provider"] for r in rows] == ["triton", "naive", "cublas"] and rows[2]["speedup_vs_cublas"] == "1.0"
    assert all(r["speedup_vs_cublas"] for r in rows) and " x    -" not in printed
    without = tmp_path / "without.csv"
    assert bk.main(common + ["--providers", "naive,cublas_lora", "--csv", str(without)]) == 0
    printed = capsys.readouterr().out
    row_lines = [line for line in printed.splitlines() if line.startswith("forward")]
    assert len(row_lines) == 2 and all(" x    - " in line and "0.00" not in line for line in row_lines), printed
    assert all(r["speedup_vs_cublas"] == "" for r in csv.DictReader(without.open()))
    log = tmp_path / "bench.txt"
    log.write_text(printed)
    logged, _ = bk.read_log(str(log))
    assert [r["provider"] for r in logged] == ["naive", "cublas_lora"]
    assert all("speedup_vs_cublas" not in r and r["median_us"] > 0 for r in logged)
    bk.markdown(bk.read_csv(str(without)), str(tmp_path / "b.md"), "header")
    table = [line for line in (tmp_path / "b.md").read_text().splitlines() if line.startswith("| forward | int1")]
    assert len(table) == 2 and all(line.endswith(" | - |") and "None" not in line for line in table), table


def test_targets_list_what_was_not_measured():
    """The M=16 and M=4096 targets of every issue shape (and of any other shape measured on a GPU)
    are listed, "not measured" where their rows are missing; interpreter shapes get none."""
    import bench_kernels as bk

    def row(K, N, M, provider, us, op="forward", device="NVIDIA H100"):
        return {"device": device, "op": op, "format": "int1", "K": K, "N": N, "M": M, "provider": provider,
                "median_us": us, "graph_us": None, "dtype": "fp16", "rank": 16}

    rows = [row(4096, 4096, 1, "triton", 9.0), row(1024, 2048, 1, "triton", 4.0), row(40, 24, 16, "triton", 1.0,
                                                                                      device="cpu")]
    got = dict(bk.targets(rows))
    assert got["int1 4096→4096: M=16 ≤ 1.5x M=1 (9.0 µs)"] == "not measured"
    assert got["int1 1024→2048: M=16 ≤ 1.5x M=1 (4.0 µs)"] == "not measured"
    for fmt in ("int1", "sparse4x4"):
        for K, N in bk.GPU_SHAPES:
            for op in ("forward", "backward_dx", "backward_dx_lora"):
                assert got[f"{fmt} {K}→{N} {op}, M=4096 ≤ 1.25x cuBLAS"] == "not measured"
    assert got["sparse4x4 8192→28672: M=16 ≤ 1.5x M=1"] == "not measured"
    assert not any("40→24" in what for what in got)
    assert [what for what, v in got.items() if v != "not measured"] == ["int1 + LoRA, M=1, 4096² ≤ 6 µs"]


def test_profile_host_refuses_an_unknown_format_and_stubs_a_small_layer():
    """--format is int1 or sparse4x4 (argparse's error, not a traceback); --stub defaults to 64²,
    where torch's F.linear is a per-call scale for the layer's Python rather than a matmul."""
    for flag in ("--stub-kernels", "--stub"):
        bad = subprocess.run([sys.executable, "bench/profile_host.py", flag, "--format", "dense"], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
        assert bad.returncode == 2 and "invalid choice: 'dense'" in bad.stderr and "sparse4x4" in bad.stderr
        assert "Traceback" not in bad.stderr
    stub = subprocess.run([sys.executable, "bench/profile_host.py", "--stub"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert stub.returncode == 0, stub.stderr
    assert "int1 K=64 N=64 M=1; ops.lora_linear stubbed" in stub.stdout and "F.linear (for scale)" in stub.stdout


def test_sass_report_compiles_for_hopper_without_a_gpu():
    """The SASS summary (wgmma or not, spills, opcode counts) works on a CPU-only machine."""
    pytest.importorskip("triton")
    out = subprocess.run([sys.executable, "bench/sass_report.py", "fwd", "int1", "(16, 64, 64, 1, 4, 2, 1)"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    if out.returncode != 0 and "ptxas" in out.stderr.lower():
        pytest.fail(f"Triton could not assemble for sm_90 here: {out.stderr[-500:]}")
    assert out.returncode == 0, out.stderr
    assert "tensor cores HGMMA" in out.stdout and "spills) 0" in out.stdout
    assert "SHF:" in out.stdout and "LOP3:" in out.stdout  # the int1 decode's rotate and and-or
    assert "registers a thread" in out.stdout and "one iteration:" in out.stdout  # the main loop's count
    bad = subprocess.run([sys.executable, "bench/sass_report.py", "fwd", "int1", "(1, 2)"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "7 integers" in bad.stderr


@pytest.mark.parametrize("arch", [90, 80], ids=["hopper", "ampere"])
def test_every_kernel_variant_and_scale_mode_compiles_for_hopper(arch):
    """The interpreter runs kernels as Python, so a construct only Triton's compiler refuses (a
    return inside an if: the per-group dX pair decode failed that way on the H100 after passing
    every CPU test; a chain of three boolean operands, refused before Triton 3.4) needs a real
    compile: every kernel, variant and int1 scale mode, for sm_90 and for the A100's sm_80."""
    pytest.importorskip("triton")
    out = subprocess.run([sys.executable, "bench/sass_report.py", "check", "--arch", str(arch)], cwd=REPO,
                         capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    done = re.search(rf"^0 of (\d+) failed to compile for sm_{arch}", out.stdout, re.M)
    assert done and int(done.group(1)) == out.stdout.count("\nok ") + out.stdout.startswith("ok "), out.stdout
    assert "scale 1 group32" in out.stdout and "(16, 64, 128, 4, 4, 2, 8) bf16 scale 2" in out.stdout
    bad = subprocess.run([sys.executable, "bench/sass_report.py", "fwd", "sparse4x4", "(16, 64, 64, 1, 4, 2, 0)",
                          "--scale", "1"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "does not fit sparse4x4" in bad.stderr


def test_sass_like_device_runs_the_report_under_the_venvs_triton(tmp_path):
    """bench/sass_like_device.sh runs sass_report.py with the Python (and Triton) of its venv. Here
    the venv is a stand-in whose python is this interpreter, so nothing is installed."""
    triton = pytest.importorskip("triton")
    import os

    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    stand_in = venv / "bin" / "python"
    stand_in.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    stand_in.chmod(0o755)
    env = dict(os.environ, TRITON_VENV=str(venv), DEVICE_TRITON=triton.__version__,
               PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    out = subprocess.run(["bash", "bench/sass_like_device.sh", "fwd", "sparse4x4", "(1, 64, 128, 4, 4, 2, 3)"],
                         cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr
    assert f"(Triton {triton.__version__})" in out.stdout and "spills) 0" in out.stdout
    assert sorted(p.name for p in venv.iterdir()) == ["bin"]  # nothing was installed


def _skip_without_gather():
    """The int1 lookup GEMV reads its table with tl.gather (Triton >= 3.3): skip its compile tests without."""
    from loraq.kernels.triton_support import gather_problem

    if gather_problem():
        pytest.skip(gather_problem())


@pytest.mark.parametrize("fmt, cfg", [("sparse4x4", "(1, 64, 128, 4, 4, 2, 3)"), ("int1", "(1, 256, 128, 4, 4, 1, 2)")])
def test_sass_report_compiles_the_gemvs(fmt, cfg):
    """The gathering and lookup GEMVs compile for sm_90 with no tensor cores and no spills (the
    gather walks K in a loop; a lookup program takes one chunk, and only its share of x·Aᵀ
    loops); a GEMV config with the wrong format is refused."""
    pytest.importorskip("triton")
    if fmt == "int1":
        _skip_without_gather()
    out = subprocess.run([sys.executable, "bench/sass_report.py", "fwd", fmt, cfg],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "tensor cores none" in out.stdout and "spills) 0" in out.stdout
    if fmt == "sparse4x4":
        assert "one iteration:" in out.stdout
    other = "int1" if fmt == "sparse4x4" else "sparse4x4"
    bad = subprocess.run([sys.executable, "bench/sass_report.py", "fwd", other, cfg], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "GEMV of" in bad.stderr and fmt in bad.stderr


@pytest.mark.parametrize("op", ["fwd", "dx"])
@pytest.mark.parametrize("fmt", ["int1", "sparse4x4"])
def test_sass_report_compiles_the_dense_slab_decode(op, fmt):
    """The slab decode compiles for sm_90 without spills, and a thread writes its 64 elements of
    a (32, 256) tile with 16-byte stores (8 of them, and the strip's) rather than one a value."""
    pytest.importorskip("triton")
    out = subprocess.run([sys.executable, "bench/sass_report.py", op, fmt, "(32, 256, 4096, 1, 4, 1, 7)"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "tensor cores none" in out.stdout and "spills) 0" in out.stdout
    stores = re.search(r"STG:(\d+)", out.stdout)
    assert stores and int(stores.group(1)) <= 16, out.stdout


@pytest.mark.parametrize("fmt", ["int1", "sparse4x4"])
def test_sass_report_compiles_the_merged_slab_decode(fmt):
    """The merged decode (``Ŵ + s·B·A``, placement 3) at its tile, 32 x 256 on 8 warps: the rank
    product on the tensor cores, no spills."""
    pytest.importorskip("triton")
    out = subprocess.run([sys.executable, "bench/sass_report.py", "fwd", fmt, "(32, 256, 4096, 3, 8, 1, 7)"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "tensor cores none" not in out.stdout and "spills) 0" in out.stdout


@pytest.mark.parametrize("group", [None, 16, 32, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gemlite_packing_is_exactly_the_int1_weight(group, dtype):
    """GemLite dequantizes (W_q − zeros)·scales per group: the arguments we pack must give Ŵ."""
    from baselines import gemlite_pack_args

    from loraq.formats import compress_weight

    w = compress_weight(torch.randn(24, 96), "int1", group_size=group).to(dtype)
    W_q, scales, zeros, g = gemlite_pack_args(w)
    assert W_q.dtype == torch.uint8 and set(W_q.unique().tolist()) <= {0, 1} and g == min(group or 96, 96)
    deq = (W_q.to(dtype) - zeros.repeat_interleave(g, 1)) * scales.repeat_interleave(g, 1)
    assert torch.equal(deq, w.dequantize())


def test_gemlite_packing_refuses_what_gemlite_cannot_hold():
    from baselines import gemlite_pack_args

    from loraq.formats import compress_weight

    W = torch.randn(8, 96)
    for w, why in [(compress_weight(W, "sparse4x4"), "int1 weights only, got sparse4x4 .GemLite has no 1:16"),
                   (compress_weight(W, "dense"), "int1 weights only, got dense"),
                   (compress_weight(W, "int1", scale="onebit"), "onebit"),
                   (compress_weight(W, "int1", group_size=12), "groups of ≥ 16"),
                   (compress_weight(torch.randn(8, 80), "int1"), "K a multiple of 32")]:
        with pytest.raises(ValueError, match=why):
            gemlite_pack_args(w)


def test_other_libraries_are_skipped_with_their_reason_off_the_gpu():
    from baselines import bnb_nf4, gemlite_int1

    from loraq.formats import compress_weight

    w = compress_weight(torch.randn(8, 64), "int1")
    x = torch.randn(2, 64)
    cpu = torch.device("cpu")
    assert gemlite_int1(w, x, None, None, 1.0, 0, cpu) == (None, 0, "GemLite needs a CUDA device")
    assert bnb_nf4(w.dequantize(), x, None, None, 1.0, 0, cpu) == (None, 0, "bitsandbytes NF4 needs a CUDA device")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("group", [None, 64])
def test_gpu_gemlite_provider_matches_the_int1_weight(group):
    """On a GPU with gemlite installed, the provider passes its own check and returns x·Ŵᵀ + LoRA
    (per-row scales: GemLite's channel-wise path; groups: its grouped path)."""
    pytest.importorskip("gemlite")
    from baselines import gemlite_int1

    from loraq import reference
    from loraq.formats import compress_weight

    w = compress_weight(torch.randn(512, 1024), "int1", group_size=group).to(torch.float16).to("cuda")
    x, A, B = (torch.randn(*s, dtype=torch.float16, device="cuda") for s in ((4, 1024), (16, 1024), (512, 16)))
    A /= 32
    fn, nbytes, note = gemlite_int1(w, x, A, B, 0.5, 0, torch.device("cuda"))
    assert fn is not None, note
    ref = reference.lora_linear_ref(x.double(), w.to(torch.float64), A.double(), B.double(), 0.5)
    assert (fn().double() - ref).abs().max().item() <= 0.02 * ref.abs().max().item()
    assert nbytes >= 512 * 1024 // 8


@pytest.mark.parametrize("op, fmt, gemv", [("fwd", "int1", "lut"), ("fwd", "sparse4x4", "gather"),
                                           ("dx", "sparse4x4", "gather")])
def test_no_gemv_candidate_spills_on_hopper(op, fmt, gemv):
    """Every candidate of the GEMVs compiles for sm_90 without spilling registers: a spilling
    candidate only costs tuning time, and a change that makes one spill should be noticed."""
    pytest.importorskip("triton")
    if gemv == "lut":
        _skip_without_gather()
    out = subprocess.run([sys.executable, "bench/sass_report.py", op, fmt, gemv],
                         cwd=REPO, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith(f"{op} ")]
    assert len(lines) >= 5 and all("(spills) 0;" in line for line in lines)


def test_a_provider_whose_output_is_wrong_is_refused_not_timed():
    import bench_kernels as bk

    right = torch.randn(5, 7)
    fn, nbytes, note = bk._checked(lambda: right.clone(), lambda: right, 10, "", torch.device("cpu"))
    assert fn is not None and nbytes == 10 and note == ""
    fn, _, note = bk._checked(lambda: right + 1.0, lambda: right, 10, "", torch.device("cpu"))
    assert fn is None and note.startswith("REFUSED") and "max error" in note
    assert bk._checked(None, lambda: right, 10, "no GPU", torch.device("cpu")) == (None, 10, "no GPU")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_profile_slab_says_it_needs_a_gpu():
    out = subprocess.run([sys.executable, "bench/profile_slab.py", "--shapes", "64x64"], capture_output=True,
                         text=True, cwd=REPO, timeout=120)
    assert out.returncode == 2 and "needs a CUDA GPU" in out.stderr


@pytest.mark.parametrize("op, fmt", [("forward", "int1"), ("dx", "sparse4x4")])
def test_run_problem_runs_the_op_a_profiler_wraps(op, fmt):
    """bench/run_problem.py (what ncu wraps in gpu_session.sh's NCU step) runs the op the given
    number of times and names the kernel the tuner chose (none off the GPU); bad sizes are refused."""
    pytest.importorskip("triton")
    import os

    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "bench/run_problem.py", "--op", op, "--format", fmt, "--K", "64",
                          "--N", "48", "--M", "3", "--reps", "2"], cwd=REPO, capture_output=True, text=True,
                         timeout=600, env=env)
    assert out.returncode == 0, out.stderr
    shape = "(3, 48)" if op == "forward" else "(3, 64)"
    assert f"{op} {fmt} 64→48 M=3 fp16" in out.stdout and f"3 calls, output {shape}" in out.stdout, out.stdout
    bad = subprocess.run([sys.executable, "bench/run_problem.py", "--M", "0"], cwd=REPO, capture_output=True,
                         text=True, timeout=120, env=env)
    assert bad.returncode == 2 and "must be positive" in bad.stderr


def test_gpu_session_script_parses_and_documents_its_ncu_step():
    """gpu_session.sh is only run on a GPU machine: here, that bash parses it and that the NCU step
    tunes before it profiles and selects run_problem's NVTX range."""
    script = (REPO / "bench" / "gpu_session.sh").read_text()
    assert subprocess.run(["bash", "-n", "bench/gpu_session.sh"], cwd=REPO, timeout=60).returncode == 0
    ncu_step = script[script.index('if [ -n "${NCU:-}" ]'):]
    assert ncu_step.index('python3 "${args[@]}"; }') < ncu_step.index("ncu --nvtx")
    assert '--nvtx-include "loraq_call/"' in ncu_step
    assert 'NVTX_RANGE = "loraq_call"' in (REPO / "bench" / "run_problem.py").read_text()


def test_gpu_session_gives_the_tests_what_the_call_has_left():
    """A device call stops at 600 s: the tests get what is left after the time spent (the install
    and the extension's build) and the steps after them, so that the benchmark is not cut off."""
    script = (REPO / "bench" / "gpu_session.sh").read_text()
    function = script[script.index("test_seconds() {"):]
    function = function[: function.index("\n}\n") + 3]

    def seconds(spent, **env):
        out = subprocess.run(["bash", "-c", f"{function}\nSECONDS={spent}; test_seconds"], capture_output=True,
                             text=True, timeout=60, env={"PATH": os.environ["PATH"], **env})
        assert out.returncode == 0, out.stderr
        return int(out.stdout)

    assert seconds(10) == 270  # a quick install: the most
    assert seconds(150) == 570 - 150 - 290  # after a 2.5-minute build of the extension
    assert seconds(150, BENCH_TIMEOUT="200") == 570 - 150 - 220
    assert seconds(0, NCU="forward int1 8192 28672 1") == 570 - 290 - 120
    assert seconds(0, NCU="forward int1 8192 28672 1;forward int1 8192 28672 16") == 60  # 40 left: the least
    assert seconds(0, NCU="a;b", NCU_TIMEOUT="30", CALL_BUDGET="900") == 270
    assert seconds(100, SANITIZE="1") == 60  # the least: the steps after the tests may not fit
    assert 'TEST_SECONDS="${TEST_TIMEOUT:-$(test_seconds)}"' in script  # an explicit TEST_TIMEOUT wins


def test_bench_kernels_refuses_an_output_it_could_not_write_before_it_measures(tmp_path, monkeypatch, capsys):
    """--markdown and --plot are written after the whole run: a folder, a path under a file, or a
    plot without matplotlib crashed there (a traceback, the report lost); now exit 2 up front."""
    import bench_kernels as bk

    monkeypatch.setattr(bk, "copy_bandwidth", lambda *_: pytest.fail("measured before the outputs were checked"))
    (tmp_path / "afile").write_text("x")
    run = ["--shapes", "40x24", "--batches", "1", "--formats", "int1", "--providers", "cublas", "--device", "cpu"]
    for bad, says in [(["--markdown", str(tmp_path)], "a folder"), (["--csv", str(tmp_path / "afile" / "b.csv")],
                                                                    "is a file, not a folder"),
                      (["--csv", ""], "nothing")]:
        with pytest.raises(SystemExit) as e:
            bk.main(run + bad)
        err = capsys.readouterr().err.splitlines()[-1]
        assert e.value.code == 2 and f"--{bad[0][2:]}" in err and says in err, err
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # not installed
    with pytest.raises(SystemExit) as e:
        bk.main(run + ["--plot", str(tmp_path / "b.png"), "--markdown", str(tmp_path / "b.md")])
    assert e.value.code == 2 and "--plot needs matplotlib" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_a_wrong_kernel_fails_the_run_and_the_report_names_its_problem(tmp_path, monkeypatch, capsys):
    """A loraq kernel whose output disagrees with the reference gets no time, the report says for
    which op, format, shape and M, and the exit status is 1 (it was 0: CI passed a wrong kernel).
    A provider not asked for is not built or checked at all."""
    pytest.importorskip("triton")
    import bench_kernels as bk

    real = bk.ops.lora_linear
    monkeypatch.setattr(bk.ops, "lora_linear", lambda *a, **k: real(*a, **k) * 1.5)
    md, out = tmp_path / "b.md", tmp_path / "b.csv"
    argv = ["--shapes", "40x24", "--batches", "3", "--formats", "int1", "--reps", "1", "--device", "cpu",
            "--csv", str(out), "--markdown", str(md)]
    assert bk.main(argv + ["--providers", "cublas,triton"]) == 1
    err = capsys.readouterr().err
    assert "1 kernel output(s) disagree with loraq.reference" in err and "forward int1 40→24 M=3 triton" in err
    rows = {r["provider"]: r for r in csv.DictReader(out.open())}
    assert rows["triton"]["median_us"] == "" and rows["triton"]["note"].startswith("REFUSED")
    assert float(rows["cublas"]["median_us"]) > 0
    text = md.read_text()
    assert "Refused (output disagrees with loraq.reference, not timed): forward int1 40→24 M=3 triton: max error" in text
    assert "| forward | int1 | 40→24 | 3 | triton |" not in text and "Not run:" not in text
    monkeypatch.setattr(bk.ops, "lora_linear", lambda *a, **k: pytest.fail("an unasked provider was run"))
    assert bk.main(argv + ["--providers", "cublas,naive"]) == 0


def test_a_failing_other_library_is_its_rows_note_not_the_end_of_the_run(tmp_path, monkeypatch, capsys):
    import bench_kernels as bk

    def broken(*_):
        raise RuntimeError("unsupported shape")

    monkeypatch.setattr(bk, "gemlite_int1", broken)
    out = tmp_path / "b.csv"
    assert bk.main(["--shapes", "40x24", "--batches", "1,3", "--formats", "int1", "--providers", "cublas,gemlite",
                    "--reps", "1", "--device", "cpu", "--csv", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [(r["M"], r["provider"]) for r in rows] == [("1", "cublas"), ("1", "gemlite"), ("3", "cublas"),
                                                       ("3", "gemlite")]
    assert all(r["note"] == "gemlite failed: RuntimeError: unsupported shape" for r in rows[1::2])


def _runs_csv(bk, path, device="NVIDIA H100 80GB HBM3", dtype="fp16", rank=16, us=1.0):
    rows = [dict(device=device, op="forward", format="int1", K=64, N=48, M=1, rank=rank, dtype=dtype, provider=p,
                 median_us=us, bytes=1, GBps=1.0, pct_copy_bw=1.0, note="") for p in ("cublas", "triton")]
    bk.write_csv(rows, str(path), quiet=True)
    return path


def test_from_csv_refuses_to_merge_runs_of_different_gpus_dtypes_or_ranks(tmp_path):
    """A later run's rows replace an earlier one's: from another GPU (or dtype, or rank) they were
    mixed into one report silently, its targets judged on whichever came last."""
    import bench_kernels as bk

    h100 = _runs_csv(bk, tmp_path / "h100.csv")
    md = tmp_path / "m.md"
    for other, says in [(_runs_csv(bk, tmp_path / "a100.csv", device="NVIDIA A100-SXM4-80GB"), "NVIDIA A100"),
                        (_runs_csv(bk, tmp_path / "bf16.csv", dtype="bf16"), "dtype bf16"),
                        (_runs_csv(bk, tmp_path / "r64.csv", rank=64), "rank 64")]:
        with pytest.raises(SystemExit) as e:
            bk.main(["--from-csv", f"{h100},{other}", "--markdown", str(md)])
        msg = str(e.value.code)
        assert "merges runs of one device, dtype and rank" in msg and str(other) in msg and says in msg, msg
        assert not md.exists()
    assert bk.main(["--from-csv", f"{h100},{h100}", "--markdown", str(md)]) == 0
    assert "device NVIDIA H100 80GB HBM3; dtype fp16; rank 16; merged from:" in md.read_text()


@pytest.mark.parametrize("cell, says", [("nan", "median_us nan is not a time"), ("0", "median_us 0.0 is not a time"),
                                        ("-3", "median_us -3.0 is not a time")])
def test_from_csv_refuses_a_time_that_is_not_one(tmp_path, cell, says):
    """A NaN, zero or negative time was read and judged ("0.0 µs: met", "nan µs: missed by nanx")."""
    import bench_kernels as bk

    path = _runs_csv(bk, tmp_path / "r.csv")
    lines = path.read_text().splitlines()
    lines[2] = lines[2].replace(",1.0,", f",{cell},", 1)  # triton's median_us
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(SystemExit) as e:
        bk.main(["--from-csv", str(path), "--markdown", str(tmp_path / "m.md")])
    assert f"{path} line 3: {says}" in str(e.value.code), e.value.code


def test_from_csv_refuses_a_line_with_missing_or_extra_cells(tmp_path):
    import bench_kernels as bk

    for name, edit in [("short", lambda line: line.rsplit(",", 2)[0]), ("long", lambda line: line + ",extra")]:
        path = _runs_csv(bk, tmp_path / f"{name}.csv")
        lines = path.read_text().splitlines()
        lines[1] = edit(lines[1])
        path.write_text("\n".join(lines) + "\n")
        with pytest.raises(SystemExit) as e:
            bk.main(["--from-csv", str(path), "--csv", str(tmp_path / "out.csv")])
        assert f"{path} line 2: not 16 cells, as in the header" in str(e.value.code), e.value.code
    assert not (tmp_path / "out.csv").exists()


def test_bnb_bytes_count_the_nf4_block_scales(monkeypatch):
    """NF4 stores a fp32 absmax per 64-value block beside the 4-bit codes (1/8 more bytes): the
    bytes moved, and so GB/s and % of bandwidth, counted only the codes. A stand-in bitsandbytes."""
    import types

    from baselines import bnb_nf4

    N, K = 48, 128

    def quantize_4bit(W, quant_type):
        state = types.SimpleNamespace(W=W, absmax=torch.ones(N * K // 64), code=torch.zeros(16), nested=False)
        return torch.zeros(N * K // 2, 1, dtype=torch.uint8), state

    bnb = types.ModuleType("bitsandbytes")
    bnb.__version__ = "0-stand-in"
    bnb.matmul_4bit = lambda x, packed_t, quant_state: x @ quant_state.W.t()
    functional = types.ModuleType("bitsandbytes.functional")
    functional.quantize_4bit = quantize_4bit
    functional.dequantize_4bit = lambda packed, state: state.W
    bnb.functional = functional
    monkeypatch.setitem(sys.modules, "bitsandbytes", bnb)
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", functional)
    W, x = torch.randn(N, K), torch.randn(2, K)
    fn, nbytes, note = bnb_nf4(W, x, torch.randn(4, K), torch.randn(N, 4), 1.0, 100, torch.device("cuda"))
    assert fn is not None and note == "bitsandbytes 0-stand-in"
    assert nbytes == N * K // 2 + 4 * N * K // 64 + 4 * 16 + 100


def test_other_libraries_say_not_installed_only_when_they_are_not(tmp_path, monkeypatch):
    """fetch_baselines.sh installs without dependencies: a GemLite whose import fails for another
    reason was reported as "not installed"."""
    from baselines import gemlite_int1

    from loraq.formats import compress_weight

    w, x, cuda = compress_weight(torch.randn(8, 64), "int1"), torch.randn(2, 64), torch.device("cuda")
    monkeypatch.setitem(sys.modules, "gemlite", None)
    fn, _, why = gemlite_int1(w, x, None, None, 1.0, 0, cuda)
    assert fn is None and why.startswith("gemlite not installed (pip install gemlite")
    monkeypatch.delitem(sys.modules, "gemlite")
    (tmp_path / "gemlite").mkdir()
    (tmp_path / "gemlite" / "__init__.py").write_text("import a_missing_dependency_of_gemlite\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fn, _, why = gemlite_int1(w, x, None, None, 1.0, 0, cuda)
    assert fn is None and why.startswith("gemlite is installed but failed to import: ModuleNotFoundError")
    assert "a_missing_dependency_of_gemlite" in why


def test_triton_one_times_the_one_launch_forward_beside_the_default(tmp_path, monkeypatch):
    """``triton_one`` is the fused forward with LORAQ_ONE_LAUNCH=1, set around its check and its
    timing only: both rows in one run, forward only, the switch gone after."""
    pytest.importorskip("triton")
    import os

    import bench_kernels as bk

    monkeypatch.delenv("LORAQ_ONE_LAUNCH", raising=False)
    seen = []
    real = bk.ops.lora_linear

    def spy(*a, **k):
        seen.append(os.environ.get("LORAQ_ONE_LAUNCH"))
        return real(*a, **k)

    monkeypatch.setattr(bk.ops, "lora_linear", spy)
    csv_path = tmp_path / "one.csv"
    assert bk.main(["--shapes", "40x24", "--batches", "1", "--formats", "int1", "--providers", "triton,triton_one",
                    "--reps", "2", "--backward", "--device", "cpu", "--csv", str(csv_path), "--quiet"]) == 0
    rows = list(csv.DictReader(csv_path.open()))
    assert sorted((r["op"], r["provider"]) for r in rows) == [("backward_dx", "triton"), ("forward", "triton"),
                                                              ("forward", "triton_one")]
    one = next(r for r in rows if r["provider"] == "triton_one")
    assert "LORAQ_ONE_LAUNCH=1" in one["note"] and float(one["median_us"]) > 0
    assert "1" in seen and None in seen  # the one-launch row ran with the switch, the default row without
    assert "LORAQ_ONE_LAUNCH" not in os.environ
