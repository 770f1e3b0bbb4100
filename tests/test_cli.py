import os
import subprocess
import sys
from importlib.metadata import entry_points

import loraq
from loraq import cli


def run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "loraq", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_version():
    out = run("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"loraq {loraq.__version__}"


def test_console_script_is_declared():
    scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert scripts.get("loraq") == "loraq.cli:main"


def test_info_lists_versions_devices_and_backends_with_reasons():
    out = run("info", env={"TRITON_INTERPRET": "0", "LORAQ_DENSE_SLAB_MIB": "64"})
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "settings:\n" in text and "  LORAQ_DENSE_SLAB_MIB=64" in text and "  TRITON_INTERPRET=0" in text
    assert f"loraq {loraq.__version__}" in text and "torch" in text and "devices:" in text
    assert "reference    available" in text
    for line in text.splitlines():
        if line.strip().startswith(("triton", "cuda ")) and "unavailable" in line:
            assert len(line.split("unavailable:", 1)[1].strip()) > 10  # a reason, not just a verdict


def test_no_command_prints_help_and_unknown_command_fails(capsys):
    assert cli.main([]) == 0
    assert "info" in capsys.readouterr().out
    out = run("frobnicate")
    assert out.returncode == 2 and "invalid choice" in out.stderr


def test_info_names_each_gpus_autotune_cache(tmp_path, monkeypatch):
    """On CUDA, ``loraq info`` says where each GPU's tuned configs are cached and how many."""
    import json
    from types import SimpleNamespace

    import torch

    from loraq.kernels import autotune

    monkeypatch.setenv("LORAQ_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(autotune, "gpu_name", lambda device: f"Fake GPU {device.index}")
    path = autotune.cache_file(torch.device("cuda", 1))
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"a": [1, 2, 3, 4, 5, 6, 7], "b": [1, 2, 3, 4, 5, 6, 0]}))
    fake = SimpleNamespace(cuda=SimpleNamespace(is_available=lambda: True, device_count=lambda: 2), device=torch.device)
    lines = cli._autotune_lines(fake)
    assert lines[0] == "autotune cache:"
    assert lines[1].startswith("  cuda:0 ") and "Fake_GPU_0" in lines[1] and lines[1].endswith("(0 tuned problems)")
    assert lines[2] == f"  cuda:1       {path} (2 tuned problems)"
