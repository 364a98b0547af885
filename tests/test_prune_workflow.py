"""``pointsparse prune channels`` on a trained checkpoint: the pruned widths
are recorded, ``load_model``, ``eval`` and ``train --resume`` rebuild the
smaller model, and the checkpoint loads with ``weights_only=True``."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from pointsparse import checkpoint
from pointsparse.app import cli
from pointsparse.models import load_model
from pointsparse.prune import graph as G
from reference import holed_cloud

TINY = ["--data", "generated", "--scenes", "2", "--val-scenes", "1", "--beams", "16", "--azimuth-steps", "192",
        "--max-range", "16", "--cr", "0.25", "--blocks", "1", "--voxel-size", "0.5", "--batch-size", "2",
        "--no-progress", "--seed", "3"]

pytestmark = pytest.mark.usefixtures("one_thread")


def ps_report(model, reference) -> float:
    """FLOPs of ``model`` over those of ``reference`` on one generated cloud."""
    from pointsparse.prune.report import sparsity_report
    from prune_procedures_support import sparse_input
    x = sparse_input(n=2000, channels=reference.in_channels, extent=24)
    flops = [sparsity_report(m, x)["total"]["dense_flops"] for m in (model, reference)]
    return flops[0] / flops[1]


@pytest.mark.slow
def test_prune_channels_checkpoint_round_trip(tmp_path, capsys):
    dense, small = tmp_path / "dense", tmp_path / "small"
    assert cli.main(["train", *TINY, "--epochs", "1", "--out", str(dense)]) == 0
    capsys.readouterr()
    assert cli.main(["prune", "channels", "--checkpoint", str(dense / "checkpoint.pt"), "--ratio", "0.5",
                     "--criterion", "bn", "--multiple", "4", "--out", str(small)]) == 0
    said = capsys.readouterr().out
    state = checkpoint.load(small / "checkpoint.pt")
    widths = state["config"]["widths"]
    assert widths["stem.0.0"]["out"] == 4 and widths["classifier.fn"]["in"] == 12  # 8 of 8, 24 of 24 halved
    model, full = load_model(small / "checkpoint.pt"), load_model(dense / "checkpoint.pt")
    assert G.widths(model) == widths
    # the cut's FLOPs on its example cloud, as sparsity_report counts them (it printed stored values alone)
    from pointsparse.app.scoring import _model_inputs, point_level
    from pointsparse.app.tasks import checkpoint_batches
    from pointsparse.prune.report import sparsity_report
    example = _model_inputs(checkpoint_batches(checkpoint.load(dense / "checkpoint.pt"), None, None)[0],
                            point_level(full))
    want = [sparsity_report(m, example)["total"]["flops"] for m in (full, model)]
    assert f"{want[0] / 1e9:.3g} -> {want[1] / 1e9:.3g} GFLOPs on the example cloud ({want[1] / want[0]:.2f})" \
        in said, said
    n_small, n_full = (sum(p.numel() for p in m.parameters()) for m in (model, full))
    assert n_small < 0.35 * n_full
    assert cli.main(["eval", "--checkpoint", str(small / "checkpoint.pt"), "--no-progress"]) == 0
    assert cli.main(["train", *TINY, "--epochs", "2", "--out", str(small), "--resume"]) == 0
    resumed = checkpoint.load(small / "checkpoint.pt")
    assert resumed["epoch"] == 2 and resumed["config"]["widths"] == widths
    assert G.widths(load_model(small / "checkpoint.pt")) == widths
    searched = tmp_path / "amc"
    assert cli.main(["prune", "amc", "--checkpoint", str(dense / "checkpoint.pt"), "--flops", "0.3",
                     "--episodes", "2", "--out", str(searched)]) == 0
    amc_model = load_model(searched / "checkpoint.pt")
    # AMC meets 0.3 of the FLOPs on its own example cloud; another cloud has other pair counts per stage
    assert ps_report(amc_model, full) < 0.4
    tuned = tmp_path / "tuned"
    assert cli.main(["prune", "channels", "--checkpoint", str(dense / "checkpoint.pt"), "--ratio", "0.5",
                     "--criterion", "taylor", "--finetune-epochs", "1", "--out", str(tuned)]) == 0
    state = checkpoint.load(tuned / "checkpoint.pt")
    assert state["epoch"] == 2 and G.widths(load_model(tuned / "checkpoint.pt")) == state["config"]["widths"]


def test_finetune_resumes_a_run_that_started_from_init(tmp_path, monkeypatch):
    """--finetune-epochs resumes the pruned checkpoint with its run's flags:
    a run started with --init resumes without it (train refuses --init with
    --resume, whose weights are the checkpoint's)."""
    import argparse

    from pointsparse.app import channels
    from pointsparse.app import train as tr

    parser = argparse.ArgumentParser()
    tr.add_arguments(parser)
    run = parser.parse_args([*TINY, "--init", str(tmp_path / "first.pt"), "--out", str(tmp_path / "run")])
    config = {"in_channels": 4, "classes": ["a", "b"], "cr": 0.25, "blocks": 1, "voxel_size": 0.5,
              "model": "minkunet"}
    path = tmp_path / "pruned" / "checkpoint.pt"
    path.parent.mkdir()
    checkpoint.save(path, {"model": {}, "config": config, "epoch": 1, "args": vars(run)})
    resumed = []
    monkeypatch.setattr(tr, "train", lambda args: resumed.append(args))
    channels.finetune(path, 2)
    assert [(a.resume, a.init, a.epochs, a.out) for a in resumed] == [(str(path), None, 3, str(path.parent))]


def test_label_map_for_generated_scenes_is_refused(tmp_path, capsys):
    """prune channels and the procedures on a --checkpoint read its run's
    data (or --data); where those are the generated scenes, --label-map
    (which maps files' raw labels) was never read: refused, exit 2, nothing
    written."""
    from pointsparse.data import NUM_FEATURES, OUTDOOR_CLASSES
    from pointsparse.models import MinkUNet

    config = {"in_channels": NUM_FEATURES, "classes": list(OUTDOOR_CLASSES), "cr": 0.125, "blocks": 1,
              "voxel_size": 0.5, "model": "minkunet"}
    ckpt = tmp_path / "run" / "checkpoint.pt"
    ckpt.parent.mkdir()
    checkpoint.save(ckpt, {"model": MinkUNet(NUM_FEATURES, len(OUTDOOR_CLASSES), cr=0.125, blocks=1).state_dict(),
                           "config": config, "args": {"data": ["generated"], "beams": 16, "azimuth_steps": 192,
                                                      "max_range": 16.0, "optimizer": "adamw", "lr": 2e-3,
                                                      "weight_decay": 1e-4}})
    out = tmp_path / "out"
    for argv, where in ((["channels"], "the run's data (generated)"),
                        (["channels", "--data", "generated-outdoor"], "--data (generated-outdoor)"),
                        (["amc", "--quick"], "the run's data (generated)")):
        assert cli.main(["prune", *argv, "--checkpoint", str(ckpt), "--label-map", "semantic-kitti",
                         "--out", str(out)]) == 2, argv
        err = capsys.readouterr().err
        assert f"--label-map maps the raw labels of point cloud files; {where} are the generated" in err, err
    assert not out.exists()


def test_data_whose_labels_are_not_the_models_classes_is_refused(tmp_path, capsys):
    """prune channels and the procedures on a --checkpoint read --data with --label-map (or the run's map) and
    never checked the map's classes against the model's, as eval does: a map of 8 classes for a 4-class model
    failed in torch's cross_entropy ("IndexError: Target 7 is out of bounds", a traceback), and one of 4 other
    classes ran on them silently. Now the classes are compared first, and a label past the model's classes
    (raw labels without a map) is named with its cloud, before any work: exit 2, nothing written."""
    from pointsparse.data import NUM_FEATURES
    from pointsparse.models import MinkUNet

    classes = ["ground", "low-vegetation", "high-vegetation", "building"]
    config = {"in_channels": NUM_FEATURES, "classes": classes, "cr": 0.125, "blocks": 1, "voxel_size": 0.5,
              "model": "minkunet"}
    ckpt, ckpt_raw = tmp_path / "run" / "checkpoint.pt", tmp_path / "raw" / "checkpoint.pt"  # (raw: no label map)
    for path, more in ((ckpt, {"label_map": "ign-lidarhd"}), (ckpt_raw, {})):
        path.parent.mkdir()
        checkpoint.save(path, {"model": MinkUNet(NUM_FEATURES, len(classes), cr=0.125, blocks=1).state_dict(),
                               "config": config, "args": {"data": [str(tmp_path / "cloud.npz")], "optimizer": "adamw",
                                                          "lr": 2e-3, "weight_decay": 1e-4, **more}})
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "cloud.npz", xyz=(rng.random((3000, 3)) * 20).astype(np.float32),
             classification=rng.choice([1, 2, 6], 3000).astype(np.uint8))
    eight = tmp_path / "eight.json"
    eight.write_text(json.dumps({"classes": list("abcdefgh"), "map": {"1": 0, "2": 1, "6": 7}}))
    four = tmp_path / "four.json"
    four.write_text(json.dumps({"classes": list("abcd"), "map": {"1": 0, "2": 1, "6": 3}}))
    raw = tmp_path / "raw.npz"
    np.savez(raw, xyz=(rng.random((3000, 3)) * 20).astype(np.float32), labels=rng.choice([0, 2, 6], 3000))
    out = tmp_path / "out"
    data = ["--data", str(tmp_path / "cloud.npz")]
    for procedure in (["channels", "--criterion", "taylor"], ["sensitivity", "--quick"]):
        for run, more, words in ((ckpt, [*data, "--label-map", str(eight)], "differ from the checkpoint's"),
                                 (ckpt, [*data, "--label-map", str(four)], "differ from the checkpoint's"),
                                 (ckpt_raw, ["--data", str(raw)], "label 6 is neither a class index (0 to 3)")):
            argv = ["prune", *procedure, "--checkpoint", str(run), *more, "--out", str(out)]
            assert cli.main(argv) == 2, argv
            err = capsys.readouterr().err
            assert words in err and "Traceback" not in err, (argv, err)
    assert not out.exists()
    assert cli.main(["prune", "channels", "--checkpoint", str(ckpt), "--criterion", "taylor", "--out", str(out)]) == 0


def test_prune_skip_nonfinite_reads_the_finite_points_of_organised_clouds(tmp_path, capsys):
    """train, eval and predict took organised clouds (points without a return are NaN) with --skip-nonfinite;
    prune had no such flag: `prune channels --data holed.npz` (and the procedures on a --checkpoint) refused the
    cloud ("xyz holds NaN or inf at 80 of 400 points"), with no word on what to do. prune --skip-nonfinite
    reads the finite points (channels' Taylor scores the same as on the cloud less the others); without it the
    refusal names the flag, and on a task without --checkpoint (no clouds read) the flag is refused."""
    from pointsparse.app.channels import load_state
    from pointsparse.data import NUM_FEATURES
    from pointsparse.models import MinkUNet

    xyz, labels, bad, holed = holed_cloud()
    np.savez(tmp_path / "holed.npz", xyz=holed, labels=labels)
    np.savez(tmp_path / "finite.npz", xyz=xyz[~bad], labels=labels[~bad])
    ckpt = tmp_path / "run" / "checkpoint.pt"
    ckpt.parent.mkdir()
    torch.manual_seed(0)
    checkpoint.save(ckpt, {"model": MinkUNet(NUM_FEATURES, 3, cr=0.125, blocks=1).state_dict(),
                           "config": {"in_channels": NUM_FEATURES, "classes": list("abc"), "cr": 0.125, "blocks": 1,
                                      "voxel_size": 0.5, "model": "minkunet"},
                           "args": {"data": [str(tmp_path / "finite.npz")], "optimizer": "adamw", "lr": 2e-3,
                                    "weight_decay": 1e-4}})
    argv = ["prune", "channels", "--checkpoint", str(ckpt), "--criterion", "taylor", "--ratio", "0.5"]
    assert cli.main([*argv, "--data", str(tmp_path / "holed.npz"), "--out", str(tmp_path / "no")]) == 2
    err = capsys.readouterr().err
    assert "holed.npz: xyz holds NaN or inf at 80 of 400 points" in err and "--skip-nonfinite" in err, err
    assert not (tmp_path / "no" / "checkpoint.pt").exists()
    pruned = []
    for name, more in (("holed", ["--skip-nonfinite"]), ("finite", [])):
        out = tmp_path / f"pruned-{name}"
        assert cli.main([*argv, "--data", str(tmp_path / f"{name}.npz"), *more, "--out", str(out)]) == 0, \
            capsys.readouterr().err
        pruned.append(load_state(out / "checkpoint.pt")["model"])
    assert pruned[0].keys() == pruned[1].keys() and all(torch.equal(pruned[0][k], pruned[1][k]) for k in pruned[0])
    from pointsparse.app.tasks import checkpoint_task  # (the procedures' clouds: read so too)

    with pytest.raises(ValueError, match="--skip-nonfinite"):
        checkpoint_task(ckpt, [str(tmp_path / "holed.npz")], clouds=2)
    assert checkpoint_task(ckpt, [str(tmp_path / "holed.npz")], clouds=2, skip_nonfinite=True)[1].name == "checkpoint"
    capsys.readouterr()
    assert cli.main(["prune", "sensitivity", "--quick", "--skip-nonfinite"]) == 2
    err = capsys.readouterr().err
    assert "--skip-nonfinite: the clouds of a --checkpoint's model" in err, err
    assert cli.main(["prune", "voxels", "--checkpoint", str(ckpt), "--skip-nonfinite", "--out", str(tmp_path / "v")]) \
        == 2
    assert "--skip-nonfinite (prune channels, sensitivity" in capsys.readouterr().err


def test_prune_on_clouds_without_points_says_so(tmp_path, capsys):
    """prune channels --criterion taylor and the procedures on a --checkpoint, given a cloud that holds no
    point (every position NaN under --skip-nonfinite, or an empty file), refused it as "has no labelled voxel
    (give clouds with labels)", though its points were labelled; the refusal now says the cloud holds no
    points, as eval's does."""
    from pointsparse.data import NUM_FEATURES
    from pointsparse.models import MinkUNet

    labels = np.random.default_rng(0).integers(0, 3, 50)
    np.savez(tmp_path / "nan.npz", xyz=np.full((50, 3), np.nan, np.float32), labels=labels)
    np.savez(tmp_path / "empty.npz", xyz=np.zeros((0, 3), np.float32), labels=np.zeros(0, np.int64))
    ckpt = tmp_path / "run" / "checkpoint.pt"
    ckpt.parent.mkdir()
    checkpoint.save(ckpt, {"model": MinkUNet(NUM_FEATURES, 3, cr=0.125, blocks=1).state_dict(),
                           "config": {"in_channels": NUM_FEATURES, "classes": list("abc"), "cr": 0.125, "blocks": 1,
                                      "voxel_size": 0.5, "model": "minkunet"},
                           "args": {"data": [str(tmp_path / "empty.npz")], "optimizer": "adamw", "lr": 2e-3,
                                    "weight_decay": 1e-4}})
    for procedure in (["channels", "--criterion", "taylor"], ["sensitivity", "--quick"]):
        for data in (["--data", str(tmp_path / "nan.npz"), "--skip-nonfinite"], ["--data", str(tmp_path / "empty.npz")],
                     []):
            argv = ["prune", *procedure, "--checkpoint", str(ckpt), *data, "--out", str(tmp_path / "out")]
            assert cli.main(argv) == 2, argv
            err = capsys.readouterr().err
            assert "holds no points" in err and "labelled voxel" not in err, (argv, err)


def test_masked_and_cut_state_dicts_round_trip(tmp_path):
    from pointsparse.models import MinkUNet
    from prune_procedures_support import sparse_input
    torch.manual_seed(0)
    net, x = MinkUNet(3, 4, cr=0.25).eval(), sparse_input(n=600, extent=16)
    graph = G.DependencyGraph(net, x)
    keep = G.plan(graph, 0.5)
    graph.mask(keep)
    config = {"model": "minkunet", "in_channels": 3, "classes": list("abcd"), "cr": 0.25, "blocks": 2}
    for stage in ("masked", "cut"):
        if stage == "cut":
            graph.cut(keep)
        path = tmp_path / f"{stage}.pt"
        torch.save({"model": net.state_dict(), "config": dict(config, widths=G.widths(net))}, path)
        loaded = load_model(path)
        assert torch.equal(loaded(x).feats, net(x).feats)
        assert any(k.endswith("weight_mask") for k in loaded.state_dict())


def test_a_masked_layer_narrowed_in_a_checkpoint_without_widths_loads(tmp_path):
    """A checkpoint of a cut model whose classifier is masked (unstructured
    pruning before the cut), saved without widths: loading fitted the
    classifier's weight_orig and weight_mask to the narrower stored ones but
    left its weight, which the mask's hook computes at the layer's call, as
    wide as built; the Linear's check of its input read that stale weight
    and the load failed ("the weights' channel widths do not chain", at the
    layer before). The masked weights are recomputed after the fit."""
    from pointsparse import prune
    from pointsparse.models import MinkUNet
    from prune_procedures_support import sparse_input
    torch.manual_seed(0)
    net, x = MinkUNet(3, 4, cr=0.25).eval(), sparse_input(n=600, extent=16)
    prune.l1_unstructured(net.classifier.fn, "weight", amount=0.5)
    graph = G.DependencyGraph(net, x)
    graph.cut(G.plan(graph, 0.5))
    assert net.classifier.fn.in_features < 32
    config = {"model": "minkunet", "in_channels": 3, "classes": list("abcd"), "cr": 0.25, "blocks": 2}
    torch.save({"model": net.state_dict(), "config": config}, tmp_path / "cut.pt")
    loaded = load_model(tmp_path / "cut.pt")
    assert loaded.classifier.fn.weight.shape == net.classifier.fn.weight.shape
    assert torch.equal(loaded(x).feats, net(x).feats)


def test_folded_bias_round_trips(tmp_path):
    from pointsparse.models import MinkUNet
    from prune_procedures_support import sparse_input
    torch.manual_seed(0)
    net, x = MinkUNet(3, 4, cr=0.25).eval(), sparse_input(n=600, extent=16)
    shortcut = net.down[1][1].shortcut[0]  # a 1x1 conv built without bias, as remove_masked may give it one
    shortcut.bias = torch.nn.Parameter(torch.randn(shortcut.out_channels))
    config = {"model": "minkunet", "in_channels": 3, "classes": list("abcd"), "cr": 0.25, "blocks": 2}
    torch.save({"model": net.state_dict(), "config": config}, tmp_path / "c.pt")
    assert torch.equal(load_model(tmp_path / "c.pt")(x).feats, net(x).feats)


def test_save_pruned_records_the_models_voxel_skips_and_prunes(tmp_path):
    """The checkpoint ``save_pruned`` writes records the model's VoxelSkip
    and VoxelPrune layers (config ``voxel_skip`` / ``voxel_prune``), so that
    it loads with them; it kept the source's config, so a learned scorer's
    weights were refused at load (and a magnitude one would load unpruned)."""
    from pointsparse.app.channels import save_pruned
    from pointsparse.models import MinkUNet, add_voxel_prune, voxel_prunes, voxel_skips
    from pointsparse.nn import VoxelSkip
    from prune_procedures_support import sparse_input
    torch.manual_seed(0)
    net, x = MinkUNet(3, 4, cr=0.25, blocks=1).eval(), sparse_input(n=600, extent=16)
    config = {"model": "minkunet", "in_channels": 3, "classes": list("abcd"), "cr": 0.25, "blocks": 1}
    state = {"model": net.state_dict(), "config": config}
    block = net.fuse[2][0]
    block.main = VoxelSkip(block.main, 0.5, "learned", block.main[0].in_channels)
    add_voxel_prune(net, "fuse.1", 0.4)
    path = save_pruned(state, net, tmp_path / "out")
    recorded = checkpoint.load(path)["config"]
    assert recorded["voxel_skip"] == voxel_skips(net) and recorded["voxel_prune"] == voxel_prunes(net)
    assert "voxel_skip" not in config  # (the source's config is left alone)
    assert torch.equal(load_model(path)(x).feats, net(x).feats)


def test_weights_the_config_does_not_describe_are_refused(tmp_path):
    """A cut checkpoint without widths loads (its narrower tensors are
    fitted); weights of a wider model or another kernel are a ValueError
    naming the tensor, not a model that fails in its forward."""
    from pointsparse.models import MinkUNet
    from prune_procedures_support import sparse_input
    torch.manual_seed(0)
    net, x = MinkUNet(3, 4, cr=0.25).eval(), sparse_input(n=600, extent=16)
    graph = G.DependencyGraph(net, x)
    keep = G.plan(graph, 0.5)
    graph.mask(keep)
    graph.cut(keep)
    config = {"model": "minkunet", "in_channels": 3, "classes": list("abcd"), "cr": 0.25, "blocks": 2}
    torch.save({"model": net.state_dict(), "config": config}, tmp_path / "cut.pt")
    assert torch.equal(load_model(tmp_path / "cut.pt")(x).feats, net(x).feats)
    wide = MinkUNet(3, 4, cr=0.5)
    torch.save({"model": wide.state_dict(), "config": config}, tmp_path / "wide.pt")
    with pytest.raises(ValueError, match=r"checkpoint tensor 'stem\.0\..*' has shape .* where the config builds"):
        load_model(tmp_path / "wide.pt")
    other_kernel = MinkUNet(3, 4, cr=0.25).state_dict()
    name = next(k for k, v in other_kernel.items() if k.endswith("weight") and v.dim() == 3 and v.shape[0] == 27)
    other_kernel[name] = other_kernel[name][:8]
    torch.save({"model": other_kernel, "config": config}, tmp_path / "kernel.pt")
    with pytest.raises(ValueError, match=f"checkpoint tensor '{name}' has shape"):
        load_model(tmp_path / "kernel.pt")


def test_finetune_of_a_multi_process_runs_checkpoint_runs_in_one_process(tmp_path, monkeypatch):
    """A checkpoint of a `train --nproc 2` run records nproc 2 (it said 1), and `prune --finetune-epochs` resumes
    the run's flags: it started two workers, which prune (no --nproc, no --device) cannot steer, and dropped their
    exit status. Fine-tuning runs in one process, as it always did, and prune returns train's status."""
    import torch.multiprocessing as mp

    dense = tmp_path / "dense"
    assert cli.main(["train", *TINY, "--epochs", "1", "--out", str(dense)]) == 0
    state = checkpoint.load(dense / "checkpoint.pt")
    state["args"]["nproc"] = 2
    checkpoint.save(dense / "checkpoint.pt", state)

    def spawn(*args, **kwargs):
        raise AssertionError("fine-tuning started --nproc workers")

    monkeypatch.setattr(mp, "spawn", spawn)
    assert cli.main(["prune", "vectors", "--checkpoint", str(dense / "checkpoint.pt"), "--sparsity", "0.5",
                     "--finetune-epochs", "1", "--out", str(tmp_path / "sparse")]) == 0
    assert checkpoint.load(tmp_path / "sparse" / "checkpoint.pt")["epoch"] == 2


def test_prune_vectors_checkpoint_keeps_its_masks_through_fine_tuning(tmp_path, capsys):
    """``prune vectors`` masks the engine vectors of every conv with more
    than one offset; the checkpoint stores the masks; ``train --resume``
    (the fine-tuning) rebuilds them before its optimizer and keeps every
    masked weight at zero while the others train; ``load_model`` and
    ``eval`` run the masked model."""
    from pointsparse.nn import Conv3d
    from pointsparse.nn.functional import panel_width
    dense, sparse = tmp_path / "dense", tmp_path / "sparse"
    assert cli.main(["train", *TINY, "--epochs", "1", "--out", str(dense)]) == 0
    assert cli.main(["prune", "vectors", "--checkpoint", str(dense / "checkpoint.pt"), "--sparsity", "0.75",
                     "--out", str(sparse)]) == 0
    assert "engine vectors masked" in capsys.readouterr().out
    before = checkpoint.load(sparse / "checkpoint.pt")["model"]
    masks = {k: v for k, v in before.items() if k.endswith("weight_mask")}
    model = load_model(dense / "checkpoint.pt")
    convs = {n for n, m in model.named_modules() if isinstance(m, Conv3d) and m.weight.shape[0] > 1}
    assert {k[:-len(".weight_mask")] for k in masks} == convs
    width = panel_width(torch.float32)
    for key, mask in masks.items():
        # whole vectors: (offset, input channel, panel of `width` output columns) all kept or all zero
        panels = mask.bool().split(width, dim=2)
        assert all((p.all(-1) | ~p.any(-1)).all() for p in panels), key
        kept = torch.stack([p[..., 0] for p in panels]).float().mean().item()
        assert 0.2 <= kept <= 0.3, (key, kept)
    assert cli.main(["train", *TINY, "--epochs", "2", "--out", str(sparse), "--resume"]) == 0
    after = checkpoint.load(sparse / "checkpoint.pt")
    assert after["epoch"] == 2
    moved = 0
    for key, mask in masks.items():
        assert torch.equal(after["model"][key], mask), key
        orig = key[:-len("_mask")] + "_orig"
        weight = after["model"][orig] * mask
        assert not weight[~mask.bool()].any(), key
        moved += int(not torch.equal(after["model"][orig][mask.bool()], before[orig][mask.bool()]))
    assert moved == len(masks)  # every masked conv trained its kept weights
    loaded = load_model(sparse / "checkpoint.pt")
    for name in convs:
        module = loaded.get_submodule(name)
        assert torch.equal(module.weight_mask, masks[name + ".weight_mask"])
        assert not module.weight[~module.weight_mask.bool()].any()
    scores = {}
    for inference in ("float32", "fused", "bf16"):
        out = tmp_path / f"eval-{inference}"
        assert cli.main(["eval", "--checkpoint", str(sparse / "checkpoint.pt"), "--no-progress", "--inference",
                         inference, "--out", str(out)]) == 0
        report = json.loads((out / "eval-metrics.json").read_text())
        assert report["inference"] == inference
        scores[inference] = report["miou"]
    # fusing changes only the float rounding; bf16 rounds weights and features (about 2e-3 of the logits)
    assert abs(scores["fused"] - scores["float32"]) < 0.01 and abs(scores["bf16"] - scores["float32"]) < 0.03, scores


def test_inference_model_forms():
    """``pointsparse eval --inference``'s models: masks made permanent
    (no ``weight_orig`` left, the masked weights zero), BatchNorm folded, the
    bf16 copy in bfloat16; the model itself unchanged; a bad name and bf16
    of a point-level model refused."""
    from pointsparse.app.evaluate import inference_model
    from pointsparse.models import SPVCNN, MinkUNet
    from pointsparse.nn import BatchNorm, Conv3d
    from pointsparse.prune import panel_structured

    torch.manual_seed(0)
    net = MinkUNet(4, 5, cr=0.25).eval()
    conv = next(m for m in net.modules() if isinstance(m, Conv3d) and m.weight.shape[0] > 1)
    panel_structured(conv, "weight", 0.75)
    assert inference_model(net, "float32") is net
    for form, dtype in (("fused", torch.float32), ("bf16", torch.bfloat16)):
        model = inference_model(net, form)
        assert not any(hasattr(m, "weight_orig") for m in model.modules())
        assert not any(isinstance(m, BatchNorm) for m in model.modules())
        assert {p.dtype for p in model.parameters()} == {dtype}
    assert hasattr(conv, "weight_orig")  # the model given is left as it was
    with pytest.raises(ValueError, match="inference must be one of"):
        inference_model(net, "int8")
    # SPVCNN's bf16 form: the voxel branch in bfloat16, the point branch (MLPs, classifier) in float32
    spv = SPVCNN(4, 5, cr=0.25).eval()
    bf16 = inference_model(spv, "bf16")
    assert {p.dtype for p in bf16.unet.parameters()} == {torch.bfloat16}
    assert {p.dtype for n, p in bf16.named_parameters() if not n.startswith("unet.")} == {torch.float32}
    assert {p.dtype for p in spv.parameters()} == {torch.float32}


@pytest.mark.parametrize("amount", ["1.0", "-0.1", "nan"])
def test_prune_vectors_refuses_a_bad_sparsity(tmp_path, amount):
    from pointsparse.app.channels import prune_vectors_checkpoint
    with pytest.raises(ValueError, match=r"--sparsity"):
        prune_vectors_checkpoint(tmp_path / "none.pt", tmp_path / "out", float(amount))
    for panels, error in ((0, ValueError), (-1, ValueError), (1.5, TypeError), (True, TypeError), (2.0, TypeError),
                          (np.bool_(True), TypeError)):
        with pytest.raises(error, match=r"--panels"):
            prune_vectors_checkpoint(tmp_path / "none.pt", tmp_path / "out", 0.5, panels=panels)


def test_prune_vectors_panels_masks_vectors_of_two_panels(tmp_path):
    """``prune vectors --panels 2``: one input channel x 32 columns blocks
    (the AVX-512 tile's width), so each 32-column stretch of a mask row is
    all kept or all pruned, about half the blocks kept."""
    dense, wide = tmp_path / "dense", tmp_path / "wide"
    assert cli.main(["train", *TINY, "--epochs", "1", "--out", str(dense)]) == 0
    assert cli.main(["prune", "vectors", "--checkpoint", str(dense / "checkpoint.pt"), "--sparsity", "0.5",
                     "--panels", "2", "--out", str(wide)]) == 0
    masks = {k: v for k, v in checkpoint.load(wide / "checkpoint.pt")["model"].items() if k.endswith("weight_mask")}
    assert masks
    for key, mask in masks.items():
        for j in range(0, mask.shape[2], 32):
            block = mask[..., j:j + 32]
            assert torch.equal(block.amax(-1), block.amin(-1)), (key, j)
        assert 0.3 <= mask.float().mean().item() <= 0.7, key
    # panels may be a numpy integer (it was refused: isinstance int), with the masks the int gives
    from pointsparse.app.channels import prune_vectors_checkpoint
    path = prune_vectors_checkpoint(dense / "checkpoint.pt", tmp_path / "np", 0.5, panels=np.int64(2))
    again = checkpoint.load(path)["model"]
    assert all(torch.equal(again[k], masks[k]) for k in masks)


def test_prune_vectors_refuses_panels_wider_than_every_conv(tmp_path, capsys):
    """``prune vectors --panels N`` past the widest conv's panels (blocks
    wider than every conv's output) is refused naming --panels and the most
    it takes, before anything is written: a huge one (1e20) was an
    OverflowError traceback from the block ids, exit status 1. The most it
    takes runs, blocks of every output column of the widest conv."""
    from pointsparse.models import MinkUNet

    ckpt = tmp_path / "checkpoint.pt"
    config = {"in_channels": 7, "classes": ["a", "b", "c"], "cr": 0.125, "blocks": 1, "voxel_size": 0.4,
              "ignore_index": 255, "model": "minkunet"}
    torch.manual_seed(0)
    torch.save({"model": MinkUNet(7, 3, cr=0.125, blocks=1).state_dict(), "config": config}, ckpt)  # widest: 32
    for panels in ("3", str(10**20)):
        assert cli.main(["prune", "vectors", "--checkpoint", str(ckpt), "--panels", panels,
                         "--out", str(tmp_path / "never")]) == 2, panels
        err = capsys.readouterr().err
        assert err.startswith("pointsparse prune: error: ") and "--panels" in err and "at most 2" in err, err
    assert not (tmp_path / "never").exists()
    assert cli.main(["prune", "vectors", "--checkpoint", str(ckpt), "--panels", "2", "--square",
                     "--out", str(tmp_path / "two")]) == 0
    masks = [v for k, v in checkpoint.load(tmp_path / "two" / "checkpoint.pt")["model"].items()
             if k.endswith("weight_mask")]
    assert masks and all(torch.equal(m.amax(-1), m.amin(-1)) for m in masks if m.shape[2] <= 32)
    # blocks of 2 panels (of 16 float32 columns) do not divide a conv of 3 or 5 panels: each row's last block is
    # narrower there and counts as one block, so the share kept differs; the print names such convs and their share
    capsys.readouterr()
    torch.save({"model": MinkUNet(7, 3, cr=0.375, blocks=1).state_dict(), "config": {**config, "cr": 0.375}}, ckpt)
    assert cli.main(["prune", "vectors", "--checkpoint", str(ckpt), "--panels", "2", "--sparsity", "0.75",
                     "--out", str(tmp_path / "three")]) == 0
    out = capsys.readouterr().err  # (a note, on stderr as the others)
    state = checkpoint.load(tmp_path / "three" / "checkpoint.pt")["model"]
    ragged = [(k.removesuffix(".weight_mask"), -(-m.shape[2] // 16)) for k, m in state.items()
              if k.endswith("weight_mask") and -(-m.shape[2] // 16) % 2 and m.shape[2] > 32]
    assert ragged, "the model has no conv of an odd number of panels"
    note = re.search(r"note: --panels 2 does not divide the output panels of (\d+) of its convs \((.*)\)", out)
    assert note and int(note.group(1)) == len(ragged), out
    name, count = ragged[0]
    assert note.group(2).startswith(f"'{name}' ({count} panel{'' if count == 1 else 's'}, "), out


def test_prune_vectors_pairs_masks_whole_bf16_vectors(tmp_path, capsys):
    """``prune vectors --pairs``: blocks of two input channels x 16 columns
    (the bf16 kernels' vectors), both channels of a pair masked alike;
    ``--square`` with ``--pairs`` refused."""
    dense, pairs = tmp_path / "dense", tmp_path / "pairs"
    assert cli.main(["train", *TINY, "--epochs", "1", "--out", str(dense)]) == 0
    assert cli.main(["prune", "vectors", "--checkpoint", str(dense / "checkpoint.pt"), "--sparsity", "0.5",
                     "--pairs", "--out", str(pairs)]) == 0
    masks = {k: v for k, v in checkpoint.load(pairs / "checkpoint.pt")["model"].items() if k.endswith("weight_mask")}
    assert masks
    for key, mask in masks.items():
        even = mask.shape[1] - mask.shape[1] % 2
        assert torch.equal(mask[:, 0:even:2], mask[:, 1:even:2]), key
        assert 0.3 <= mask.float().mean().item() <= 0.7, key
    capsys.readouterr()
    assert cli.main(["prune", "vectors", "--checkpoint", str(dense / "checkpoint.pt"), "--square", "--pairs",
                     "--out", str(tmp_path / "both")]) == 2
    assert "--square and --pairs" in capsys.readouterr().err and not (tmp_path / "both").exists()


@pytest.mark.parametrize("procedure", ["channels", "schedule"])
def test_vector_block_flags_are_refused_by_other_procedures(tmp_path, capsys, procedure):
    """``--square``, ``--pairs`` and ``--panels`` shape ``prune vectors``'
    blocks; any other procedure refuses them (exit 2, the flags named)
    before it reads a checkpoint or trains, --panels at its default 1 too."""
    for flags in (["--panels", "2"], ["--square"], ["--pairs", "--panels", "3"], ["--panels", "1"]):
        capsys.readouterr()
        assert cli.main(["prune", procedure, "--checkpoint", str(tmp_path / "missing.pt"), *flags,
                         "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert all(f in err for f in flags if f.startswith("--")) and "prune vectors" in err, err
    assert not (tmp_path / "out").exists()


def test_overlapping_convs_look_at_a_kernel_region_convs_region():
    """A kernel_region conv's windows are its region's offsets: one of a
    single offset (27 in its kernel_size) overlaps nothing, and 'prune
    offsets' at 0.74 pruned that offset (round(0.74 * 1)), the conv's whole
    output; a region spanning no more than the stride on every axis (a k3 s2
    conv's offsets at i_z 0 and 1 about the centre) meets each input row
    once. A region spanning more than the stride overlaps as a plain k3 conv."""
    from torch import nn

    from pointsparse.app.channels import overlapping_convs
    from pointsparse.nn import Conv3d

    single = Conv3d(3, 6, 3, kernel_region=[13])
    pair = Conv3d(6, 6, 3, stride=2, kernel_region=[12, 13])
    cross = Conv3d(6, 6, 3, stride=2, kernel_region="cross")
    plain = Conv3d(6, 6, 3)
    assert overlapping_convs(nn.Sequential(single, pair, cross, plain)) == [cross, plain]


def test_prune_offsets_masks_whole_offsets_of_the_overlapping_convs(tmp_path, capsys):
    """``prune offsets``: whole kernel offsets of every conv whose windows
    overlap (the k3 convs: 7 of 27 kept at 0.74, by the offsets' weight
    norm), none of the k2 s2 down- and upsampling convs (each input row meets
    one output row there: a pruned offset would cut voxels off); the masks
    hold through fine-tuning while the kept weights train; the engine
    executes only the kept offsets' pairs (``sparsity_report``) and the
    bf16 model scores as the float32 one."""
    from pointsparse.app.channels import overlapping_convs, prune_offsets_checkpoint
    from pointsparse.prune.report import sparsity_report
    dense, sparse = tmp_path / "dense", tmp_path / "offsets"
    assert cli.main(["train", *TINY, "--epochs", "1", "--out", str(dense)]) == 0
    assert cli.main(["prune", "offsets", "--checkpoint", str(dense / "checkpoint.pt"), "--out", str(sparse)]) == 0
    out = capsys.readouterr().out
    assert "kernel offsets masked" in out and "(0.26)" in out, out
    model = load_model(dense / "checkpoint.pt")
    overlapping = {n for n, m in model.named_modules() if m in overlapping_convs(model)}
    strided = {n for n, m in model.named_modules() if hasattr(m, "kernel_volume") and m.kernel_volume == 8}
    assert overlapping and strided and not overlapping & strided
    before = checkpoint.load(sparse / "checkpoint.pt")["model"]
    masks = {k[:-len(".weight_mask")]: v for k, v in before.items() if k.endswith("weight_mask")}
    assert set(masks) == overlapping
    for name, mask in masks.items():
        per_offset = mask.flatten(1)
        assert torch.equal(per_offset.amax(1), per_offset.amin(1)), name  # whole offsets
        assert int(per_offset[:, 0].sum()) == 7, name
        orig = before[name + ".weight_orig"]
        kept_norm = orig.flatten(1).norm(dim=1)[per_offset[:, 0].bool()].min()
        assert kept_norm >= orig.flatten(1).norm(dim=1)[~per_offset[:, 0].bool()].max(), name
    assert cli.main(["train", *TINY, "--epochs", "2", "--out", str(sparse), "--resume"]) == 0
    after = checkpoint.load(sparse / "checkpoint.pt")["model"]
    for name, mask in masks.items():
        assert torch.equal(after[name + ".weight_mask"], mask), name
        assert not (after[name + ".weight_orig"] * mask)[~mask.bool()].any(), name
        assert not torch.equal(after[name + ".weight_orig"][mask.bool()], before[name + ".weight_orig"][mask.bool()])
    loaded = load_model(sparse / "checkpoint.pt").eval()
    from prune_procedures_support import sparse_input
    report = sparsity_report(loaded, sparse_input(n=2000, channels=loaded.in_channels, extent=24))
    for name in overlapping:
        layer = report["layers"][name]
        assert 0 < layer["executed_flops"] < 0.5 * layer["dense_flops"], (name, layer)
    scores = {}
    for inference in ("float32", "bf16"):
        assert cli.main(["eval", "--checkpoint", str(sparse / "checkpoint.pt"), "--no-progress", "--inference",
                         inference, "--out", str(tmp_path / inference)]) == 0
        scores[inference] = json.loads((tmp_path / inference / "eval-metrics.json").read_text())["miou"]
    assert abs(scores["bf16"] - scores["float32"]) < 0.03, scores
    with pytest.raises(ValueError, match=r"--sparsity"):
        prune_offsets_checkpoint(dense / "checkpoint.pt", tmp_path / "bad", 1.0)


@pytest.mark.parametrize("ratio, err", [(None, TypeError), (0.0, ValueError), (float("nan"), ValueError)])
def test_prune_channels_names_a_bad_ratio(ratio, err):
    # None skipped the check and failed in float() without naming the argument
    from pointsparse.prune import workflow
    from prune_procedures_support import ResidualNet, sparse_input
    net = ResidualNet().eval()
    with pytest.raises(err, match="ratio"):
        workflow.prune_channels(net, sparse_input(n=80), ratio)
    assert net.stem[0].out_channels == 8


def test_prune_holds_its_out_as_train_does(tmp_path, capsys):
    """prune took no lock on its --out (train, eval and predict do): a second
    run into the same folder mixed its files with the first's. Now refused
    while another run holds it; --finetune-epochs trains in its own --out
    under prune's lock (no second lock refused)."""
    from pointsparse.checkpoint import DirectoryLock

    dense, small = tmp_path / "dense", tmp_path / "small"
    assert cli.main(["train", *TINY, "--epochs", "1", "--out", str(dense)]) == 0
    argv = ["prune", "offsets", "--checkpoint", str(dense / "checkpoint.pt"), "--out", str(small)]
    with DirectoryLock(small):
        capsys.readouterr()
        assert cli.main(argv) == 2
        assert f"--out {small} is in use by another run" in capsys.readouterr().err
        assert sorted(p.name for p in small.iterdir()) == [".lock"]
    assert cli.main(argv + ["--finetune-epochs", "1"]) == 0
    assert checkpoint.load(small / "checkpoint.pt")["epoch"] == 2



def test_prune_offsets_and_vectors_count_a_kernel_region_conv_inside_its_region(tmp_path, monkeypatch):
    """The kept/total counts ``prune offsets`` and ``prune vectors`` print
    are of the convs' weights: a kernel_region conv's region (the 20
    offsets outside a 'cross' region, never run, were counted as kept
    offsets of 27 and as weights). No model a checkpoint builds has such a
    conv today, so the model is handed in here."""
    from pointsparse.app import channels, evaluate
    from prune_procedures_support import region_chain
    monkeypatch.setattr(channels, "load_state", lambda path: {})
    monkeypatch.setattr(channels, "save_pruned", lambda state, model, out: tmp_path / "checkpoint.pt")
    for outside in (0.0, 1e-3):
        built = []
        monkeypatch.setattr(evaluate, "checkpoint_model",
                            lambda state, path: built.append(region_chain(0, outside)) or built[-1])
        _, kept, total = channels._prune_offsets(tmp_path / "in.pt", tmp_path / "out", 3 / 7)
        assert (kept, total) == ((7 - 3) + (27 - 12), 7 + 27)  # round(3/7 * 7) and round(3/7 * 27) pruned
        _, kept, total, ragged = channels._prune_vectors(tmp_path / "in.pt", tmp_path / "out", 0.5, False)
        assert ragged == []  # (blocks of one panel divide every conv's panels)
        region = list(built[-1][0].kernel_region)
        masks = [built[-1][0].weight_mask[region], built[-1][2].weight_mask]
        assert (kept, total) == (sum(int(m.count_nonzero()) for m in masks), 7 * 3 * 6 + 27 * 6 * 4)


def test_prune_vectors_leaves_a_single_offset_kernel_region_conv_alone(tmp_path, monkeypatch):
    """``prune vectors`` prunes the convs with more than one offset; a
    kernel_region conv that runs one offset (a 1x1x1 conv in effect, its
    other 26 offsets never run) is one with a single offset and was pruned
    by its 27-offset weight's shape. Its weight is left unmasked, as a k1
    conv's; a model of no other conv is refused."""
    from torch import nn

    from pointsparse.app import channels, evaluate
    from pointsparse.nn import Conv3d, ReLU
    monkeypatch.setattr(channels, "load_state", lambda path: {})
    monkeypatch.setattr(channels, "save_pruned", lambda state, model, out: tmp_path / "checkpoint.pt")
    torch.manual_seed(0)
    net = nn.Sequential(Conv3d(3, 16, 3), ReLU(), Conv3d(16, 16, 3, kernel_region=[13]), ReLU(), Conv3d(16, 4, 1))
    monkeypatch.setattr(evaluate, "checkpoint_model", lambda state, path: net)
    _, kept, total, _ = channels._prune_vectors(tmp_path / "in.pt", tmp_path / "out", 0.5, False)
    assert hasattr(net[0], "weight_mask") and not hasattr(net[2], "weight_mask") and not hasattr(net[4], "weight_mask")
    assert total == 27 * 3 * 16 and kept == int(net[0].weight_mask.count_nonzero())
    monkeypatch.setattr(evaluate, "checkpoint_model", lambda state, path: nn.Sequential(
        Conv3d(3, 16, 3, kernel_region=[13]), ReLU(), Conv3d(16, 4, 1)))
    with pytest.raises(ValueError, match="no sparse conv with more than one offset"):
        channels._prune_vectors(tmp_path / "in.pt", tmp_path / "out", 0.5, False)


@pytest.fixture(scope="module")
def voxel_run(tmp_path_factory):
    """A TINY run of one epoch (its checkpoint), which the ``prune voxels`` tests prune."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    dense = tmp_path_factory.mktemp("voxel-run") / "dense"
    assert cli.main(["train", *TINY, "--epochs", "1", "--out", str(dense)]) == 0
    torch.set_num_threads(before)
    return dense / "checkpoint.pt"


def _voxels_by_hand(path, placement: str, stages, keep: float, score: str = "magnitude"):
    """The checkpoint's model with VoxelSkip around the convs of every
    residual block of decoder stages ``stages`` (``placement="skip"``) or
    VoxelPrune on their input (``"prune"``), added by hand."""
    from pointsparse.models import add_voxel_prune
    from pointsparse.nn import VoxelSkip
    model = load_model(path)
    for j in stages:
        if placement == "prune":
            add_voxel_prune(model, f"fuse.{j}", keep, score,
                            model.fuse[j][0].main[0].in_channels if score == "learned" else None)
            continue
        for block in model.fuse[j]:
            block.main = VoxelSkip(block.main, keep, score, block.main[0].in_channels if score == "learned" else None)
    return model.eval()


@pytest.mark.parametrize("argv, placement, stages, keep", [
    ([], "skip", (0, 1, 2), 0.5),  # the defaults: bench/voxel_prune.py's
    (["--stages", "3", "--ratio", "0.25"], "skip", (3,), 0.25),
    (["--placement", "prune", "--stages", "2", "1", "--ratio", "0.3"], "prune", (1, 2), 0.3),
    (["--placement", "prune"], "prune", (0, 1, 2), 0.5),
])
def test_prune_voxels_writes_the_model_with_them_added_by_hand(voxel_run, tmp_path, capsys, argv, placement, stages,
                                                               keep):
    """``prune voxels`` writes a checkpoint whose model is the source's with
    VoxelSkip around the convs of each residual block of the decoder stages
    (or VoxelPrune on their input) added: recorded in its config, loaded by
    ``load_model`` with them, its outputs those of the model with the same
    layers added by hand, bit for bit; one line says what was added where."""
    out = tmp_path / "voxels"
    assert cli.main(["prune", "voxels", "--checkpoint", str(voxel_run), *argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    kind = "VoxelSkip" if placement == "skip" else "VoxelPrune"
    places = ([f"fuse.{j}.0.main" for j in stages] if placement == "skip" else [f"fuse.{j}" for j in sorted(stages)])
    assert f"pruned checkpoint {out / 'checkpoint.pt'}: {kind}(keep_ratio={keep}, score='magnitude')" in printed
    assert all(p in printed for p in places), printed
    state, source = checkpoint.load(out / "checkpoint.pt"), checkpoint.load(voxel_run)
    assert sorted(state["config"][f"voxel_{placement}"]) == sorted(places)
    assert f"voxel_{'prune' if placement == 'skip' else 'skip'}" not in state["config"]
    assert state["epoch"] == source["epoch"] and state["args"] == source["args"]
    from prune_procedures_support import sparse_input
    loaded, by_hand = load_model(out / "checkpoint.pt"), _voxels_by_hand(voxel_run, placement, stages, keep)
    x = sparse_input(n=2000, channels=loaded.in_channels, extent=24)
    with torch.no_grad():
        y = loaded(x).feats
        assert torch.equal(y, by_hand(x).feats)
        assert not torch.equal(y, load_model(voxel_run)(x).feats)  # (the layers do prune)


def test_prune_voxels_learned_score_fine_tunes_and_predicts(voxel_run, tmp_path, capsys):
    """``--score learned``: each VoxelSkip gets a scorer (the same in every
    run), saved with the weights and in the fresh optimizer state, so that
    ``--finetune-epochs`` (``train --resume``, which builds the model with
    them from the config) trains it; the result loads and predicts."""
    import numpy as np

    argv = ["prune", "voxels", "--checkpoint", str(voxel_run), "--score", "learned", "--stages", "1", "2"]
    assert cli.main([*argv, "--out", str(tmp_path / "a")]) == 0
    assert cli.main([*argv, "--out", str(tmp_path / "b")]) == 0
    first, again = (checkpoint.load(tmp_path / d / "checkpoint.pt")["model"] for d in "ab")
    scorers = [k for k in first if ".prune.scorer." in k]
    assert sorted(scorers) == [f"fuse.{j}.0.main.prune.scorer.{t}" for j in (1, 2) for t in ("bias", "weight")]
    assert all(torch.equal(first[k], again[k]) for k in scorers)
    by_hand = _voxels_by_hand(voxel_run, "skip", (1, 2), 0.5, "learned")
    by_hand.load_state_dict(first)
    from prune_procedures_support import sparse_input
    loaded = load_model(tmp_path / "a" / "checkpoint.pt")
    x = sparse_input(n=2000, channels=loaded.in_channels, extent=24)
    with torch.no_grad():
        assert torch.equal(loaded(x).feats, by_hand(x).feats)
    tuned = tmp_path / "tuned"
    assert cli.main([*argv, "--finetune-epochs", "1", "--out", str(tuned)]) == 0
    state = checkpoint.load(tuned / "checkpoint.pt")
    assert state["epoch"] == 2 and sorted(state["config"]["voxel_skip"]) == ["fuse.1.0.main", "fuse.2.0.main"]
    assert all(not torch.equal(state["model"][k], first[k]) for k in scorers)  # the scorers trained
    load_model(tuned / "checkpoint.pt")
    cloud = tmp_path / "c.npz"
    rng = np.random.default_rng(0)
    np.savez(cloud, xyz=(rng.random((800, 3)) * 12).astype(np.float32))
    assert cli.main(["predict", "--checkpoint", str(tuned / "checkpoint.pt"), "--data", str(cloud),
                     "--out", str(tmp_path / "pred"), "--no-progress"]) == 0
    assert any((tmp_path / "pred").iterdir())


def test_prune_voxels_refusals_name_the_file_the_stages_and_the_flags(voxel_run, tmp_path, capsys, monkeypatch):
    """``prune voxels`` refuses, exit 2 and nothing written: stages out of
    range naming the range (an SPVCNN's stages: test_prune_spvcnn.py),
    layers of the same placement already at a stage (a VoxelPrune on a
    skipped stage's input is another place: taken), and a --ratio out of
    (0, 1]."""
    monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)
    skipped = tmp_path / "skipped"
    assert cli.main(["prune", "voxels", "--checkpoint", str(voxel_run), "--stages", "1", "--out", str(skipped)]) == 0
    pruned = tmp_path / "pruned"
    assert cli.main(["prune", "voxels", "--checkpoint", str(skipped / "checkpoint.pt"), "--placement", "prune",
                     "--stages", "1", "--out", str(pruned)]) == 0
    config = checkpoint.load(pruned / "checkpoint.pt")["config"]
    assert list(config["voxel_skip"]) == ["fuse.1.0.main"] and list(config["voxel_prune"]) == ["fuse.1"]
    from pointsparse.app.channels import save_pruned
    from pointsparse.models import add_voxel_prune, loading
    inner = load_model(voxel_run)
    with monkeypatch.context() as patched:  # (a checkpoint written before add_voxel_prune refused this place)
        patched.setattr(loading, "_meets_unpruned_sites", lambda *args: None)
        add_voxel_prune(inner, "fuse.1.0.main", 0.5)
        inner_path = save_pruned(checkpoint.load(voxel_run), inner, tmp_path / "inner")
    capsys.readouterr()
    never = tmp_path / "never"
    for source, argv, words in [
        (voxel_run, ["--stages", "4"], "--stages 4: the model's decoder stages are 0..3"),
        (voxel_run, ["--stages", "0", "-1"], "--stages -1: the model's decoder stages are 0..3"),
        (voxel_run, ["--placement", "prune", "--stages", "3"], "--stages 3: --placement prune takes stages 0..2"),
        (voxel_run, ["--stages", "1", "1"], "--stages 1 1: stage 1 is given twice"),
        (skipped / "checkpoint.pt", ["--stages", "0", "1"],
         f"{skipped / 'checkpoint.pt'}: decoder stage 1 has VoxelSkip already (fuse.1.0.main, in its config's "
         "voxel_skip)"),
        (pruned / "checkpoint.pt", ["--placement", "prune", "--stages", "1"],
         f"{pruned / 'checkpoint.pt'}: decoder stage 1 has a VoxelPrune on its input already (fuse.1, in its "
         "config's voxel_prune)"),
        (inner_path, ["--stages", "1"], f"{inner_path}: config voxel_prune['fuse.1.0.main']: module_name "
                                        "'fuse.1.0.main' is inside the main of the ResidualBlock 'fuse.1.0'"),
        (voxel_run, ["--ratio", "0"], "(--ratio) must be a number in (0, 1]: the fraction of the voxels"),
        (voxel_run, ["--ratio", "1.5"], "(--ratio) must be a number in (0, 1]"),
    ]:
        assert cli.main(["prune", "voxels", "--checkpoint", str(source), *argv, "--out", str(never)]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("pointsparse prune: error: ") and words in err, (argv, err)
    assert not never.exists()


@pytest.mark.parametrize("placement, score", [("skip", "magnitude"), ("skip", "learned"), ("prune", "magnitude"),
                                              ("prune", "learned")])
def test_prune_channels_of_a_voxel_pruned_checkpoint(voxel_run, tmp_path, placement, score):
    """``prune channels`` on a ``prune voxels`` checkpoint: the graph traces
    through VoxelPrune's row selection and VoxelSkip's scatter (``add_to``),
    a learned scorer's ``Linear(C, 1)`` loses the channels it reads with the
    layer it scores, every group is cut as in the model without them (a
    magnitude score's norm fixed the channels feeding the pruned stages:
    they were left whole), and the checkpoint records the widths with
    voxel_skip / voxel_prune: it loads as the model pruned in memory."""
    from pointsparse.app.evaluate import checkpoint_model
    from pointsparse.app.tasks import checkpoint_batches
    from pointsparse.models import voxel_prunes, voxel_skips
    from pointsparse.prune.workflow import channel_scores, prune_channels
    from prune_procedures_support import sparse_input
    voxels, both, plain = tmp_path / "voxels", tmp_path / "both", tmp_path / "plain"
    assert cli.main(["prune", "voxels", "--checkpoint", str(voxel_run), "--placement", placement, "--stages", "1",
                     "2", "--score", score, "--out", str(voxels)]) == 0
    for source, out in ((voxels / "checkpoint.pt", both), (voxel_run, plain)):
        assert cli.main(["prune", "channels", "--checkpoint", str(source), "--ratio", "0.5", "--multiple", "4",
                         "--out", str(out)]) == 0
    source = checkpoint.load(voxels / "checkpoint.pt")
    in_memory = checkpoint_model(source, voxels / "checkpoint.pt").eval()
    prune_channels(in_memory, checkpoint_batches(source, None, None)[0].input, 0.5, channel_scores("l1", in_memory),
                   multiple=4)
    config = checkpoint.load(both / "checkpoint.pt")["config"]
    assert config["widths"] == G.widths(in_memory)
    assert config["voxel_skip" if placement == "skip" else "voxel_prune"] == (
        voxel_skips(in_memory) if placement == "skip" else voxel_prunes(in_memory)) != {}
    loaded = load_model(both / "checkpoint.pt")
    x = sparse_input(n=2000, channels=loaded.in_channels, extent=24)
    with torch.no_grad():
        assert torch.equal(loaded(x).feats, in_memory(x).feats)
    cut = {name.replace(".main.module.", ".main."): w for name, w in config["widths"].items() if ".scorer" not in name}
    assert cut == checkpoint.load(plain / "checkpoint.pt")["config"]["widths"]
    if score == "learned":
        for j in (1, 2):
            prune = loaded.fuse[j][0].main.prune if placement == "skip" else loaded.voxel_prune[f"fuse_{j}"]
            assert prune.scorer.in_features == cut[f"fuse.{j}.0.main.0"]["in"] < source["config"][
                f"voxel_{placement}"][f"fuse.{j}.0.main" if placement == "skip" else f"fuse.{j}"]["in_channels"]


@pytest.mark.parametrize("procedure", ["vectors", "offsets"])
def test_prune_vectors_and_offsets_of_a_voxel_pruned_checkpoint(voxel_run, tmp_path, procedure):
    """``prune vectors`` / ``prune offsets`` on a checkpoint with a learned
    VoxelSkip around stage 1's block and a VoxelPrune on stage 2's input:
    the convs inside the VoxelSkip are masked too, the config keeps
    voxel_skip and voxel_prune, and it loads as the model masked in memory."""
    from pointsparse.app.channels import overlapping_convs
    from pointsparse.app.evaluate import checkpoint_model
    from pointsparse.nn import Conv3d
    from pointsparse.prune import kernel_structured, panel_structured
    from prune_procedures_support import sparse_input
    skipped, voxels, out = tmp_path / "skipped", tmp_path / "voxels", tmp_path / procedure
    assert cli.main(["prune", "voxels", "--checkpoint", str(voxel_run), "--stages", "1", "--score", "learned",
                     "--out", str(skipped)]) == 0
    assert cli.main(["prune", "voxels", "--checkpoint", str(skipped / "checkpoint.pt"), "--placement", "prune",
                     "--stages", "2", "--out", str(voxels)]) == 0
    assert cli.main(["prune", procedure, "--checkpoint", str(voxels / "checkpoint.pt"), "--out", str(out)]) == 0
    source = checkpoint.load(voxels / "checkpoint.pt")
    in_memory = checkpoint_model(source, voxels / "checkpoint.pt").eval()
    if procedure == "vectors":
        for m in in_memory.modules():
            if isinstance(m, Conv3d) and m.weight.shape[0] > 1:
                panel_structured(m, "weight", 0.75)
    else:
        for m in overlapping_convs(in_memory):
            kernel_structured(m, "weight", 0.74, scope="offset")
    state = checkpoint.load(out / "checkpoint.pt")
    assert all(state["config"][k] == source["config"][k] for k in ("voxel_skip", "voxel_prune"))
    masks = {k for k in state["model"] if k.endswith(".weight_mask")}
    assert masks == {k for k in in_memory.state_dict() if k.endswith(".weight_mask")}
    assert {f"fuse.1.0.main.module.{i}.weight_mask" for i in (0, 3)} <= masks
    loaded = load_model(out / "checkpoint.pt")
    x = sparse_input(n=2000, channels=loaded.in_channels, extent=24)
    with torch.no_grad():
        assert torch.equal(loaded(x).feats, in_memory(x).feats)


@pytest.mark.parametrize("placement", ["skip", "prune"])
def test_prune_voxels_learned_on_a_channel_pruned_checkpoint(voxel_run, tmp_path, placement):
    """The other order: ``prune voxels --score learned`` on a ``prune
    channels`` checkpoint gives each scorer the narrowed width of the
    stage it scores; the config records it with the widths, and the
    checkpoint loads as the channel-pruned model with the layers added by hand."""
    from prune_procedures_support import sparse_input
    small, voxels = tmp_path / "small", tmp_path / "voxels"
    assert cli.main(["prune", "channels", "--checkpoint", str(voxel_run), "--ratio", "0.5", "--multiple", "4",
                     "--out", str(small)]) == 0
    assert cli.main(["prune", "voxels", "--checkpoint", str(small / "checkpoint.pt"), "--placement", placement,
                     "--stages", "1", "2", "--score", "learned", "--out", str(voxels)]) == 0
    widths, dense = checkpoint.load(small / "checkpoint.pt")["config"]["widths"], load_model(voxel_run)
    config = checkpoint.load(voxels / "checkpoint.pt")["config"]
    for j in (1, 2):
        narrowed = widths[f"fuse.{j}.0.main.0"]["in"]
        assert narrowed < dense.fuse[j][0].main[0].in_channels
        assert config[f"voxel_{placement}"][f"fuse.{j}.0.main" if placement == "skip" else f"fuse.{j}"][
            "in_channels"] == narrowed
    by_hand = _voxels_by_hand(small / "checkpoint.pt", placement, (1, 2), 0.5, "learned")
    by_hand.load_state_dict(checkpoint.load(voxels / "checkpoint.pt")["model"])
    loaded = load_model(voxels / "checkpoint.pt")
    assert config["widths"] == G.widths(loaded) == G.widths(by_hand)
    x = sparse_input(n=2000, channels=loaded.in_channels, extent=24)
    with torch.no_grad():
        assert torch.equal(loaded(x).feats, by_hand(x).feats)


def test_export_and_fused_eval_of_a_voxel_and_channel_pruned_checkpoint(voxel_run, tmp_path):
    """``prune voxels --score learned`` then ``prune channels``: ``export
    --inference fused`` writes a program that gives the fused model's
    logits, and ``eval --inference fused`` scores it as the float32 model."""
    from pointsparse import export
    from pointsparse.app.evaluate import inference_model
    voxels, both, program = tmp_path / "voxels", tmp_path / "both", tmp_path / "m.pt2"
    assert cli.main(["prune", "voxels", "--checkpoint", str(voxel_run), "--stages", "1", "2", "--score", "learned",
                     "--out", str(voxels)]) == 0
    assert cli.main(["prune", "channels", "--checkpoint", str(voxels / "checkpoint.pt"), "--ratio", "0.5",
                     "--multiple", "4", "--out", str(both)]) == 0
    path = both / "checkpoint.pt"
    assert cli.main(["export", "--checkpoint", str(path), "--inference", "fused", "--out", str(program)]) == 0
    fused = inference_model(load_model(path).eval(), "fused")
    assert not any(hasattr(m, "running_var") for m in fused.modules())
    x = export.example_input(fused.in_channels, 0.5)
    with torch.no_grad():
        assert torch.equal(export.ProgramModel.load(program)(x).feats, fused(x).feats)
    scores = {}
    for inference in ("float32", "fused"):
        assert cli.main(["eval", "--checkpoint", str(path), "--no-progress", "--inference", inference,
                         "--out", str(tmp_path / inference)]) == 0
        scores[inference] = json.loads((tmp_path / inference / "eval-metrics.json").read_text())["miou"]
    assert abs(scores["fused"] - scores["float32"]) < 0.01, scores


def test_channel_scores_taylor_names_batches_that_are_no_iterable():
    """``channel_scores("taylor", model, loss_fn, None)`` gave Python's
    "'NoneType' object is not iterable" from its own list(batches); the
    criterion's TypeError naming batches now."""
    from torch import nn
    from pointsparse.prune import workflow
    net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))
    loss_fn = lambda m, b: m(b).pow(2).mean()  # noqa: E731
    with pytest.raises(TypeError, match="batches must be an iterable of batches"):
        workflow.channel_scores("taylor", net, loss_fn, None)
    scores = workflow.channel_scores("taylor", net, loss_fn, (torch.randn(8, 4) for _ in range(2)))  # a generator
    assert sorted(tuple(w.shape) for w in scores.values()) == [(2, 6), (6, 4)]


def test_a_pruned_checkpoint_starts_its_own_best(tmp_path, capsys):
    """The pruned checkpoint kept the dense run's best_miou: fine-tuning it
    (--finetune-epochs, or train --resume) wrote best.pt only on an epoch
    that beat the dense model, so a pruned folder could have no best.pt at
    all, and its metrics.json gave as best_miou a score no model there
    reached. The pruned model is another model: its best starts empty, the
    fine-tuning's best epoch is its best.pt."""
    dense, tuned = tmp_path / "dense", tmp_path / "tuned"
    assert cli.main(["train", *TINY, "--epochs", "1", "--out", str(dense)]) == 0
    state = checkpoint.load(dense / "checkpoint.pt")
    checkpoint.save(dense / "checkpoint.pt", {**state, "best_miou": 0.99})  # a dense model no pruned one beats
    assert cli.main(["prune", "vectors", "--checkpoint", str(dense / "checkpoint.pt"), "--finetune-epochs", "1",
                     "--out", str(tuned)]) == 0
    report = json.loads((tuned / "metrics.json").read_text())
    best = checkpoint.load(tuned / "best.pt")
    assert report["best_miou"] == best["best_miou"] == max(best["history"]["val_miou"][1:]) < 0.99


def test_a_pruned_checkpoint_replaces_the_runs_files_in_its_out(tmp_path, capsys):
    """``prune ... --out DIR`` without --finetune-epochs into a folder holding
    another run (a trained run, an earlier prune's fine-tuning) wrote its
    checkpoint.pt beside that run's best.pt, metrics.json, PNGs and eval's
    report: eval or export of DIR/best.pt read the other, unpruned model.
    The pruned checkpoint is a new run in DIR: they are removed before it is
    written, as a new train run's first checkpoint removes them, saying so.
    A --checkpoint among them (DIR/best.pt, --out DIR) is refused before
    any work, the folder left as it was."""
    dense, out = tmp_path / "dense", tmp_path / "out"
    assert cli.main(["train", *TINY, "--epochs", "1", "--out", str(dense)]) == 0
    out.mkdir()
    previous = ["best.pt", "metrics.json", "confusion.png", "eval-metrics.json", "eval-topdown.png"]
    for name in previous:
        (out / name).write_bytes(b"another run's")
    (out / "notes.txt").write_bytes(b"the user's")
    capsys.readouterr()
    assert cli.main(["prune", "vectors", "--checkpoint", str(dense / "checkpoint.pt"), "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["checkpoint.pt", "notes.txt"]
    assert all(name in said for name in previous) and "removed" in said
    assert "weight_mask" in "".join(checkpoint.load(out / "checkpoint.pt")["model"])
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "best.pt").write_bytes((dense / "best.pt").read_bytes())
    assert cli.main(["prune", "vectors", "--checkpoint", str(alone / "best.pt"), "--out", str(alone)]) == 2
    err = capsys.readouterr().err
    assert f"--out {alone}" in err and f"{alone / 'best.pt'} (--checkpoint)" in err and "Traceback" not in err
    assert [p.name for p in alone.iterdir() if not p.name.startswith(".")] == ["best.pt"]


def test_the_library_prunes_refuse_an_out_that_would_remove_their_source(tmp_path):
    """The library's prune_*_checkpoint(path, out) write a pruned checkpoint
    that removes the run's files in ``out`` (a new run there): with ``path``
    one of them (out/best.pt) the source was deleted from disk, replaced by
    its pruned checkpoint. Refused before any work, as the CLI refuses it,
    naming both and leaving the folder as it was."""
    from pointsparse.app import channels
    dense = tmp_path / "dense"
    assert cli.main(["train", *TINY, "--epochs", "1", "--out", str(dense)]) == 0
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "best.pt").write_bytes((dense / "best.pt").read_bytes())
    calls = [lambda: channels.prune_checkpoint(alone / "best.pt", alone, 0.5),
             lambda: channels.prune_vectors_checkpoint(alone / "best.pt", alone, 0.5),
             lambda: channels.prune_offsets_checkpoint(alone / "best.pt", alone, 0.3),
             lambda: channels.prune_voxels_checkpoint(alone / "best.pt", alone, 0.5)]
    for call in calls:
        with pytest.raises(ValueError, match=f"out {alone}: .*{alone / 'best.pt'} \\(path\\)"):
            call()
        assert [p.name for p in alone.iterdir()] == ["best.pt"]
    assert channels.prune_vectors_checkpoint(dense / "best.pt", alone, 0.5) == alone / "checkpoint.pt"


def test_a_procedure_on_a_checkpoint_pruning_voxels_at_stride_1(voxel_run, tmp_path):
    """The procedures' task on a checkpoint whose model prunes voxels at
    stride 1 (add_voxel_prune on fuse.3, recorded in its config: its logits
    are on the kept voxels) took their cross-entropy against every voxel's
    labels and their argmax against them in the mIoU: torch's bare
    'Expected input batch_size (604) to match target batch_size (1208)'
    (``pointsparse prune sensitivity --checkpoint``). The loss now scores the
    kept voxels against their labels, and the metric gives the dropped
    voxels class 0, as predict and eval give their points."""
    from pointsparse.app import metrics
    from pointsparse.app.tasks import checkpoint_batches, checkpoint_task
    from pointsparse.models import add_voxel_prune, voxel_prunes

    state = checkpoint.load(voxel_run)
    model = load_model(voxel_run)
    pruner = add_voxel_prune(model, "fuse.3", 0.5)
    path = tmp_path / "pruned.pt"
    checkpoint.save(path, dict(state, model=model.state_dict(),
                               config=dict(state["config"], voxel_prune=voxel_prunes(model))))
    _, task = checkpoint_task(path)
    net = task.trained_model()
    kept = []
    pruner.register_forward_hook(lambda m, args, y: kept.append(m.select(args[0])[0]))

    def logits_and_kept(x):  # (the rows the pruner keeps of its input: the input's voxels, in their order)
        kept.clear()
        with torch.no_grad():
            model.eval()(x)
            out = net(x)
        assert 0 < len(out) < len(x) and len(kept[0]) == len(out)
        return out, kept[0]

    x, labels = task.batch_fn()
    out, rows = logits_and_kept(x)
    assert torch.equal(task.loss_fn(out, labels),
                       torch.nn.functional.cross_entropy(out.feats, labels[rows], ignore_index=255))
    val = checkpoint_batches(state, count=4)[-1]  # (the task's validation cloud: the last of its four)
    out, rows = logits_and_kept(val.input)
    pred = torch.zeros(len(val.input), dtype=torch.int64).index_copy(0, rows, out.feats.argmax(1))
    classes = len(state["config"]["classes"])
    assert task.eval_fn(net) == metrics.mean_iou(metrics.confusion_matrix(pred, val.labels, classes, 255))
    task.train_fn(net, 1)  # (its steps' loss)


def test_a_checkpoint_task_takes_a_checkpoint_recording_no_args(voxel_run, tmp_path):
    """A training checkpoint whose record of its run's flags is None (which checkpoint.load_training,
    eval, predict and --resume take as no record) made the procedures' task on it (``pointsparse prune
    <procedure> --checkpoint``) fail with AttributeError "'NoneType' object has no attribute 'get'"
    (its readers took a missing args only); it reads as one without args: the generated scenes and
    the default learning rate."""
    from pointsparse.app.tasks import checkpoint_task

    state = checkpoint.load(voxel_run)
    for name, args in (("none.pt", None), ("absent.pt", ...)):
        record = {k: v for k, v in state.items() if k != "args"} if args is ... else dict(state, args=args)
        checkpoint.save(tmp_path / name, record)
    _, none = checkpoint_task(tmp_path / "none.pt", clouds=2)
    _, absent = checkpoint_task(tmp_path / "absent.pt", clouds=2)
    assert none.lr == absent.lr == pytest.approx(0.005)
    x, labels = none.batch_fn()
    y, same = absent.batch_fn()
    assert torch.equal(x.coords, y.coords) and torch.equal(labels, same)


@pytest.mark.parametrize("args", [None, ..., {}])
def test_finetune_epochs_on_a_checkpoint_recording_no_args_names_it(voxel_run, tmp_path, capsys, args):
    """--finetune-epochs resumes the pruned checkpoint's run with its flags (its args); on a checkpoint
    whose args is None or absent it failed with TypeError "argparse.Namespace() argument after ** must
    be a mapping" / KeyError 'args' and a traceback, and on one whose args is an empty dict (no flag
    recorded either; save_pruned writes it no optimizer) train's main failed on the first flag it read.
    A ValueError names the checkpoint written and what it lacks."""
    state = checkpoint.load(voxel_run)
    path = tmp_path / "in.pt"
    checkpoint.save(path, {k: v for k, v in state.items() if k != "args"} if args is ... else dict(state, args=args))
    out = tmp_path / "out"
    assert cli.main(["prune", "channels", "--checkpoint", str(path), "--ratio", "0.5", "--finetune-epochs", "1",
                     "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{out / 'checkpoint.pt'}: --finetune-epochs resumes the run" in err and "records no flags" in err
    assert "Traceback" not in err and load_model(out / "checkpoint.pt") is not None  # (the pruned one is written)


@pytest.mark.parametrize("recorded", [True, False])
def test_a_checkpoint_task_makes_fresh_models_of_its_widths(voxel_run, tmp_path, recorded):
    """The procedures' task on a checkpoint: its ``make_model(seed)``
    ignored the seed and returned the trained weights, so `prune lottery
    --checkpoint`'s 'random re-init' control trained the trained model.
    ``make_model(seed)`` is a fresh model of the checkpoint's architecture
    and widths (a channel-pruned one's, recorded in its config or only in
    its weights' shapes), initialised as a model of those widths is, drawn
    from the seed; the trained model is ``trained_model()``."""
    from pointsparse.app.tasks import checkpoint_task
    from pointsparse.nn import Conv3d

    small = tmp_path / "small"
    assert cli.main(["prune", "channels", "--checkpoint", str(voxel_run), "--ratio", "0.5", "--out", str(small)]) == 0
    path = small / "checkpoint.pt"
    if not recorded:  # (the widths only in the weights' shapes)
        state = checkpoint.load(path)
        checkpoint.save(path, dict(state, config={k: v for k, v in state["config"].items() if k != "widths"}))
    _, task = checkpoint_task(path)
    trained = load_model(path)
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in task.trained_model().state_dict().items())
    fresh, again, other = task.make_model(0), task.make_model(0), task.make_model(1)
    assert G.widths(fresh) == G.widths(trained) == G.widths(other)
    assert fresh.state_dict().keys() == trained.state_dict().keys()
    conv = fresh.stem[0][0]  # (narrowed: its fresh weights are those of a conv of its width)
    assert conv.out_channels < 8 and not torch.equal(conv.weight, trained.stem[0][0].weight)
    for name, m in fresh.named_modules():
        if isinstance(m, Conv3d) and m.weight.numel() > 200:
            bound = 1 / ((m.out_channels if m.transposed else m.in_channels) * m.kernel_volume) ** 0.5
            assert 0.9 * bound < float(m.weight.abs().max()) <= bound, name
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in fresh.state_dict().items())
    assert not torch.equal(fresh.stem[0][0].weight, other.stem[0][0].weight)
    assert 0 <= task.eval_fn(fresh) <= 1


def test_prune_lottery_on_a_checkpoint_names_its_trained_start(voxel_run, tmp_path, capsys, monkeypatch):
    """`prune lottery --checkpoint` starts from the trained weights (and
    says so), and its random re-init control trains a fresh model drawn
    from --seed + 1, not the trained weights."""
    from pointsparse.app.tasks import checkpoint_task
    from pointsparse.prune import lottery

    started = []
    masked = lottery.train_masked
    monkeypatch.setattr(lottery, "train_masked", lambda model, *a, **k: started.append(
        {key: v.clone() for key, v in model.state_dict().items()}) or masked(model, *a, **k))
    assert cli.main(["prune", "lottery", "--checkpoint", str(voxel_run), "--quick", "--rounds", "1",
                     "--seed", "4", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert f"start: the trained weights of {voxel_run}, not a fresh initialisation" in out, out
    fresh, trained = checkpoint_task(voxel_run)[1].make_model(5).state_dict(), load_model(voxel_run).state_dict()
    assert not torch.equal(started[0]["stem.0.0.weight"], trained["stem.0.0.weight"])
    assert all(torch.equal(v, fresh[k]) for k, v in started[0].items())


def test_prune_amc_says_when_no_episode_learned(voxel_run, tmp_path, capsys):
    """`prune amc --episodes 2` ran its 2 episodes before its agent trained
    (as random warm-up, 30 of them, or now an untrained agent's) and printed
    the best as AMC's ratios: it says so now, and warns."""
    with pytest.warns(RuntimeWarning, match=r"AMC ran no learned episode: of its 2 episodes, 0 were random warm-up "
                                            r"and .* \(25 per episode\), .* \(give episodes > 3\)"):
        assert cli.main(["prune", "amc", "--checkpoint", str(voxel_run), "--episodes", "2", "--out",
                         str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "\n  0 of the 2 episodes acted by the trained agent (none: these ratios are a random search's best, not " \
           "AMC's)\n" in out, out
    assert json.loads((tmp_path / "amc_ratios.json").read_text())["learned_episodes"] == 0


@pytest.mark.parametrize("procedure, why", [("lottery", "a lottery ticket is pruned from the dense network round "
                                                        "by round"),
                                            ("rigl", "RigL draws and moves its layers' masks itself")])
def test_lottery_and_rigl_on_a_masked_checkpoint_name_the_file(voxel_run, tmp_path, capsys, monkeypatch, procedure,
                                                               why):
    """`prune lottery` / `prune rigl` on a checkpoint whose weights are
    masked (prune vectors' or offsets') failed in the library's words, "pass
    an unpruned model (prune.remove first)", naming no file and an action a
    command line user cannot take: the --checkpoint is named now, with why
    and what to give."""
    masked = tmp_path / "vectors"
    assert cli.main(["prune", "vectors", "--checkpoint", str(voxel_run), "--out", str(masked)]) == 0
    capsys.readouterr()
    monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)
    assert cli.main(["prune", procedure, "--checkpoint", str(masked / "checkpoint.pt"), "--quick", "--out",
                     str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()  # (the folder it made went again)
    err = capsys.readouterr().err
    layers = [k[:-len(".weight_mask")] for k in checkpoint.load(masked / "checkpoint.pt")["model"]
              if k.endswith(".weight_mask")]
    assert err.startswith(f"pointsparse prune: error: --checkpoint {masked / 'checkpoint.pt'}: its model is already "
                          f"pruned (masks on {len(layers)} layers, e.g. {layers[0]!r}); {why}: give the dense "
                          "checkpoint it was pruned from\n"), err


@pytest.mark.parametrize("procedure", ["schedule", "init"])
def test_schedule_and_init_below_a_checkpoints_sparsity_are_refused(voxel_run, tmp_path, capsys, monkeypatch,
                                                                      procedure):
    """`prune schedule|init --sparsity 0.5` on a checkpoint already pruned
    further (masks never un-prune) printed 'target 0.500 sparsity 0.9..',
    pruned nothing and wrote it again, exit 0. Refused now before any
    training, naming --sparsity, the file and its sparsity."""
    from pointsparse.app import procedures
    from pointsparse.prune import adapters
    masked = tmp_path / "vectors"
    assert cli.main(["prune", "vectors", "--checkpoint", str(voxel_run), "--sparsity", "0.9", "--out",
                     str(masked)]) == 0
    capsys.readouterr()
    now = adapters.sparsity(load_model(masked / "checkpoint.pt"))
    assert now > 0.5
    monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)
    trained = []
    monkeypatch.setattr(procedures, procedure if procedure == "schedule" else "prune_at_init",
                        lambda *a, **k: trained.append(a))
    assert cli.main(["prune", procedure, "--checkpoint", str(masked / "checkpoint.pt"), "--sparsity", "0.5",
                     "--quick", "--out", str(tmp_path / "out")]) == 2
    assert not trained and not (tmp_path / "out").exists()
    err = capsys.readouterr().err
    assert err.startswith(f"pointsparse prune: error: --sparsity 0.5: the model of --checkpoint "
                          f"{masked / 'checkpoint.pt'} is already {now:.3f} sparse, and prune {procedure} never "
                          f"restores a pruned weight: give --sparsity >= {now:.3f}, or the dense checkpoint it was "
                          "pruned from\n"), err


def test_prune_offsets_refuses_a_sparsity_that_prunes_every_offset(voxel_run, tmp_path, capsys, monkeypatch):
    """`prune offsets --sparsity 0.99` pruned round(0.99 * 27) = 27 of the 27
    offsets of every conv whose windows overlap and wrote the checkpoint
    ('0 of the 486 offsets ... kept'): each of those convs gives zeros, a
    model destroyed without an error. Refused now, naming --sparsity, the
    first such conv and the largest sparsity that keeps an offset; 0.98
    (26 of 27 pruned) still writes one."""
    monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)
    out = tmp_path / "out"
    assert cli.main(["prune", "offsets", "--checkpoint", str(voxel_run), "--sparsity", "0.99", "--out",
                     str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pointsparse prune: error: amount (--sparsity) 0.99 prunes all 27 kernel offsets of conv "
                          "'stem.0.0' (round(0.99 * 27) = 27): it would give zeros; give at most 0.9814\n"), err
    assert not (out / "checkpoint.pt").exists()
    assert cli.main(["prune", "offsets", "--checkpoint", str(voxel_run), "--sparsity", "0.98", "--out",
                     str(out)]) == 0
    assert "18 of the 486 offsets" in capsys.readouterr().out


def test_prune_vectors_refuses_a_sparsity_that_prunes_a_whole_conv(voxel_run, tmp_path, capsys, monkeypatch):
    """`prune vectors --sparsity 0.999` pruned every engine vector of the
    convs with fewer than 500 (round(0.999 * n) = n) and wrote the
    checkpoint: those convs give zeros. Refused now, nothing written."""
    monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)
    out = tmp_path / "out"
    assert cli.main(["prune", "vectors", "--checkpoint", str(voxel_run), "--sparsity", "0.999", "--out",
                     str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pointsparse prune: error: amount (--sparsity) 0.999 prunes every engine vector of conv "
                          "'stem.0.0': it would give zeros; give a smaller one\n"), err
    assert not (out / "checkpoint.pt").exists()


def test_prune_channels_of_unlabelled_clouds_of_another_format_than_the_runs(tmp_path, capsys):
    """A run that records SemanticKITTI's map (read from .bin scans by default) refuses labelled clouds of a
    format whose default is another map without --label-map; unlabelled ones (an Open3D-ML .npy scan's
    points alone), which prune channels --criterion l1 reads for its example input only, were refused as
    well, naming their labels, where they were pruned on before. They are read as before (no labels); a
    labelled cloud is still refused, and --criterion taylor still asks for labelled clouds."""
    from pointsparse.data import NUM_FEATURES
    from pointsparse.data.readers import load_label_map
    from pointsparse.models import MinkUNet

    classes = load_label_map("semantic-kitti").classes
    rng = np.random.default_rng(0)
    xyz = rng.uniform(0, 8, (400, 3)).astype(np.float32)
    (tmp_path / "bare").mkdir()
    np.save(tmp_path / "bare" / "000000.npy", xyz)
    np.savez(tmp_path / "labelled.npz", xyz=xyz, labels=rng.integers(1, 20, 400))
    ckpt = tmp_path / "run" / "checkpoint.pt"
    ckpt.parent.mkdir()
    torch.manual_seed(0)
    checkpoint.save(ckpt, {"model": MinkUNet(NUM_FEATURES, len(classes), cr=0.125, blocks=1).state_dict(),
                           "config": {"in_channels": NUM_FEATURES, "classes": list(classes), "cr": 0.125,
                                      "blocks": 1, "voxel_size": 0.5, "model": "minkunet",
                                      "label_map": "semantic-kitti"},
                           "args": {"data": ["/nowhere/seq"], "label_map": None, "optimizer": "adamw", "lr": 2e-3,
                                    "weight_decay": 1e-4}})
    argv = ["prune", "channels", "--checkpoint", str(ckpt), "--ratio", "0.5"]
    assert cli.main([*argv, "--data", str(tmp_path / "bare"), "--out", str(tmp_path / "p")]) == 0, \
        capsys.readouterr().err
    assert (tmp_path / "p" / "checkpoint.pt").is_file()
    assert cli.main([*argv, "--data", str(tmp_path / "labelled.npz"), "--out", str(tmp_path / "q")]) == 2
    assert "its clouds take no label map (raw labels) by default" in capsys.readouterr().err
    assert cli.main([*argv, "--data", str(tmp_path / "bare"), "--criterion", "taylor", "--out",
                     str(tmp_path / "r")]) == 2
    assert "needs labelled clouds" in capsys.readouterr().err


def test_prune_channels_reads_unlabelled_semantic3d_scans_of_a_semantic3d_run_as_semantic3d(tmp_path, capsys):
    """A run on Semantic3D scans (read through Semantic3D's map, the default for a .txt with its .labels) pruned
    on the benchmark's test scans (no .labels beside them), without --label-map: their rows were read as S3DIS
    rows (a .txt's default without .labels), refused as "not S3DIS rows ... give the label map 'semantic3d'".
    Unlabelled clouds of another format's default are read through the map the run records; eval of them
    names their missing labels."""
    from pointsparse.data import NUM_FEATURES
    from pointsparse.data.readers import load_label_map
    from pointsparse.models import MinkUNet

    classes = load_label_map("semantic3d").classes
    rng = np.random.default_rng(0)
    rows = np.c_[rng.uniform(0, 20, (3000, 3)), rng.integers(-2000, 2000, 3000), rng.integers(0, 255, (3000, 3))]
    scan = tmp_path / "scan.txt"
    np.savetxt(scan, rows, fmt="%.3f %.3f %.3f %d %d %d %d")
    ckpt = tmp_path / "run" / "checkpoint.pt"
    ckpt.parent.mkdir()
    torch.manual_seed(0)
    checkpoint.save(ckpt, {"model": MinkUNet(NUM_FEATURES, len(classes), cr=0.125, blocks=1).state_dict(),
                           "config": {"in_channels": NUM_FEATURES, "classes": list(classes), "cr": 0.125,
                                      "blocks": 1, "voxel_size": 0.5, "model": "minkunet", "label_map": "semantic3d"},
                           "args": {"data": ["/nowhere/scan.txt"], "label_map": None, "optimizer": "adamw",
                                    "lr": 2e-3, "weight_decay": 1e-4}})
    assert cli.main(["prune", "channels", "--checkpoint", str(ckpt), "--ratio", "0.5", "--data", str(scan), "--out",
                     str(tmp_path / "p")]) == 0, capsys.readouterr().err
    assert cli.main(["eval", "--checkpoint", str(ckpt), "--data", str(scan), "--no-progress"]) == 2
    assert f"{scan} has no labels" in capsys.readouterr().err


def test_prune_channels_of_an_unlabelled_cloud_whose_format_default_map_has_other_classes(tmp_path, capsys):
    """prune channels (l1) of a run on the generated scenes (or on raw labels) with --data of an unlabelled
    SemanticKITTI sweep (the README's benchmark cloud, kitti-raw/000049.bin) was refused: "the data's classes
    [car, ...] differ from the checkpoint's ... give --label-map of the raw labels", labels the cloud does not
    have and l1 does not read. Where the clouds taken hold no labels and no --label-map is given, their
    format's default map's classes are not compared; a labelled scan, or a --label-map typed, still are."""
    from pointsparse.data import NUM_FEATURES, OUTDOOR_CLASSES
    from pointsparse.models import MinkUNet

    config = {"in_channels": NUM_FEATURES, "classes": list(OUTDOOR_CLASSES), "cr": 0.125, "blocks": 1,
              "voxel_size": 0.5, "model": "minkunet"}
    ckpt = tmp_path / "run" / "checkpoint.pt"
    ckpt.parent.mkdir()
    torch.manual_seed(0)
    checkpoint.save(ckpt, {"model": MinkUNet(NUM_FEATURES, len(OUTDOOR_CLASSES), cr=0.125, blocks=1).state_dict(),
                           "config": config, "args": {"data": ["generated"], "beams": 16, "azimuth_steps": 192,
                                                      "max_range": 16.0, "optimizer": "adamw", "lr": 2e-3,
                                                      "weight_decay": 1e-4}})
    rng = np.random.default_rng(0)
    for name in ("bare", "labelled"):
        (tmp_path / name / "velodyne").mkdir(parents=True)
        np.c_[rng.uniform(-15, 15, (3000, 3)), np.zeros(3000)].astype(np.float32).tofile(
            tmp_path / name / "velodyne" / "000000.bin")
    (tmp_path / "labelled" / "labels").mkdir()
    rng.choice([10, 40], 3000).astype(np.uint32).tofile(tmp_path / "labelled" / "labels" / "000000.label")
    argv = ["prune", "channels", "--checkpoint", str(ckpt), "--ratio", "0.5"]
    assert cli.main([*argv, "--data", str(tmp_path / "bare"), "--out", str(tmp_path / "p")]) == 0, \
        capsys.readouterr().err
    for more in (["--data", str(tmp_path / "labelled")],
                 ["--data", str(tmp_path / "bare"), "--label-map", "semantic-kitti"]):
        assert cli.main([*argv, *more, "--out", str(tmp_path / "q")]) == 2, more
        assert "differ from the checkpoint's" in capsys.readouterr().err, more


#: prune <procedure> --checkpoint ... --quick: a short run of each, and the line that prints its model's sparsity.
_WRITTEN = [("schedule", ["--rounds", "1", "--sparsity", "0.5"], r"round 1: target 0\.500 sparsity (\d\.\d{3})"),
            ("lottery", ["--rounds", "1"], r"round 1: sparsity (\d\.\d{3})"),
            ("init", ["--sparsity", "0.5"], r"snip: sparsity (\d\.\d{3})"),
            ("rigl", ["--sparsity", "0.5"], r"drop/grow updates, sparsity (\d\.\d{3})")]


@pytest.mark.parametrize("procedure, argv, printed", _WRITTEN)
def test_task_procedures_on_a_checkpoint_write_the_pruned_checkpoint(voxel_run, tmp_path, capsys, monkeypatch,
                                                                     procedure, argv, printed):
    """`prune schedule|lottery|init|rigl --checkpoint` pruned the trained
    model, printed what it found and threw the model away (no file, --out
    refused), where amc, netadapt, channels, vectors write a checkpoint.
    Each writes ``--out/checkpoint.pt`` now: the pruned model (RigL's masks
    as torch's ``weight_orig`` / ``weight_mask``, as every other one's),
    which ``load_model`` and ``eval`` read, of the sparsity printed, giving
    the outputs of the model the procedure left."""
    from prune_procedures_support import sparse_input

    from pointsparse.app import channels
    from pointsparse.prune import adapters

    left = []
    save = channels.save_pruned
    monkeypatch.setattr(channels, "save_pruned", lambda state, model, out: left.append(model) or save(state, model,
                                                                                                        out))
    out = tmp_path / "out"
    assert cli.main(["prune", procedure, "--checkpoint", str(voxel_run), "--quick", *argv, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    found = re.findall(printed, text)
    path = out / "checkpoint.pt"
    assert found and f"\npruned checkpoint {path}: sparsity {found[-1]} " in text, text
    state = checkpoint.load(path)
    loaded = load_model(path).eval()
    assert f"{adapters.sparsity(loaded):.3f}" == found[-1]
    masked = {k[:-len(".weight_mask")] for k in state["model"] if k.endswith(".weight_mask")}
    assert masked == {n for n, _ in adapters.prunable_layers(loaded)}  # (rigl's too: torch's form, held in training)
    assert "best_miou" not in state and state["epoch"] == checkpoint.load(voxel_run)["epoch"]
    x = sparse_input(n=2000, channels=loaded.in_channels, extent=24)
    with torch.no_grad():
        assert torch.equal(loaded(x).feats, left[0].eval()(x).feats)
    assert cli.main(["eval", "--checkpoint", str(path), "--no-progress", "--out", str(tmp_path / "eval")]) == 0


def test_prune_rigl_checkpoint_keeps_its_masks_through_training(voxel_run, tmp_path, capsys):
    """RigL zeroes weights in place, which any later training would regrow:
    `prune rigl --checkpoint` writes its final masks as torch's
    ``weight_mask`` buffers, so `train --resume` of the pruned checkpoint
    trains the kept weights and holds the dropped ones at zero, as does
    `train --init` from it."""
    out = tmp_path / "rigl"
    assert cli.main(["prune", "rigl", "--checkpoint", str(voxel_run), "--quick", "--sparsity", "0.8", "--out",
                     str(out)]) == 0
    before = checkpoint.load(out / "checkpoint.pt")["model"]
    masks = {k: v for k, v in before.items() if k.endswith(".weight_mask")}
    assert masks and all(not bool(before[k[:-5] + "_orig"][~v.bool()].any()) for k, v in masks.items())
    assert cli.main(["train", "--out", str(out), "--resume", "--epochs", "2", "--no-progress"]) == 0
    after = checkpoint.load(out / "checkpoint.pt")
    assert after["epoch"] == 2
    moved = 0
    for key, mask in masks.items():
        orig = after["model"][key[:-5] + "_orig"]
        assert torch.equal(after["model"][key], mask), key
        moved += int(not torch.equal(orig[mask.bool()], before[key[:-5] + "_orig"][mask.bool()]))
    assert moved > len(masks) // 2  # (the kept weights trained)
    loaded = load_model(out / "checkpoint.pt")
    for key, mask in masks.items():
        assert not bool(loaded.get_submodule(key[:-len(".weight_mask")]).weight[~mask.bool()].any()), key
    # a new run from its weights (--init) takes the masks too: its training regrew every pruned weight
    assert cli.main(["train", *TINY, "--epochs", "1", "--init", str(out / "checkpoint.pt"), "--out",
                     str(tmp_path / "init")]) == 0
    started = checkpoint.load(tmp_path / "init" / "checkpoint.pt")["model"]
    for key, mask in masks.items():
        assert torch.equal(started[key], mask), key
        assert not bool(started[key[:-5] + "_orig"][~mask.bool()].any()), key


def test_a_loaded_masked_model_deep_copies_after_a_training_forward(tmp_path):
    """A model masked by the toolkit deep-copies after a forward with
    gradients; the twin load_model makes of its checkpoint (masks on torch's
    hooks) refused it (torch's 'Only Tensors created explicitly by the
    user'). The copy computes what the loaded model computes, and a loss
    reading a masked weight still reaches its weight_orig."""
    import copy

    from pointsparse.models import MinkUNet
    from prune_procedures_support import sparse_input
    torch.manual_seed(0)
    net, x = MinkUNet(3, 4, cr=0.25).eval(), sparse_input(n=600, extent=16)
    G.DependencyGraph(net, x).mask(G.plan(G.DependencyGraph(net, x), 0.5))
    config = {"model": "minkunet", "in_channels": 3, "classes": list("abcd"), "cr": 0.25, "blocks": 2}
    path = tmp_path / "masked.pt"
    torch.save({"model": net.state_dict(), "config": dict(config, widths=G.widths(net))}, path)
    for model in (net, load_model(path)):
        stem = model.stem[0][0]
        (model(x).feats.square().mean() + stem.weight.abs().sum()).backward()
        assert stem.weight_orig.grad is not None and stem.weight_orig.grad.abs().sum() > 0
        twin = copy.deepcopy(model)
        assert torch.equal(twin(x).feats, model(x).feats)


def test_prune_channels_names_data_of_other_channels_than_the_checkpoints_model(tmp_path, capsys):
    """A checkpoint that records no data of its run (config and weights
    alone, as ``models.model_from_state`` reads them) took generated scenes
    (7 feature channels) for channels' example input; a model of 4 input
    channels then failed with its own 'MinkUNet was built for 4 input
    channels; got 7', naming neither the data nor why it was read. The
    refusal now names the data taken and why no clouds serve."""
    from pointsparse.models import MinkUNet

    torch.manual_seed(0)
    config = {"model": "minkunet", "in_channels": 4, "classes": list("abcde"), "cr": 0.25, "blocks": 1,
              "voxel_size": 0.2}
    net = MinkUNet(4, 5, cr=0.25, blocks=1)
    path = tmp_path / "bare.pt"
    checkpoint.save(path, {"config": config, "model": net.state_dict()})
    assert cli.main(["prune", "channels", "--checkpoint", str(path), "--ratio", "0.5",
                     "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert ("generated scenes (the checkpoint records no data of its run): 7 feature channels a voxel (the clouds' "
            "readers give x, y, z, intensity and rgb), but the checkpoint's minkunet model takes 4: a model of other "
            "inputs runs on tensors you make") in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("procedure, what", [("vectors", "weights"), ("offsets", "offsets")])
def test_prune_vectors_and_offsets_of_a_pruned_checkpoint_say_the_sparsity_compounds(voxel_run, tmp_path, capsys,
                                                                                     procedure, what):
    """``prune vectors`` / ``prune offsets --sparsity S`` on a checkpoint
    pruned already prune S of what each conv had left (torch's rule): a
    checkpoint at 0.84 went to 0.91 with --sparsity 0.5, and nothing said
    so (the help read as a total). A note now gives the kept share before
    and after; a dense checkpoint gets none."""
    first, second = tmp_path / "first", tmp_path / "second"
    assert cli.main(["prune", procedure, "--checkpoint", str(voxel_run), "--sparsity", "0.5", "--out",
                     str(first)]) == 0
    assert "pruned already" not in capsys.readouterr().err
    assert cli.main(["prune", procedure, "--checkpoint", str(first / "checkpoint.pt"), "--sparsity", "0.5", "--out",
                     str(second)]) == 0
    captured = capsys.readouterr()
    kept = re.search(rf"(\d+) of the (\d+) {what if what == 'offsets' else 'weights of its convs'}", captured.out)
    note = re.search(rf"note: --checkpoint .*first/checkpoint.pt was pruned already \((\d+) of the (\d+) {what} "
                     rf"kept, ([\d.]+)\): --sparsity 0.5 pruned that share of what each conv had left \(torch.nn.utils."
                     rf"prune's rule\), so ([\d.]+) of them stay in all, not 0.50", captured.err)
    assert kept and note, (captured.out, captured.err)
    assert note.group(2) == kept.group(2) and int(note.group(1)) > int(kept.group(1))
    assert float(note.group(3)) < 0.55 and float(note.group(4)) < 0.3


def test_prune_no_progress_reaches_its_fine_tuning(voxel_run, tmp_path, monkeypatch, capsys):
    """``pointsparse prune`` refused --no-progress ("unrecognized
    arguments"), which train, eval and predict take: its --finetune-epochs
    training showed the run's bars. The checkpoint procedures now take it and
    hand it to that training; the run's own setting stands without it; a
    task procedure, which trains no run, refuses it as any flag it would not
    read."""
    from pointsparse import checkpoint
    from pointsparse.app import train as train_app

    state = checkpoint.load(voxel_run)
    state["args"]["no_progress"] = False  # (a run that showed its bars)
    (tmp_path / "run").mkdir()
    checkpoint.save(tmp_path / "run" / "checkpoint.pt", state)
    seen = []
    monkeypatch.setattr(train_app, "main", lambda args: seen.append((args.no_progress, args.epochs)) or 0)
    for extra, want in (([], False), (["--no-progress"], True)):
        out = tmp_path / f"out{len(seen)}"
        assert cli.main(["prune", "offsets", "--checkpoint", str(tmp_path / "run" / "checkpoint.pt"),
                         "--finetune-epochs", "2", *extra, "--out", str(out)]) == 0
        assert seen[-1] == (want, state["epoch"] + 2)
    capsys.readouterr()
    assert cli.main(["prune", "schedule", "--quick", "--no-progress", "--out", str(tmp_path / "s")]) == 2
    assert "--no-progress" in capsys.readouterr().err
