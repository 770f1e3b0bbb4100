"""README.md's code, run as a new user would, and its stated numbers checked against what it prints.

The expected values are parsed from README.md itself, so these tests fail when either the README
or the code drifts from the other."""

import importlib.util
import os
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import loraq

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
UNITS = {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}  # loraq.nn.format_bytes: decimal units


def section(heading: str) -> str:
    """The README's text from ``heading`` (a whole line) to the next heading of its level or above."""
    level = len(heading) - len(heading.lstrip("#"))
    lines = README.splitlines(keepends=True)
    start = lines.index(heading + "\n")
    fenced = False
    for end in range(start + 1, len(lines)):
        fenced ^= lines[end].startswith("```")
        if not fenced and re.match(rf"#{{1,{level}}} ", lines[end]):  # a code block's "# comment" is not one
            break
    else:
        end = len(lines)
    return "".join(lines[start:end])


def python_blocks(text: str):
    return re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)


def close_at_precision(measured: float, stated: str) -> bool:
    """``measured`` rounds to ``stated`` at the number of decimals ``stated`` is written with."""
    decimals = len(stated.split(".")[1]) if "." in stated else 0
    return abs(measured - float(stated)) <= 0.5 * 10 ** -decimals + 1e-9


def test_readme_has_one_self_contained_python_block():
    # if another block is added, it needs a test here too
    assert len(python_blocks(README)) == 1
    assert python_blocks(section("## Ten lines"))


def test_ten_lines_block_runs_and_its_comments_hold(tmp_path, monkeypatch, capsys):
    (code,) = python_blocks(section("## Ten lines"))
    monkeypatch.chdir(tmp_path)  # the block saves to the relative path run/ckpt
    ns = {}
    exec(compile(code, "README.md (Ten lines)", "exec"), ns)
    out = capsys.readouterr().out
    model, fresh = ns["model"], ns["fresh"]

    # "# fc: 2.0 MB dense → 68 kB stored (15x less than fp16)", against the printed footprint row
    fp_line = next(line for line in code.splitlines() if "loraq.footprint(model)" in line)
    m = re.search(r"#\s*([\w.]+): ([\d.]+) (\w+) dense → ([\d.]+) (\w+) stored "
                  r"\(([\d.]+)x less than fp16\)", fp_line)
    assert m, f"footprint comment not in the expected form: {fp_line!r}"
    name, dense, dense_unit, stored, stored_unit, ratio = m.groups()
    header = next(i for i, line in enumerate(out.splitlines()) if "vs fp16" in line)
    row = next(line for line in out.splitlines()[header:] if line.split()[0] == name)
    p = re.search(r"\)\s+([\d.]+) (\w+)\s+([\d.]+) (\w+)\s+([\d.]+)x", row)
    assert p, row
    assert (p.group(2), p.group(4)) == (dense_unit, stored_unit), (row, fp_line)
    assert close_at_precision(float(p.group(1)), dense), (row, fp_line)
    assert close_at_precision(float(p.group(3)), stored), (row, fp_line)
    assert close_at_precision(float(p.group(5)), ratio), (row, fp_line)
    layer = next(l for l in loraq.footprint(model).layers if l.name == name)
    assert close_at_precision(layer.dense_bytes / UNITS[dense_unit], dense)
    assert close_at_precision(layer.base_bytes / UNITS[stored_unit], stored)
    assert close_at_precision(layer.fp16_bytes / layer.base_bytes, ratio)

    # "# per layer: bytes and ‖W−Ŵ‖/‖W‖ before/after the init": svd's start repairs, so after < before
    assert "‖W−Ŵ‖/‖W‖" in out
    report_row = next(line for line in out.splitlines() if line.split()[0] == name)
    before, after = map(float, report_row.split()[-2:])
    assert 0 < after < before < 1

    # "# ... train: only the LoRA adapters (and modules_to_save) require grad ..."
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{name}.lora_A", f"{name}.lora_B"}

    # "loraq.save(model, "run/ckpt")   # model.safetensors + loraq_config.json"
    save_line = next(line for line in code.splitlines() if "loraq.save(" in line)
    folder = re.search(r"loraq\.save\(model, \"([^\"]+)\"\)", save_line).group(1)
    files = re.findall(r"[\w.]+\.(?:safetensors|json)", save_line.split("#", 1)[1])
    assert sorted(os.listdir(tmp_path / folder)) == sorted(files)

    # "# bit-exact, no dense weights needed": the fresh, randomly initialised model comes back exactly
    assert isinstance(getattr(fresh, name), loraq.LoraLinear)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), model.eval()(x))
    for (k, a), (k2, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert k == k2 and (not torch.is_tensor(a) or (a.dtype == b.dtype and torch.equal(a, b))), k


def test_one_layer_and_functional_lines_run():
    text = section("## Ten lines")
    one = re.search(r"One layer: `([^`]+)`", text).group(1)
    functional = re.search(r"functional: `([^`]+)`", text).group(1)
    linear = nn.Linear(40, 24)
    layer = eval(one, {"loraq": loraq, "linear": linear})
    assert isinstance(layer, loraq.LoraLinear) and layer.compression == "sparse4x4" and layer.rank == 16
    x = torch.randn(5, 40)
    ns = {"loraq": loraq, "x": x, "weight": layer.base, "lora_A": layer.lora_A, "lora_B": layer.lora_B,
          "scaling": layer.scaling, "bias": layer.bias}
    y = eval(functional, ns)
    torch.testing.assert_close(y, layer(x))


def test_formats_table_bits_per_weight_match_footprint():
    # the bits cell is found by its form (a condition such as "for K a multiple of 32" dropped);
    # cells are split at unescaped pipes ("\\|w\\|" stays in its cell, as Markdown renders it)
    formula_cell = re.compile(r"[\dKNg +/()=.]+?(?: \([\d.]+ at \w = \d+\))?")
    rows = []
    for line in section("## Formats").splitlines():
        line = re.sub(r" for K a multiple of \d+", "", line)
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)]
        if len(cells) > 2 and re.match(r"`(int1|sparse4x4|dense)`", cells[1]):
            assert len(cells) == 6, f"an unescaped | splits a cell of: {line}"  # 4 columns
            rows.append((cells[1], next(c for c in cells[2:] if formula_cell.fullmatch(c))))
    assert len(rows) == 5, rows
    N, K, g = 8, 4096, 128
    for kind, bits in rows:
        kwargs = {"compression": re.match(r"`(\w+)`", kind).group(1)}
        if "group_size=g" in kind:
            kwargs["group_size"] = g
        if 'scale="onebit"' in kind:
            kwargs["scale"] = "onebit"
        layer = loraq.LoraLinear.from_linear(nn.Linear(K, N).half(), rank=4, **kwargs)
        (fp,) = loraq.footprint(nn.Sequential(layer)).layers
        measured = 8 * fp.base_bytes / (N * K)
        # "1 + 16/K (1.004 at K = 4096)", "1 + 16/K + 16/N", "(16 + 4)/16 = 1.25", "16"
        bits = bits.strip()
        example = re.search(r"\s*\(([\d.]+) at (\w) = (\d+)\)$", bits)
        total = re.search(r"\s*= ([\d.]+)$", bits)
        formula = bits[:(example or total).start()] if example or total else bits
        assert measured == pytest.approx(eval(formula, {"K": K, "N": N, "g": g})), (kind, bits, measured)
        if example:  # the formula's value where the README evaluates it
            value = eval(formula, {"K": K, "N": N, "g": g, example.group(2): int(example.group(3))})
            assert close_at_precision(value, example.group(1)), (kind, bits)
        if total:
            assert close_at_precision(measured, total.group(1)), (kind, bits)


def _env_table():
    rows = re.findall(r"^\| `(LORAQ_\w+)` \| ([^|]+) \|", section("### Environment variables"), re.M)
    return {name: default.strip().strip("`") for name, default in rows}


def _package_sources():
    files = [*sorted((ROOT / "loraq").rglob("*.py")), *sorted((ROOT / "kernels").rglob("*.py")),
             ROOT / "setup.py"]
    return "\n".join(f.read_text(encoding="utf-8") for f in files)


def test_environment_table_names_exactly_the_variables_the_code_reads():
    table = _env_table()
    assert table, "no LORAQ_* rows in the README's environment table"
    read = set(re.findall(r"[\"'](LORAQ_[A-Z0-9_]+)[\"']", _package_sources()))  # names as string literals
    assert set(table) == read, (sorted(set(table) - read), sorted(read - set(table)))


def test_environment_table_defaults_are_the_codes(monkeypatch, tmp_path):
    src = _package_sources()
    for name, default in _env_table().items():
        monkeypatch.delenv(name, raising=False)
        got = re.findall(rf"(?:environ\.get|getenv)\(\"{name}\", \"([^\"]*)\"\)", src)  # getenv: loraq.compat
        if got:
            assert set(got) == {default}, (name, default, got)
        elif re.search(rf"env_is\(\"{name}\", \"1\"\)", src):
            assert default in ("unset", "0"), (name, default)  # a switch: unset and 0 are both off
        elif re.search(rf"not env_is\(\"{name}\", \"0\"\)", src):
            assert default == "1", (name, default)  # a switch on unless 0
        elif name == "LORAQ_CACHE_DIR":
            from loraq.kernels import autotune

            monkeypatch.setenv("HOME", str(tmp_path))
            monkeypatch.setattr(autotune, "gpu_name", lambda device: "GPU")
            path = autotune.cache_file(torch.device("cpu"))
            assert path.parent == Path(os.path.expanduser(default)) / "autotune", (default, path)
        else:
            raise AssertionError(f"{name}: no default found in the code to check {default!r} against")


def _quickstart(monkeypatch, *argv, train=False):
    """examples/quickstart.py's main() with ``argv``; without ``train`` its fit() only records its calls."""
    spec = importlib.util.spec_from_file_location("quickstart", ROOT / "examples" / "quickstart.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    calls = []
    if not train:
        monkeypatch.setattr(module, "fit", lambda *a, **k: calls.append(k))
    monkeypatch.setattr("sys.argv", ["quickstart.py", *argv])
    return module.main, calls


def test_quickstart_prints_the_readme_lines(monkeypatch, capsys):
    block = re.search(r"`python examples/quickstart.py`.*?```\n(.*?)```", README, re.S).group(1)
    main, calls = _quickstart(monkeypatch)
    assert main() == 0 and len(calls) == 2
    printed = capsys.readouterr().out.strip().splitlines()
    expected = block.strip().splitlines()
    # same lines, accuracies aside (those need the full training: the README's were measured)
    for want, got in zip(expected, printed[-len(expected):]):
        pattern = r"\d\.\d+".join(map(re.escape, re.split(r"\d\.\d+", want)))
        assert re.fullmatch(pattern, got), (want, got)
    assert printed[-1].endswith("True")


def test_quickstart_refuses_a_bad_rank_before_pretraining(monkeypatch, capsys):
    for argv in (["--rank", "0"], ["--epochs", "-1"]):
        main, calls = _quickstart(monkeypatch, *argv)
        with pytest.raises(SystemExit) as e:
            main()
        assert e.value.code == 2 and calls == [], argv  # argparse's usage error, nothing trained
        assert f"got {argv[1]}" in capsys.readouterr().err, argv


def test_quickstart_rank_above_the_head_width_runs(monkeypatch, capsys):
    # the head is 10 wide: rank 16 gives it a full-rank adapter, as `loraq demo` does, not an error
    main, _ = _quickstart(monkeypatch, "--rank", "16")
    assert main() == 0
    assert "+ LoRA r=16 at init (svd)" in capsys.readouterr().out
