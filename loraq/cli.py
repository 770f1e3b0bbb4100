"""The ``loraq`` command: ``info``, ``train``, ``sweep``, ``evaluate``, ``demo``, ``build-ext``. Each has a Python function with the same options."""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
from typing import List, Optional

from ._version import __version__


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default unless its help already says it, or there is none to show."""

    def _get_help_string(self, action):
        if "(default" in (action.help or "") or action.default is None or action.default is False \
                or action.default == argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """A usage error is one line on stderr (argparse prints the whole usage first), exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


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
    from . import extension

    if extension.origin():
        lines.append(f"  {'compiled':<12} {extension.origin()}")
    lines.append("settings:")
    settings = sorted((k, v) for k, v in os.environ.items() if k.startswith("LORAQ_") or k == "TRITON_INTERPRET")
    lines += [f"  {k}={v}{_setting_problem(k, v, ops)}" for k, v in settings] \
        or ["  (no LORAQ_* or TRITON_INTERPRET variable set)"]
    lines += _autotune_lines(torch)
    return "\n".join(lines)


_SWITCHES = ("LORAQ_AUTOTUNE_VERBOSE", "LORAQ_CUDA_GEMV", "LORAQ_ONE_LAUNCH", "LORAQ_FAST_LAUNCH",
             "LORAQ_OFFSET_DECODE")
_SETTINGS = ("LORAQ_BACKEND", "LORAQ_CACHE_DIR", "LORAQ_DENSE_SLAB_MIB", "LORAQ_BUILD_EXT", *_SWITCHES)


def _setting_problem(name: str, value: str, ops) -> str:
    """Why an environment setting will not do what it says ('' when it will): listed bare, a typo
    or a value loraq does not understand would look like it is in effect."""
    if name == "LORAQ_BACKEND":
        if value not in ops.BACKENDS:
            return (f"  (invalid: expected one of {', '.join(ops.BACKENDS)}; every layer built without "
                    "backend= raises)")
        ok = ops.backend_status().get(value, (True, ""))[0]
        return "" if ok else "  (unavailable here, see backends: every layer built without backend= raises)"
    if name == "LORAQ_CUDA_GEMV":  # on by default
        return "" if value in ("", "0", "1") else "  (not understood, so on: 0 turns it off)"
    if name in _SWITCHES:
        return "" if value in ("", "0", "1") else "  (not understood, so off: 1 turns it on, 0 or unset: off)"
    if name == "LORAQ_DENSE_SLAB_MIB":
        try:
            if int(value) >= 0:
                return ""
        except ValueError:
            pass
        return "  (invalid: a whole number of MiB >= 0 expected; the Triton kernels on CUDA raise)"
    if name.startswith("LORAQ_") and name not in _SETTINGS:
        return f"  (not a loraq setting, ignored; known: {', '.join(sorted(_SETTINGS))})"
    return ""


def _autotune_lines(torch) -> List[str]:
    """Where each GPU's tuned kernel configs are cached, and how many (on CUDA with Triton)."""
    if not torch.cuda.is_available():
        return []
    try:
        from .kernels import autotune
    except Exception as e:  # no Triton: nothing is tuned
        return [f"autotune: unavailable ({type(e).__name__})"]
    lines = ["autotune cache:"]
    for i in range(torch.cuda.device_count()):
        path = autotune.cache_file(torch.device("cuda", i))
        where = "memory only (no home folder; set LORAQ_CACHE_DIR)" if path is None else str(path)
        count = 0 if path is None else len(autotune._read(path))
        lines.append(f"  cuda:{i}       {where} ({count} tuned problems)")
    return lines


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="loraq", description="Compress, then adapt: 1-bit / 1:16 sparse Linear "
                    "layers repaired with LoRA, run by fused kernels.")
    parser.add_argument("--version", action="version", version=f"loraq {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("info", help="versions, devices and which backends are available (and why not)")
    add_train_parser(sub)
    add_sweep_parser(sub)
    add_evaluate_parser(sub)
    add_demo_parser(sub)
    add_build_ext_parser(sub)
    return parser


def _csv(text: str) -> List[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _ints(text: str) -> List[int]:
    try:
        return [int(t) for t in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _model_options(p) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="mlp", help="mlp | resnet18 | minilm | hf:NAME_OR_PATH")
    g.add_argument("--data", default="digits", help="digits | mnist:PATH | imagefolder:PATH | hf:PATH")
    g.add_argument("--weights", help="local state dict (torch.save file) of the model, for mlp or resnet18")
    g.add_argument("--hidden", type=_ints, default="1000,2000", help="mlp hidden sizes, comma-separated")
    g.add_argument("--limit", type=int, help="use at most this many examples")
    g.add_argument("--pretrain-epochs", type=int, default=0, help="train the dense model first")
    g.add_argument("--pretrain-lr", type=float, default=1e-3, help="learning rate of the dense pretraining")


def _lora_options(g) -> None:
    g.add_argument("--targets", type=_csv, help="comma-separated Linear names or regexes (default: the model's)")
    g.add_argument("--modules-to-save", type=_csv, help="comma-separated modules kept dense and trainable")
    g.add_argument("--clip-rank", action="store_true",
                   help="give layers narrower than the rank a full-rank adapter instead of an error")
    g.add_argument("--rslora", action="store_true", help="scale adapters by alpha/sqrt(rank), not alpha/rank")
    g.add_argument("--loftq-iters", type=int, default=1, help="alternations of init loftq")
    g.add_argument("--group-size", type=int, help="int1 inputs per scale (default: one per row)")


def add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="compress a model and train LoRA adapters on the frozen compressed base",
                       formatter_class=HelpFormatter)
    _model_options(p)
    g = p.add_argument_group("compression and LoRA")
    g.add_argument("--compression", default="int1", help="int1 | sparse4x4 | dense")
    g.add_argument("--rank", type=int, default=8, help="LoRA rank")
    g.add_argument("--alpha", type=float, help="LoRA alpha: adapters are scaled by alpha/rank (default: the rank)")
    g.add_argument("--init", default="gaussian", help="gaussian | svd | loftq")
    _lora_options(g)
    g = p.add_argument_group("optimisation")
    g.add_argument("--optimizer", default="adam", help="adam | adamw | sgd")
    g.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    g.add_argument("--weight-decay", type=float, default=0.0, help="weight decay")
    g.add_argument("--batch-size", type=int, default=64, help="training batch size")
    g.add_argument("--epochs", type=int, default=10, help="LoRA training epochs")
    g.add_argument("--patience", type=int, help="stop after this many epochs without a better validation accuracy")
    g.add_argument("--seed", type=int, default=0, help="random seed of data splits, init and training")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--output", help="run folder (default: a new folder under ./loraq-runs/)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_sweep_parser(sub) -> None:
    p = sub.add_parser("sweep", help="compressions x ranks x inits, an Optuna study per cell, one evaluation table",
                       formatter_class=HelpFormatter)
    _model_options(p)
    g = p.add_argument_group("cells")
    g.add_argument("--compressions", type=_csv, default="int1,sparse4x4",
                   help="comma-separated: int1, sparse4x4, dense")
    g.add_argument("--ranks", type=_ints, default="2,4,8,16,32,64,128", help="comma-separated LoRA ranks")
    g.add_argument("--inits", type=_csv, default="gaussian,svd,loftq", help="comma-separated: gaussian, svd, loftq")
    _lora_options(g)
    g = p.add_argument_group("search")
    g.add_argument("--trials", type=int, default=10, help="finished (complete or pruned) trials per cell")
    g.add_argument("--epochs", type=int, default=10, help="LoRA training epochs per trial")
    g.add_argument("--patience", type=int, help="stop a trial after this many epochs without a better validation "
                   "accuracy")
    g.add_argument("--search-space", help="JSON (or a JSON file) overriding parameters of the default space, "
                   'e.g. \'{"lr": {"low": 1e-4, "high": 1e-2, "log": true}, "optimizer": ["adamw"]}\'')
    g.add_argument("--seed", type=int, default=0, help="random seed of data splits, init and training")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    g.add_argument("--storage", help="Optuna storage URL shared by workers, e.g. postgresql://user@host/db "
                   "(default: sqlite in the output folder)")
    g.add_argument("--study-prefix", help="study names are PREFIX-<cell> (default: loraq-<settings hash>)")
    p.add_argument("--output", help="sweep folder (default: ./loraq-runs/sweep-<model>-<data>-<settings hash>, "
                   "so rerunning a command resumes it)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="the whole pipeline on scikit-learn's digits: pretrain, sweep int1 and "
                       "sparse4x4 x ranks x inits, report (about 6 minutes on 2 cores)",
                       formatter_class=HelpFormatter)
    p.add_argument("--quick", action="store_true", help="two ranks, two trials per cell (about a minute)")
    p.add_argument("--output", help="demo folder (default: a new folder under ./loraq-runs/)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_evaluate_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="evaluate a run's checkpoint: accuracy, macro P/R/F1, confusion matrix, "
                       "latency, memory, footprint", formatter_class=HelpFormatter)
    p.add_argument("run", help="a run folder written by loraq train (or its checkpoint/ folder)")
    p.add_argument("--split", default="test", help="train | val | test")
    p.add_argument("--data", help="another data set spec (default: the run's)")
    p.add_argument("--batch-size", type=int, default=256, help="examples per forward (and per timed batch)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--output", help="where to write the results (default: the run folder)")


def add_build_ext_parser(sub) -> None:
    p = sub.add_parser("build-ext", help="compile loraq's CUDA extension (the small-batch CUDA GEMVs) for an install "
                       "that has none, into the cache folder (needs nvcc and ninja; minutes)",
                       formatter_class=HelpFormatter)
    p.add_argument("--arch", help="compute capabilities, e.g. 9.0 or 8.0;9.0+PTX (default: the visible GPUs', "
                   "or 8.0;9.0+PTX without one)")
    p.add_argument("--jobs", type=int, help="compilers run at once (default: every core)")
    p.add_argument("--force", action="store_true", help="build again even when a build for these sources exists")
    p.add_argument("--verbose", action="store_true", help="print the compiler commands and output")
    p.add_argument("--quiet", action="store_true", help="no progress line")


def run_build_ext(args) -> int:
    import time

    from . import extension

    if args.jobs is not None and args.jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {args.jobs}")
    archs = extension.parse_archs(args.arch) if args.arch else None
    where, _ = extension.import_installed()
    if where:
        print(f"nothing to build: this install has the compiled extension {where}")
        return 0
    before = extension.build_record()
    start = time.monotonic()
    try:
        folder = extension.build(archs, jobs=args.jobs, force=args.force, verbose=args.verbose,
                                 progress=not args.quiet)
    except RuntimeError as e:  # the compiler failed: its last lines, exit 1
        print(f"loraq build-ext: error: {e}", file=sys.stderr)
        return 1
    record = extension.build_record(folder)
    archs_built = ";".join(record["archs"])
    if before is not None and before == record:
        print(f"already built for {archs_built}: {folder} (--force builds it again)")
    else:
        print(f"built for {archs_built} in {time.monotonic() - start:.0f} s: {folder}")
    ok, check = _extension_check()
    print(f"check: {check}")
    if not ok:
        return 1
    print("loraq now loads it whenever loraq._C is missing; on CUDA the tuner times its GEMVs beside the Triton "
          "kernels (LORAQ_CUDA_GEMV=0 leaves them out)")
    return 0


def _extension_check():
    """``(passed, what was checked)``: the extension's CPU ops against loraq's Python dequantize
    (its GPU kernels need a GPU)."""
    import torch

    from .formats import Int1Weight, Sparse4x4Weight

    q = Int1Weight.from_dense(torch.randn(7, 45, dtype=torch.float16), group_size=16)
    s = Sparse4x4Weight.from_dense(torch.randn(30, 37))
    try:
        ok = (torch.equal(torch.ops.loraq.int1_dequantize(q.packed, q.scale, 45, 16), q.dequantize())
              and torch.equal(torch.ops.loraq.sparse4x4_dequantize(s.values, s.positions, 30, 37), s.dequantize()))
    except Exception as e:  # ops missing (not loaded) or failing
        return False, f"the extension's dequantize did not run ({type(e).__name__}: {e}): build it again with --force"
    if not ok:
        return False, "the extension's dequantize differs from loraq's Python: build it again with --force"
    gemvs = [op for op in ("int1_gemv_mma", "sparse4x4_gemv") if hasattr(torch.ops.loraq, op)]
    return True, (f"int1 and sparse4x4 dequantize on the CPU match loraq's Python; GEMV ops registered: "
                  f"{', '.join(gemvs)}")


def _check_backend(device: str) -> None:
    """A ``LORAQ_BACKEND`` that cannot run on ``device`` fails here, as bad input, before anything is
    written: the layers would raise it mid-run, after the run folder was started."""
    from . import ops
    from .train import check_device, resolve_device

    name = os.environ.get("LORAQ_BACKEND")
    if not name or name in ("auto", "reference"):
        return
    if name not in ops.BACKENDS:
        raise ValueError(f"LORAQ_BACKEND must be one of {', '.join(ops.BACKENDS)}, got {name!r}")
    check_device(device)
    dev = resolve_device(device)
    ok, why = ops.backend_status(dev)[name]
    if not ok:
        raise ValueError(f"LORAQ_BACKEND={name} cannot run on {dev}: {why}")


def run_train(args) -> int:
    from .train import TrainConfig, train

    _check_backend(args.device)
    options = {k: v for k, v in vars(args).items() if k not in ("command", "output", "quiet")}
    summary = train(TrainConfig(**options), output=args.output, quiet=args.quiet)
    print(f"best epoch {summary['best_epoch']}: validation accuracy {summary['best_val_acc']:.4f}, "
          f"test accuracy {summary['test_acc']:.4f}; {summary['trainable_params']:,} trainable parameters, "
          f"{summary['compression_ratio']:.2f}x smaller than dense; run folder {summary['output']}")
    return 0


def _print_sweep(result) -> None:
    print(result["table"])
    print(f"\nevaluation.csv, accuracy_vs_rank.png and per-cell reports in {result['output']}")


def run_sweep(args) -> int:
    from .sweep import SweepConfig, sweep

    _check_backend(args.device)
    options = {k: v for k, v in vars(args).items() if k not in ("command", "output", "quiet")}
    _print_sweep(sweep(SweepConfig(**options), output=args.output, quiet=args.quiet))
    return 0


def run_demo(args) -> int:
    from .demo import demo, demo_config

    _check_backend(demo_config(args.quick).device)
    result = demo(quick=args.quick, output=args.output, quiet=args.quiet)
    _print_sweep(result)
    print(f"demo finished in {result['seconds']:.0f} s")
    return 0


def run_evaluate(args) -> int:
    from .evaluate import evaluate

    _check_backend(args.device)
    r = evaluate(args.run, split=args.split, data=args.data, output=args.output, device=args.device,
                 batch_size=args.batch_size)
    print(f"{r['split']} ({r['examples']} examples): accuracy {r['accuracy']:.4f}, macro precision "
          f"{r['macro_precision']:.4f}, recall {r['macro_recall']:.4f}, F1 {r['macro_f1']:.4f}; "
          f"{r['median_latency_ms_per_batch']:.2f} ms per batch of {r['batch_size']}; "
          f"stored {r['footprint']['stored_bytes']:,} bytes ({r['footprint']['ratio']:.2f}x smaller than dense)")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    try:
        status = _main(argv)
        sys.stdout.flush()  # a pipe's buffered output fails here, not in Python's flush at exit
        return status
    except BrokenPipeError:  # the reader left (loraq info | head): no traceback, now or at exit
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # stdout is no file (captured)
            pass
        return 141  # the shell's status for SIGPIPE


def _main(argv: Optional[List[str]]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "info":
        print(info_text())
        return 0
    handler = {"train": run_train, "sweep": run_sweep, "evaluate": run_evaluate, "demo": run_demo,
               "build-ext": run_build_ext}[args.command]
    try:
        return handler(args)
    except (ValueError, FileNotFoundError, ImportError) as e:  # bad input or a missing extra: one line, exit 2
        print(f"loraq {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        raise
    except OSError as e:  # an output path that is a file, no permission, a full disk: one line, exit 1
        print(f"loraq {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: one line, the shell's status for SIGINT
        resumes = args.command == "sweep" or (args.command == "demo" and args.output is not None)
        print(f"loraq {args.command}: interrupted" + ("; rerun the same command to resume it (finished trials "
              "are kept)" if resumes else ""), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
