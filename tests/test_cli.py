import os
import subprocess
import sys
from importlib.metadata import distribution

import pytest

import loraq
from loraq import cli


def run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "loraq", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_version():
    out = run("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"loraq {loraq.__version__}"


def test_console_script_is_declared():
    # the distribution's own entry points (entry_points(group=...) is Python 3.10+)
    scripts = {e.name: e.value for e in distribution("loraq").entry_points if e.group == "console_scripts"}
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


def _subparsers():
    parser = cli.build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return action.choices


def test_help_documents_every_option_and_shows_each_default_as_typed():
    import argparse

    for name in ("train", "sweep", "evaluate", "demo"):
        p = _subparsers()[name]
        for action in p._actions:
            assert action.help, f"loraq {name} {action.option_strings or action.dest} has no help"
        text = " ".join(p.format_help().split())  # argparse wraps lines
        for action in p._actions:
            if action.option_strings and action.default not in (None, False, argparse.SUPPRESS) \
                    and "(default" not in action.help:
                assert f"(default: {action.default})" in text, (name, action.dest)
    sweep_help = " ".join(_subparsers()["sweep"].format_help().split())
    assert "(default: 2,4,8,16,32,64,128)" in sweep_help and "(default: int1,sparse4x4)" in sweep_help
    assert "(default: 1000,2000)" in sweep_help and "(default: gaussian,svd,loftq)" in sweep_help


def test_every_option_is_the_same_named_keyword_of_the_python_function_with_its_default():
    """README: every command is also a function with the same options (and so the same defaults)."""
    import dataclasses
    import inspect

    from loraq.demo import demo
    from loraq.evaluate import evaluate
    from loraq.sweep import SweepConfig
    from loraq.train import TrainConfig

    def parsed(*argv):
        args = vars(cli.build_parser().parse_args(list(argv)))
        del args["command"]
        return {k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}

    for name, config in (("train", TrainConfig), ("sweep", SweepConfig)):
        got = parsed(name)
        assert got.pop("output") is None and got.pop("quiet") is False
        want = {f.name: f.default for f in dataclasses.fields(config) if f.init}
        assert got == want, name
    for name, fn, argv in (("evaluate", evaluate, ["RUN"]), ("demo", demo, [])):
        got = parsed(name, *argv)
        params = inspect.signature(fn).parameters
        assert set(got) == set(params), name
        assert {k: v for k, v in got.items() if k != "run"} == \
            {k: p.default for k, p in params.items() if k != "run"}, name


def test_list_options_parse_commas_and_reject_non_integers(capsys):
    args = cli.build_parser().parse_args(["sweep", "--ranks", "2,8,32", "--hidden", "16, 16", "--compressions",
                                          "int1,sparse4x4", "--inits", "svd"])
    assert (args.ranks, args.hidden, args.compressions, args.inits) == ([2, 8, 32], [16, 16], ["int1", "sparse4x4"],
                                                                        ["svd"])
    for argv in (["train", "--hidden", "16,x"], ["sweep", "--ranks", "2.5"], ["train", "--rank", "x"]):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        err = capsys.readouterr().err
        # one line naming the option and value, not argparse's whole usage block first
        assert e.value.code == 2 and err.count("\n") == 1, err
        assert err.startswith(f"loraq {argv[0]}: error: argument {argv[1]}") and "--help" in err


@pytest.mark.parametrize("command, message", [
    ("train", "loraq train: interrupted\n"),
    ("sweep", "loraq sweep: interrupted; rerun the same command to resume it (finished trials are kept)\n"),
])
def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys, command, message):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sys.modules[f"loraq.{command}"], command, interrupted)
    try:
        rc = cli.main([command, "--hidden", "8", "--limit", "50", "--ranks" if command == "sweep" else "--rank", "2",
                       "--quiet"])
    except KeyboardInterrupt:  # escaped main (a traceback and Python's own exit status)
        rc = None
    assert rc == 130
    captured = capsys.readouterr()
    assert captured.err == message and captured.out == ""


def test_ctrl_c_in_a_real_run_exits_130_without_traceback(tmp_path):
    import signal
    import time

    p = subprocess.Popen([sys.executable, "-m", "loraq", "train", "--hidden", "8", "--epochs", "100000", "--rank", "2",
                          "--quiet", "--output", str(tmp_path / "r")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 60
    while not (tmp_path / "r" / "metrics.csv").exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.1)  # training has started
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130 and err == "loraq train: interrupted\n", err


def test_an_output_path_that_is_a_file_is_one_line_not_a_traceback(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    rc = cli.main(["train", "--hidden", "8", "--limit", "50", "--epochs", "1", "--rank", "2", "--quiet",
                   "--output", str(tmp_path / "file" / "run")])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and err.startswith("loraq train: error:") and "Not a directory" in err


def test_an_unusable_loraq_backend_is_bad_input_before_anything_is_written(tmp_path, monkeypatch, capsys):
    tiny = ["--hidden", "8", "--limit", "50", "--epochs", "1", "--quiet", "--device", "cpu"]
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for value, message in (("triton", "LORAQ_BACKEND=triton cannot run on cpu: Triton kernels need"),
                           ("fast", "LORAQ_BACKEND must be one of auto, cuda, triton, reference, got 'fast'")):
        monkeypatch.setenv("LORAQ_BACKEND", value)
        for argv in (["train", "--rank", "2"], ["sweep", "--ranks", "2", "--trials", "1"]):
            rc = cli.main([*argv, *tiny, "--output", str(tmp_path / "out")])
            err = capsys.readouterr().err
            assert rc == 2 and err == f"loraq {argv[0]}: error: {message}" + err.split(message, 1)[1]
            assert err.count("\n") == 1 and not (tmp_path / "out").exists()


def test_info_flags_settings_that_are_not_in_effect(monkeypatch):
    """A typo or a value loraq does not understand, listed bare, would look like a setting in effect."""
    for k, v in {"LORAQ_BACKEND": "fast", "LORAQ_FAST_LAUNCH": "true", "LORAQ_DENSE_SLAB_MIB": "lots",
                 "LORAQ_BACKNED": "triton", "LORAQ_ONE_LAUNCH": "1", "LORAQ_CACHE_DIR": "/tmp/x"}.items():
        monkeypatch.setenv(k, v)
    text = cli.info_text()
    lines = {line.split("=", 1)[0].strip(): line for line in text.split("settings:\n", 1)[1].splitlines()
             if "=" in line}
    assert "invalid: expected one of auto, cuda, triton, reference" in lines["LORAQ_BACKEND"]
    assert "not understood, so off" in lines["LORAQ_FAST_LAUNCH"]
    assert "invalid: a whole number of MiB" in lines["LORAQ_DENSE_SLAB_MIB"]
    assert "not a loraq setting" in lines["LORAQ_BACKNED"]
    assert lines["LORAQ_ONE_LAUNCH"] == "  LORAQ_ONE_LAUNCH=1" and lines["LORAQ_CACHE_DIR"] == "  LORAQ_CACHE_DIR=/tmp/x"


def test_output_piped_into_a_reader_that_left_is_no_traceback():
    p = subprocess.Popen([sys.executable, "-m", "loraq", "info"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # `loraq info | head -0`: the reader is gone before loraq writes
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141 and err == "", err


def test_python_m_loraq_runs_only_as_a_script():
    out = subprocess.run([sys.executable, "-c", "import loraq.__main__; print('imported')"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and out.stdout == "imported\n"
    assert run("--version").stdout == f"loraq {loraq.__version__}\n"
