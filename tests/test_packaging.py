import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_install_as_loraq_kernels():
    import loraq.kernels

    assert Path(loraq.kernels.__file__).parent.name == "kernels"


def test_import_needs_no_gpu_triton_or_extension():
    code = ("import sys; sys.modules['triton'] = None; sys.modules['loraq._C'] = None; import loraq, torch;"
            "from loraq import ops; s = ops.backend_status(torch.device('cpu'));"
            "assert s['reference'][0] and not s['triton'][0] and 'triton is not importable' in s['triton'][1];"
            "print(loraq.__version__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def skip_with_old_setuptools():
    """setup.py run directly (or pip with --no-build-isolation) takes this environment's
    setuptools, which it refuses before 77 (pip's isolated build gets 77 or later)."""
    import setuptools

    import re

    if tuple(map(int, re.match(r"(\d+)(?:\.(\d+))?", setuptools.__version__).groups("0"))) < (77, 0):
        pytest.skip(f"setuptools {setuptools.__version__} here: setup.py needs 77 or later")


def test_setup_refuses_an_old_setuptools_with_the_command_that_fixes_it(tmp_path):
    """An old setuptools (Python 3.9's venv has 58) would build a package named UNKNOWN."""
    (tmp_path / "setuptools").mkdir()
    (tmp_path / "setuptools" / "__init__.py").write_text("__version__ = '58.1.0'\ndef setup(**kw): pass\n")
    out = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert out.returncode == 1 and out.stdout == ""
    assert "needs setuptools >= 77, this environment has 58.1.0" in out.stderr
    assert "pip install -U 'setuptools>=77'" in out.stderr


def _setup_name(tmp_path, env, break_torch=False):
    skip_with_old_setuptools()
    env = {**os.environ, **env}
    if break_torch:  # what an isolated build environment without torch looks like
        (tmp_path / "torch").mkdir()
        (tmp_path / "torch" / "__init__.py").write_text("raise ImportError('no torch here')")
        env["PYTHONPATH"] = str(tmp_path)
    out = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "loraq"
    return [line for line in out.stderr.splitlines() if line.startswith("loraq: not building")]


def test_setup_skips_the_extension_on_request(tmp_path):
    assert _setup_name(tmp_path, {"LORAQ_BUILD_EXT": "0"}) == [
        "loraq: not building the optional extension loraq._C: LORAQ_BUILD_EXT=0"]


def test_setup_skips_the_extension_without_torch_at_build_time(tmp_path):
    (line,) = _setup_name(tmp_path, {"LORAQ_BUILD_EXT": "1"}, break_torch=True)
    assert "torch is not importable at build time" in line and "--no-build-isolation" in line


def test_the_readme_lists_every_environment_variable_the_code_reads():
    """The README's table of variables and the ``LORAQ_*`` names the package and setup.py read
    are the same set."""
    import re

    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("### Environment variables"):]
    table = table[: table.index("\n\n", table.index("|"))]
    listed = set(re.findall(r"^\| `(LORAQ_[A-Z_]+)` \|", table, re.M))
    sources = [*(ROOT / "loraq").rglob("*.py"), *(ROOT / "kernels").rglob("*.py"), ROOT / "setup.py"]
    read = set()
    for path in sources:
        read |= set(re.findall(r"(?:environ(?:\.get)?\(?\[?|env_is\(|getenv\()\s*\"(LORAQ_[A-Z_]+)\"", path.read_text()))
    assert listed and listed == read, (sorted(listed - read), sorted(read - listed))
