"""The command line: help for the tool and every command (in subprocesses, as
a user runs it), errors for unknown commands, quick demo runs (one seed: identical
metrics) and the README's layout of the application."""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import re
import subprocess
import sys
import tomllib

import pytest

from pointsparse.app import cli
from reference import ROOT


def start(*args: str) -> subprocess.Popen:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.Popen([sys.executable, "-m", "pointsparse", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def finish(proc: subprocess.Popen, timeout: int = 120) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


# Runs `python -m pointsparse ARGS` for each ARGS of a JSON list on argv[1] in this one process (sys.argv set,
# stdout and stderr captured, the exit status kept), and prints [[status, stdout, stderr], ...] as JSON.
_HELPS = r"""
import contextlib, io, json, runpy, sys
got = []
for args in json.loads(sys.argv[1]):
    sys.argv = ["pointsparse", *args]
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_module("pointsparse", run_name="__main__", alter_sys=True)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    got.append([code, out.getvalue(), err.getvalue()])
print(json.dumps(got))
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The help of the tool and of every command, as ``python -m pointsparse``
    prints it, in one child process (a child's start is seconds of importing
    torch: a child each took 35 s of the suite's worker time on an AMD Zen 3,
    bench/RESULTS.md stop 78), beside a quick demo in its own, started
    together as a user runs them (the demo writes to a temporary folder, not
    over the runs/demo a user's `make demo` left)."""
    out = tmp_path_factory.mktemp("quick-demo")
    helps = {"--help": ("--help",)}
    helps.update({f"{c} --help": (c, "--help") for c, _, _ in cli.COMMANDS})
    demo = start("demo", "--steps", "2", "--points", "5000", "--out", str(out))
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, "-c", _HELPS, json.dumps(list(helps.values()))], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = dict(zip(helps, map(tuple, json.loads(proc.stdout.strip().splitlines()[-1]))))
    found["demo"] = finish(demo, timeout=300)
    return found


def test_top_level_help(runs):
    rc, out, err = runs["--help"]
    assert rc == 0, err
    assert out.startswith("usage: pointsparse")
    for name, _, _ in cli.COMMANDS:
        assert name in out


@pytest.mark.parametrize("command", [name for name, _, _ in cli.COMMANDS])
def test_command_help(runs, command):
    rc, out, err = runs[f"{command} --help"]
    assert rc == 0, err
    assert out.startswith(f"usage: pointsparse {command}")


def test_every_option_of_every_command_says_what_it_does():
    """Each option's --help line explains it: demo's and prune's --seed and
    prune's --schedule were listed with nothing after them."""
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    bare = [(name, action.option_strings[0]) for name, parser in sub.choices.items() for action in parser._actions
            if action.option_strings and not action.help]
    assert not bare, bare


def test_each_commands_description_is_a_whole_sentence():
    """A command's ``--help`` shows its module's first docstring paragraph: it took the first line only, so
    ``pointsparse demo --help`` said "Train a small MinkUNet on generated LiDAR street scenes for a few
    minutes," and stopped there."""
    import argparse

    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in sub.choices.items():
        assert command.description.rstrip().endswith("."), (name, command.description)
    assert "score it on held-out scenes" in sub.choices["demo"].description


def test_demo_runs_and_prints_a_loss(runs):
    rc, out, err = runs["demo"]
    assert rc == 0, err[-3000:]
    losses = [float(v) for v in re.findall(r"loss\s+([-+0-9.eE]+|nan|inf)", out)]
    assert losses, out
    assert all(math.isfinite(v) for v in losses), out


def test_closing_lines_name_the_run_folders_files_as_out_was_given(tmp_path, monkeypatch, capsys):
    """The closing lines of train and demo named metrics.json under --out as
    typed (``runs/demo/metrics.json``) and the pictures by metrics.json's
    absolute paths (``/home/.../runs/demo/curves.png``): every file in the
    run folder is named under --out as typed now, a file elsewhere as it is."""
    from pointsparse.app import train

    (tmp_path / "runs" / "demo").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    report = {"miou": 0.5, "pictures": {"curves": str(tmp_path / "runs" / "demo" / "curves.png"),
                                        "elsewhere": str(tmp_path / "other.png")}}
    train._print_report(report, "runs/demo")
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["mIoU 50.0%  ->  runs/demo/metrics.json", "  curves: runs/demo/curves.png",
                     f"  elsewhere: {tmp_path / 'other.png'}"], lines


def test_demo_default_plan_is_fixed_and_a_seed_repeats_exactly(tmp_path):
    """The demo's default plan depends on nothing measured (no time budget,
    no time limit: a fixed epoch count), so two runs with one seed, in two
    processes, give identical metrics; ``--minutes`` is the opt-in budget."""
    import argparse
    import json

    from pointsparse.app import demo

    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    plan = demo.training_arguments(parser.parse_args([]))
    assert (plan.time_budget, plan.time_limit, plan.epochs) == (None, None, demo.EPOCHS)
    budget = demo.training_arguments(parser.parse_args(["--minutes", "2"]))
    assert (budget.time_budget, budget.epochs) == (2.0, demo.MAX_EPOCHS)
    for bad in ("nan", "0", "-1"):  # named as the user wrote it, not as the train flag it becomes
        with pytest.raises(ValueError, match="--minutes must be a finite number > 0"):
            demo.training_arguments(parser.parse_args(["--minutes", bad]))
    flags = ("demo", "--epochs", "1", "--points", "1500", "--seed", "3", "--no-progress")
    procs = [start(*flags, "--out", str(tmp_path / run)) for run in ("a", "b")]
    for proc in procs:
        rc, out, err = finish(proc, timeout=300)
        assert rc == 0, err[-3000:]
    a, b = (json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("a", "b"))
    assert a["epochs"] == b["epochs"] == 1 and a["steps"] == b["steps"] == 12
    assert a["history"]["step_loss"] == b["history"]["step_loss"]
    assert (a["miou"], a["per_class"], a["confusion"]) == (b["miou"], b["per_class"], b["confusion"])


def test_readme_layout_names_every_application_module_and_command():
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    layout = layout[layout.index("  app/"):layout.index("datasets/")]
    for path in sorted((ROOT / "pointsparse" / "app").glob("*.py")):
        assert path.name == "__init__.py" or path.name in layout, path.name
    for name, module, _ in cli.COMMANDS:
        assert f"`pointsparse {name}" in layout, name
        assert module.startswith("pointsparse.app.") and f"{module.rsplit('.', 1)[1]}.py" in layout, module


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 0
    assert capsys.readouterr().out.startswith("usage: pointsparse")


def test_unknown_command(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["bogus"])
    assert info.value.code == 2 and "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("argv, command, unknown", [
    (["train", "--out", "r", "--bogus", "1"], "train", "--bogus 1"),
    (["eval", "--checkpoint", "c.pt", "--bogus"], "eval", "--bogus"),
    (["prune", "lottery", "--bogus"], "prune", "--bogus"),  # (the procedure: prune's positional)
    (["prune", "--bogus", "lottery", "--quick"], "prune", "--bogus"),
    (["bench", "kmap", "--args", "--repeats 2", "--repeats", "2"], "bench", "--repeats 2"),
])
def test_an_option_the_command_does_not_take_is_named_with_its_usage(capsys, argv, command, unknown):
    """An option the command does not know was argparse's top-level error
    (``usage: pointsparse [-h] <command> ...``), which shows none of the
    command's options: it is the command's own usage and error line now,
    exit status 2."""
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert err.startswith(f"usage: pointsparse {command} [-h]"), err
    assert err.rstrip().endswith(f"pointsparse {command}: error: unrecognized arguments: {unknown}"), err


@pytest.mark.parametrize("argv, usage, message", [
    (["--bogus"], "usage: pointsparse [-h]", "pointsparse: error: unrecognized arguments: --bogus"),
    # (before the command: the program's own options, which train's --out is not)
    (["--out=r", "train", "--out", "r"], "usage: pointsparse [-h]",
     "pointsparse: error: unrecognized arguments: --out=r"),
    (["--out=r", "train", "--out", "r", "--bogus"], "usage: pointsparse [-h]",
     "pointsparse: error: unrecognized arguments: --out=r --bogus"),
    (["train", "--out", "r", "--epochs", "x"], "usage: pointsparse train [-h]",
     "pointsparse train: error: argument --epochs: invalid int value: 'x'"),
    (["prune"], "usage: pointsparse prune [-h]",
     "pointsparse prune: error: the following arguments are required: procedure"),
    (["prune", "magic"], "usage: pointsparse prune [-h]", "pointsparse prune: error: argument procedure: invalid "
                                                          "choice: 'magic'"),
])
def test_other_usage_errors_are_as_argparse_gives_them(capsys, argv, usage, message):
    """Words before the command, a wrong value, a missing or wrong procedure:
    argparse's error of the parser that read them, exit status 2."""
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert err.startswith(usage), err
    assert message in err.rstrip().splitlines()[-1], err


@pytest.mark.parametrize("argv, flag", [
    (["train", "--out", ""], "--out"),
    (["train", "--out", "r", "--data", "a.npy", ""], "--data"),
    (["train", "--out", "r", "--resume", ""], "--resume"),
    (["eval", "--checkpoint", "c.pt", "--out", ""], "--out"),
    (["eval", "--checkpoint", "c.pt", "--label-map", ""], "--label-map"),
    (["predict", "--checkpoint", "c.pt", "--data", "a.npy", "--out", ""], "--out"),
    (["predict", "--checkpoint", "c.pt", "--data", "", "--out", "p"], "--data"),
    (["predict", "--program", "", "--data", "a.npy", "--out", "p"], "--program"),
    (["export", "--checkpoint", "c.pt", "--out", ""], "--out"),
    (["demo", "--out=", "--steps", "1"], "--out"),
    (["prune", "channels", "--checkpoint", "c.pt", "--out", ""], "--out"),
    (["prune", "channels", "--checkpoint", "", "--out", "p"], "--checkpoint"),
])
def test_an_empty_path_is_a_usage_error(tmp_path, monkeypatch, capsys, argv, flag):
    """An empty word where a file or folder is named (an unset shell
    variable: --out "$DIR") was the current folder: train, predict and
    prune wrote their files there, --data '' read every cloud in it, and
    eval --out '' wrote no report, without a word. It is argparse's error
    naming the option, exit status 2, before anything is read or made."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert err.startswith(f"usage: pointsparse {argv[0]} [-h]"), err
    assert f"error: argument {flag}: " in err and "empty" in err, err
    assert list(tmp_path.iterdir()) == []


def test_train_run_as_a_module_refuses_an_empty_path_too(tmp_path, monkeypatch, capsys):
    """``python -m pointsparse.app.train`` (torchrun's entry) parses with its
    own parser, which refuses an empty --out as the CLI's does."""
    from pointsparse.app import train

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        train._cli(["--out", ""])
    assert info.value.code == 2
    assert "error: argument --out: " in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_version_flag_prints_the_packages_version(capsys):
    """``pointsparse --version`` was an unrecognised argument."""
    import pointsparse

    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"pointsparse {pointsparse.__version__}"


def test_console_script_entry_point():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, attr = scripts["pointsparse"].partition(":")
    assert (module, attr) == ("pointsparse.app.cli", "main")
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0


def test_every_library_the_package_imports_comes_with_pip_install():
    """``pip install .`` must bring what the library and its CLI import: the
    prune procedures' default task (digits) imports scikit-learn, which only
    ``make venv`` installed (six of the README's seven procedure commands
    failed after a plain pip install). Each third-party module the package
    imports is a dependency, an optional extra's (PLY / PCD, LAS: refused
    naming the extra where absent) or torch's own (sympy)."""
    import ast

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[<>=!~\[ ;]", d)[0].lower() for d in project["dependencies"]}
    extras = {re.split(r"[<>=!~\[ ;]", d)[0].lower() for group in project["optional-dependencies"].values()
              for d in group}
    distributions = {"sklearn": "scikit-learn", "open3d": "open3d-cpu"}  # (import name -> pip name)
    imported = set()
    for path in (ROOT / "pointsparse").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third = {m for m in imported if m not in sys.stdlib_module_names and m != "pointsparse"}
    assert {"torch", "numpy", "sklearn", "open3d"} <= third  # (the scan reads the imports)
    missing = {m for m in third - {"sympy"} if distributions.get(m, m) not in names | extras}
    assert not missing, missing
    assert "scikit-learn" in names  # the CLI's default task, not an extra


def test_bench_unknown_suite_is_an_error(capsys):
    assert cli.main(["bench", "no-such-suite"]) == 2
    err = capsys.readouterr().err
    assert "no-such-suite" in err or "no benchmark suites" in err
    # the command's own error line, as every other command's (was a bare message)
    assert err.startswith("pointsparse bench: error: ")


def test_bench_hands_args_to_each_suite(monkeypatch, capsys):
    """A suite's own options had no way through: `pointsparse bench conv
    --channels 64` was argparse's "unrecognized arguments". --args hands
    them on, split as a shell would; a quote left open is the command's
    error line."""
    from pointsparse.app import benchmark

    calls = []
    monkeypatch.setattr(benchmark, "suites", lambda: ["conv", "kmap"])
    monkeypatch.setattr(benchmark.subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    assert cli.main(["bench", "conv", "--quick", "--args", "--channels 64 --out 'a b.md'"]) == 0
    assert calls[0][-5:] == ["--quick", "--channels", "64", "--out", "a b.md"] and len(calls) == 1
    assert cli.main(["bench", "kmap", "--args", "--out 'open"]) == 2
    assert "pointsparse bench: error: --args" in capsys.readouterr().err and len(calls) == 1


def test_bench_runs_a_suite_once_refuses_one_out_for_several_and_names_the_failed(monkeypatch, capsys):
    """A CLI review: ``bench voxelize voxelize`` ran it twice; ``--args
    '--out F'`` for two suites wrote both pages to F, the last one left,
    each saying "written"; the status was the OR of the suites' (a signal's
    -9 gave 247, a 1 and a 2 gave 3) and no line named the failed suites."""
    from pointsparse.app import benchmark

    calls, codes = [], {}
    monkeypatch.setattr(benchmark, "suites", lambda: ["conv", "kmap", "spmm"])
    monkeypatch.setattr(benchmark.subprocess, "call",
                        lambda cmd: calls.append(cmd) or codes.get(cmd[1].rsplit("/", 1)[-1][:-3], 0))
    assert cli.main(["bench", "kmap", "kmap", "--quick"]) == 0 and len(calls) == 1
    for out in ("--out same.md", "--out=same.md"):
        assert cli.main(["bench", "conv", "kmap", "--args", out]) == 2
        assert "--args names one --out for 2 suites (conv, kmap)" in capsys.readouterr().err and len(calls) == 1
    assert cli.main(["bench", "kmap", "--args", "--out one.md"]) == 0 and len(calls) == 2  # (one suite: its page)
    codes.update(conv=-9, spmm=2)
    assert cli.main(["bench", "conv", "kmap", "spmm"]) == 1
    assert "pointsparse bench: 2 of 3 suites failed: conv (signal 9), spmm (exit 2)" in capsys.readouterr().err
    assert cli.main(["bench", "spmm", "kmap"]) == 2  # (one failed: its own status)
    assert cli.main(["bench", "conv"]) == 1  # (a signal: 1)


def test_bench_args_of_one_option(monkeypatch, capsys):
    """``--args '--no-variants'`` (one option, no space) was argparse's
    'argument --args: expected one argument': a word that starts with '-'
    reads as an option unless it holds a space, so only ``--args=...``
    worked. The word after --args is its value now, whatever it starts with."""
    from pointsparse.app import benchmark

    calls = []
    monkeypatch.setattr(benchmark, "suites", lambda: ["north_star", "kmap"])
    monkeypatch.setattr(benchmark.subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    assert cli.main(["bench", "north_star", "--args", "--no-variants", "--quick"]) == 0
    assert calls[-1][-2:] == ["--quick", "--no-variants"]
    assert cli.main(["bench", "kmap", "--args", "--repeats=2"]) == 0
    assert calls[-1][-1] == "--repeats=2" and calls[-1][-2].endswith("kmap.py")
    assert cli.main(["bench", "--args", "-h", "kmap"]) == 0
    assert calls[-1][-1] == "-h" and len(calls) == 3
    with pytest.raises(SystemExit) as info:  # (nothing after it: still argparse's error)
        cli.main(["bench", "kmap", "--args"])
    assert info.value.code == 2 and "--args: expected one argument" in capsys.readouterr().err


def test_bad_input_is_a_message_not_a_traceback(tmp_path):
    """A missing or damaged checkpoint, as a user meets it from the shell:
    one line naming the file, exit status 2; POINTSPARSE_TRACEBACK=1 gives
    the traceback."""
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(b"not a checkpoint")
    missing = tmp_path / "missing.pt"
    procs = [start("eval", "--checkpoint", str(missing), "--no-progress"),
             start("export", "--checkpoint", str(damaged), "--out", str(tmp_path / "m.pt2"))]
    for proc, (command, path) in zip(procs, (("eval", missing), ("export", damaged))):
        rc, out, err = finish(proc)
        assert rc == 2 and err.startswith(f"pointsparse {command}: error: ") and str(path) in err, err
        assert "Traceback" not in err
    os.environ[cli.TRACEBACK_ENV] = "1"
    try:
        rc, _, err = finish(start("eval", "--checkpoint", str(missing), "--no-progress"))
    finally:
        del os.environ[cli.TRACEBACK_ENV]
    assert rc == 1 and "Traceback" in err and str(missing) in err
    assert not (tmp_path / "m.pt2").exists()


def test_a_path_the_system_refuses_is_a_message_not_a_traceback(tmp_path, capsys):
    """A path the file system refuses with an error other than 'not found'
    (a name longer than the system's limit: ENAMETOOLONG from the first
    stat) was an OSError traceback, exit status 1, from every command that
    checks its paths: now the command's one error line naming the path,
    exit status 2, as for a missing file; POINTSPARSE_TRACEBACK=1 still
    gives the traceback."""
    import numpy as np
    import torch

    from pointsparse.models import MinkUNet

    long = "a" * 300  # (past NAME_MAX, 255 on the usual file systems)
    ckpt, cloud = tmp_path / "c.pt", tmp_path / "c.npy"
    config = {"in_channels": 7, "classes": ["a", "b", "c"], "cr": 0.125, "blocks": 1, "voxel_size": 0.4,
              "ignore_index": 255, "model": "minkunet"}
    torch.save({"model": MinkUNet(7, 3, cr=0.125, blocks=1).state_dict(), "config": config}, ckpt)
    np.save(cloud, (np.random.default_rng(0).random((200, 4)) * 10).astype(np.float32))
    cases = [["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / f"{long}.pt2")],
             ["eval", "--checkpoint", str(tmp_path / f"{long}.pt"), "--no-progress"],
             ["eval", "--checkpoint", str(ckpt), "--data", str(tmp_path / f"{long}.npy"), "--no-progress"],
             ["predict", "--checkpoint", str(ckpt), "--data", str(cloud), "--out", str(tmp_path / long),
              "--no-progress"],
             ["prune", "vectors", "--checkpoint", str(tmp_path / f"{long}.pt"), "--out", str(tmp_path / "p")],
             ["demo", "--out", str(tmp_path / long), "--steps", "1"]]
    for argv in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(f"pointsparse {argv[0]}: error: ") and long in err, (argv, err)
        assert "File name too long" in err and len(err.splitlines()) == 2, (argv, err)
    os.environ[cli.TRACEBACK_ENV] = "1"
    try:
        with pytest.raises(OSError):
            cli.main(cases[0])
    finally:
        del os.environ[cli.TRACEBACK_ENV]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.npy", "c.pt"]


def test_train_device_is_checked_before_training():
    """--device: cpu and cuda[:N] where this machine has them; anything else
    (a bogus name, another device type, cuda without CUDA or past the
    devices) a ValueError naming --device (it was torch's RuntimeError from
    deep inside the first .to())."""
    import torch

    from pointsparse.app.distributed import pick_device
    assert pick_device("cpu", 0) == torch.device("cpu")
    bad = ["bogus", "meta", "cuda:99", "cuda:-1x"]
    if not torch.cuda.is_available():
        bad += ["cuda", "cuda:0"]
    for name in bad:
        with pytest.raises(ValueError, match="--device"):
            pick_device(name, 0)


@pytest.mark.parametrize("argv,words", [
    (["train", "--out", "{tmp}/r", "--ignore-index", str(1 << 40)], "--ignore-index must fit in int32"),
    (["train", "--out", "{tmp}/r", "--label-map", "semantic-kitti"], "--label-map maps the raw labels"),
    (["train", "--out", "{tmp}/r", "--data", "generated-indoor", "--val-label-map", "s3dis"],
     "--val-label-map maps the raw labels"),
    (["prune", "channels", "--out", "{tmp}/p"], "prune channels needs --checkpoint"),
    (["prune", "vectors", "--out", "{tmp}/p"], "prune vectors needs --checkpoint"),
    (["prune", "channels", "--out", "{tmp}/p", "--checkpoint", "{tmp}/c.pt", "--multiple", "0"],
     "--multiple must be >= 1"),
    (["prune", "channels", "--out", "{tmp}/p", "--checkpoint", "{tmp}/c.pt", "--finetune-epochs", "-1"],
     "--finetune-epochs must be >= 0"),
    (["prune", "vectors", "--out", "{tmp}/p", "--checkpoint", "{tmp}/c.pt", "--finetune-epochs", "-1"],
     "--finetune-epochs must be >= 0"),
    # A thread count in the tens of thousands crashed the OpenMP runtime (a segfault, no message).
    (["train", "--out", "{tmp}/r", "--threads", "100000"], "--threads must be in [1, "),
    (["eval", "--out", "{tmp}/r", "--checkpoint", "{tmp}/c.pt", "--threads", "100000"], "--threads must be in [1, "),
    (["predict", "--out", "{tmp}/r", "--checkpoint", "{tmp}/c.pt", "--data", "{tmp}", "--threads", "100000"],
     "--threads must be in [1, "),
    (["train", "--out", "{tmp}/r", "--nproc", "100000"], "--nproc must be at most"),
    (["train", "--out", "{tmp}/r", "--seed", "-1"], "--seed must be in [0, 2**32)"),
    (["demo", "--out", "{tmp}/r", "--points", "100000000", "--steps", "1"], "--points must be at most"),
    (["demo", "--out", "{tmp}/r", "--steps", "1", "--epochs", "5"], "--epochs: --steps runs a quick check"),
    (["demo", "--out", "{tmp}/r", "--steps", "1", "--minutes", "1"], "--minutes: --steps runs a quick check"),
    (["prune", "channels", "--out", "{tmp}/p", "--checkpoint", "{tmp}/c.pt", "--sparsity", "0.9"],
     "prune channels keeps --ratio"),
])
def test_flags_checked_before_any_work(tmp_path, capsys, argv, words):
    """Flags that were accepted and then ignored or misread (a label map on
    generated scenes, an ignore index no label can hold, --multiple 0 read as
    the default 8, a negative fine-tuning count) or exited with status 1 (no
    --checkpoint): a one-line error naming the flag, exit status 2, nothing
    written."""
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert cli.main(argv) == 2
    assert words in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("argv, words", [
    (["train", "--data", "{tmp}/a.npy", "--beams", "64"], "--beams 64: the generated scenes' settings"),
    (["train", "--data", "{tmp}/a.npy", "--beams=64"], "--beams 64: the generated scenes' settings"),
    (["train", "--data", "{tmp}/a.npy", "--beam", "64"], "--beams 64: the generated scenes' settings"),
    (["train", "--data", "{tmp}/a.npy", "--max-range=50", "--scenes", "16"], "--scenes 16, --max-range 50.0: the "),
    (["train", "--data", "generated", "--schedule", "step", "--warmup=0.05"], "--warmup 0.05 is the warm-up of "),
    (["prune", "channels", "--checkpoint", "{tmp}/c.pt", "--seed", "0"], "--seed 0 (prune sensitivity, "),
    (["prune", "channels", "--checkpoint", "{tmp}/c.pt", "--rounds=5"], "--rounds 5 (prune schedule, lottery)"),
    (["prune", "amc", "--quick", "--episodes", "120"], "--episodes 120: --quick runs 30 episodes"),
])
def test_flags_typed_at_their_default_value_are_refused_too(tmp_path, capsys, argv, words):
    """A flag the run would not read is refused however it is typed (``--flag value``, ``--flag=value``, an
    abbreviation argparse takes), its default value included: ``train --beams 64`` on files was accepted and
    ignored, as the value equalled the default, where ``--beams 32`` was refused."""
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert cli.main([*argv, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert words in err and "would be ignored" in err, err
    assert not any(tmp_path.iterdir())


def test_given_flags_are_those_typed():
    """cli.given_flags names the flags typed on the command line, whatever their value, in the form
    ``--flag value``; on a namespace no command line made (no record of what was typed) it names those that
    differ from their defaults."""
    import argparse

    from pointsparse.app import train

    args = cli.build_parser().parse_args(["train", "--out", "r", "--data", "a.npy", "--bea=64", "--scenes", "16",
                                          "--no-augment"])
    assert cli.given_flags(args, train.add_arguments, "beams", "scenes", "max_range", "no_augment", "val_scenes") == \
        ["--beams 64", "--scenes 16", "--no-augment"]
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    plain = parser.parse_args(["--out", "r", "--data", "a.npy", "--beams", "64", "--scenes", "8"])
    assert cli.given_flags(plain, train.add_arguments, "beams", "scenes") == ["--scenes 8"]


def test_command_parsers_hold_only_actions_the_typed_record_reads():
    """CommandParser finds the typed options by parsing again into a
    namespace of marks: store, store_true/false and store_const replace a
    mark, but append, extend and count would build on it (an error at the
    second parse). Every command's options are of the first kinds."""
    import argparse

    readable = (argparse._StoreAction, argparse._StoreConstAction, argparse._HelpAction,
                argparse._VersionAction)  # (store_true/false are store_const)
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == {name for name, _, _ in cli.COMMANDS}
    for name, parser in sub.choices.items():
        assert isinstance(parser, cli.CommandParser), name
        for action in parser._actions:
            assert isinstance(action, readable), (name, action.dest, type(action).__name__)


def test_label_map_checks_name_the_generated_scenes_exactly():
    """--label-map is refused only where every cloud is generated: with
    --val-data files it maps theirs (as --val-label-map's help says), and a
    folder whose name starts with "generated" is files."""
    import argparse

    from pointsparse.app import train

    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    ok = [["--data", "generated", "--val-data", "v.bin", "--label-map", "semantic-kitti"],
          ["--data", "generated_scans/", "--label-map", "semantic-kitti"]]
    for argv in ok:
        train.check_args(parser.parse_args(["--out", "r", *argv]))
    with pytest.raises(ValueError, match="--label-map maps the raw labels"):
        train.check_args(parser.parse_args(["--out", "r", "--data", "generated-outdoor", "--label-map", "x"]))


def test_prune_channels_multiple_is_checked_in_the_api():
    from pointsparse.models import MinkUNet
    from pointsparse.prune.workflow import prune_channels

    model = MinkUNet(4, 3, cr=0.25, blocks=1).eval()
    for bad, error in ((0, ValueError), (-8, ValueError), (2.5, TypeError), (True, TypeError)):
        with pytest.raises(error, match="multiple .* must be a positive int"):
            prune_channels(model, None, 0.5, multiple=bad)


def test_out_paths_that_cannot_be_written_are_named(tmp_path, capsys):
    """--out that is a file where a directory is wanted (eval, prune), a
    folder where a file is wanted (export) or under a file: a one-line error
    naming it, exit status 2, before any work (were FileExistsError /
    torch's RuntimeError tracebacks, exit status 1, after the work)."""
    import torch

    from pointsparse import export

    from pointsparse.models import MinkUNet

    a_file = tmp_path / "taken"
    a_file.write_text("x")
    ckpt = tmp_path / "ckpt" / "checkpoint.pt"
    ckpt.parent.mkdir()
    config = {"in_channels": 7, "classes": ["a", "b", "c"], "cr": 0.125, "blocks": 1, "voxel_size": 0.4,
              "ignore_index": 255, "model": "minkunet", "data": ["generated"]}
    torch.save({"model": MinkUNet(7, 3, cr=0.125, blocks=1).state_dict(), "config": config,
                "args": {"data": ["generated"], "beams": 8, "azimuth_steps": 64, "val_scenes": 1}}, ckpt)
    cases = [(["eval", "--checkpoint", str(ckpt), "--out", str(a_file)], f"--out {a_file} is a file"),
             (["eval", "--checkpoint", str(ckpt), "--out", str(a_file / "sub")], "cannot make this directory"),
             (["prune", "channels", "--checkpoint", str(ckpt), "--out", str(a_file)], f"--out {a_file} is a file"),
             (["export", "--checkpoint", str(ckpt), "--out", str(tmp_path)], "is a folder; give the .pt2 file"),
             (["export", "--checkpoint", str(ckpt), "--out", str(a_file / "m.pt2")], "no folder"),
             (["export", "--checkpoint", str(ckpt), "--out", str(a_file / "sub" / "m.pt2")],
              f"--out {a_file / 'sub' / 'm.pt2'}: its folder {a_file / 'sub'}: cannot make this directory"),
             (["export", "--checkpoint", str(ckpt), "--out", str(ckpt)], "is the checkpoint it would export"),
             (["prune", "channels", "--checkpoint", str(ckpt), "--out", str(ckpt.parent)], "would replace"),
             (["prune", "vectors", "--checkpoint", str(ckpt), "--out", str(ckpt.parent)], "would replace"),
             (["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "m.txt")], "a program file ends in .pt2")]
    before = ckpt.read_bytes()
    for argv, words in cases:
        assert cli.main(argv) == 2, argv
        assert words in capsys.readouterr().err, argv
    assert ckpt.read_bytes() == before and sorted(p.name for p in ckpt.parent.iterdir()) == ["checkpoint.pt"]
    # a missing checkpoint: named, and --out's new folder not made (it was made before the checkpoint was read)
    assert cli.main(["export", "--checkpoint", str(tmp_path / "none.pt"), "--out", str(tmp_path / "new" / "m.pt2")]) == 2
    assert "none.pt" in capsys.readouterr().err and not (tmp_path / "new").exists()
    program = torch.export.export(torch.nn.Linear(2, 2), (torch.randn(1, 2),))
    with pytest.raises(ValueError, match="is a folder"):
        export.save(program, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "taken"]
    assert [p.name for p in ckpt.parent.iterdir()] == ["checkpoint.pt"]


def test_prune_out_in_the_run_folder_of_its_checkpoint_replaces_none_of_the_runs_files(tmp_path, capsys):
    """``prune ... --checkpoint RUN/best.pt --out RUN`` wrote the pruned
    checkpoint over RUN/checkpoint.pt, the run's last checkpoint beside the
    one given, silently (only RUN/checkpoint.pt as --checkpoint was refused);
    with --finetune-epochs the resumed training writes RUN/best.pt, the file
    given. Both now refused before any work, naming the file; nothing
    written."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"last epoch")
    (run / "best.pt").write_bytes(b"best epoch")
    alone = tmp_path / "alone"  # a run folder that kept only its best.pt
    alone.mkdir()
    (alone / "best.pt").write_bytes(b"best epoch")
    cases = [(["prune", "vectors", "--checkpoint", str(run / "best.pt"), "--out", str(run)], run / "checkpoint.pt"),
             (["prune", "voxels", "--checkpoint", str(run / "best.pt"), "--out", str(run) + "/"],
              run / "checkpoint.pt"),
             (["prune", "amc", "--checkpoint", str(run / "best.pt"), "--out", str(run)], run / "checkpoint.pt"),
             (["prune", "offsets", "--checkpoint", str(alone / "best.pt"), "--out", str(alone),
               "--finetune-epochs", "1"], alone / "best.pt")]
    for argv, named in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "would replace" in err and str(named) in err and "Traceback" not in err, (argv, err)
    assert sorted(p.name for p in run.iterdir()) == ["best.pt", "checkpoint.pt"]
    assert (run / "checkpoint.pt").read_bytes() == b"last epoch" and (run / "best.pt").read_bytes() == b"best epoch"
    assert [p.name for p in alone.iterdir()] == ["best.pt"]


def test_a_checkpoint_or_program_of_the_wrong_contents_is_a_message(tmp_path, capsys):
    """eval, predict and export on a checkpoint whose config holds a value of
    the wrong kind (a str voxel size, classes that are no list, widths that
    are no dict) or on a program whose meta does: a one-line error naming
    the file, exit status 2 (were the TypeError's traceback, exit status 1);
    nothing written."""
    import numpy as np
    import torch

    from pointsparse import export
    from pointsparse.models import MinkUNet

    config = {"in_channels": 7, "classes": ["a", "b", "c"], "cr": 0.125, "blocks": 1, "voxel_size": 0.4,
              "ignore_index": 255, "model": "minkunet"}
    weights = MinkUNet(7, 3, cr=0.125, blocks=1).state_dict()
    cloud = tmp_path / "c.npz"
    rng = np.random.default_rng(0)
    np.savez(cloud, xyz=(rng.random((500, 3)) * 10).astype(np.float32), labels=rng.integers(0, 3, 500))
    out = tmp_path / "out"
    bad = {"voxel": {"voxel_size": "0.4"}, "classes": {"classes": "abc"}, "widths": {"widths": [1, 2]}}
    for name, change in bad.items():
        ckpt = tmp_path / f"{name}.pt"
        torch.save({"model": weights, "config": {**config, **change}}, ckpt)
        for argv in (["eval", "--checkpoint", str(ckpt), "--data", str(cloud), "--no-progress"],
                     ["predict", "--checkpoint", str(ckpt), "--data", str(cloud), "--out", str(out),
                      "--no-progress"],
                     ["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "m.pt2")]):
            assert cli.main(argv) == 2, argv
            err = capsys.readouterr().err
            assert err.startswith(f"pointsparse {argv[0]}: error: ") and str(ckpt) in err, (argv, err)
    model = MinkUNet(7, 3, cr=0.125, blocks=1).eval()
    program = tmp_path / "bad.pt2"
    export.save(export.export_model(model, export.example_input(7, 0.4)), program, {**config, "voxel_size": "0.4"})
    for argv in (["eval", "--program", str(program), "--data", str(cloud), "--no-progress"],
                 ["predict", "--program", str(program), "--data", str(cloud), "--out", str(out), "--no-progress"]):
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(f"pointsparse {argv[0]}: error: ") and str(program) in err, (argv, err)
    assert not out.exists() and not (tmp_path / "m.pt2").exists()


def test_train_and_prune_on_a_checkpoint_of_the_wrong_contents_is_a_message(tmp_path, capsys):
    """train --resume / --init and prune (channels, vectors, offsets, a
    procedure on a --checkpoint) on a checkpoint whose config holds a value
    of the wrong kind (a str voxel size, classes that are no list, widths
    that are no dict): a one-line error naming the file, exit status 2, as
    eval's (were the TypeError's traceback, exit status 1); nothing written."""
    import numpy as np
    import torch

    from pointsparse import checkpoint
    from pointsparse.app.train import NUM_FEATURES
    from pointsparse.data.generated import OUTDOOR_CLASSES
    from pointsparse.models import MinkUNet

    tiny = ["--data", "generated", "--scenes", "2", "--val-scenes", "1", "--beams", "16", "--azimuth-steps", "192",
            "--max-range", "16", "--cr", "0.125", "--blocks", "1", "--voxel-size", "0.5", "--batch-size", "2",
            "--no-progress", "--seed", "3", "--epochs", "1"]
    classes = list(OUTDOOR_CLASSES)
    config = {"in_channels": NUM_FEATURES, "classes": classes, "cr": 0.125, "blocks": 1, "voxel_size": 0.5,
              "ignore_index": 255, "model": "minkunet"}
    model = MinkUNet(NUM_FEATURES, len(classes), cr=0.125, blocks=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    run = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": {"base_lrs": [0.05]},
           "history": {}, "epoch": 0, "torch_rng": torch.get_rng_state()}  # what --resume reads besides the config
    cloud = tmp_path / "c.npz"
    rng = np.random.default_rng(0)
    np.savez(cloud, xyz=(rng.random((500, 3)) * 10).astype(np.float32),
             labels=rng.integers(0, len(classes), 500))
    out, run_out = tmp_path / "out", tmp_path / "run"
    bad = {"voxel": {"voxel_size": "0.4"}, "classes": {"classes": "abc"}, "widths": {"widths": [1, 2]}}
    for name, change in bad.items():
        ckpt = tmp_path / f"{name}.pt"
        checkpoint.save(ckpt, {**run, "config": {**config, **change}})
        cases = [["train", *tiny, "--resume", str(ckpt), "--out", str(run_out)],
                 ["prune", "channels", "--checkpoint", str(ckpt), "--data", str(cloud), "--out", str(out)],
                 ["prune", "vectors", "--checkpoint", str(ckpt), "--out", str(out)],
                 ["prune", "offsets", "--checkpoint", str(ckpt), "--out", str(out)],
                 ["prune", "netadapt", "--checkpoint", str(ckpt), "--data", str(cloud), str(cloud),
                  "--out", str(out)]]
        if name != "widths":  # --init copies the tensors that fit by name and shape: no model of its widths made
            cases.append(["train", *tiny, "--init", str(ckpt), "--out", str(run_out)])
        for argv in cases:
            assert cli.main(argv) == 2, argv
            err = capsys.readouterr().err
            assert err.startswith(f"pointsparse {argv[0]}: error: ") and str(ckpt) in err, (argv, err)
            assert "Traceback" not in err, (argv, err)
    assert not out.exists() and not any(run_out.rglob("*.pt"))  # (train's --out holds only its lock's folder)


def test_processes_get_a_cuda_device_each_or_a_clear_error(monkeypatch):
    """NCCL takes one process per CUDA device: ``--nproc 2`` on a machine
    with one GPU, where --device defaults to cuda, failed inside
    DistributedDataParallel ("Duplicate GPU detected"); now a ValueError
    before training says to pass --device cpu or --nproc 1, as does
    ``--device cuda:0`` for several processes."""
    import torch

    from pointsparse.app.distributed import pick_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert pick_device(None, 0) == torch.device("cuda:0")
    assert pick_device("cuda", 0, 1) == torch.device("cuda:0")
    assert pick_device("cpu", 1, 2) == torch.device("cpu")
    for name in (None, "cuda"):
        with pytest.raises(ValueError, match=r"2 processes on this machine need a CUDA device each .* has 1: pass "
                                             r"--device cpu, or --nproc 1 \(torchrun: --nproc-per-node 1\)"):
            pick_device(name, 1, 2)
    with pytest.raises(ValueError, match="--device cuda:0 puts all 2 processes on one device"):
        pick_device("cuda:0", 0, 2)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert [pick_device(None, r, 2) for r in (0, 1)] == [torch.device("cuda:0"), torch.device("cuda:1")]


def test_a_launch_without_local_world_size_is_not_refused_for_the_whole_world(monkeypatch):
    """A launcher that sets WORLD_SIZE, RANK and LOCAL_RANK but not
    LOCAL_WORLD_SIZE (mpirun, SLURM scripts; torchrun and --nproc set it):
    the processes on this machine are not known, and the whole world was
    taken for them: 2 nodes of 4 GPUs (WORLD_SIZE 8) were refused ("8
    processes on this machine need a CUDA device each ... it has 4"), one
    process per node on --device cuda:0 too. Now each gets its local rank's
    device, as before the check; where LOCAL_WORLD_SIZE is set it holds."""
    import argparse

    import torch

    from pointsparse.app import distributed
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    groups = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda *a, **k: groups.append((a, k)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    args = argparse.Namespace(device=None, threads=torch.get_num_threads())
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("LOCAL_RANK", "1")
    dist = distributed.init_distributed(args)
    assert (dist.rank, dist.world, dist.device) == (5, 8, torch.device("cuda:1")) and len(groups) == 1
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    args.device = "cuda:0"
    assert distributed.init_distributed(args).device == torch.device("cuda:0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="--device cuda:0 puts all 2 processes on one device"):
        distributed.init_distributed(args)


def test_a_missing_optional_extra_is_one_line_with_its_install_hint(tmp_path, monkeypatch, capsys):
    """Reading a LAS tile without laspy ended the command with a traceback
    (the install hint on its last line); now the usual one-line error, exit 2."""
    monkeypatch.setitem(sys.modules, "laspy", None)  # import laspy raises ImportError
    (tmp_path / "tile.las").write_bytes(b"LASF" + bytes(400))
    code = cli.main(["train", "--data", str(tmp_path / "tile.las"), "--out", str(tmp_path / "run"), "--epochs", "1",
                     "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert "pointsparse train: error:" in err and "pip install laspy" in err and "Traceback" not in err


def test_eval_help_gives_evals_own_data_and_label_map_defaults():
    """``pointsparse eval --help`` showed train's texts for --data ("'generated' ..., the default") and
    --label-map ("semantic-kitti [default for .bin]"), while eval scores the run's data by default and reads
    --data files with the run's label map: a run trained on learning ids, scored on a SemanticKITTI .bin
    scan without --label-map, scored 569 of its 123,389 points, under wrong classes, as the help had it read
    them right. Each flag's help now says eval's default; train's and eval's lists of label maps name every
    map load_label_map knows."""
    import argparse

    from pointsparse.data.readers import LABEL_MAP_DIR

    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    helps = {name: {a.dest: " ".join(a.help.split()) for a in command._actions if a.help}
             for name, command in sub.choices.items()}
    assert "the default" not in helps["eval"]["data"]
    assert "default: the files the run validated on, else the run's data" in helps["eval"]["data"]
    assert "[default for .bin]" not in helps["eval"]["label_map"]
    assert ("default: the run's (its --val-label-map, but for files of its training clouds' format when the "
            "validation clouds' takes another default map the map the run trained through; else its --label-map, "
            "else the default map its clouds "
            "took, where --data's format takes it too: other formats are refused), else semantic-kitti for .bin") \
        in helps["eval"]["label_map"]
    for command in ("train", "eval"):
        for path in LABEL_MAP_DIR.glob("*.json"):
            assert path.stem in helps[command]["label_map"], (command, path.stem)
    # (eval runs one process and has no loss: train's "over all processes", "divided among processes" and "in
    # loss or metrics" were not eval's)
    for dest in ("batch_size", "threads", "ignore_index"):
        assert "process" not in helps["eval"][dest] and "loss" not in helps["eval"][dest], helps["eval"][dest]
        assert helps["eval"][dest] != helps["train"][dest]


def test_eval_help_names_the_files_its_out_gets(tmp_path):
    """``pointsparse eval --help`` said --out writes "metrics.json and PNGs"; eval writes eval-metrics.json,
    eval-confusion.png and eval-topdown.png (beside a run's own metrics.json, which it leaves alone): a user
    reading metrics.json after an eval into the run's folder read the training run's numbers."""
    import argparse

    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    help_text = next(a.help for a in sub.choices["eval"]._actions if a.dest == "out")
    for name in ("eval-metrics.json", "eval-confusion.png", "eval-topdown.png"):
        assert name in help_text


def test_a_system_failure_naming_no_path_is_no_usage_error(monkeypatch):
    """Only OSErrors that name a path (the input a user gave: a name too
    long, a permission refused) are the one-line usage error, exit status
    2: a failure of the system naming none (a full disk on write, a broken
    pipe) still raises, exit status 1 with its traceback, as before."""
    import errno

    from pointsparse.app import export

    def fails(error):
        def main(args):
            raise error
        return main

    for error in (OSError(errno.ENOSPC, "No space left on device"), BrokenPipeError(errno.EPIPE, "Broken pipe")):
        monkeypatch.setattr(export, "main", fails(error))
        with pytest.raises(type(error)):
            cli.main(["export", "--checkpoint", "c.pt", "--out", "m.pt2"])
    monkeypatch.setattr(export, "main", fails(PermissionError(errno.EACCES, "Permission denied", "/x/m.pt2")))
    assert cli.main(["export", "--checkpoint", "c.pt", "--out", "m.pt2"]) == 2


def test_a_command_imports_only_its_own_module():
    """``pointsparse --help`` and each command imported every command's module to build the parser: the
    pruning package, and torch's compiler under it, took about 1.5 s of every CLI call on 2 cores (4.4 s
    of CPU for a command's help). Now the tool's help imports none, a command only its own; every
    command's help and options are the same (build_parser() still builds them all)."""
    code = ("import sys\n"
            "from pointsparse.app import cli\n"
            "try:\n"
            "    cli.main(sys.argv[1:])\n"
            "except SystemExit:\n"
            "    pass\n"
            "names = [m for m, _, _ in [(n.rsplit('.', 1)[1], 0, 0) for _, n, _ in cli.COMMANDS]]\n"
            "print(sorted(n for n in names if 'pointsparse.app.' + n in sys.modules and n != 'cli'),\n"
            "      'torch._dynamo' in sys.modules, file=sys.stderr)\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for args in (["--help"], ["export", "--help"], ["eval", "--help"], ["prune", "--help"]):
        run = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                             cwd=ROOT, timeout=120)
        modules, dynamo = run.stderr.strip().splitlines()[-1].rsplit(" ", 1)
        if args[0] == "--help":
            assert (modules, dynamo) == ("[]", "False"), run.stderr[-2000:]
        elif args[0] == "prune":  # (the pruning command itself imports the pruning package, not the compiler:
            # prune/stripe.py made its fold's torch.compiler.disable at import, 0.9 s of CPU a call)
            assert "'prune'" in modules and dynamo == "False", (modules, dynamo)
        else:  # (export and eval share train's helpers, so they import it)
            assert f"'{cli.COMMANDS[[n for n, _, _ in cli.COMMANDS].index(args[0])][1].rsplit('.', 1)[1]}'" in modules
            assert "'prune'" not in modules and dynamo == "False", (args, modules, dynamo)
    full = cli.build_parser()
    sub = next(a for a in full._actions if isinstance(a, argparse._SubParsersAction))
    for name, _, _ in cli.COMMANDS:
        alone = next(a for a in cli.build_parser([name])._actions if isinstance(a, argparse._SubParsersAction))
        assert alone.choices[name].format_help() == sub.choices[name].format_help(), name


def test_ctrl_c_is_a_line_not_a_traceback(tmp_path):
    """Ctrl-C during ``pointsparse train`` printed a KeyboardInterrupt's full
    traceback. It prints one line now, saying --resume continues the run
    where it has a checkpoint, and the process still ends by SIGINT, as
    Python's does (a shell's loop of commands stops); called in-process,
    main returns 130 (a shell's code for a process SIGINT stopped)."""
    import signal
    from unittest import mock

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "pointsparse", "train", "--data", "generated", "--scenes", "2", "--val-scenes", "1",
           "--beams", "16", "--azimuth-steps", "192", "--max-range", "16", "--cr", "0.125", "--blocks", "1",
           "--voxel-size", "0.5", "--epochs", "10000", "--no-progress", "--out", str(out)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", POINTSPARSE_NUM_THREADS="1")

    def stopped_after(argv, line_start: str, signum, err_path):
        """(exit status, stderr) of ``argv`` sent ``signum`` once a stdout line starts with ``line_start``."""
        with open(err_path, "w") as err_file:
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err_file, text=True, env=env)
            try:
                for line in proc.stdout:
                    if line.startswith(line_start):
                        break
                proc.send_signal(signum)
                proc.communicate(timeout=120)
            finally:
                proc.kill()
        return proc.returncode, err_path.read_text()

    # (the first epoch done: its checkpoint written)
    status, err = stopped_after(cmd, "epoch 2/", signal.SIGINT, tmp_path / "err.txt")
    assert status == -signal.SIGINT, (status, err)
    assert "Traceback" not in err and err.strip().endswith(
        "pointsparse train: interrupted (train --resume continues from its last checkpoint)"), err
    assert (out / "checkpoint.pt").is_file()
    # SIGTERM (a scheduler's preemption) alike: it ended the process by its default action, no line, and left
    # a checkpoint's temporary file behind where it came during a write
    env = dict(env, POINTSPARSE_TRACEBACK="")
    status, err = stopped_after([*cmd, "--resume"], "epoch 3/", signal.SIGTERM, tmp_path / "err2.txt")
    assert status == -signal.SIGTERM, (status, err)
    assert "Traceback" not in err and err.strip().endswith(
        "pointsparse train: terminated (SIGTERM) (train --resume continues from its last checkpoint)"), err
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name]
    # with the traceback asked for: the traceback, and the process still ends by SIGTERM (it ended as by SIGINT)
    env = dict(env, POINTSPARSE_TRACEBACK="1")
    status, err = stopped_after([*cmd, "--resume"], "epoch 4/", signal.SIGTERM, tmp_path / "err3.txt")
    assert status == -signal.SIGTERM and "Traceback" in err and "Terminated" in err, (status, err[-2000:])
    with mock.patch("pointsparse.app.demo.main", side_effect=cli.Terminated):
        assert cli.main(["demo", "--out", str(tmp_path / "d")]) == 143
    with mock.patch("pointsparse.app.demo.main", side_effect=KeyboardInterrupt):
        assert cli.main(["demo", "--out", str(tmp_path / "d")]) == 130
    # a Ctrl-C while the command's module (and torch) import: the line too (it was the import's traceback)
    with mock.patch.object(cli, "build_parser", side_effect=KeyboardInterrupt), \
            mock.patch.dict(os.environ, {"POINTSPARSE_TRACEBACK": ""}), mock.patch("sys.stderr", new=io.StringIO()) as err:
        assert cli.main(["prune", "sensitivity"]) == 130
    assert err.getvalue() == "pointsparse prune: interrupted\n"
