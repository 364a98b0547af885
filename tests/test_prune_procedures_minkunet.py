"""The procedures on MinkUNet (skipped where ``pointsparse.models`` has not
landed): channel groups inside its residual blocks, exact surgery, AMC's
FLOPs model, SynFlow without data."""

from __future__ import annotations

import pytest
import torch

from pointsparse.prune import adapters, amc, init, surgery
from prune_procedures_support import sparse_input

pytestmark = pytest.mark.usefixtures("one_thread")

models = pytest.importorskip("pointsparse.models")


def _net():
    torch.manual_seed(0)
    return models.MinkUNet(3, 4, cr=0.125, blocks=1).eval()


def test_groups_are_the_channels_inside_blocks():
    groups = surgery.channel_groups(_net())
    assert groups and all(g.consumer.endswith("main.3") or g.producer == "stem.0.0" for g in groups)
    assert all(g.repeat == 1 and g.offset == 0 for g in groups)


def test_surgery_exact_and_flops_model():
    net = _net()
    x = sparse_input(n=300, extent=16)
    named = dict(net.named_modules())
    g = surgery.channel_groups(net)[1]
    c = adapters.out_channels(named[g.producer])
    with torch.no_grad():
        named[g.consumer].weight[:, c // 2:] = 0  # the upper half of the channels feeds nothing
    before = net(x).feats
    infos = amc.layer_infos(net, x)
    predicted = amc.flops_for(infos, {g.producer: 1 - (c // 2) / c})
    surgery.prune_channels(net, g, list(range(c // 2)))
    assert torch.allclose(net(x).feats, before, atol=1e-4)
    assert predicted == pytest.approx(sum(i.flops for i in amc.layer_infos(net, x)))


def test_synflow_masks_minkunet():
    net = _net()
    x = sparse_input(n=200, extent=16)
    masks = init.prune_at_init(net, "synflow", 0.9, example_input=x, iterations=5)
    total = sum(m.numel() for m in masks.values())
    assert abs(sum(int(m.sum()) for m in masks.values()) - round(0.1 * total)) <= 1
    assert net(x).feats.shape == (len(x), 4)
