"""``pointsparse prune`` on an SPVCNN checkpoint (a voxel U-Net under
``unet.`` plus a point branch): ``prune voxels`` puts its layers in the
U-Net's decoder stages while every point still gets its logits, and the
procedures on a ``--checkpoint`` run on SPVCNN's points and their labels."""

from __future__ import annotations

import pytest
import torch

from pointsparse import checkpoint
from pointsparse.app import cli
from pointsparse.models import add_voxel_prune, add_voxel_skip, load_model

TINY = ["--data", "generated", "--scenes", "2", "--val-scenes", "1", "--beams", "16", "--azimuth-steps", "192",
        "--max-range", "16", "--cr", "0.25", "--blocks", "1", "--voxel-size", "0.5", "--batch-size", "2",
        "--no-progress", "--seed", "3"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def spvcnn_run(tmp_path_factory):
    """A TINY SPVCNN run of one epoch (its checkpoint)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    dense = tmp_path_factory.mktemp("spvcnn-run") / "dense"
    assert cli.main(["train", *TINY, "--model", "spvcnn", "--epochs", "1", "--out", str(dense)]) == 0
    torch.set_num_threads(before)
    return dense / "checkpoint.pt"


def _points_input(path):
    """SPVCNN's input (voxels, inverse, points, point_batch) of the run's first cloud."""
    from pointsparse.app.tasks import checkpoint_batches
    batch = checkpoint_batches(checkpoint.load(path))[0]
    return batch.input, batch.inverse, batch.points, batch.point_batch


def _flops(model, x) -> int:
    from pointsparse.prune.report import sparsity_report
    return sparsity_report(model, x)["total"]["flops"]


@pytest.mark.parametrize("argv, placement, places", [
    ([], "skip", ["unet.fuse.0.0.main", "unet.fuse.1.0.main", "unet.fuse.2.0.main"]),  # the defaults
    (["--stages", "3"], "skip", ["unet.fuse.3.0.main"]),
    (["--placement", "prune"], "prune", ["unet.fuse.0", "unet.fuse.2"]),  # (not stage 1: its points' voxels)
    (["--placement", "prune", "--stages", "3"], "prune", ["unet.fuse.3"]),  # (the point branch classifies)
])
def test_prune_voxels_of_an_spvcnn_checkpoint(spvcnn_run, tmp_path, capsys, argv, placement, places):
    """``prune voxels`` refused an SPVCNN checkpoint ("has no decoder stages
    fuse[j]"): its U-Net is under ``unet.``. It now puts VoxelSkip / VoxelPrune
    in ``unet.fuse[j]``: recorded in the config, loaded by ``load_model``, the
    outputs those of the model with the layers added by hand; every point
    gets finite logits (a point whose voxel a stride-1 VoxelPrune dropped
    reads the kept voxels around it and its point MLPs), fewer FLOPs run, and
    ``--ratio 1`` (every voxel kept) gives the dense model's logits bit for
    bit. ``eval`` reads the checkpoint."""
    out = tmp_path / "voxels"
    assert cli.main(["prune", "voxels", "--checkpoint", str(spvcnn_run), *argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert all(p in printed for p in places), printed
    state = checkpoint.load(out / "checkpoint.pt")
    assert sorted(state["config"][f"voxel_{placement}"]) == places
    loaded, dense = load_model(out / "checkpoint.pt").eval(), load_model(spvcnn_run).eval()
    by_hand = load_model(spvcnn_run).eval()
    for name in places:
        (add_voxel_skip if placement == "skip" else add_voxel_prune)(by_hand, name, 0.5)
    x = _points_input(spvcnn_run)
    with torch.no_grad():
        y = loaded(*x)
        assert y.shape == (len(x[2]), len(state["config"]["classes"])) and bool(y.isfinite().all())
        assert torch.equal(y, by_hand(*x))
        assert not torch.equal(y, dense(*x))  # (the layers do prune)
    assert _flops(loaded, x) < 0.95 * _flops(dense, x)
    whole = tmp_path / "whole"
    assert cli.main(["prune", "voxels", "--checkpoint", str(spvcnn_run), *argv, "--ratio", "1", "--out",
                     str(whole)]) == 0
    with torch.no_grad():
        assert torch.equal(load_model(whole / "checkpoint.pt").eval()(*x), dense(*x))
    assert cli.main(["eval", "--checkpoint", str(out / "checkpoint.pt"), "--no-progress", "--out",
                     str(tmp_path / "eval")]) == 0


def test_prune_voxels_of_an_spvcnn_refuses_a_voxel_prune_before_its_points_are_averaged(spvcnn_run, tmp_path,
                                                                                         capsys, monkeypatch):
    """SPVCNN averages every point into the voxels after decoder stage 1
    (stride 4): a VoxelPrune on that stage's input would leave points
    without a voxel. Refused, exit 2, nothing written, saying why and what
    to give instead."""
    monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)
    never = tmp_path / "never"
    for argv in (["--placement", "prune", "--stages", "1"], ["--placement", "prune", "--stages", "0", "1", "2"]):
        assert cli.main(["prune", "voxels", "--checkpoint", str(spvcnn_run), *argv, "--out", str(never)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("pointsparse prune: error: --stages 1: an SPVCNN averages its points into the voxels "
                              "that decoder stage 1 gives (stride 4), so every point needs its voxel there: "
                              "--placement prune takes stages 0, 2, 3 of an SPVCNN; --placement skip (which keeps "
                              "every voxel) takes stage 1"), err
    assert not never.exists()


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _run(argv, out):
    assert cli.main(["prune", *argv, "--out", str(out)]) == 0


def test_the_procedures_task_on_an_spvcnn_checkpoint(spvcnn_run):
    """The procedures' task on a checkpoint refused an SPVCNN run ("takes a
    MinkUNet run ... use prune channels"). Its task now runs SPVCNN on the
    points of the run's clouds: the example input is (voxels, inverse,
    points, point_batch), the loss scores the per-point logits against the
    points' labels, the metric is their mIoU, and training steps move the
    weights."""
    from pointsparse.app import metrics
    from pointsparse.app.tasks import checkpoint_batches, checkpoint_task

    state, task = checkpoint_task(spvcnn_run)
    model = task.trained_model()
    x, labels = task.batch_fn()
    assert isinstance(x, tuple) and len(x) == 4 and labels.shape == (len(x[2]),)
    with torch.no_grad():
        logits = model(*x)
    assert torch.equal(task.loss_fn(logits, labels), torch.nn.functional.cross_entropy(logits, labels,
                                                                                       ignore_index=255))
    val = checkpoint_batches(state, count=4)[-1]  # (the task's validation cloud: the last of its four)
    with torch.no_grad():
        pred = model(val.input, val.inverse, val.points, val.point_batch).argmax(1)
    classes = len(state["config"]["classes"])
    assert task.eval_fn(model) == metrics.mean_iou(metrics.confusion_matrix(pred, val.point_labels, classes, 255))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    task.train_fn(model, 2)
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items() if v.is_floating_point())


def _check_cut(spvcnn_run, state, pruned, tmp_path):
    """``pruned`` (cut from the run's model) written as ``prune amc`` /
    ``netadapt`` write it: its widths recorded, every point MLP's Linear
    reading the width of the voxel stage it devoxelises (the classifier the
    last stage's), the model loaded runs on every point as ``pruned`` does,
    with fewer parameters and FLOPs than the dense one."""
    from pointsparse.app.channels import save_pruned
    from pointsparse.prune import graph as G

    path = save_pruned(state, pruned, tmp_path / "pruned")
    loaded, dense = load_model(path).eval(), load_model(spvcnn_run).eval()
    assert checkpoint.load(path)["config"]["widths"] == G.widths(loaded) != G.widths(dense)
    for i, source in enumerate(("unet.stem.1.0", "unet.down.3.1.main.3", "unet.fuse.1.0.main.3")):
        assert loaded.point_mlps[i][0].in_features == loaded.get_submodule(source).out_channels
    assert loaded.classifier.in_features == loaded.unet.fuse[3][0].main[3].out_channels
    x = _points_input(spvcnn_run)
    with torch.no_grad():
        y = loaded(*x)
        assert torch.equal(y, pruned.eval()(*x)) and y.shape == dense(*x).shape and bool(y.isfinite().all())
    assert _params(loaded) < _params(dense) and _flops(loaded, x) < _flops(dense, x)


def test_amc_cuts_the_channels_of_an_spvcnn_checkpoint(spvcnn_run, tmp_path):
    """AMC on an SPVCNN run's task (``prune amc --checkpoint``'s: every
    coupled group of its graph, the point MLPs' Linear inputs cut with the
    voxel stages they read): ratios within the FLOPs budget, which cut a
    model that loads back smaller; ratios of 0 cut nothing (the same
    logits bit for bit)."""
    from pointsparse.app import procedures
    from pointsparse.app.tasks import checkpoint_task

    state, task = checkpoint_task(spvcnn_run)
    model = task.trained_model()
    with pytest.warns(RuntimeWarning, match="AMC ran no learned episode"):  # (3 episodes: its warm-up)
        res = procedures.amc(task, model, 0.6, 3, 3, coupled=True)
    assert res.flops <= 0.6 * res.dense_flops and any(name.startswith("unet.") for name in res.ratios)
    x = task.example_input
    with torch.no_grad():
        same = procedures.cut_channels(model, {name: 0.0 for name in res.ratios}, example_input=x).eval()
        assert torch.equal(same(*x), model(*x))
    _check_cut(spvcnn_run, state, procedures.cut_channels(model, res.ratios, example_input=x), tmp_path)


def test_netadapt_cuts_the_channels_of_an_spvcnn_checkpoint(spvcnn_run, tmp_path, monkeypatch):
    """NetAdapt on an SPVCNN run's task (``prune netadapt --checkpoint``'s:
    every coupled group, latencies measured on its (voxels, inverse,
    points, point_batch) input, which ``measure_latency`` passed to the
    model as one argument): one iteration shrinks one group; its model
    loads back smaller. (Latency here: the parameter count, so that the
    test is quick and steady.)"""
    from pointsparse.app.tasks import checkpoint_task
    from pointsparse.prune import netadapt as NA

    state, task = checkpoint_task(spvcnn_run)
    model = task.trained_model()
    assert NA.measure_latency(model, task.example_input, 1) > 0
    monkeypatch.setattr(NA, "measure_latency", lambda net, example, repeats=7: 1e-6 * _params(net))
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        res = NA.netadapt(model, None, task.train_fn, task.eval_fn, task.example_input, 0.99,
                          initial_reduction=0.005, short_steps=1, long_steps=1, max_iterations=1)
    assert len(res.history) == 1 and res.measured_latency < res.initial_latency
    # (one step of 0.005 toward a budget of 0.99: the group it cuts, chosen by a fine-tuned accuracy that
    # follows the RNG's state, may or may not reach it; it warns exactly where it does not)
    missed = res.measured_latency > 0.99 * res.initial_latency
    warned = any("could not meet the latency budget" in str(w.message) for w in caught)
    assert warned == missed, (res.measured_latency / res.initial_latency, [str(w.message) for w in caught])
    _check_cut(spvcnn_run, state, res.model, tmp_path)


@pytest.mark.parametrize("granularity", ["unstructured", "channel"])
def test_sensitivity_scans_an_spvcnn_checkpoint(spvcnn_run, tmp_path, capsys, granularity):
    """``prune sensitivity --checkpoint`` on an SPVCNN run scans every
    prunable layer, the point branch's Linear layers too; at ratio 0 each
    layer's metric is the dense model's."""
    out = tmp_path / "sens"
    _run(["sensitivity", "--checkpoint", str(spvcnn_run), "--quick", "--granularity", granularity], out)
    text = capsys.readouterr().out
    # (the checkpoint's own score, then the baseline trained the task's steps more: the printed "dense mIoU"
    # was that baseline alone, read as the checkpoint's)
    assert "the checkpoint's mIoU on the task's validation cloud: " in text, text
    dense = float(text.split("more (the procedure's baseline): ")[1].split()[0])
    curves = {line.split(":")[0].strip(): [float(v) for v in line.split(":")[1].split()]
              for line in text.splitlines() if line.startswith("  ") and ":" in line and "layer:" not in line}
    assert "with that share of its" in text  # (the columns' ratios named: the rows had no header)
    if granularity == "channel":  # (the classifier's output channels are the classes: never scanned)
        assert "the output layer 'classifier' is left out" in text and "classifier" not in curves, text
    assert any(name.startswith("point_mlps.") for name in curves) and any(name.startswith("unet.") for name in curves)
    assert all(abs(vals[0] - dense) <= 5.1e-4 for vals in curves.values()), text  # (printed: 4 and 3 decimals)
    assert (out / "sensitivity.png").exists()
    if granularity == "channel":  # (its --out may be the run's own folder: it writes no checkpoint; it was refused
        import shutil           # as "the pruned checkpoint would replace ...")

        run = tmp_path / "run"
        run.mkdir()
        shutil.copy(spvcnn_run, run / "checkpoint.pt")
        before = (run / "checkpoint.pt").read_bytes()
        assert cli.main(["prune", "sensitivity", "--checkpoint", str(run / "checkpoint.pt"), "--quick", "--out",
                         str(run)]) == 0, capsys.readouterr().err
        assert (run / "sensitivity.json").exists() and (run / "checkpoint.pt").read_bytes() == before


@pytest.mark.parametrize("procedure, argv", [("schedule", ["--rounds", "1", "--sparsity", "0.5"]),
                                             ("lottery", ["--rounds", "1"]), ("init", ["--sparsity", "0.5"]),
                                             ("init", ["--sparsity", "0.5", "--method", "grasp"]),
                                             ("init", ["--sparsity", "0.5", "--method", "synflow"]),
                                             ("rigl", ["--sparsity", "0.5"])])
def test_masking_procedures_on_an_spvcnn_checkpoint(spvcnn_run, tmp_path, capsys, procedure, argv):
    """``prune schedule|lottery|init|rigl --checkpoint`` on an SPVCNN run
    write its masked model, which loads, runs on every point as the model
    they left does, and keeps fewer weights."""
    from pointsparse.app import channels
    from pointsparse.prune import adapters

    left = []
    save = channels.save_pruned
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(channels, "save_pruned", lambda state, model, out: left.append(model) or save(state, model,
                                                                                                      out))
        _run([procedure, "--checkpoint", str(spvcnn_run), "--quick", *argv], tmp_path / "out")
    capsys.readouterr()
    loaded = load_model(tmp_path / "out" / "checkpoint.pt").eval()
    assert adapters.sparsity(loaded) > 0.1
    x = _points_input(spvcnn_run)
    with torch.no_grad():
        assert torch.equal(loaded(*x), left[0].eval()(*x))
