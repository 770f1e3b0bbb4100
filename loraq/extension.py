"""The compiled extension for installs that did not compile it.

``pip install loraq`` (and the README's ``pip install -e .``) builds in an isolated environment
without torch, so ``loraq._C`` (the CUDA GEMVs of ``csrc/``, which won the small-batch forward on
an H100) is skipped. :func:`build` (``loraq build-ext``) compiles the same sources, shipped inside
the package as ``loraq/csrc``, with torch's JIT builder into ``$LORAQ_CACHE_DIR/ext/<key>/``, and
:func:`load` loads that build whenever ``loraq._C`` itself is missing. The key covers the sources,
torch's version and CUDA version, the Python ABI and the machine, so an upgrade of any of them
never loads a stale build: it asks for a new one.

This is the Python side of ``csrc/``: it imports nothing from loraq, and ``loraq.ops`` and
``loraq.kernels`` load the extension through it.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

NAME = "loraq_C"  # the JIT build's library name; the ops are the same torch.ops.loraq.* as loraq._C's
COMPILED = (".cu", ".cpp")  # translation units; the headers (.cuh, .h) only enter the key
HEADERS = (".cuh", ".h")
FLAGS = ["-O3"]  # as setup.py's: for the host and the device compiler
_ARCH = re.compile(r"^\d+\.\d+(\+PTX)?$")

# (where the ops came from, why they are missing, the architectures of a `loraq build-ext` build
# or None): one of the first two is ""
_STATE: Optional[Tuple[str, str, Optional[List[str]]]] = None
_NVCC = "nvcc.exe" if os.name == "nt" else "nvcc"


def sources_dir() -> Optional[Path]:
    """The CUDA sources: ``loraq/csrc`` in an installed wheel, ``csrc/`` beside the package in a
    checkout (editable installs); None when neither holds any."""
    here = Path(__file__).resolve().parent
    for folder in (here / "csrc", here.parent / "csrc"):
        if any(folder.glob("*.cu")):
            return folder
    return None


def source_files(folder: Optional[Path] = None) -> List[Path]:
    """Every file of the build (translation units and headers), sorted by name."""
    folder = sources_dir() if folder is None else folder
    if folder is None:
        return []
    return sorted(p for p in folder.iterdir() if p.suffix in COMPILED + HEADERS)


def build_key(files: List[Path]) -> str:
    """16 hex digits naming one build: the sources' names and contents, torch's version and CUDA
    version, the Python ABI and the machine (a build made for any other cannot be loaded)."""
    h = hashlib.sha256()
    for part in (torch.__version__, str(torch.version.cuda), sys.implementation.cache_tag, platform.machine(),
                 " ".join(FLAGS)):
        h.update(part.encode() + b"\0")
    for path in files:
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def cache_root() -> Optional[Path]:
    """loraq's cache folder (the tuner's winners, these builds): ``$LORAQ_CACHE_DIR``, else
    ``~/.cache/loraq``; None without a home folder (a service account)."""
    root = os.environ.get("LORAQ_CACHE_DIR") or None
    if root is None:
        try:
            root = str(Path.home() / ".cache" / "loraq")
        except RuntimeError:  # no home directory
            return None
    # "~/x" set where no shell expands it (a .env file, Docker's ENV, os.environ in Python) is the
    # home folder's, not a folder named "~" in the working directory; a relative folder is taken
    # from where the process is now
    return Path(os.path.abspath(os.path.expanduser(root)))


def build_dir(files: Optional[List[Path]] = None, root: Optional[Path] = None) -> Optional[Path]:
    """``<cache root>/ext/<build key>``, where this install's build lives; None without sources or
    a cache folder."""
    files = source_files() if files is None else files
    root = cache_root() if root is None else root
    if not files or root is None:
        return None
    return root / "ext" / build_key(files)


def build_record(folder: Optional[Path] = None) -> Optional[Dict]:
    """What a finished build wrote beside its library (``build.json``: the library's file name,
    the architectures, versions, seconds taken); None when there is no finished build."""
    folder = build_dir() if folder is None else folder
    if folder is None:
        return None
    try:
        record = json.loads((folder / "build.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not (folder / str(record.get("library", ""))).is_file():
        return None
    return record


def import_installed() -> Tuple[str, Optional[Exception]]:
    """Import ``loraq._C`` (installed by ``pip install`` from source): ``(where, None)``, or
    ``("", the exception)`` when it is not there or does not import."""
    try:
        import loraq._C as compiled  # registers torch.ops.loraq.*
    except Exception as e:  # not built (ImportError), or built against another torch (OSError)
        return "", e
    return f"loraq._C ({compiled.__file__})", None


def load() -> str:
    """Make ``torch.ops.loraq``'s compiled ops available, once per process: ``loraq._C`` when it
    is installed, else the build of :func:`build` for this install. Returns why neither could be
    loaded ("" when one was)."""
    global _STATE
    if _STATE is None:
        _STATE = _load()
    return _STATE[1]


def origin() -> str:
    """Where the compiled ops came from ("" when they did not load)."""
    load()
    return _STATE[0]


def arch_problem(capability: Tuple[int, int]) -> str:
    """Why the loaded build cannot run on a GPU of compute ``capability`` ("" when it can, or when
    the architectures are not known: ``loraq._C``). A build for ``major.minor`` runs on the same
    major at that minor or newer; one with ``+PTX`` also on every newer GPU."""
    if load() or not _STATE[2]:
        return ""
    return _arch_problem(tuple(capability), tuple(_STATE[2]))


@lru_cache(maxsize=None)  # asked on the launch path's cache key: parse once
def _arch_problem(capability: Tuple[int, int], archs: Tuple[str, ...]) -> str:
    for arch in archs:
        built = tuple(int(v) for v in arch.split("+")[0].split("."))
        if (built[0] == capability[0] and built[1] <= capability[1]) or (arch.endswith("+PTX")
                                                                           and built <= capability):
            return ""
    cap = "%d.%d" % capability
    return (f"the extension built by `loraq build-ext` is for {';'.join(archs)}, not for this GPU's {cap}: "
            f"run `loraq build-ext` on it (it adds {cap})")


def _not_built(error: Exception) -> str:
    if torch.version.cuda is None:  # a CPU-only (or ROCm) torch: no build of it can help
        return (f"the compiled extension loraq._C is not built ({type(error).__name__}); it needs a CUDA "
                f"build of torch (this is {torch.__version__})")
    return (f"the compiled extension loraq._C is not built ({type(error).__name__}); build it with "
            "`loraq build-ext` (needs nvcc and ninja), or install loraq from source with "
            "CUDA_HOME=/usr/local/cuda pip install --no-build-isolation -e .")


def _record_archs(record: Dict) -> List[str]:
    archs = record.get("archs")
    return [a for a in archs if isinstance(a, str) and _ARCH.match(a)] if isinstance(archs, list) else []


def _load() -> Tuple[str, str, Optional[List[str]]]:
    where, error = import_installed()
    if error is None:
        return where, "", None
    folder = build_dir()
    record = build_record(folder) if folder is not None else None
    if record is None:
        return "", _not_built(error), None
    library = folder / record["library"]
    try:
        torch.ops.load_library(str(library))
    except Exception as e:  # a damaged file, or a library it needs went away
        return "", (f"the extension built by `loraq build-ext` in {folder} does not load "
                    f"({type(e).__name__}: {e}); build it again with `loraq build-ext --force`"), None
    archs = _record_archs(record)
    return f"{library} (built by `loraq build-ext` for {';'.join(archs) or '?'})", "", archs


def cuda_home() -> Optional[Path]:
    """The CUDA toolkit: ``$CUDA_HOME`` or ``$CUDA_PATH``, else ``/usr/local/cuda``, else the
    folder above the ``nvcc`` on the PATH (when it holds the headers); None when none has nvcc."""
    for env in ("CUDA_HOME", "CUDA_PATH"):  # named: that one or none
        if os.environ.get(env):
            home = Path(os.environ[env])
            return home if (home / "bin" / _NVCC).exists() else None
    candidates = [Path("/usr/local/cuda")]
    nvcc = shutil.which(_NVCC)
    if nvcc:  # a wrapper script in /usr/local/bin is not the toolkit: its folder has no headers
        candidates.append(Path(os.path.realpath(nvcc)).parent.parent)
    for home in candidates:
        if (home / "bin" / _NVCC).exists() and (home / "include" / "cuda_runtime.h").exists():
            return home
    return None


def default_archs() -> List[str]:
    """The visible GPUs' architectures (``["9.0"]`` on an H100); without a GPU, Ampere and Hopper
    with Hopper's PTX, so that newer GPUs can compile it when they load it."""
    if torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return [f"{major}.{minor}" for major, minor in caps]
    return ["8.0", "9.0+PTX"]


def parse_archs(text: str) -> List[str]:
    """``"8.0;9.0"`` (also with commas or spaces; ``+PTX`` allowed) as a list; ValueError otherwise."""
    archs = [a for a in re.split(r"[;,\s]+", text.strip()) if a]
    bad = [a for a in archs if not _ARCH.match(a)]
    if not archs or bad:
        raise ValueError(f"architectures are like 9.0 or 8.0;9.0+PTX (compute capabilities), got {text!r}")
    return archs


def ninja_dir() -> Optional[str]:
    """The folder of the ``ninja`` that torch's builder will run: the PATH's, else the one beside
    this Python (a virtual environment used without activating it); None without one."""
    for path in (None, os.path.dirname(sys.executable)):
        found = shutil.which("ninja", path=path)
        if found:
            return os.path.dirname(found)
    return None


def check_can_build() -> Tuple[List[Path], Path, Path]:
    """``(source files, CUDA toolkit, build folder)``, or ValueError saying what is missing."""
    files = source_files()
    if not files:
        raise ValueError("this install of loraq holds no CUDA sources (loraq/csrc): reinstall loraq "
                         "(its wheels and source archives ship them)")
    if torch.version.cuda is None:
        kind = "a ROCm" if getattr(torch.version, "hip", None) else "a CPU-only"
        raise ValueError(f"torch {torch.__version__} is {kind} build: loraq's CUDA extension cannot link "
                         "against it (install a CUDA build of torch)")
    if ninja_dir() is None:
        raise ValueError("building the extension needs ninja: pip install ninja")
    home = cuda_home()
    if home is None:
        named = [f"{env}={os.environ[env]} has no bin/{_NVCC}" for env in ("CUDA_HOME", "CUDA_PATH")
                 if os.environ.get(env)][:1]
        raise ValueError(f"no CUDA toolkit with nvcc found{' (' + named[0] + ')' if named else ''}: "
                         "set CUDA_HOME to one (e.g. CUDA_HOME=/usr/local/cuda)")
    folder = build_dir(files)
    if folder is None:
        raise ValueError("no folder to build in: set LORAQ_CACHE_DIR (there is no home folder)")
    return files, home, folder


def build(archs: Optional[List[str]] = None, jobs: Optional[int] = None, force: bool = False,
          verbose: bool = False, progress: bool = True) -> Path:
    """Compile ``loraq/csrc`` for ``archs`` (default :func:`default_archs`) into this install's
    build folder and load it; returns the folder. A finished build that loads and covers
    ``archs`` is reused unless ``force``; one that does not cover them is rebuilt for its
    architectures and ``archs`` together (two GPUs sharing a home folder both stay served). One
    process builds a folder at a time: another waits for it, then reuses its build. A process
    that already loaded a build keeps it (``torch.ops.loraq`` registers once per process; a
    RuntimeWarning says so): new processes load the new one. Bad arguments or a missing toolkit
    raise ValueError before anything is written; a failed compile raises RuntimeError with the
    compiler's last lines. ``jobs``: the compilers run at once (default: torch's, every core);
    ``verbose``: the compiler commands and output; ``progress``: a line on stderr counting the
    elapsed time."""
    archs = default_archs() if archs is None else parse_archs(";".join(archs))
    if jobs is not None and jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    where, error = import_installed()
    if error is None:
        raise ValueError(f"this install already has the compiled extension: {where}")
    files, home, folder = check_can_build()
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _locked(folder.parent / f"{folder.name}.lock"):
        record = build_record(folder)  # read under the lock: another process may have just built it
        if record is not None and not force:
            have = _record_archs(record)
            if all(_covered(a, have) for a in archs) and _reload() == "":
                return folder
            archs = _union(have, archs)  # damaged, or lacking some of archs: for both
        # from scratch, into new files: a library a process has loaded stays mapped intact
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        start = time.monotonic()
        with _Ticker(f"compiling loraq's CUDA extension for {';'.join(archs)}", progress and not verbose):
            library = _compile(files, folder, home, archs, jobs, verbose)
        record = {"library": library.name, "archs": archs, "torch": torch.__version__, "cuda": torch.version.cuda,
                  "python": sys.implementation.cache_tag, "sources": [p.name for p in files],
                  "seconds": round(time.monotonic() - start, 1), "built": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "process": os.getpid()}
        _write_atomic(folder / "build.json", json.dumps(record, indent=1))
    if _STATE is not None and not _STATE[1]:
        warnings.warn(f"this process keeps the compiled extension it loaded before ({_STATE[0]}); new processes "
                      f"load the build in {folder}", RuntimeWarning, stacklevel=2)
    elif _reload():
        raise RuntimeError(f"the new build in {folder} does not load: {load()}")
    return folder


def _reload() -> str:
    """:func:`load`, asked again if it failed before (a build may have appeared since)."""
    global _STATE
    if _STATE is not None and _STATE[1]:
        _STATE = None
    return load()


def _covered(arch: str, have: List[str]) -> bool:
    return arch in have or (not arch.endswith("+PTX") and arch + "+PTX" in have)


def _union(have: List[str], archs: List[str]) -> List[str]:
    both = [a for a in dict.fromkeys(have + archs) if not (a + "+PTX" in have + archs)]
    return sorted(both, key=lambda a: tuple(int(v) for v in a.split("+")[0].split(".")))


class _locked:
    """An exclusive lock on ``path`` (POSIX ``flock``; nothing where there is none), held while
    one process checks and builds a folder."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        self.file = open(self.path, "a")
        try:
            import fcntl
        except ImportError:  # Windows: builds are not serialized
            return self
        fcntl.flock(self.file.fileno(), fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        self.file.close()  # releases the lock


# Run in a process of its own: torch's builder remembers what it built per process (a second
# build of the same name would be skipped) and loads what it built (a second library registering
# torch.ops.loraq in one process is refused).
_CHILD = """
import json, sys
from torch.utils import cpp_extension
a = json.loads(sys.argv[1])
cpp_extension.CUDA_HOME = a["home"]  # read once at import; where torch guessed another toolkit
cpp_extension.load(name=a["name"], sources=a["sources"], extra_cflags=a["flags"], extra_cuda_cflags=a["flags"],
                   build_directory=a["folder"], verbose=a["verbose"], is_python_module=False)
"""


def _compile(files: List[Path], folder: Path, home: Path, archs: List[str], jobs: Optional[int],
             verbose: bool) -> Path:
    """Compile and link ``files`` into ``folder`` in a child process; the library's path."""
    env = {**os.environ, "CUDA_HOME": str(home), "TORCH_CUDA_ARCH_LIST": ";".join(archs)}
    if jobs is not None:
        env["MAX_JOBS"] = str(jobs)
    ninja = ninja_dir()  # torch runs `ninja` from the PATH
    if ninja is not None and ninja not in env.get("PATH", "").split(os.pathsep):
        env["PATH"] = ninja + os.pathsep + env.get("PATH", "")
    args = json.dumps({"name": NAME, "sources": [str(p) for p in files if p.suffix in COMPILED], "flags": FLAGS,
                       "folder": str(folder), "home": str(home), "verbose": verbose})
    out = subprocess.run([sys.executable, "-c", _CHILD, args], env=env, text=True,
                         stdout=None if verbose else subprocess.PIPE, stderr=None if verbose else subprocess.STDOUT)
    library = folder / (NAME + (".pyd" if sys.platform == "win32" else ".so"))
    if out.returncode != 0 or not library.is_file():
        tail = "\n".join((out.stdout or "").strip().splitlines()[-40:]) or "(the compiler's output is above)"
        raise RuntimeError(f"compiling the extension in {folder} failed:\n{tail}")
    return library


class _Ticker:
    """A tqdm line counting the seconds of a long step that reports no progress of its own."""

    def __init__(self, what: str, on: bool):
        self.what, self.on = what, on

    def __enter__(self):
        if not self.on:
            return self
        from tqdm.auto import tqdm

        self.bar = tqdm(desc=self.what, bar_format="{desc}: {elapsed}", file=sys.stderr)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._tick, daemon=True)
        self.thread.start()
        return self

    def _tick(self):
        every = 1.0 if getattr(sys.stderr, "isatty", lambda: False)() else 30.0  # a log file: fewer lines
        while not self.done.wait(every):
            self.bar.refresh()

    def __exit__(self, *exc):
        if self.on:
            self.done.set()
            self.thread.join()
            self.bar.close()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


__all__ = ["load", "origin", "arch_problem", "import_installed", "build", "build_dir", "build_record", "build_key", "cache_root", "sources_dir",
           "source_files", "cuda_home", "default_archs", "parse_archs", "check_can_build"]
