"""The ``loraq`` command. Sub-commands: ``info`` (versions, devices, backends)."""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
from typing import List, Optional

from ._version import __version__


def _version_of(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except Exception as e:  # not installed, or broken
        return f"not available ({type(e).__name__})"


def info_text() -> str:
    """Versions, devices and which backends are available (and why not)."""
    import torch

    from . import ops

    lines = [f"loraq {__version__}", f"python {platform.python_version()} ({sys.executable})"]
    for mod in ("torch", "triton", "numpy", "safetensors", "transformers", "peft", "torchvision", "optuna"):
        lines.append(f"{mod:<13} {_version_of(mod)}")
    lines.append("devices:")
    lines.append(f"  cpu          {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"  cuda:{i}       {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.1f} GiB")
    else:
        lines.append(f"  cuda         none (torch {torch.__version__}, built for CUDA {torch.version.cuda})")
    lines.append("backends:")
    for name, (ok, why) in ops.backend_status().items():
        lines.append(f"  {name:<12} {'available' if ok else 'unavailable'}: {why}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraq", description="Compress, then adapt: 1-bit / 1:16 sparse Linear "
                                     "layers repaired with LoRA, run by fused kernels.")
    parser.add_argument("--version", action="version", version=f"loraq {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("info", help="versions, devices and which backends are available (and why not)")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "info":
        print(info_text())
        return 0
    parser.print_help()
    return 0 if args.command is None else 2


if __name__ == "__main__":
    sys.exit(main())
