"""``pointsparse prune <procedure>``: registered, parses, runs quick."""

from __future__ import annotations

import dataclasses
import json
import re
import warnings

import pytest

from pointsparse.app import cli

pytestmark = pytest.mark.usefixtures("one_thread")


def test_registered_and_parses():
    parser = cli.build_parser()
    args = parser.parse_args(["prune", "amc", "--flops", "0.4", "--reward", "error", "--quick"])
    assert args.procedure == "amc" and args.flops == 0.4 and args.quick
    with pytest.raises(SystemExit):
        parser.parse_args(["prune", "magic"])


@pytest.mark.parametrize("procedure", ["sensitivity", "amc"])
def test_quick_runs_on_digits(procedure, tmp_path, capsys):
    pytest.importorskip("sklearn")
    assert cli.main(["prune", procedure, "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "dense accuracy" in out
    if procedure == "amc":  # (10 warm-up episodes; the agent trains once it holds 64 transitions, 3 an episode)
        assert "\n  8 of the 30 episodes acted by the trained agent\n" in out, out
    assert (tmp_path / ("sensitivity.png" if procedure == "sensitivity" else "amc_ratios.json")).exists()
    if procedure == "sensitivity":  # (the scan as printed, for a user's own tables)
        scan = json.loads((tmp_path / "sensitivity.json").read_text())
        assert scan["ratios"] == [0.0, 0.3, 0.6, 0.9] and scan["metric"] == "accuracy", scan
        rows = {line.split(":")[0].strip(): line.split(":")[1].split() for line in out.splitlines()
                if line.startswith("  ") and "layer:" not in line and ":" in line}
        assert set(scan["curves"]) == set(rows), (scan, rows)
        for name, values in scan["curves"].items():
            assert [f"{v:.3f}" for v in values] == rows[name]
        assert f"ratios under a drop of 0.02: {scan['chosen']}" in out


def test_channel_sensitivity_leaves_the_output_layer_out(tmp_path, capsys):
    """``prune sensitivity --granularity channel`` (the README's command) scanned the digits CNN's last Linear
    too, and recommended cutting 30% of its outputs: the digit classes. The output layer is left out, and said so;
    the rows' ratios are named above them."""
    pytest.importorskip("sklearn")
    assert cli.main(["prune", "sensitivity", "--granularity", "channel", "--model", "cnn", "--quick", "--out",
                     str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "the output layer '13' is left out: its output channels are the model's classes" in out, out
    assert "   layer: accuracy with that share of its output channels pruned, at 0 0.3 0.6 0.9" in out, out
    rows = [line.split(":")[0].strip() for line in out.splitlines() if line.startswith("  ") and "layer:" not in line]
    assert rows == ["1", "4", "8"], out


@pytest.mark.parametrize("flag,value", [("--finetune-lr-factor", "nan"), ("--finetune-lr-factor", "1e308"),
                                        ("--finetune-lr-factor", "1.5"), ("--threshold", "nan"), ("--sparsity", "1.5"),
                                        ("--sparsity", "inf"), ("--flops", "0"), ("--latency", "-1"),
                                        ("--prune-fraction", "nan"), ("--rounds", "0"), ("--episodes", "-3"),
                                        ("--rewind", "-1"), ("--seed", "-1"), ("--seed", str(2**32))])
def test_bad_flags_fail_before_any_work(flag, value, tmp_path, capsys, monkeypatch):
    """The command line prints the message naming the flag and returns 2, no
    traceback; POINTSPARSE_TRACEBACK=1 raises the ValueError itself.
    --finetune-lr-factor is a fraction of the training lr, in (0, 1]: 1e308
    was torch's RuntimeError traceback (an lr past float32) after the dense
    training, and a large one (1e6) trained the weights to NaN and printed
    their accuracy without a word."""
    argv = ["prune", "schedule", flag, value, "--out", str(tmp_path / "never")]
    monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("pointsparse prune: error: ") and flag in err and "Traceback" not in err
    monkeypatch.setenv(cli.TRACEBACK_ENV, "1")
    with pytest.raises(ValueError, match=flag):
        cli.main(argv)
    assert not (tmp_path / "never").exists()


def test_finetune_lr_factor_takes_one():
    """--finetune-lr-factor 1 (the training lr itself) is in its range."""
    from pointsparse.app import prune

    args = cli.build_parser().parse_args(["prune", "schedule", "--finetune-lr-factor", "1"])
    prune.check_args(args)
    assert args.finetune_lr_factor == 1.0


@pytest.mark.parametrize("argv, words", [
    # The task of --checkpoint is its own model and clouds: --task and --model were ignored.
    (["amc", "--checkpoint", "{ckpt}", "--task", "scene"], "--task scene: --checkpoint runs `prune amc` on its"),
    (["amc", "--checkpoint", "{ckpt}", "--task", "digits"], "--task digits: --checkpoint runs `prune amc` on its"),
    (["netadapt", "--checkpoint", "{ckpt}", "--model", "cnn"], "--model cnn: --checkpoint runs `prune netadapt`"),
    (["amc", "--checkpoint", "{ckpt}", "--reconstruct"], "--reconstruct: amc on a --checkpoint cuts every coupled"),
    # ... and the clouds are a checkpoint's: without one the task's own data were used.
    (["amc", "--data", "x.npy"], "--data x.npy: the clouds of a --checkpoint's model; `prune amc` on --task digits"),
    (["sensitivity", "--task", "scene", "--label-map", "s3dis"], "--label-map s3dis: the clouds of a --checkpoint's "
                                                                 "model; `prune sensitivity` on --task scene"),
    # Another procedure's flags.
    (["lottery", "--sparsity", "0.5"], "--sparsity 0.5 (prune schedule, init, rigl, vectors, offsets): `prune "
                                       "lottery` takes no such flag, so it would be ignored"),
    (["amc", "--latency", "0.3", "--rounds", "2"], "--rounds 2 (prune schedule, lottery), --latency 0.3 (prune "
                                                   "netadapt): `prune amc` takes none of them"),
    (["schedule", "--finetune-epochs", "2"], "--finetune-epochs 2 (prune channels, vectors, offsets, voxels)"),
    (["voxels", "--checkpoint", "{ckpt}", "--criterion", "bn"], "--criterion bn (prune channels): `prune voxels`"),
    (["voxels", "--checkpoint", "{ckpt}", "--data", "x.npy"], "--data x.npy (prune channels, sensitivity"),
    (["voxels", "--checkpoint", "{ckpt}", "--sparsity", "0.5"], "--sparsity: prune voxels keeps --ratio of the "
                                                                "voxels"),
    (["offsets", "--checkpoint", "{ckpt}", "--placement", "prune"], "--placement prune (prune voxels): `prune "
                                                                    "offsets` takes no such flag"),
    (["channels", "--checkpoint", "{ckpt}", "--stages", "1", "2", "--score", "learned"],
     "--stages 1 2 (prune voxels), --score learned (prune voxels): `prune channels` takes none of them"),
    (["vectors", "--checkpoint", "{ckpt}", "--data", "x.npy"], "--data x.npy (prune channels, sensitivity"),
    (["offsets", "--checkpoint", "{ckpt}", "--ratio", "0.3"], "--ratio 0.3 (prune channels, voxels): `prune offsets`"),
    (["channels", "--checkpoint", "{ckpt}", "--quick"], "--quick (prune sensitivity, schedule, lottery, init, rigl, "
                                                        "amc, netadapt): `prune channels` takes no such flag"),
    (["channels", "--checkpoint", "{ckpt}", "--seed", "1"], "--seed 1 (prune sensitivity"),
    # Counts --quick replaces.
    (["amc", "--quick", "--episodes", "50"], "--episodes 50: --quick runs 30 episodes, so it would be ignored"),
    (["lottery", "--quick", "--rounds", "8"], "--rounds 8: --quick runs at most 3 rounds"),
])
def test_flags_the_procedure_would_not_read_are_refused(argv, words, tmp_path, capsys, monkeypatch):
    """A flag `prune <procedure>` never reads (another procedure's, the task
    with --checkpoint, clouds without one, a count --quick replaces) was
    accepted and dropped: refused now, exit 2, before any work."""
    from pointsparse.app import channels, prune

    def no_work(*args, **kwargs):
        raise AssertionError("the procedure started before its flags were checked")

    for module, name in ((prune, "_task"), (channels, "main"), (channels, "vectors_main"),
                         (channels, "offsets_main"), (channels, "voxels_main")):
        monkeypatch.setattr(module, name, no_work)
    monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)
    argv = [a.replace("{ckpt}", str(tmp_path / "missing.pt")) for a in argv]
    assert cli.main(["prune", *argv, "--out", str(tmp_path / "never")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pointsparse prune: error: ") and words in err, err
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("argv", [
    ["amc", "--checkpoint", "c.pt", "--data", "x.npy", "--label-map", "s3dis", "--flops", "0.3", "--episodes", "2"],
    ["amc", "--reconstruct", "--flops", "0.5", "--reward", "error", "--finetune-lr-factor", "0.01"],
    ["netadapt", "--task", "scene", "--model", "minkunet", "--latency", "0.5", "--quick", "--seed", "2"],
    ["sensitivity", "--granularity", "channel", "--model", "cnn", "--threshold", "0.05"],
    ["schedule", "--schedule", "agp", "--sparsity", "0.98", "--rounds", "5"],
    ["lottery", "--quick", "--rounds", "2", "--rewind", "20", "--prune-fraction", "0.3"],
    ["init", "--method", "synflow", "--sparsity", "0.95"],
    ["rigl", "--distribution", "uniform", "--sparsity", "0.8"],
    ["channels", "--checkpoint", "c.pt", "--ratio", "0.3", "--criterion", "bn", "--scope", "global", "--multiple",
     "4", "--finetune-epochs", "1", "--data", "x.npy"],
    ["vectors", "--checkpoint", "c.pt", "--sparsity", "0.5", "--square", "--finetune-epochs", "1"],
    ["offsets", "--checkpoint", "c.pt", "--sparsity", "0.5"],
    ["voxels", "--checkpoint", "c.pt", "--placement", "prune", "--stages", "0", "1", "--score", "learned", "--ratio",
     "0.3", "--finetune-epochs", "1"],
])
def test_flags_the_procedure_reads_are_accepted(argv):
    from pointsparse.app import prune

    prune.check_read(cli.build_parser().parse_args(["prune", *argv]))


@pytest.mark.parametrize("argv, words", [
    (["schedule", "--task", "scene", "--model", "cnn"], "--model cnn is a digits model; the scene task takes sparse"),
    (["schedule", "--model", "minkunet"], "--model minkunet needs --task scene"),
])
def test_a_model_of_the_other_task_is_a_flag_error(argv, words, tmp_path, capsys, monkeypatch):
    """A model the task does not have: the message and exit status 2 of the
    other bad flags (was SystemExit, exit status 1), nothing written."""
    monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)
    monkeypatch.chdir(tmp_path)  # (schedule takes no --out: nothing made here)
    assert cli.main(["prune", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pointsparse prune: error: ") and words in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("graph", [False, True])
def test_cut_channels_copies_a_model_pruned_by_torch(graph):
    """A layer pruned with torch.nn.utils.prune holds a computed weight that
    copy.deepcopy refuses: cut_channels (what ``prune amc`` cuts with)
    failed with torch's 'Only Tensors created explicitly by the user'."""
    import torch

    from pointsparse.app import procedures
    from prune_procedures_support import sparse_chain, sparse_input

    net, x = sparse_chain(0), sparse_input()
    torch.nn.utils.prune.l1_unstructured(net[0], "weight", 0.5)
    net(x)
    cut = procedures.cut_channels(net, {"0": 0.5}, example_input=x if graph else None)
    assert cut[0].out_channels == 3 and cut(x).feats.shape == net(x).feats.shape
    assert net[0].out_channels == 6 and hasattr(net[0], "weight_mask")  # the model left as it was


def test_help_of_the_shared_flags_names_every_procedure_that_reads_them():
    """``pointsparse prune --help`` said --data and --label-map were
    channels' alone and --checkpoint the four checkpoint procedures', yet
    every procedure runs on a --checkpoint's model and clouds (amc and
    netadapt write a pruned checkpoint in --out, which the help called a
    folder for plots, ratios, tables); --finetune-lr-factor named none of
    its procedures. Each such flag's help now names every procedure that
    reads it (prune.READ_BY)."""
    import re

    from pointsparse.app import prune

    parser = cli.build_parser()
    actions = {a.dest: a for a in parser._subparsers._group_actions[0].choices["prune"]._actions}
    for name in ("data", "label_map", "skip_nonfinite", "finetune_lr_factor"):
        named = set(re.findall(r"\w+", actions[name].help)) & set(prune.PROCEDURES)
        assert named == set(prune.READ_BY[name]), (name, actions[name].help)
    checkpoint_help = set(re.findall(r"\w+", actions["checkpoint"].help))
    assert set(prune.PROCEDURES) <= checkpoint_help | {"procedures"} and "amc" in checkpoint_help, \
        actions["checkpoint"].help
    assert "pruned checkpoint" in actions["out"].help, actions["out"].help


def test_a_rewind_past_the_lottery_training_names_the_flag(tmp_path, capsys, monkeypatch):
    """--rewind at or past the steps a lottery round trains was refused as
    the library's 'rewind_step must be in [0, train_steps=120)': now as the
    flag, with the steps the task trains, before --out is made."""
    pytest.importorskip("sklearn")
    monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["prune", "lottery", "--quick", "--rewind", "1000"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pointsparse prune: error: --rewind 1000 must be < 120"), err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("procedure", ["schedule", "lottery", "init", "rigl"])
def test_out_of_a_procedure_that_writes_no_file_is_refused(procedure, tmp_path, capsys, monkeypatch):
    """schedule, lottery, init and rigl on a task print what they found and
    write no file: --out DIR was accepted and left an empty DIR (and, left
    out, an empty ./prune-out in the folder the command ran in). Refused by
    name now, as every flag a command would not read; nothing is made (on a
    --checkpoint they write the pruned checkpoint there: test_prune_workflow)."""
    monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["prune", procedure, "--out", str(tmp_path / "never")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"pointsparse prune: error: --out {tmp_path / 'never'}: `prune {procedure}` writes no "
                          "file on a task"), err
    assert "or give --checkpoint" in err, err
    assert list(tmp_path.iterdir()) == []


def test_a_procedure_that_writes_no_file_makes_no_folder(tmp_path, capsys, monkeypatch):
    pytest.importorskip("sklearn")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["prune", "schedule", "--quick", "--rounds", "1"]) == 0
    assert "round 1: target 0.900" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, episodes, warmup", [(["--episodes", "20"], 20, 5), ([], 120, 30),
                                                    (["--episodes", "400"], 400, 30), (["--quick"], 30, 10)])
def test_amc_warms_up_a_quarter_of_a_short_search(argv, episodes, warmup, tmp_path, monkeypatch):
    """`prune amc` warmed up 30 episodes whatever --episodes, so a search of
    30 or fewer (the few a checkpoint's costly episodes allow) acted at
    random throughout: the warm-up is a quarter of the episodes now, at most
    30 (AMC's own ratio: 100 of 400), and --quick's 10 of 30 as before."""
    from pointsparse.app import prune, procedures

    pytest.importorskip("sklearn")
    seen = []

    class Stop(Exception):
        pass

    def amc(task, model, flops, episodes, warmup, *args):
        seen.append((episodes, warmup))
        raise Stop

    monkeypatch.setattr(procedures, "amc", amc)  # (the dense model untrained: the warm-up is all this looks at)
    monkeypatch.setattr(prune, "_task", lambda args: dataclasses.replace(prune.digits_task("mlp", args.seed),
                                                                         train_fn=lambda *a, **k: None))
    with pytest.raises(Stop):
        cli.main(["prune", "amc", *argv, "--out", str(tmp_path)])
    assert seen == [(episodes, warmup)]


def test_rigl_at_sparsity_0_counts_no_update(capsys):
    """`prune rigl --sparsity 0` keeps every weight, so no drop/grow can
    change a connection, yet it printed '14 drop/grow updates': it says
    that nothing was dropped or grown now."""
    pytest.importorskip("sklearn")
    assert cli.main(["prune", "rigl", "--sparsity", "0", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "RigL (erk): sparsity 0.000, every weight kept: no connection to drop or grow, accuracy " in out, out
    assert "drop/grow updates" not in out


def test_amc_budget_below_the_largest_cut_names_the_flag_before_training(tmp_path, capsys, monkeypatch):
    """`prune amc --flops 0.01` trained the dense model, then failed in the
    library's words, absolute FLOPs of an argument the user never typed
    ("target_flops 5.797e+05 is below what max_ratio=0.8 reaches"): refused
    now before any training, naming --flops and the least it can be."""
    pytest.importorskip("sklearn")
    monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)
    assert cli.main(["prune", "amc", "--flops", "0.01", "--quick", "--out", str(tmp_path / "out")]) == 2
    out, err = capsys.readouterr()
    assert "dense accuracy" not in out
    assert re.match(r"pointsparse prune: error: --flops 0.01: AMC removes at most 0.8 of each layer's output "
                    r"channels, which leaves 0\.\d{3} of the dense FLOPs of task digits-cnn's model; give --flops >= "
                    r"0\.\d{3}\n", err), err


def test_a_written_checkpoint_names_the_layers_pruned_whole(tmp_path, capsys, monkeypatch):
    """A global threshold (schedule's magnitude, SNIP, GraSP) can prune a
    layer whole (SNIP's layer collapse: `prune init --checkpoint` at 0.9
    zeroed five of a MinkUNet's convs), which then gives zeros: the
    written checkpoint's line said only its overall sparsity. It names such
    layers now, and how many of the prunable layers they are."""
    import argparse

    import torch

    from prune_procedures_support import sparse_chain

    from pointsparse.app import channels, prune
    from pointsparse.prune import custom_from_mask

    net = sparse_chain(0)
    custom_from_mask(net[3], "weight", torch.zeros_like(net[3].weight, dtype=torch.bool))
    custom_from_mask(net[0], "weight", torch.rand(net[0].weight.shape) < 0.5)
    monkeypatch.setattr(channels, "save_pruned", lambda state, model, out: out / "checkpoint.pt")
    prune._save_masked(argparse.Namespace(checkpoint=tmp_path / "c.pt", checkpoint_state={}, out=tmp_path), net,
                       "the model")
    out = capsys.readouterr().out
    assert "; 1 of its 3 prunable layers pruned whole (it gives zeros): '3'\n" in out, out
    custom_from_mask(net[6], "weight", torch.zeros_like(net[6].weight, dtype=torch.bool))
    prune._save_masked(argparse.Namespace(checkpoint=tmp_path / "c.pt", checkpoint_state={}, out=tmp_path), net,
                       "the model")
    assert "; 2 of its 3 prunable layers pruned whole (they give zeros): '3', '6'\n" in capsys.readouterr().out
    net = sparse_chain(0)
    prune._save_masked(argparse.Namespace(checkpoint=tmp_path / "c.pt", checkpoint_state={}, out=tmp_path), net,
                       "the model")
    assert "pruned whole" not in capsys.readouterr().out


def test_netadapt_budget_below_the_narrowest_widths_names_the_flag_before_training(tmp_path, capsys, monkeypatch):
    """`prune netadapt --task scene --latency 0.5` (the README's example then;
    it gives 0.8 now) trained the dense model, searched down to the narrowest widths the
    latency table holds, which on the scene task estimate well above half
    the initial latency, and ended with a RuntimeWarning and exit status 0.
    The table is built before the training now, and a --latency below the
    least estimate of its widths is refused there: exit 2, the flag named
    with the least it can be, nothing trained, no folder made."""
    monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)
    out = tmp_path / "out"
    assert cli.main(["prune", "netadapt", "--task", "scene", "--latency", "0.05", "--quick", "--out", str(out)]) == 2
    printed, err = capsys.readouterr()
    assert "dense mIoU" not in printed and not out.exists()
    found = re.match(r"pointsparse prune: error: --latency 0.05: NetAdapt's narrowest widths \(about 1/4 of each "
                     r"layer's output channels\) leave at least (0\.\d{3}|1\.000) of the initial latency of task "
                     r"scene's model, as timed on this machine; give --latency >= (0\.\d{3}|1\.000) \(the latency "
                     r"table is timed afresh each run\)\n", err)
    assert found and 0.05 < float(found[1]) <= float(found[2]) <= 1, err


@pytest.mark.parametrize("on_checkpoint", [False, True])
def test_netadapt_that_misses_its_budget_says_so_and_exits_1(on_checkpoint, tmp_path, capsys, monkeypatch):
    """A search that ends above its budget printed the library's
    RuntimeWarning (at a line of procedures.py) and exited 0, so a script
    took the run for a success. The command says so on stderr now, the
    library's words after the flag, and exits 1, having printed what it
    reached and written what it writes (the latency table; on a
    --checkpoint the pruned checkpoint); the warning is not repeated."""
    from pointsparse.app import channels, prune, tasks
    from pointsparse.prune import netadapt

    real = netadapt.netadapt

    asked = []

    def stopped_short(*args, **kwargs):  # one iteration towards an unreachable target: a missed budget
        asked.append(kwargs.get("max_iterations"))
        return real(*args, **{**kwargs, "budget_seconds": 1e-12, "max_iterations": 1})

    monkeypatch.setattr(netadapt, "netadapt", stopped_short)
    monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)
    out = tmp_path / "out"
    argv = ["prune", "netadapt", "--latency", "1", "--quick", "--out", str(out)]
    saved = []
    if on_checkpoint:
        def task(args):
            args.checkpoint_state = {}
            scene = tasks.scene_task(args.seed, points=3000)
            model = scene.make_model(args.seed)
            return dataclasses.replace(scene, trained_model=lambda: model)

        monkeypatch.setattr(prune, "_task", task)
        monkeypatch.setattr(channels, "save_pruned", lambda state, model, out: saved.append(model)
                            or out / "checkpoint.pt")
        argv += ["--checkpoint", str(tmp_path / "c.pt")]
    else:
        argv += ["--task", "scene"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli.main(argv) == 1
    printed, err = capsys.readouterr()
    assert not [w for w in caught if "could not meet the latency budget" in str(w.message)]
    assert err.startswith("pointsparse prune: error: --latency 1 not met: NetAdapt could not meet the latency "
                          "budget: "), err
    assert "max_iterations=1 reached" in err and "Traceback" not in err, err
    # --quick bounds the search too (a checkpoint's toward an unreachable --latency ran all 50 iterations)
    assert asked == [prune.QUICK_ITERATIONS] and prune.QUICK_ITERATIONS < 50
    assert "\nchannels {" in printed, printed
    if on_checkpoint:
        assert len(saved) == 1 and f"pruned checkpoint: {out / 'checkpoint.pt'}" in printed, printed
        assert f"the model it reached is written all the same: {out / 'checkpoint.pt'}" in err, err
    else:
        assert (out / "latency_table.json").exists() and not saved
        assert f"the latency table is written all the same: {out / 'latency_table.json'}" in err, err
        assert f"\nlatency table: {out / 'latency_table.json'}\n" in printed, printed  # (named, as amc's file)


@pytest.mark.parametrize("argv, want", [(["--task", "scene"], 0.85), ([], 0.6), (["--task", "digits"], 0.6),
                                        (["--task", "scene", "--latency", "0.9"], 0.9)])
def test_netadapt_default_latency_is_the_tasks(argv, want, tmp_path, monkeypatch):
    """--latency's default was 0.6 on every task: below what the scene
    task's narrowest widths leave (0.53-0.78 of its latency), so a bare
    `prune netadapt --task scene` was refused. The default is now the
    task's; a --latency given is kept."""
    from pointsparse.app import prune
    seen = {}

    def stop(args, task, model):
        seen["latency"] = prune._latency(args)
        raise ValueError("stopped")

    monkeypatch.setattr(prune, "_check_latency", stop)
    assert cli.main(["prune", "netadapt", *argv, "--quick", "--out", str(tmp_path / "o")]) == 2
    assert seen == {"latency": want}


def test_netadapt_refusal_of_the_default_latency_says_it_was_the_default(tmp_path, capsys, monkeypatch):
    """Where no --latency was given, the refusal named '--latency 0.85' as if
    the user had passed it; it now says the value is the task's default (the
    default set here below what any table leaves, so that it is refused)."""
    from pointsparse.app import prune
    monkeypatch.setattr(prune, "DEFAULT_LATENCY", {"digits": 0.6, "scene": 0.05})
    monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)
    out = tmp_path / "out"
    assert cli.main(["prune", "netadapt", "--task", "scene", "--quick", "--out", str(out)]) == 2
    err = capsys.readouterr()[1]
    assert err.startswith("pointsparse prune: error: --latency 0.05 (task scene's default: none given): NetAdapt's "
                          "narrowest widths"), err
    assert not out.exists()


def test_help_after_a_procedure_lists_the_flags_it_reads(capsys):
    """``pointsparse prune channels --help`` printed every procedure's flags
    (amc's episodes, the lottery's rewind, ...) beside channels' own. After
    a procedure's name the help now lists the flags that procedure reads
    (prune.READ_BY; --square, --pairs and --panels: vectors'), --out and
    --checkpoint for every one; before it, every procedure's."""
    from pointsparse.app import prune

    parser = cli.build_parser()
    flags = {a.option_strings[-1]: a.dest for a in parser._subparsers._group_actions[0].choices["prune"]._actions
             if a.option_strings and a.dest != "help"}
    seen = {}
    for procedure in prune.PROCEDURES:
        with pytest.raises(SystemExit) as stop:
            cli.main(["prune", procedure, "--help"])
        assert stop.value.code == 0
        out = capsys.readouterr().out
        listed = set(re.findall(r"^  (--[\w-]+)", out, re.M))
        want = {flag for flag, dest in flags.items() if prune.reads(dest, procedure)}
        assert listed == want, (procedure, listed ^ want)
        assert {"--out", "--checkpoint"} <= listed and f"pointsparse prune {procedure}` reads" in out
        seen[procedure] = listed
    assert {"--ratio", "--criterion", "--data"} <= seen["channels"] and "--episodes" not in seen["channels"]
    assert {"--episodes", "--flops"} <= seen["amc"] and "--panels" in seen["vectors"] - seen["offsets"]
    with pytest.raises(SystemExit):
        cli.main(["prune", "--help"])
    assert set(re.findall(r"^  (--[\w-]+)", capsys.readouterr().out, re.M)) == set(flags)
