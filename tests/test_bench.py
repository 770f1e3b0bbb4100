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
         "--csv", str(csv_path), "--plot", str(png)],
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


def test_bench_kernels_rejects_bad_shapes():
    out = subprocess.run([sys.executable, "bench/bench_kernels.py", "--shapes", "40by24"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "KxN" in out.stderr
