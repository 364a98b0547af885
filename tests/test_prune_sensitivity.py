"""Sensitivity scan: per-layer curves, exact restore, threshold choice, plot."""

from __future__ import annotations

import pytest
import torch

from pointsparse.prune import sensitivity
from prune_procedures_support import Trainer, mlp, sparse_chain, sparse_input

pytestmark = pytest.mark.usefixtures("one_thread")

def _density(layer):
    return lambda m: float((m[layer].weight != 0).float().mean())


def test_curves_are_the_layer_alone_and_model_restored():
    net = mlp(0)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    res = sensitivity.sensitivity_scan(net, _density(0))
    assert res.ratios == [round(0.1 * i, 1) for i in range(10)]
    # only layer 0 is pruned while it is scanned: its density is 1 - r; others leave it at 1
    assert res.curves["0"] == pytest.approx([1 - r for r in res.ratios], abs=1 / 128)
    assert res.curves["2"] == [1.0] * 10 and res.curves["4"] == [1.0] * 10
    after = net.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert not any(k.endswith("_orig") for k in after) and not net[0]._forward_pre_hooks


def test_channel_granularity_on_sparse_conv():
    net = sparse_chain()
    x = sparse_input()

    def zero_channels(m):  # fraction of output channels of layer 3 that are entirely zero
        w = m[3].weight
        return float((w.abs().sum((0, 1)) == 0).float().mean())

    res = sensitivity.sensitivity_scan(net, zero_channels, ratios=[0.0, 0.5], granularity="channel", layers=["3"])
    assert res.curves["3"] == [0.0, 0.5]
    net(x)  # still runs


def test_choose_ratios_threshold():
    res = sensitivity.SensitivityResult([0.0, 0.1, 0.2, 0.3], {"a": [0.9, 0.9, 0.88, 0.7], "b": [0.9, 0.85, 0.9, 0.9]},
                                        0.9, "unstructured")
    assert sensitivity.choose_ratios(res, 0.025) == {"a": 0.2, "b": 0.0}  # b's dip at 0.1 stops it
    assert sensitivity.choose_ratios(res, 0.3) == {"a": 0.3, "b": 0.3}
    assert sensitivity.choose_ratios(res, 0.03, relative=True) == {"a": 0.2, "b": 0.0}


def test_real_metric_apply_and_plot(tmp_path):
    tr = Trainer()
    net = mlp(0)
    tr(net, 150)
    res = sensitivity.sensitivity_scan(net, tr.accuracy, ratios=[0.0, 0.5, 0.9])
    assert res.baseline > 0.8 and all(len(v) == 3 for v in res.curves.values())
    chosen = sensitivity.choose_ratios(res, 0.05)
    sensitivity.apply_ratios(net, chosen)
    for name, r in chosen.items():
        assert float((dict(net.named_modules())[name].weight == 0).float().mean()) == pytest.approx(r, abs=0.01)
    path = sensitivity.plot_sensitivity(res, tmp_path / "s.png", 0.05)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_inputs():
    net = mlp(0)
    with pytest.raises(ValueError, match="granularity"):
        sensitivity.sensitivity_scan(net, _density(0), granularity="block")
    with pytest.raises(ValueError, match="ratios"):
        sensitivity.sensitivity_scan(net, _density(0), ratios=[0.5, 1.0])
    with pytest.raises(TypeError, match="eval_fn"):
        sensitivity.sensitivity_scan(net, None)
    with pytest.raises(ValueError, match="not a submodule"):
        sensitivity.sensitivity_scan(net, _density(0), layers=["9"])
    with pytest.raises(ValueError, match="threshold"):
        sensitivity.choose_ratios(sensitivity.SensitivityResult([0.0], {"a": [1.0]}, 1.0, "unstructured"), -1)
