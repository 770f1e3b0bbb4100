"""The kernel benchmark harness runs on a CPU (reference and interpreter providers, tiny shapes)."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


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

    def row(fmt, K, N, M, provider, us, op="forward", device="NVIDIA H100"):
        return {"device": device, "op": op, "format": fmt, "K": K, "N": N, "M": M, "provider": provider,
                "median_us": us, "graph_us": None}

    rows = [row("int1", 8192, 28672, 1, "triton", 12.0), row("int1", 8192, 28672, 16, "triton", 30.0),
            row("int1", 4096, 4096, 1, "triton", 9.0),
            row("int1", 4096, 4096, 4096, "triton", 500.0), row("int1", 4096, 4096, 4096, "cublas", 450.0),
            row("sparse4x4", 8192, 28672, 1, "triton", 1.0, device="cpu")]  # interpreter rows never count
    got = dict(bk.targets(rows))
    assert got["int1 + LoRA, M=1, 8192→28672 ≤ 15 µs"] == "12.0 µs: met"
    assert got["int1 + LoRA, M=1, 4096² ≤ 6 µs"] == "9.0 µs: missed by 1.50x"
    assert got["sparse4x4 + LoRA, M=1, 8192→28672 ≤ 20 µs"] == "not measured"
    assert got["int1 8192→28672: M=16 ≤ 1.5x M=1 (12.0 µs)"] == "30.0 µs: missed by 1.67x"
    assert got["int1 4096→4096 forward, M=4096 ≤ 1.25x cuBLAS (450.0 µs)"] == "500.0 µs: met"


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


@pytest.mark.parametrize("fmt, cfg", [("sparse4x4", "(1, 64, 128, 4, 4, 2, 3)"), ("int1", "(1, 256, 128, 4, 4, 1, 2)")])
def test_sass_report_compiles_the_gemvs(fmt, cfg):
    """The gathering and lookup GEMVs compile for sm_90 with no tensor cores and no spills (the
    gather walks K in a loop; a lookup program takes one chunk); a GEMV config with the wrong
    format is refused."""
    pytest.importorskip("triton")
    out = subprocess.run([sys.executable, "bench/sass_report.py", "fwd", fmt, cfg],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "tensor cores none" in out.stdout and "spills) 0" in out.stdout
    assert ("one iteration:" in out.stdout) == (fmt == "sparse4x4")
    other = "int1" if fmt == "sparse4x4" else "sparse4x4"
    bad = subprocess.run([sys.executable, "bench/sass_report.py", "fwd", other, cfg], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and f"is a forward GEMV of {fmt}" in bad.stderr
