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
