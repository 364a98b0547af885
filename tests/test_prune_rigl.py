"""RigL: densities (uniform, ERK), the cosine drop fraction, drop/grow by
magnitude and gradient at constant density, hooks around a training loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from pointsparse.prune import adapters, rigl
from prune_procedures_support import Trainer, mlp, region_chain, sparse_chain, sparse_input  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def test_erk_densities_meet_the_budget():
    net = mlp(0, widths=(8, 64, 64, 3))
    d = rigl.erk_densities(net, 0.2)
    sizes = {n: m.weight.numel() for n, m in adapters.prunable_layers(net)}
    total = sum(d[n] * sizes[n] for n in sizes) / sum(sizes.values())
    assert total == pytest.approx(0.2)
    # ERK: small layers are denser; (64+64)/(64*64) < (8+64)/(8*64)
    assert d["2"] < d["0"] <= 1.0
    dense = rigl.erk_densities(net, 0.9)
    assert max(dense.values()) == 1.0  # a layer that would exceed 1 is dense
    assert sum(dense[n] * sizes[n] for n in sizes) / sum(sizes.values()) == pytest.approx(0.9)


def test_erk_on_sparse_conv_uses_kernel_dims():
    net = sparse_chain()
    d = rigl.erk_densities(net, 0.3)
    raw = {"0": (3 + 3 + 3 + 3 + 6) / (27 * 3 * 6), "3": (9 + 6 + 12) / (27 * 6 * 12), "6": (3 + 12 + 4) / (12 * 4)}
    dense_layers = [n for n in d if d[n] == 1.0]
    scaled = [n for n in d if n not in dense_layers]
    for a in scaled:
        for b in scaled:
            assert d[a] / d[b] == pytest.approx(raw[a] / raw[b])


def test_erk_on_region_conv_counts_the_region():
    # the cross (7 of 27 offsets) spans 3 offsets on every axis; its weights are 7 * 3 * 6, not 27 * 3 * 6
    net = region_chain()
    d = rigl.erk_densities(net, 0.1)
    raw = {"0": (3 + 3 + 3 + 3 + 6) / (7 * 3 * 6), "2": (3 + 3 + 3 + 6 + 4) / (27 * 6 * 4)}
    assert all(0 < v < 1 for v in d.values())
    assert d["0"] / d["2"] == pytest.approx(raw["0"] / raw["2"])
    sizes = {"0": 7 * 3 * 6, "2": 27 * 6 * 4}
    assert sum(d[n] * sizes[n] for n in sizes) / sum(sizes.values()) == pytest.approx(0.1)


def test_erk_region_extent_per_axis():
    # offsets 0 and 1 of a 3x3x3 kernel differ on z only: extents (1, 1, 2)
    from pointsparse.nn import Conv3d
    conv = Conv3d(2, 5, 3, kernel_region=[0, 1])
    assert rigl._kernel_dims(conv) == [1, 1, 2, 2, 5]


def test_masks_density_and_cosine_schedule():
    net = mlp(0, widths=(8, 32, 32, 3))
    r = rigl.RigL(net, density=0.25, distribution="uniform", update_interval=5, end_step=40, drop_fraction=0.3)
    for n, m in adapters.prunable_layers(net):
        assert int(r.masks[n].sum()) == round(0.25 * m.weight.numel())
        assert torch.equal(m.weight != 0, r.masks[n])
    assert r.drop_fraction_at(0) == pytest.approx(0.3)
    assert r.drop_fraction_at(20) == pytest.approx(0.15)
    assert r.drop_fraction_at(40) == pytest.approx(0.0)
    assert r.drop_fraction_at(10) == pytest.approx(0.15 * (1 + math.cos(math.pi / 4)))


def test_update_drops_smallest_and_grows_largest_gradient():
    torch.manual_seed(0)
    lin = nn.Linear(4, 4, bias=False)
    net = nn.Sequential(lin)
    r = rigl.RigL(net, density=0.5, distribution="uniform", update_interval=1, end_step=100, drop_fraction=0.5)
    with torch.no_grad():
        lin.weight.copy_(torch.arange(1.0, 17.0).view(4, 4) * r.masks["0"])
    grad = torch.zeros(4, 4)
    inactive = (~r.masks["0"]).nonzero()
    grad[tuple(inactive[0])] = 5.0
    grad[tuple(inactive[1])] = 3.0
    lin.weight.grad = grad
    old = r.masks["0"].clone()
    r.step_count = 0
    r.update()  # fraction 0.5 * (1 + cos 0)/2 = 0.5 of 8 active -> 4 dropped, 4 grown
    new = r.masks["0"]
    assert int(new.sum()) == 8
    active_vals = (torch.arange(1.0, 17.0).view(4, 4))[old]
    dropped = old & ~new
    assert set(torch.arange(1.0, 17.0).view(4, 4)[dropped].tolist()) <= set(sorted(active_vals.tolist())[:4])
    assert bool(new[tuple(inactive[0])]) and bool(new[tuple(inactive[1])])
    assert float(lin.weight.detach()[tuple(inactive[0])]) == 0.0  # grown connections start at zero
    assert bool((lin.weight.detach()[dropped] == 0).all())  # dropped weights were left live until apply_masks
    assert bool((lin.weight.detach()[~new] == 0).all()) and int((lin.weight != 0).sum()) <= 8


def test_training_with_hooks_keeps_density_and_changes_masks():
    tr = Trainer()
    net = mlp(0, widths=(8, 32, 32, 3))
    r = rigl.RigL(net, density=0.3, distribution="erk", update_interval=10, end_step=60)
    start = {n: m.clone() for n, m in r.masks.items()}
    with r:
        tr(net, 80)
    assert r.step_count == 80 and r.updates == 5
    assert adapters.sparsity(net) >= 1 - r.density() - 1e-9
    assert r.density() == pytest.approx(sum(int(m.sum()) for m in start.values()) /
                                        sum(m.numel() for m in start.values()))
    assert any(not torch.equal(start[n], r.masks[n]) for n in start)
    for n, m in adapters.prunable_layers(net):
        assert not bool((m.weight[~r.masks[n]] != 0).any())
    # outside the context the hook is gone
    tr(net, 5)
    assert r.step_count == 80


def test_static_sparse_never_changes_and_attach():
    net = mlp(0)
    s = rigl.static_sparse(net, 0.5, "uniform")
    before = {n: m.clone() for n, m in s.masks.items()}
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    handle = s.attach(opt)
    x = torch.randn(4, 8)
    for _ in range(3):
        net(x).sum().backward()
        opt.step()
    handle.remove()
    assert s.step_count == 3 and all(torch.equal(before[n], s.masks[n]) for n in before)
    assert adapters.sparsity(net) == pytest.approx(0.5, abs=0.01)


def test_bad_inputs():
    with pytest.raises(ValueError, match="density"):
        rigl.RigL(mlp(0), density=0.0)
    with pytest.raises(ValueError, match="distribution"):
        rigl.RigL(mlp(0), distribution="er")
    with pytest.raises(ValueError, match="update_interval"):
        rigl.RigL(mlp(0), update_interval=0)
    with pytest.raises(TypeError, match="update_interval"):
        rigl.RigL(mlp(0), update_interval=True)
    with pytest.raises(TypeError, match="end_step"):
        rigl.RigL(mlp(0), end_step=True)
    for seed, error in (("a", TypeError), (1.5, TypeError), (-1, ValueError)):  # were torch's RuntimeError / accepted
        with pytest.raises(error, match="seed must be an int >= 0"):
            rigl.RigL(mlp(0), seed=seed)
    with pytest.raises(TypeError, match="seed"):
        rigl.static_sparse(mlp(0), 0.5, seed=None)
    r = rigl.RigL(mlp(0), density=0.5)
    with pytest.raises(RuntimeError, match="gradient"):
        r.update()


@pytest.mark.parametrize("make", [np.int64, np.int32])
def test_counts_take_numpy_integers(make):
    """update_interval, end_step and seed may be numpy integers (the first
    two were refused: isinstance int), kept as the ints they hold."""
    r = rigl.RigL(mlp(0), update_interval=make(5), end_step=make(40), seed=make(3))
    want = rigl.RigL(mlp(0), update_interval=5, end_step=40, seed=3)
    assert (r.update_interval, r.end_step) == (5, 40) and type(r.update_interval) is type(r.end_step) is int
    assert all(torch.equal(r.masks[n], want.masks[n]) for n in want.masks)
    assert r.drop_fraction_at(20) == want.drop_fraction_at(20)


@pytest.mark.parametrize("bad", [True, np.bool_(True), 2.0, 1.5])
def test_counts_refuse_bools_and_floats(bad):
    with pytest.raises(TypeError, match="update_interval must be a positive int"):
        rigl.RigL(mlp(0), update_interval=bad)
    with pytest.raises(TypeError, match="end_step must be a positive int"):
        rigl.RigL(mlp(0), end_step=bad)


@pytest.mark.parametrize("outside", [0.0, 1e-3])
@pytest.mark.parametrize("distribution", ["uniform", "erk"])
def test_a_kernel_region_conv_is_sparse_inside_its_region(outside, distribution):
    """A kernel_region conv's weights are its region's: the masks were drawn
    over all 27 offsets (a 'cross' conv's density over its 7 was off the
    target, its zeros outside counted as pruned) and drop/grow could pick
    the offsets outside (small values dropped, zero-gradient ones grown). The
    density counts and the masks choose only the region's weights; the
    values outside stay as they are."""
    net = region_chain(0, outside)
    conv = net[0]
    rest = [k for k in range(27) if k not in conv.kernel_region]
    before = conv.weight.detach()[rest].clone()
    r = rigl.RigL(net, density=0.5, distribution=distribution, update_interval=1, end_step=100, drop_fraction=0.5)
    used = {n: adapters.used_mask(m) for n, m in adapters.prunable_layers(net)}
    kept = {n: int((r.masks[n] & used[n]).sum()) for n in used}
    assert r.density() == pytest.approx(sum(kept.values()) / sum(int(u.sum()) for u in used.values()))
    assert adapters.sparsity(net) == pytest.approx(0.5, abs=2 / (7 * 18 + 27 * 24))
    if distribution == "uniform":
        assert kept == {"0": round(0.5 * 7 * 18), "2": round(0.5 * 27 * 24)}
    x = sparse_input()
    net(x).feats.square().sum().backward()
    r.step_count = 0
    r.update()
    assert {n: int((r.masks[n] & used[n]).sum()) for n in used} == kept
    assert bool(r.masks["0"][rest].all())
    assert torch.equal(conv.weight.detach()[rest], before)


@pytest.mark.parametrize("make", [rigl.RigL, rigl.static_sparse])
def test_a_layer_pruned_by_torch_is_refused(make):
    """A layer already pruned with torch.nn.utils.prune (weight_orig +
    weight_mask) has a computed ``weight``: the masks were written into that
    copy (recomputed at the next forward, so never in effect) and the first
    update said 'call update after backward' after a backward. Now a
    ValueError naming the layer, before anything is changed."""
    net = mlp(0)
    torch.nn.utils.prune.l1_unstructured(net[2], "weight", 0.5)
    before = net[0].weight.detach().clone()
    with pytest.raises(ValueError, match="layer '2' is already pruned"):
        make(net, 0.3)
    assert torch.equal(net[0].weight, before)


def test_update_on_channels_last_and_transposed_weights():
    """A weight that is no contiguous block (a channels_last Conv2d, a
    transposed Parameter) made update fail with torch's 'view size is not
    compatible with input tensor's size and stride'; the drop / grow now runs
    and the weights hold the masks."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(16, 6), nn.Linear(6, 2))
    net = net.to(memory_format=torch.channels_last)
    net[3].weight = nn.Parameter(torch.randn(2, 6).t().contiguous().t())
    assert not net[0].weight.is_contiguous() and not net[3].weight.is_contiguous()
    r = rigl.RigL(net, 0.5, "uniform", update_interval=1, end_step=10)
    kept = {n: int(m.sum()) for n, m in r.masks.items()}
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x = torch.randn(4, 3, 4, 4).to(memory_format=torch.channels_last)
    with r:
        for _ in range(3):
            opt.zero_grad()
            net(x).pow(2).mean().backward()
            opt.step()
    assert r.updates == 3 and {n: int(m.sum()) for n, m in r.masks.items()} == kept
    for n, m in r.layers:
        assert not bool(m.weight[~r.masks[n]].any())


def test_tied_weights_are_refused():
    """Two layers sharing one weight Parameter got two independent masks,
    both multiplied into the one tensor: RigL reported density 0.5 while a
    quarter of the weights was left. Now a ValueError naming both layers."""
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    net[2].weight = net[0].weight
    with pytest.raises(ValueError, match=r"layers '0' and '2' share one weight"):
        rigl.RigL(net, 0.5, "uniform")
    r = rigl.RigL(net, 0.5, "uniform", layers=["0"])  # one of them: its mask is the shared weight's
    assert r.density() == 0.5 and float((net[2].weight != 0).float().mean()) == 0.5


def test_a_frozen_layer_is_named_as_frozen():
    """A layer with requires_grad=False never gets a gradient: the update said
    'call update after backward' to a user who had; it now says the layer is
    frozen."""
    net = mlp(0)
    net[0].weight.requires_grad_(False)
    r = rigl.RigL(net, 0.5, update_interval=1, end_step=10)
    net(torch.randn(4, 8)).sum().backward()
    with pytest.raises(ValueError, match=r"layer '0' is frozen \(requires_grad=False\)"):
        r.update()


def test_erk_with_a_layer_of_no_weights():
    """A layer without weights (Linear(8, 0) and the Linear(0, 4) after it)
    made erk_densities divide by its size: Python's ZeroDivisionError from
    RigL(model) (uniform worked). Such a layer is dense (nothing to prune)
    and the others meet the budget."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 8), nn.Linear(8, 0), nn.Linear(0, 4))
    d = rigl.erk_densities(net, 0.3)
    assert d["2"] == d["3"] == 1.0
    assert (d["0"] * 128 + d["1"] * 128) / 256 == pytest.approx(0.3)
    r = rigl.RigL(net, 0.3, update_interval=1, end_step=10)
    assert r.density() == pytest.approx(0.3, abs=0.01)
    net(torch.randn(2, 8)).sum().backward()
    assert r.update()["2"] == 0


@pytest.mark.parametrize("how", ["context", "attach"])
def test_a_step_of_two_optimizers_counts_once(how):
    """Two optimizers, each stepping its layers, both hooked: each training
    step was counted twice (the drop/grow updates came at half the interval
    and the cosine schedule ran twice as fast). Each optimizer still masks
    its layers after its own step."""
    net = mlp(0, widths=(8, 32, 32, 3))
    r = rigl.RigL(net, density=0.3, distribution="uniform", update_interval=2, end_step=100)
    biases = torch.optim.SGD([m.bias for m in (net[0], net[2], net[4])], lr=0.1)  # steps none of the weights
    first = torch.optim.SGD([net[0].weight], lr=0.1, momentum=0.9)
    rest = torch.optim.SGD([net[2].weight, net[4].weight], lr=0.1, momentum=0.9)
    x = torch.randn(16, 8)

    def train(steps):
        for _ in range(steps):
            for opt in (biases, first, rest):
                opt.zero_grad()
            net(x).square().mean().backward()
            for opt in (biases, first, rest):
                opt.step()

    if how == "context":
        with r:
            train(6)
    else:
        handles = [r.attach(biases), r.attach(first), r.attach(rest)]
        train(6)
        for h in handles:
            h.remove()
    assert r.step_count == 6 and r.updates == 3
    for n, m in adapters.prunable_layers(net):
        assert not bool((m.weight[~r.masks[n]] != 0).any())


def test_a_new_optimizer_each_call_counts_every_step():
    """A train function that makes its optimizer at each call (the steps of
    one optimizer, then of the next): every step counts."""
    tr = Trainer()
    net = mlp(0, widths=(8, 32, 32, 3))
    r = rigl.RigL(net, density=0.3, update_interval=2, end_step=100)
    with r:
        for _ in range(3):
            tr(net, 1)
    assert r.step_count == 3 and r.updates == 1


def _rigl_training(net, r, steps, seed):
    """``steps`` SGD steps on fixed data under ``r`` (hooked by attach)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    handle = r.attach(opt)
    for _ in range(steps):
        x = torch.randn(16, 8, generator=g)
        opt.zero_grad()
        net(x).square().mean().backward()
        opt.step()
    handle.remove()


def test_state_dict_resumes_a_run_where_it_stopped():
    """RigL's masks and step count were in no state_dict: a run stopped
    after 7 steps and restarted from a checkpoint of its model drew fresh
    random masks at step 0 (its updates and drop schedule from the start
    again). RigL.state_dict() / load_state_dict() now carry them, as an
    optimizer's do: 7 + 7 steps resumed = 14 steps in one go."""
    whole = mlp(0, widths=(8, 32, 32, 3))
    part = mlp(0, widths=(8, 32, 32, 3))
    part.load_state_dict(whole.state_dict())
    a = rigl.RigL(whole, density=0.3, update_interval=3, end_step=12, seed=1)
    _rigl_training(whole, a, 7, seed=0)
    b = rigl.RigL(part, density=0.3, update_interval=3, end_step=12, seed=1)
    _rigl_training(part, b, 7, seed=0)
    saved = {"model": part.state_dict(), "rigl": b.state_dict()}
    resumed = mlp(1, widths=(8, 32, 32, 3))  # another start: everything must come from the checkpoint
    c = rigl.RigL(resumed, density=0.3, update_interval=3, end_step=12, seed=2)
    resumed.load_state_dict(saved["model"])
    c.load_state_dict(saved["rigl"])
    assert c.step_count == 7 and c.updates == 2
    _rigl_training(whole, a, 7, seed=5)
    _rigl_training(resumed, c, 7, seed=5)
    assert c.step_count == a.step_count == 14 and c.updates == a.updates == 3
    for n in a.masks:
        assert torch.equal(a.masks[n], c.masks[n])
    for p, q in zip(whole.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    # the state is plain tensors and numbers: it goes through torch.save's safe load
    import io
    buf = io.BytesIO()
    torch.save(b.state_dict(), buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=True)["step_count"] == 7


def test_load_state_dict_refuses_another_models_state():
    r = rigl.RigL(mlp(0, widths=(8, 32, 32, 3)), density=0.3)
    other = rigl.RigL(mlp(0, widths=(8, 16, 32, 3)), density=0.3)
    with pytest.raises(ValueError, match=r"state_dict.*'0'.*shape"):
        r.load_state_dict(other.state_dict())
    fewer = rigl.RigL(mlp(0, widths=(8, 32, 32, 3)), density=0.3, layers=["0"])
    with pytest.raises(ValueError, match=r"state_dict.*layers"):
        r.load_state_dict(fewer.state_dict())
    with pytest.raises(TypeError, match="state_dict"):
        r.load_state_dict([1, 2])
    state = r.state_dict()
    state["step_count"] = -1
    with pytest.raises(ValueError, match="step_count"):
        r.load_state_dict(state)
    state = r.state_dict()  # (a density is checked before anything changes: refused whole)
    state["step_count"], state["densities"] = 5, {"0": "dense"}
    with pytest.raises(TypeError, match=r"densities\['0'\]"):
        r.load_state_dict(state)
    assert r.step_count == 0


@pytest.mark.parametrize("twice", ["context-and-attach", "attach-twice"])
def test_one_optimizer_step_hooked_twice_counts_once(twice):
    """RigL used as a context and also attached to the optimizer (or
    attached twice) ran step twice per optimizer step: step_count doubled,
    updates came at half update_interval and the drop schedule ran twice as
    fast. An optimizer step is counted once however many of RigL's hooks
    see it."""
    net = mlp(0, widths=(8, 32, 32, 3))
    r = rigl.RigL(net, density=0.3, distribution="uniform", update_interval=2, end_step=100)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x = torch.randn(16, 8)
    handles = [r.attach(opt)]
    if twice == "attach-twice":
        handles.append(r.attach(opt))
        context = __import__("contextlib").nullcontext()
    else:
        context = r
    with context:
        for _ in range(6):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    for h in handles:
        h.remove()
    assert r.step_count == 6 and r.updates == 3
    opt.zero_grad()
    net(x).square().mean().backward()
    opt.step()  # every hook removed: not counted
    assert r.step_count == 6


def test_state_dict_resumes_with_the_model_loaded_before_the_rigl_is_built():
    """A resumed script loads the model, builds its RigL, then loads the
    RigL state: the new RigL's own random masks zeroed ~70% of the loaded
    weights, and load_state_dict's masks kept many of those as zeros, so the
    resumed run went on from other weights than the saved, silently. The
    values a fresh RigL zeroed are given back where the loaded masks keep
    them (while nothing has written the weight since); loaded after the
    RigL, the model's own values stay."""
    whole = mlp(0, widths=(8, 32, 32, 3))
    part = mlp(0, widths=(8, 32, 32, 3))
    part.load_state_dict(whole.state_dict())
    a = rigl.RigL(whole, density=0.3, update_interval=3, end_step=12, seed=1)
    _rigl_training(whole, a, 7, seed=0)
    b = rigl.RigL(part, density=0.3, update_interval=3, end_step=12, seed=1)
    _rigl_training(part, b, 7, seed=0)
    saved = {"model": part.state_dict(), "rigl": b.state_dict()}
    resumed = mlp(1, widths=(8, 32, 32, 3))
    resumed.load_state_dict(saved["model"])
    c = rigl.RigL(resumed, density=0.3, update_interval=3, end_step=12, seed=2)
    c.load_state_dict(saved["rigl"])
    for key, value in saved["model"].items():
        assert torch.equal(resumed.state_dict()[key], value), key
    _rigl_training(whole, a, 7, seed=5)
    _rigl_training(resumed, c, 7, seed=5)
    for n in a.masks:
        assert torch.equal(a.masks[n], c.masks[n])
    for p, q in zip(whole.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    # a RigL that has stepped gives nothing back: its weights are the training's
    d = rigl.RigL(mlp(1, widths=(8, 32, 32, 3)), density=0.3, update_interval=3, end_step=12, seed=2)
    d.step()
    before = {n: m.weight.detach().clone() for n, m in d.layers}
    d.load_state_dict(saved["rigl"])
    for n, m in d.layers:
        assert torch.equal(m.weight, before[n] * d.masks[n])


def test_a_nested_context_takes_its_hooks_off_on_the_last_exit():
    """``with r:`` inside ``with r:`` (a helper that wraps its own loop in
    the RigL it is handed) registered a second pair of global optimizer
    hooks and lost the first: after both exits the outer pair stayed on, so
    every later optimizer step of the model still counted, updated and
    masked. The hooks now come off when the outermost context exits."""
    net = mlp(0, widths=(8, 32, 32, 3))
    r = rigl.RigL(net, density=0.3, update_interval=2, end_step=100, seed=1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)

    def step():
        opt.zero_grad()
        net(torch.randn(16, 8)).square().mean().backward()
        opt.step()

    with r:
        with r:
            step()
        step()  # (still inside the outer context: counted)
    assert r.step_count == 2
    step()
    assert r.step_count == 2
    assert any(bool((m.weight != 0).logical_and(~r.masks[n]).any()) for n, m in r.layers)  # dense steps now


def test_a_second_rigl_on_the_same_model_keeps_its_density():
    """RigL(model, 0.3) run twice (a notebook cell run again, static_sparse
    then RigL): the second drew its random masks over weights the first had
    zeroed, so ~0.09 of the weights were left while density() said 0.3. A
    new RigL keeps the weights that are not zero first: the second one's
    masks are the first's, and its density is the weights'."""
    net = mlp(0, widths=(8, 32, 32, 3))
    first = rigl.RigL(net, density=0.3, distribution="uniform", seed=1)
    second = rigl.RigL(net, density=0.3, distribution="uniform", seed=2)
    for n, m in second.layers:
        assert torch.equal(second.masks[n], first.masks[n])
        assert int((m.weight != 0).sum()) == int(second.masks[n].sum())
    kept = sum(int((m.weight != 0).sum()) for _, m in second.layers)
    assert kept / sum(m.weight.numel() for _, m in second.layers) == pytest.approx(second.density())
    # a denser second RigL keeps every weight left, and draws the rest among the zeros
    third = rigl.RigL(net, density=0.5, distribution="uniform", seed=3)
    for n, m in third.layers:
        assert bool(third.masks[n][first.masks[n]].all())
