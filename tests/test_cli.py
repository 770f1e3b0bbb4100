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
    out = run("info", env={"TRITON_INTERPRET": "0"})
    assert out.returncode == 0, out.stderr
    text = out.stdout
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
