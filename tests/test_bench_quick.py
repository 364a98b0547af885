"""`pointsparse bench NAME --quick` passes --quick to every bench/*.py script:
each one's own argument parser must take it (checked by handing the parser
the script builds ``["--quick"]``), and a few of the cheapest smoke runs go
end to end through the command, leaving the committed results untouched."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from pointsparse.app import benchmark, cli
from reference import ROOT
from test_bench_checks import _bench_module

# Runs each script as __main__ with ArgumentParser.parse_args replaced by a probe
# that parses ["--quick"] with the script's own parser and stops the script there.
_PROBE_HEAD = r"""
import argparse, contextlib, io, json, runpy, sys
from pathlib import Path

class Parsed(Exception):
    pass

parse_args = argparse.ArgumentParser.parse_args
"""

# After a probe (raising Parsed(what to report)): every script run as __main__, a dict of script -> report printed.
_PROBE_RUN = r"""
argparse.ArgumentParser.parse_args = probe
bench = Path(sys.argv[1])
sys.path.insert(0, str(bench))
found = {}
for script in sorted(bench.glob("*.py")):
    if script.stem.startswith("_"):
        continue
    sys.argv = [str(script)]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            runpy.run_path(str(script), run_name="__main__")
        found[script.stem] = "ran to the end without parsing its arguments"
    except Parsed as parsed:
        found[script.stem] = parsed.args[0]
    except SystemExit as e:
        found[script.stem] = f"exit {e.code}: {err.getvalue().strip()[-300:]}"
print(json.dumps(found))
"""

PROBE = _PROBE_HEAD + r"""
def probe(self, args=None, namespace=None):
    raise Parsed(getattr(parse_args(self, ["--quick"]), "quick", "no `quick` attribute"))
""" + _PROBE_RUN


def test_every_bench_script_takes_quick():
    proc = subprocess.run([sys.executable, "-c", PROBE, str(benchmark.BENCH_DIR)], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(found) == benchmark.suites()
    assert len(found) >= 18
    refused = {name: result for name, result in found.items() if result is not True}
    assert not refused, refused


def test_quick_runs_end_to_end_and_leave_the_results_alone(tmp_path, monkeypatch):
    """voxelize (one trip against four, checked equal), plan_grouped (fused
    against grouped conv, checked) and prune_exec (every pruned conv checked
    against the naive sum): exit 0, pages written to the temporary folder."""
    names = ["voxelize", "plan_grouped", "prune_exec"]
    committed = {n: (benchmark.BENCH_DIR / "results" / f"{n}.md").read_bytes() for n in names}
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    assert cli.main(["bench", *names, "--quick"]) == 0
    for n in names:
        assert (benchmark.BENCH_DIR / "results" / f"{n}.md").read_bytes() == committed[n]
        page = (tmp_path / "pointsparse-bench-quick" / f"{n}.md").read_text()
        assert page.startswith("# ") and "--quick" in page and "|---|" in page


def test_a_suite_without_its_checkpoint_says_so(tmp_path, monkeypatch, capsys):
    """The fine-tuning suites (prune_finetune, voxel_prune) on a checkout that has not run ``make demo``: the
    default checkpoint absent is a line on stdout and exit 0, measuring nothing (``pointsparse bench --quick``
    smoke-runs every suite there); a --checkpoint named and absent is exit 2 naming it (voxel_prune exited 0
    on it, then 2 on the default too; the two suites disagreed)."""
    import argparse

    sys.path.insert(0, str(benchmark.BENCH_DIR))
    try:
        import _common
    finally:
        sys.path.remove(str(benchmark.BENCH_DIR))
    absent = tmp_path / "absent" / "checkpoint.pt"
    for name in ("prune_finetune", "voxel_prune"):
        proc = subprocess.run([sys.executable, str(benchmark.BENCH_DIR / f"{name}.py"), "--quick", "--checkpoint",
                               str(absent)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert proc.returncode == 2, (name, proc.stderr[-2000:])
        assert f"--checkpoint: {absent} does not exist" in proc.stderr
        assert not (tmp_path / "runs").exists()
    monkeypatch.setattr(_common, "DEMO_CHECKPOINT", absent)
    parser = argparse.ArgumentParser()
    assert _common.absent_checkpoint(parser, absent, "suite") is True
    assert capsys.readouterr().out == (f"suite: {absent} does not exist (run `make demo` first, or pass "
                                       "--checkpoint); nothing measured\n")
    absent.parent.mkdir()
    absent.write_bytes(b"")
    assert _common.absent_checkpoint(parser, absent, "suite") is False
    # pages show the default (resolved in this checkout) relative to the repository, as another clone has it
    assert _common.shown(_common.ROOT / "runs" / "demo" / "checkpoint.pt") == str(Path("runs/demo/checkpoint.pt"))
    assert _common.shown(absent) == str(absent)


def _pointsparse_names(tree) -> dict:
    """alias -> dotted module path, for every import of a pointsparse module in ``tree``."""
    import ast

    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases.update({a.asname or a.name: a.name for a in node.names if a.name.startswith("pointsparse")})
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pointsparse") and not node.level:
            aliases.update({a.asname or a.name: f"{node.module}.{a.name}" for a in node.names})
    return aliases


_MISSING = object()


def _resolve(dotted: str):
    """The module or attribute ``dotted`` names, or ``_MISSING`` when it does
    not exist (an attribute whose value is None exists: ``_engine.VECTOR_DENSITY_TWIN``
    off Intel)."""
    import importlib

    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name, _MISSING)
            if obj is _MISSING:
                return _MISSING
        return obj
    return _MISSING


def test_bench_scripts_use_only_names_the_package_has():
    """Every ``module.name`` a bench script reads through an imported pointsparse
    module (or name it imports from one) exists: the scripts run rarely, so a
    renamed or removed library name would otherwise surface in a benchmark run
    (twice this happened: ``functional.conv_with_map``, ``_engine.DEFAULT_METHOD``)."""
    import ast
    import inspect

    missing = set()
    for script in sorted((ROOT / "bench").glob("*.py")):
        tree = ast.parse(script.read_text())
        aliases = _pointsparse_names(tree)
        missing |= {f"{script.name}: {path}" for path in aliases.values() if _resolve(path) is _MISSING}
        for node in ast.walk(tree):
            chain = []  # ps.nn.VoxelSkip -> base "ps", chain ["nn", "VoxelSkip"]
            while isinstance(node, ast.Attribute):
                chain.insert(0, node.attr)
                node = node.value
            if not chain or not isinstance(node, ast.Name) or node.id not in aliases:
                continue
            path = aliases[node.id]
            for name in chain:  # every name read from a module along the chain exists
                if not inspect.ismodule(_resolve(path)):
                    break
                path = f"{path}.{name}"
                if _resolve(path) is _MISSING:
                    missing.add(f"{script.name}:{node.lineno}: {path}")
                    break
    assert not missing, sorted(missing)


def test_prune_exec_times_only_the_modes_asked(tmp_path):
    """``prune_exec.py --modes fwd core``: the forward and kernels-alone
    columns timed (every pruned conv still checked), the fwd+bwd ones
    left as '-' rather than filled."""
    page = tmp_path / "page.md"
    proc = subprocess.run([sys.executable, str(benchmark.BENCH_DIR / "prune_exec.py"), "--quick", "--parts",
                           "sparsity", "--kinds", "offset", "--modes", "fwd", "core", "--out", str(page)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in page.read_text().splitlines() if line.startswith("| offset")]
    assert len(rows) == 3
    for cells in rows:
        fwd_ms, fwd_x, bwd_ms, bwd_x, core_x = (c.strip() for c in cells[4:9])
        assert float(fwd_ms) > 0 and fwd_x.endswith("x") and core_x.endswith("x")
        assert bwd_ms == bwd_x == "-"


def test_north_star_times_an_exported_program(tmp_path):
    """``bench/north_star.py --program NAME=FILE.pt2 --no-variants``: a program
    ``pointsparse export`` wrote, timed as ``pointsparse predict`` runs it on
    the KITTI sweep (a row with its file, size, form and times); a spec
    without ``=`` or naming no file is refused with the flag named."""
    import pytest

    from conftest import find_datasets

    datasets = find_datasets()
    if datasets is None or not (datasets / "kitti-raw" / "000049.bin").is_file():
        pytest.skip("needs ../shared/datasets/kitti-raw/000049.bin")
    sys.path.insert(0, str(benchmark.BENCH_DIR))
    try:
        from program_profile import small_program  # (the bench's own small exported MinkUNet)
    finally:
        sys.path.remove(str(benchmark.BENCH_DIR))
    program = small_program(tmp_path, voxel_size=0.4)
    script = str(benchmark.BENCH_DIR / "north_star.py")
    env = dict(os.environ, PYTHONPATH=str(ROOT), POINTSPARSE_DATASETS=str(datasets))
    page = tmp_path / "ns.md"
    proc = subprocess.run([sys.executable, script, "--quick", "--no-variants", "--voxel-size", "0.2", "--program",
                           f"tiny={program}", "--out", str(page)], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = page.read_text()
    assert "Trained programs on KITTI raw 000049 at 0.2 m" in text and "Seeded random weights" not in text
    row = next(line for line in text.splitlines() if line.startswith("| tiny |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == f"`{program}`" and cells[3] == "fused" and cells[4] == "0.4"
    assert float(cells[2]) > 0 and float(cells[5]) > 0 and float(cells[6]) > 0
    for spec, said in ((str(program), "NAME=FILE.pt2"), (f"tiny={tmp_path / 'absent.pt2'}", "does not exist")):
        proc = subprocess.run([sys.executable, script, "--quick", "--no-variants", "--program", spec, "--out",
                               str(page)], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
        assert proc.returncode != 0 and said in proc.stderr and "--program" in proc.stderr


def test_prune_finetune_keeps_each_models_rows_across_amounts(tmp_path):
    """bench/prune_finetune.py's OUT/rows.json: a row is reused under its own
    key (checkpoint and epochs; ratio and criterion for the pruned models;
    AMC's search for AMC), so a run with another ``--vectors`` reuses the
    unpruned and keep rows; a file of the earlier one-key form keeps its
    rows (and held-out scores) where its key starts as this run's, and
    loses them for another budget."""
    import argparse

    pf = _bench_module("prune_finetune")
    ckpt = tmp_path / "checkpoint.pt"
    args = argparse.Namespace(checkpoint=ckpt, epochs=60, ratio=0.5, criterion="l1", amc_episodes=0, amc_warmup=10,
                              vectors=0.85, square=False, pairs=True, panels=1, offsets=0.0)
    other = argparse.Namespace(**{**vars(args), "vectors": 0.5, "pairs": False, "offsets": 0.74})
    for name in ("unpruned", "keep 0.5", "keep 0.5 + pair vectors 0.85", "AMC"):
        assert pf.row_key(name, args) == pf.row_key(name, other)
    assert pf.row_key("unpruned", argparse.Namespace(**{**vars(args), "ratio": 0.25})) == pf.row_key("unpruned", args)
    for changed in ({"ratio": 0.25}, {"criterion": "l2"}, {"epochs": 20}):
        assert pf.row_key("keep 0.5", argparse.Namespace(**{**vars(args), **changed})) != pf.row_key("keep 0.5", args)
    assert pf.row_key("AMC", argparse.Namespace(**{**vars(args), "amc_episodes": 30})) != pf.row_key("AMC", args)
    rows = {"unpruned": [1, 1, 1, 0.8, 10, ""], "keep 0.5 + pair vectors 0.75": [1, 1, 1, 0.7, 5, ""]}
    held = {"48 bf16": {"unpruned": 0.87, "keep 0.5 + pair vectors 0.75": 0.88}}
    store = tmp_path / "rows.json"
    store.write_text(json.dumps({"key": f"{ckpt.resolve()} 60 0.5 l1 0 10 0.75 pair", "rows": rows, "held_out": held}))
    saved = pf.load_rows(store, args)
    assert saved["rows"] == rows and saved["held_out"] == held
    assert saved["keys"] == {n: pf.row_key(n, args) for n in rows}
    store.write_text(json.dumps({"key": f"{ckpt.resolve()} 20 0.5 l1 0 10 0.75 pair", "rows": rows, "held_out": held}))
    assert pf.load_rows(store, args) == {"rows": {}, "keys": {}, "held_out": {}}
    assert pf.load_rows(tmp_path / "absent.json", args) == {"rows": {}, "keys": {}, "held_out": {}}
    store.write_text(json.dumps(saved))
    assert pf.load_rows(store, args) == saved
    # The key held the checkpoint's path, not what it holds: a checkpoint trained again at the same path (make
    # demo writes runs/demo/checkpoint.pt) had the old one's rows come back as this one's. Its bytes count now.
    ckpt.write_bytes(b"one")
    first = pf.row_key("unpruned", args)
    ckpt.write_bytes(b"two")
    os.utime(ckpt, ns=(1, 1))
    assert pf.row_key("unpruned", args) != first


def test_a_bare_out_name_is_a_page_in_the_results_folder(tmp_path):
    """``--out NAME.md`` wrote NAME.md into the folder the script ran from in
    some scripts (cache_state.py, north_star.py, ...) and under bench/results/
    in others; every single-page script now writes a bare name as a page in
    the results folder (the quick one with --quick) and a path with a folder
    as given."""
    sys.path.insert(0, str(benchmark.BENCH_DIR))
    try:
        import _common
    finally:
        sys.path.remove(str(benchmark.BENCH_DIR))
    assert _common.page_path(None, "x.md") == _common.RESULTS_DIR / "x.md"
    assert _common.page_path("y.md", "x.md") == _common.RESULTS_DIR / "y.md"
    assert _common.page_path("y.md", "x.md", quick=True) == _common.results_path("y.md", quick=True)
    assert _common.page_path(str(tmp_path / "z.md"), "x.md") == tmp_path / "z.md"
    assert _common.page_path("./z.md", "x.md") == Path("z.md")  # (the folder it runs from, asked for)
    page = _common.results_path("bare_out_check.md", quick=True)
    page.unlink(missing_ok=True)
    proc = subprocess.run([sys.executable, str(benchmark.BENCH_DIR / "cache_state.py"), "--quick", "--out",
                           "bare_out_check.md"], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert page.is_file() and not (tmp_path / "bare_out_check.md").exists()


def test_voxel_prune_bench_adds_recorded_pruners(tmp_path):
    """bench/voxel_prune.py's VoxelPrune variant goes through
    models.add_voxel_prune: voxel_prunes records its pruners (a checkpoint of
    it loads pruned), the pruned forward is the one its own hooks gave, and
    the report loads the weights of a learned run saved before (the scorer
    of stage j as voxel_prune_<j>)."""
    import copy
    import importlib

    import torch

    import pointsparse as ps
    from pointsparse.models import MinkUNet, voxel_prunes

    sys.path.insert(0, str(benchmark.BENCH_DIR))
    try:
        vp = importlib.import_module("voxel_prune")
    finally:
        sys.path.remove(str(benchmark.BENCH_DIR))
    torch.manual_seed(0)
    dense = MinkUNet(4, 3, cr=0.25, blocks=1).eval()
    g = torch.Generator().manual_seed(1)
    coords = torch.unique(torch.cat([torch.zeros(800, 1, dtype=torch.long), torch.randint(0, 16, (800, 3),
                                                                                          generator=g)], 1), dim=0)
    x = ps.SparseTensor(torch.randn(len(coords), 4, generator=g), coords.int())
    for score in ("magnitude", "learned"):
        model = copy.deepcopy(dense)
        vp.add_voxel_prune(model, 0.5, (0, 2), score)
        channels = {j: vp._first_conv_channels(model.fuse[j]) if score == "learned" else None for j in (0, 2)}
        assert voxel_prunes(model) == {f"fuse.{j}": {"keep_ratio": 0.5, "score": score, "threshold": None,
                                                     "in_channels": channels[j]} for j in (0, 2)}
        by_hand = copy.deepcopy(dense)  # (the hooks the bench made before)
        for j in (0, 2):
            pruner = model.voxel_prune[f"fuse_{j}"]
            by_hand.fuse[j].register_forward_pre_hook(lambda module, args, p=pruner: (p(args[0]),))
        with torch.no_grad():
            assert torch.equal(model(x).feats, by_hand(x).feats)
    old = {k.replace("voxel_prune.fuse_", "voxel_prune_"): v.clone() for k, v in model.state_dict().items()}
    assert "voxel_prune_2.scorer.weight" in old
    torch.save(old, tmp_path / "weights.pt")
    fresh = copy.deepcopy(dense)
    vp.add_voxel_prune(fresh, 0.5, (0, 2), "learned")
    vp.load_weights(fresh, tmp_path / "weights.pt")
    assert torch.equal(fresh.voxel_prune.fuse_2.scorer.weight, old["voxel_prune_2.scorer.weight"])


def test_a_page_records_a_command_a_shell_gives_back(tmp_path):
    """A page's ``Command:`` line quotes its arguments as a shell needs them:
    ab_trees.py's ``--setup 0 'SPATIAL = True; EXPORT = True'`` was recorded
    unquoted (stops 50-53's pages), which a shell cuts at the ``;`` and
    argparse then refused (``unrecognized arguments: = True``)."""
    import shlex

    page = tmp_path / "a page.md"
    argv = ["--quick", "--setup", "1", "SPATIAL = False; EXPORT = False", "--out", str(page)]
    proc = subprocess.run([sys.executable, str(benchmark.BENCH_DIR / "ab_trees.py"), *argv], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(line for line in page.read_text().splitlines() if line.startswith("Command: `"))
    assert shlex.split(line[len("Command: `"):-1]) == ["python", "bench/ab_trees.py", *argv]


def test_ab_trees_times_an_spvcnn_from_the_points(tmp_path):
    """``ab_trees.py --model spvcnn``: each tree's child builds the same
    seeded SPVCNN, their per-point logits are compared, and both rows are
    timed."""
    page = tmp_path / "spvcnn.md"
    proc = subprocess.run([sys.executable, str(benchmark.BENCH_DIR / "ab_trees.py"), "--quick", "--model", "spvcnn",
                           "--out", str(page)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = page.read_text()
    assert "### SPVCNN (cr 0.5, unpruned, float32), a generated street" in text
    assert text.count("| equal |") == 2 and text.count("| 1.00x |") >= 2


def test_ab_trees_refuses_a_setup_for_no_tree(tmp_path):
    """``ab_trees.py --setup INDEX CODE``: an INDEX past the trees given was
    dropped silently (the run timed every tree without the setup asked for,
    its page then naming none), and one that is not a number ended in a bare
    ``int()`` traceback; both are now a usage error naming --setup."""
    for index, said in (("2", "trees 0 to 1"), ("one", "a tree's index")):
        proc = subprocess.run([sys.executable, str(benchmark.BENCH_DIR / "ab_trees.py"), "--quick", "--setup", index,
                               "SPATIAL = True", "--out", str(tmp_path / "page.md")], capture_output=True, text=True,
                              timeout=120, cwd=tmp_path)
        assert proc.returncode == 2 and "--setup" in proc.stderr and said in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr and not (tmp_path / "page.md").exists()


def test_bf16_layers_without_amx_says_so_and_exits_0(tmp_path):
    """bench/bf16_layers.py compares the AMX tiles with the vdpbf16ps form: on
    a CPU without AMX-BF16 its ``--quick`` exited 1, so ``pointsparse bench
    --quick`` (every script) failed on every machine but the Xeon, where a
    script lacking what it needs (CUDA, spconv, the KITTI sweep) says so and
    exits 0; it now does the same (a page written where AMX runs)."""
    from pointsparse import _ext

    page = tmp_path / "page.md"
    proc = subprocess.run([sys.executable, str(benchmark.BENCH_DIR / "bf16_layers.py"), "--quick", "--out", str(page)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, env=dict(os.environ,
                                                                                              PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    if _ext.core.conv_amx():
        assert page.is_file()
    else:
        assert "AMX-BF16" in proc.stdout and "nothing measured" in proc.stdout and not page.exists()


# Each script's parser, handed "--quick OPTION 0" (and -1) for each of --repeats, --rounds, --threads and the other
# counts (map_loop.py's --calls / --runs, cuda_speed.py's --cpu-rounds) it has:
# it must refuse the count itself (argparse's exit 2, naming the option), not start the run.
COUNT_PROBE = _PROBE_HEAD + r"""
def probe(self, args=None, namespace=None):
    outcome = {}
    for option in ("--repeats", "--rounds", "--threads", "--calls", "--runs", "--cpu-rounds"):
        if option not in self._option_string_actions:
            continue
        for value in ("0", "-1"):
            err = io.StringIO()
            try:
                with contextlib.redirect_stderr(err):
                    parsed = parse_args(self, ["--quick", option, value])
                outcome[f"{option} {value}"] = f"accepted as {getattr(parsed, option[2:].replace('-', '_'))!r}"
            except SystemExit as e:
                said = err.getvalue().strip().splitlines()[-1:]
                if e.code != 2 or not said or option not in said[0]:
                    outcome[f"{option} {value}"] = f"exit {e.code}: {said}"
    raise Parsed(outcome)
""" + _PROBE_RUN


def test_no_script_takes_a_count_below_one():
    """``--repeats 0`` (``--rounds 0``) was read as 'not given' by the scripts
    that default to None (kmap.py timed 7 repeats, its page silent about it),
    and as zero by the others; a negative count ran every cloud's build and
    then failed in statistics.median ('no median for empty data'), and
    ``--threads 0`` failed in torch.set_num_threads: every script's parser
    refuses them now, naming the option. So do map_loop.py's --calls / --runs
    (0 calls: a median of nothing in the child; 0 runs: a page of empty
    rows) and cuda_speed.py's --cpu-rounds."""
    proc = subprocess.run([sys.executable, "-c", COUNT_PROBE, str(benchmark.BENCH_DIR)], capture_output=True,
                          text=True, timeout=120, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = {name: said for name, said in json.loads(proc.stdout.strip().splitlines()[-1]).items() if said}
    assert not found, found


# Runs each script named in sys.argv[2] (a JSON dict of script -> command lines) as __main__ with each command
# line, stopping it where _common.quick_defaults has filled in the options left unset: reports what they hold.
FILL_PROBE = r"""
import contextlib, io, json, runpy, sys
from pathlib import Path

bench = Path(sys.argv[1])
sys.path.insert(0, str(bench))
import _common

class Filled(Exception):
    pass

fill = _common.quick_defaults
def probe(args, **defaults):
    fill(args, **defaults)
    raise Filled({name: getattr(args, name) for name in defaults})

_common.quick_defaults = probe

def stop(name):  # (a script that reads its scene or page before filling its defaults stops there, not timed)
    def reached(*args, **kwargs):
        raise Filled(f"reached _common.{name} before filling its defaults")
    return reached

for name in ("kitti_or_street", "kitti_path", "street_scene", "street_points", "real_sweeps", "page_path"):
    setattr(_common, name, stop(name))
found = {}
for script, argvs in json.loads(sys.argv[2]).items():
    for argv in argvs:
        sys.argv = [str(bench / f"{script}.py"), *argv]
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                runpy.run_path(sys.argv[0], run_name="__main__")
            said = "ran to the end without filling its defaults"
        except Filled as filled:
            said = filled.args[0]
        except SystemExit as e:
            said = f"exit {e.code}: {err.getvalue().strip()[-300:]}"
        found[f"{script} {' '.join(argv)}"] = said
print(json.dumps(found))
"""


def test_quick_leaves_the_counts_given_alone():
    """--quick set its own counts over those the command line gave: map_loop.py --quick --calls 7 ran 3
    calls (and the page's command named 7), as did cuda_speed.py, north_star.py, vector_threshold.py,
    collector_stalls.py and conv_instructions.py with their rounds, calls, runs, voxels, channels and the
    like, and ab_trees.py, bf16_training.py, cache_state.py, call_overhead.py, compress_linear.py,
    host_reads.py, kmap_instructions.py, masked_wgrad.py and output_pool.py after them (cache_state.py
    --quick --mb 64 passed over 2 MB, output_pool.py --quick --cr 1 timed cr 0.25, kmap_instructions.py
    --quick --time 5 timed one round). --quick now only changes the defaults (bench/maps_ahead.py's rule):
    each option given keeps its value, the others take --quick's (or, without it, the full run's)."""
    given = {"map_loop": {"--calls": 7, "--runs": 3},
             "cuda_speed": {"--rounds": 5, "--cpu-rounds": 2, "--voxels": 30000, "--cr": [0.75]},
             "north_star": {"--rounds": 3},
             "vector_threshold": {"--rounds": 4, "--channels": [16], "--densities": [0.5], "--listed": [4]},
             "collector_stalls": {"--calls": 50, "--runs": 3},
             "conv_instructions": {"--calls": 3, "--channels": [16], "--kinds": ["offset"]},
             "ab_trees": {"--rounds": 3},
             "bf16_training": {"--channels": [32], "--rounds": 3},
             "cache_state": {"--channels": [32], "--rounds": 3, "--mb": 8.0},
             "call_overhead": {"--rounds": 3},
             "compress_linear": {"--rounds": 3},
             "host_reads": {"--voxels": 10000, "--cr": 0.75},
             "kmap_instructions": {"--calls": 3, "--time": 4},
             "masked_wgrad": {"--channels": [32], "--amounts": [0.5], "--rounds": 3},
             "output_pool": {"--cr": 0.5, "--channels": [16], "--rounds": 3}}

    def words(options):
        return [w for option, value in options.items()
                for w in (option, *map(str, value if isinstance(value, list) else [value]))]

    argvs = {script: [["--quick", *words(options)], ["--quick"], [], [*words(options)[:2]], ["--quick",
                                                                                               *words(options)[:2]]]
             for script, options in given.items()}
    proc = subprocess.run([sys.executable, "-c", FILL_PROBE, str(benchmark.BENCH_DIR), json.dumps(argvs)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT, env=dict(os.environ,
                                                                                            PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    for script, options in given.items():
        asked = {option[2:].replace("-", "_"): value for option, value in options.items()}
        both, quick, full = (found[f"{script} {' '.join(argv)}"] for argv in argvs[script][:3])
        assert all(isinstance(x, dict) for x in (both, quick, full)), (script, both, quick, full)
        assert both == asked, (script, both)  # (every option given: --quick changes none)
        assert set(quick) == set(full) == set(asked) and quick != full, (script, quick, full)
        assert all(value is not None for value in (*quick.values(), *full.values())), (script, quick, full)
        first = next(iter(asked))  # one option given: it alone keeps its value, the others are the defaults
        for argv, defaults in ((argvs[script][3], full), (argvs[script][4], quick)):
            one = found[f"{script} {' '.join(argv)}"]
            assert one == {**defaults, first: asked[first]}, (script, argv, one)
    assert found["map_loop --quick"] == {"calls": 3, "runs": 1} and found["north_star --quick"] == {"rounds": 1}
    assert found["cuda_speed "]["voxels"] == 85_000 and found["conv_instructions --quick"]["kinds"] == ["dense"]
    assert found["cache_state --quick"] == {"channels": [16], "rounds": 2, "mb": 2.0}
    assert found["output_pool --quick"]["cr"] == 0.25 and found["kmap_instructions --quick"]["time"] == 0


def test_kmap_page_names_the_options_it_ran_with(tmp_path):
    """bench/kmap.py's ``Command:`` line was always ``bench/kmap.py [--quick]``
    and its note '7 repeats, 3 above 300k voxels or with --quick': a page of
    ``--repeats 1`` read as medians of 3 or 7 builds, and its command did not
    reproduce it. Both say what ran now (the command quoted as typed)."""
    import shlex

    page = tmp_path / "odd name's" / "k.md"
    proc = subprocess.run([sys.executable, str(benchmark.BENCH_DIR / "kmap.py"), "--quick", "--repeats", "1",
                           "--out", str(page)], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = page.read_text()
    command = next(line for line in text.splitlines() if line.startswith("Command: `"))[len("Command: `"):-1]
    assert shlex.split(command)[-5:] == ["--quick", "--repeats", "1", "--out", str(page)]
    assert "Medians of repeated builds (1 repeat each (--repeats))" in text and "7 repeats" not in text
    # (a median of fewer than 7 builds gives no verdict on the target: 2 of 6 quick runs read "4.2x (target >= 6x)")
    assert "no verdict on the target" in text
    assert page.with_suffix(".png").is_file() and f"wrote {page} and" in proc.stdout


def test_the_documented_args_example_runs():
    """``pointsparse bench --help`` and the README showed ``pointsparse bench
    conv --args '--channels 64 --rounds 5'``, and conv.py has neither
    option ('unrecognized arguments'). The example they show now
    (benchmark.EXAMPLE) is parsed by that suite's own parser."""
    import shlex

    suite, options = benchmark.EXAMPLE
    probe = _PROBE_HEAD + f"""
def probe(self, args=None, namespace=None):
    parse_args(self, {shlex.split(options)!r})
    raise Parsed(True)
""" + _PROBE_RUN
    proc = subprocess.run([sys.executable, "-c", probe, str(benchmark.BENCH_DIR)], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])[suite] is True
    readme = (ROOT / "README.md").read_text()
    help_text = cli.build_parser()._subparsers._group_actions[0].choices["bench"].format_help()
    for text in (readme, " ".join(help_text.split())):
        assert f"--args '{options}'" in text and "--channels 64 --rounds 5" not in text


# Each script with a page option (--out / --output), handed a folder, or a path under a file, as the page.
PAGE_PROBE = COUNT_PROBE.replace('''    for option in ("--repeats", "--rounds", "--threads", "--calls", "--runs", "--cpu-rounds"):
        if option not in self._option_string_actions:
            continue
        for value in ("0", "-1"):''', '''    for option in ("--out", "--output"):
        if option not in self._option_string_actions or option in SKIP.get(script.stem, ()):
            continue
        for value in (ARGV[2], ARGV[3] + "/page.md", ARGV[2] + "/"):''').replace(
    "bench = Path(sys.argv[1])", "bench = Path(sys.argv[1])\nARGV = list(sys.argv)\nSKIP = json.loads(ARGV[4])")
assert PAGE_PROBE.count("ARGV[3]") == 1 and "SKIP = " in PAGE_PROBE


def test_a_page_that_cannot_be_written_is_refused_before_the_run(tmp_path):
    """``--out`` naming a folder (``--out /tmp/``) or a path under a file
    ran the whole benchmark and then failed writing the page, in a bare
    IsADirectoryError / FileExistsError traceback (voxelize.py --quick:
    20 s lost; the full runs take minutes). Every page option is checked as
    it is parsed now (argparse's exit 2, naming it)."""
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    folders = {"spmm": ["--out"], "prune_finetune": ["--out"], "voxel_prune": ["--out"]}  # (these take folders)
    proc = subprocess.run([sys.executable, "-c", PAGE_PROBE, str(benchmark.BENCH_DIR), str(tmp_path), str(a_file),
                           json.dumps(folders)], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = {name: said for name, said in json.loads(proc.stdout.strip().splitlines()[-1]).items() if said}
    assert not found, found


def test_spmm_isa_page_in_a_new_folder_says_how_it_ran(tmp_path):
    """bench/spmm.py --isa --out NEW wrote spmm_isa.md into NEW without making
    it (FileNotFoundError after every build was timed), ran its 7 rounds
    with --quick, and both pages' Command lines left out --out (the isa
    page --quick too); --out naming a file ran the whole sweep, then failed
    in os.makedirs. Now: the folder is made, --quick takes 2 rounds (the
    page says so), the Command is the one typed, a file is refused at once."""
    import shlex

    folder = tmp_path / "new folder" / "isa"
    script = str(benchmark.BENCH_DIR / "spmm.py")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, script, "--isa", "--quick", "--threads", "1", "--out", str(folder)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = (folder / "spmm_isa.md").read_text()
    command = next(line for line in text.splitlines() if line.startswith("Command: `"))[len("Command: `"):-1]
    assert shlex.split(command)[-6:] == ["--isa", "--quick", "--threads", "1", "--out", str(folder)]
    assert "Medians of 2 interleaved rounds" in text
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    for given in (a_file, a_file / "sub"):
        proc = subprocess.run([sys.executable, script, "--quick", "--out", str(given)], capture_output=True,
                              text=True, timeout=60, cwd=tmp_path, env=env)
        assert proc.returncode == 2 and "argument --out:" in proc.stderr and "is a file" in proc.stderr


def test_conv_refuses_options_it_would_ignore(tmp_path):
    """bench/conv.py --widths 8 16 without --isa timed the default layers and
    never read the widths; --isa --parts gave the --isa page alone; --widths
    0 reached the kernels. Each is argparse's usage error now, naming the
    options, before anything is timed."""
    script = str(benchmark.BENCH_DIR / "conv.py")
    for argv, said in ((["--widths", "8", "16"], "--widths"), (["--isa", "--parts"], "--parts"),
                       (["--isa", "--widths", "0"], "--widths")):
        proc = subprocess.run([sys.executable, script, "--quick", *argv, "--output", str(tmp_path / "c.md")],
                              capture_output=True, text=True, timeout=60, cwd=tmp_path,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))
        assert proc.returncode == 2 and said in proc.stderr.splitlines()[-1], (argv, proc.stderr[-500:])
        assert not (tmp_path / "c.md").exists()


def test_memory_runs_the_steps_asked_and_says_how_it_ran(tmp_path):
    """bench/memory.py --quick ran 120 steps whatever --steps said, and its
    Command line read 'python bench/memory.py --steps 120 --threads 1'
    whatever --cr, --voxel-size or --quick were (run as written, it replaced
    bench/results/memory.md); --steps below 50 trained, then failed in a bare
    StopIteration (the RSS at step 50 is the baseline). --steps is taken as
    given, a count below 50 is refused at once, the Command is the one typed."""
    import shlex

    script = str(benchmark.BENCH_DIR / "memory.py")
    env = dict(os.environ, PYTHONPATH=str(ROOT), TMPDIR=str(tmp_path))
    proc = subprocess.run([sys.executable, script, "--steps", "10"], capture_output=True, text=True, timeout=60,
                          cwd=tmp_path, env=env)
    assert proc.returncode == 2 and "--steps" in proc.stderr.splitlines()[-1] and "step" not in proc.stdout
    argv = ["--quick", "--steps", "50", "--cr", "0.125", "--voxel-size", "0.4"]
    proc = subprocess.run([sys.executable, script, *argv], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = (tmp_path / "pointsparse-bench-quick" / "memory.md").read_text()
    command = next(line for line in text.splitlines() if line.startswith("Command: `"))[len("Command: `"):-1]
    assert shlex.split(command)[-len(argv):] == argv
    assert "| 50 |" in text and "| 100 |" not in text and "cr=0.125" in text


def test_a_page_path_with_a_space_is_quoted_in_its_command(tmp_path):
    """voxelize.py and sparse_isa.py wrote ``--out PATH`` into the page's
    Command line unquoted: ``--out '/tmp/a b/v.md'`` read back as
    ``--out /tmp/a b/v.md`` (the run it names writes to /tmp/a with a stray
    argument). Quoted as a shell reads it now."""
    import shlex

    for name in ("voxelize", "sparse_isa"):
        page = tmp_path / "a b" / f"{name}.md"
        proc = subprocess.run([sys.executable, str(benchmark.BENCH_DIR / f"{name}.py"), "--quick", "--out",
                               str(page)], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))
        assert proc.returncode == 0, proc.stderr[-2000:]
        line = next(line for line in page.read_text().splitlines() if line.startswith("Command: `"))
        words = shlex.split(line[len("Command: `"):-1])
        assert words[words.index("--out") + 1] == str(page), (name, line)


def test_prune_speed_page_names_its_scene_size_and_threads(tmp_path):
    """bench/prune_speed.py's Command line gave --repeats, --amc-* and
    --scenes but not --voxels or --threads: a page of a 2,000-voxel scene on
    one thread named a command that times 30,000 voxels on two (and
    --voxels 0 was read as 'not given'). Both are on the line now, and
    --voxels takes a count of at least 1."""
    import shlex

    env = dict(os.environ, PYTHONPATH=str(ROOT), TMPDIR=str(tmp_path))
    script = str(benchmark.BENCH_DIR / "prune_speed.py")
    proc = subprocess.run([sys.executable, script, "--quick", "--voxels", "0"], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path, env=env)
    assert proc.returncode == 2 and "--voxels" in proc.stderr.splitlines()[-1]
    proc = subprocess.run([sys.executable, script, "--quick", "--voxels", "2000", "--threads", "1",
                           "--amc-episodes", "0"], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    page = (tmp_path / "pointsparse-bench-quick" / "prune_speed_generated.md").read_text()
    words = shlex.split(next(line for line in page.splitlines() if line.startswith("Command: `"))[10:-1])
    assert words[words.index("--voxels") + 1] == "2000" and words[words.index("--threads") + 1] == "1"


def test_train_only_names_experiments_it_has(tmp_path):
    """bench/train.py --only NAME with a name it has no experiment of (a typo,
    or a dataset's experiment where the dataset is absent) trained nothing
    and printed 'results: PAGE' with exit 0. It is argparse's error now,
    naming --only, the names it did not find and those it has."""
    proc = subprocess.run([sys.executable, str(benchmark.BENCH_DIR / "train.py"), "--quick", "--only", "generated",
                           "nosuch"], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                          env=dict(os.environ, PYTHONPATH=str(ROOT), TMPDIR=str(tmp_path)))
    said = proc.stderr.strip().splitlines()[-1:]
    assert proc.returncode == 2 and said and "--only" in said[0] and "'nosuch'" in said[0]
    assert "generated" in said[0].split("available")[-1] and "results:" not in proc.stdout


def test_ab_builds_says_when_outputs_were_not_checked(tmp_path):
    """``ab_builds.py --no-check`` times attribution builds whose outputs
    differ on purpose (bench/results/sparse_c64_attribution_xeon_stop61.patch):
    its table must say the outputs were not compared, and one without the
    flag must not."""
    said = {}
    for flags in ([], ["--no-check"]):
        proc = subprocess.run([sys.executable, str(benchmark.BENCH_DIR / "ab_builds.py"), "--quick", *flags],
                              capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        said[bool(flags)] = "Outputs NOT checked (--no-check)" in proc.stdout
    assert said == {False: False, True: True}


def test_ab_builds_times_the_input_gradient_with_its_own_choice(tmp_path):
    """``ab_builds.py --passes input`` ran the input gradient with the
    forward's choice of kernels, where the module chooses on the transposed
    weight (forward-panel vectors run dense there): the case now records
    each variant's input-gradient choice beside the forward's, as
    ``_engine.choose_execution(weight, transpose=True)`` makes it."""
    import importlib

    import numpy as np
    import torch

    from pointsparse.nn import _engine

    sys.path.insert(0, str(benchmark.BENCH_DIR))
    try:
        ci = importlib.import_module("conv_instructions")
    finally:
        sys.path.remove(str(benchmark.BENCH_DIR))
    g = torch.Generator().manual_seed(0)
    coords = torch.cat([torch.zeros(400, 1, dtype=torch.int32),
                        torch.randint(0, 12, (400, 3), generator=g, dtype=torch.int32)], 1).unique(dim=0)
    path, paths, _, _ = ci.case_data(16, coords, ["dense", "vector", "twin"], tmp_path)
    arrays = np.load(path)
    for kind in ("dense", "vector", "twin"):
        run = _engine.choose_execution(torch.from_numpy(arrays["weight_" + kind]), transpose=True)
        assert bool(arrays["input_vector_" + kind]) == run.vector
        want = np.zeros(0, np.uint8) if run.active is None else run.active
        assert np.array_equal(arrays["input_active_" + kind], want)
        assert paths["input", kind] == run.name


def test_program_profile_breaks_a_program_down(tmp_path):
    """``bench/program_profile.py --quick`` exports a small MinkUNet and
    profiles it: the page holds the operators' table (the convs among them)
    and the maps its graph built, each with its fused plan; without a file
    and without --quick the program argument is named."""
    script = str(benchmark.BENCH_DIR / "program_profile.py")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    page = tmp_path / "profile.md"
    proc = subprocess.run([sys.executable, script, "--quick", "--out", str(page)], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = page.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| `pointsparse::conv_inference` |"))
    assert float(row.split("|")[2]) > 0 and float(row.split("|")[4]) > 0
    maps = [line for line in text.splitlines() if line.startswith("| map |")]
    plans = [line for line in text.splitlines() if line.startswith("| plan |")]
    assert maps and len(plans) == len(maps) and "| (3, 3, 3) |" in maps[0]
    assert "Sums: k3 maps" in text
    proc = subprocess.run([sys.executable, script, "--out", str(page)], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env=env)
    assert proc.returncode != 0 and "program" in proc.stderr and "--quick" in proc.stderr


def test_a_datasets_folder_named_is_the_one_searched_and_must_exist(tmp_path, monkeypatch):
    """With ``POINTSPARSE_DATASETS`` naming a folder without the KITTI sweep,
    north_star.py and prune_exec.py said '../shared/datasets/kitti-raw/000049.bin
    is absent' (not the folder searched); one naming no folder fell back to
    ../shared/datasets in silence (a page of other data than the one named).
    The message names the path searched now, and a missing folder is exit 2
    naming it (the tests' fixture skips, naming it, rather than fall back)."""
    import conftest

    empty, absent = tmp_path / "empty", tmp_path / "absent"
    empty.mkdir()
    for name, argv in (("north_star", ["--quick"]), ("prune_exec", [])):
        for folder in (empty, absent):
            proc = subprocess.run([sys.executable, str(benchmark.BENCH_DIR / f"{name}.py"), *argv], capture_output=True,
                                  text=True, timeout=120, cwd=tmp_path,
                                  env=dict(os.environ, PYTHONPATH=str(ROOT), POINTSPARSE_DATASETS=str(folder)))
            if folder == empty:
                assert proc.returncode == 0, (name, proc.stderr[-2000:])
                assert f"{name}: {empty / 'kitti-raw' / '000049.bin'} is absent; nothing measured" in proc.stdout
            else:
                assert proc.returncode == 2 and "nothing measured" not in proc.stdout, (name, proc.stdout)
                assert f"POINTSPARSE_DATASETS={str(absent)!r} is not a folder" in proc.stderr, proc.stderr[-2000:]
    monkeypatch.setenv("POINTSPARSE_DATASETS", str(absent))
    assert conftest.find_datasets() is None and conftest.datasets_folders() == [absent]


# Each script's parser, asked whether it has a page option --out.
OUT_PROBE = _PROBE_HEAD + r"""
def probe(self, args=None, namespace=None):
    actions = self._option_string_actions
    if "--out" not in actions:
        raise Parsed("no --out")
    raise Parsed(actions.get("--output", actions["--out"]) is actions["--out"] or "--output is another option")
""" + _PROBE_RUN


def test_every_script_that_writes_a_page_takes_out():
    """prune_speed.py, memory.py, plan_grouped.py, profile_minkunet.py,
    prune.py, prune_procedures.py, spconv_compare.py, spconv_weights.py and
    train.py had no --out: run in full, each wrote over its committed page
    in bench/results/ (a reviewer reproducing a record lost it). Every
    script takes --out now but host_reads.py, which prints its counts and
    writes no page; conv.py and busy_machine.py, which took --output alone,
    take --out too (--output still names the same page)."""
    proc = subprocess.run([sys.executable, "-c", OUT_PROBE, str(benchmark.BENCH_DIR)], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(name for name, has in found.items() if has is not True) == ["host_reads"], found


def test_out_puts_the_page_and_what_goes_beside_it_where_named(tmp_path):
    """``--out PAGE`` of the scripts that took none: the page there (a
    folder made for it), prune_speed.py's plot beside it as PAGE.png and
    named so on the page, prune.py's --quick page written too (it wrote
    none), the committed pages untouched; spconv_compare.py refuses --out
    for its two parts at once."""
    committed = {n: (benchmark.BENCH_DIR / "results" / n).read_bytes() for n in ("prune.md", "prune_speed_generated.md",
                                                                                "prune_procedures.md")}
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    folder = tmp_path / "new folder"
    for name, argv in (("prune", ["--quick"]),
                       ("prune_speed", ["--quick", "--voxels", "2000", "--threads", "1", "--amc-episodes", "0"]),
                       ("prune_procedures", ["--quick", "--only", ""])):
        page = folder / f"{name} page.md"
        proc = subprocess.run([sys.executable, str(benchmark.BENCH_DIR / f"{name}.py"), *argv, "--out", str(page)],
                              capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
        assert proc.returncode == 0, (name, proc.stderr[-2000:])
        assert page.is_file() and f"written {page}" in proc.stdout, (name, proc.stdout[-500:])
    assert (folder / "prune_speed page.png").is_file()
    assert "Plot: prune_speed page.png." in (folder / "prune_speed page.md").read_text()
    assert {n: (benchmark.BENCH_DIR / "results" / n).read_bytes() for n in committed} == committed
    proc = subprocess.run([sys.executable, str(benchmark.BENCH_DIR / "spconv_compare.py"), "--quick", "--out",
                           str(folder / "s.md")], capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert proc.returncode == 2 and "--out names one part's page" in proc.stderr


def test_program_profile_says_on_stdout_that_it_fell_back_to_a_street(tmp_path):
    """bench/program_profile.py FILE.pt2 without the KITTI sweep profiles a
    generated street and said so on its page alone: the run's output read as
    the sweep's. It says so on stdout too, naming the path searched."""
    sys.path.insert(0, str(benchmark.BENCH_DIR))
    try:
        from program_profile import small_program
    finally:
        sys.path.remove(str(benchmark.BENCH_DIR))
    program = small_program(tmp_path, voxel_size=0.4)
    empty = tmp_path / "datasets"
    empty.mkdir()
    page = tmp_path / "profile.md"
    proc = subprocess.run([sys.executable, str(benchmark.BENCH_DIR / "program_profile.py"), str(program),
                           "--voxel-size", "0.4", "--calls", "1", "--out", str(page)], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path,
                          env=dict(os.environ, PYTHONPATH=str(ROOT), POINTSPARSE_DATASETS=str(empty)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    said = (f"program_profile: {empty / 'kitti-raw' / '000049.bin'} is absent; profiling a generated street of 20k "
            "voxels instead")
    assert said in proc.stdout and "a generated street of 20k voxels at 0.4 m" in page.read_text()


def _voxel_prune():
    import importlib

    sys.path.insert(0, str(benchmark.BENCH_DIR))
    try:
        return importlib.import_module("voxel_prune")
    finally:
        sys.path.remove(str(benchmark.BENCH_DIR))


def test_voxel_prune_errors_exit_2_and_its_paths_do_not_depend_on_the_folder(tmp_path):
    """bench/voxel_prune.py exited 0 on a missing checkpoint and on a --report
    of a folder without the unpruned run (the message on stdout): both are
    exit 2 now, the message on stderr, before anything is trained. A
    --time-sweep without the sweep measures nothing and exits 0, as
    north_star.py, naming the path searched. The default --checkpoint
    (runs/demo/checkpoint.pt) and --out were read from the folder the script
    ran in: they are in the repository now."""
    vp = _voxel_prune()
    defaults = vp.build_parser().parse_args([])
    assert defaults.checkpoint == ROOT / "runs" / "demo" / "checkpoint.pt"
    assert defaults.out == ROOT / "runs" / "voxel-prune"
    script, checkpoint, empty = str(benchmark.BENCH_DIR / "voxel_prune.py"), tmp_path / "ckpt.pt", tmp_path / "data"
    checkpoint.write_bytes(b"")
    empty.mkdir()
    env = dict(os.environ, PYTHONPATH=str(ROOT), POINTSPARSE_DATASETS=str(empty))

    def run(*argv):
        return subprocess.run([sys.executable, script, *argv], capture_output=True, text=True, timeout=120,
                              cwd=tmp_path, env=env)

    absent = tmp_path / "absent" / "checkpoint.pt"
    proc = run("--quick", "--checkpoint", str(absent))
    assert proc.returncode == 2 and f"--checkpoint: {absent} does not exist" in proc.stderr, proc.stderr[-2000:]
    runs = tmp_path / "runs"
    for argv in (["--report"], ["--report", "--variant", "voxelprune"]):
        proc = run(*argv, "--checkpoint", str(checkpoint), "--out", str(runs))
        assert proc.returncode == 2 and f"{runs / 'unpruned'} holds no run" in proc.stderr, proc.stderr[-2000:]
    assert not runs.exists()
    (runs / "unpruned").mkdir(parents=True)
    (runs / "unpruned" / "weights.pt").write_bytes(b"")
    proc = run("--report", "--time-sweep", "--checkpoint", str(checkpoint), "--out", str(runs))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"--time-sweep needs {empty / 'kitti-raw' / '000049.bin'}, which is absent; nothing measured" in proc.stdout


def _fake_runs(folder, records: dict) -> None:
    """result.json (and an empty weights.pt) of each run ``(variant, seed) -> record`` under ``folder``."""
    for (variant, seed), record in records.items():
        run = (folder / f"seed-{seed}" if seed else folder) / variant
        run.mkdir(parents=True)
        (run / "weights.pt").write_bytes(b"")
        (run / "result.json").write_text(json.dumps({"miou": 0.5, "finetune_s": 1.0, **record}))


def test_voxel_prune_report_describes_the_runs_as_they_were_fine_tuned(tmp_path, monkeypatch):
    """bench/voxel_prune.py --report wrote its summary and Command line from
    its own options: runs fine-tuned with --quick (4 steps, 1 held-out scene)
    read as 'fine-tuned 120 steps ... on 4 held-out scenes'. Each run records
    its fine-tuning in result.json now; the page gives the runs' values,
    says where they differ (run by run) and marks what older runs did not
    record; the models timed are rebuilt with the keep the runs recorded."""
    import torch

    vp = _voxel_prune()
    args = vp.build_parser().parse_args(["--out", str(tmp_path / "runs"), "--results", str(tmp_path / "page.md"),
                                         "--rounds", "1"])
    # run_variant records how it fine-tuned
    quick = vp.build_parser().parse_args(["--out", str(tmp_path / "runs"), "--checkpoint", "c.pt", "--steps", "4",
                                          "--val-scenes", "1", "--keep", "0.3", "--variant", "unpruned"])
    monkeypatch.setattr(vp, "build", lambda args, variant: torch.nn.Linear(1, 1))
    monkeypatch.setattr(vp, "finetune", lambda model, args: 1.0)
    monkeypatch.setattr(vp, "evaluate", lambda model, args: 0.5)
    vp.run_variant(quick)
    record = json.loads((tmp_path / "runs" / "unpruned" / "result.json").read_text())
    assert record == {"miou": 0.5, "finetune_s": 1.0, "seed": 0, "checkpoint": "c.pt", "steps": 4, "batch": 2,
                      "lr": 1e-3, "scenes": 24, "val_scenes": 1, "voxel_size": 0.2, "max_range": 35.0, "keep": 0.3,
                      "stages": [0, 1, 2], "skip_stages": [0, 1, 2]}
    same = {k: v for k, v in record.items() if k not in ("miou", "finetune_s")}
    _fake_runs(tmp_path / "runs", {("voxelprune", 0): same, ("unpruned", 1): same, ("voxelprune", 1): same})
    built = []
    monkeypatch.setattr(vp, "build", lambda args, variant: built.append((variant, args.keep)) or torch.nn.Linear(1, 1))
    monkeypatch.setattr(vp, "load_weights", lambda model, path: None)
    monkeypatch.setattr(vp, "timed_scan", lambda args: ("scan", "a scan"))
    monkeypatch.setattr(vp, "time_variants", lambda models, scan, rounds: {"encoder": 1.0, **{v: 2.0 for v in models}})
    monkeypatch.setattr(vp, "environment", lambda: {})
    vp.report(args)
    text = (tmp_path / "page.md").read_text()
    assert "c.pt: MinkUNet fine-tuned 4 steps of 2 scans each" in text and "on 1 held-out scenes." in text
    assert "VoxelPrune(0.3)" in text and "120 steps" not in text and "differ" not in text
    assert built == [("unpruned", 0.3), ("voxelprune", 0.3)]
    command = next(line for line in text.splitlines() if line.startswith("Command: `"))
    assert "--steps 4 " in command and "--val-scenes 1 " in command and "--keep 0.3 " in command
    # runs fine-tuned otherwise, and a run made before result.json recorded more than its steps
    (tmp_path / "runs" / "seed-1" / "voxelprune" / "result.json").write_text(json.dumps(
        {"miou": 0.5, "finetune_s": 1.0, **same, "steps": 120}))
    (tmp_path / "runs" / "seed-1" / "unpruned" / "result.json").write_text(json.dumps(
        {"miou": 0.5, "finetune_s": 1.0, "steps": 4}))
    vp.report(args)
    text = (tmp_path / "page.md").read_text()
    assert "fine-tuned 4/120 steps of 2/? scans each" in text
    assert ("The runs differ in how they were fine-tuned: --steps 4 (unpruned seed 0), 4 (unpruned seed 1), "
            "4 (voxelprune seed 0), 120 (voxelprune seed 1).") in text
    assert "?: not recorded by runs made before result.json recorded it (--checkpoint, --batch," in text


def test_prune_finetune_runs_in_the_repository_from_any_folder(tmp_path, monkeypatch):
    """A review: bench/prune_finetune.py's default checkpoint is the repository's runs/demo, but its runs went to
    runs/prune-finetune(-quick) under the folder it was started from. The default --out is the repository's
    runs/prune-finetune too; a given one stays as typed."""
    pf, _common = _bench_module("prune_finetune"), _bench_module("_common")
    ckpt = tmp_path / "checkpoint.pt"
    ckpt.write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["prune_finetune.py", "--checkpoint", str(ckpt), "--quick"])
    assert pf.parse_args().out == _common.ROOT / "runs" / "prune-finetune"
    monkeypatch.setattr(sys, "argv", ["prune_finetune.py", "--checkpoint", str(ckpt), "--out", "here"])
    assert pf.parse_args().out == Path("here")


def test_compile_counts_dynamos_steps_by_function(tmp_path):
    """``bench/compile.py --count-steps``: the bytecode instructions dynamo traces to compile a small MinkUNet,
    in all and by function (a figure RESULTS quoted from a throwaway script at stop 78). The page's rows add
    are the largest first, the package's own functions among them, the output checked against eager."""
    script = str(benchmark.BENCH_DIR / "compile.py")
    page = tmp_path / "steps.md"
    proc = subprocess.run([sys.executable, script, "--count-steps", "--top", "4", "--out", str(page)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in page.read_text().splitlines() if line.startswith("| `")]
    total = int(next(line for line in page.read_text().splitlines() if line.startswith("| **all**"))
                .split("|")[2].strip(" *").replace(",", ""))
    counts = [int(r.split("|")[2].replace(",", "")) for r in rows]
    assert len(rows) == 4 and counts == sorted(counts, reverse=True) and 10_000 < total
    assert any("pointsparse/" in r for r in rows)
