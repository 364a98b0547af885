"""``pointsparse prune channels`` on a trained checkpoint: the pruned widths
are recorded, ``load_model``, ``eval`` and ``train --resume`` rebuild the
smaller model, and the checkpoint loads with ``weights_only=True``."""

from __future__ import annotations

import pytest
import torch

from pointsparse import checkpoint
from pointsparse.app import cli
from pointsparse.models import load_model
from pointsparse.prune import graph as G

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
    assert cli.main(["prune", "channels", "--checkpoint", str(dense / "checkpoint.pt"), "--ratio", "0.5",
                     "--criterion", "bn", "--multiple", "4", "--out", str(small)]) == 0
    state = checkpoint.load(small / "checkpoint.pt")
    widths = state["config"]["widths"]
    assert widths["stem.0.0"]["out"] == 4 and widths["classifier.fn"]["in"] == 12  # 8 of 8, 24 of 24 halved
    model, full = load_model(small / "checkpoint.pt"), load_model(dense / "checkpoint.pt")
    assert G.widths(model) == widths
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
