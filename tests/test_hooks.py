"""torch's full backward hooks on the package's modules of SparseTensors
(pointsparse/nn/_hooks.py): torch warned that the output was no tensor and
the hooks never fired."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import pointsparse as ps
from pointsparse import nn as spnn
from pointsparse.nn import fuse
from reference import random_coords


def make(n=200, c=4, extent=7, seed=0, dtype=torch.float64):
    coords = random_coords(n, extent, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    return ps.SparseTensor(torch.randn(len(coords), c, generator=g, dtype=dtype), coords)


def _grads(module, x, weight_out, hooks=()):
    """(feats' gradient, output, parameters' gradients) of sum(out * weight_out)."""
    module.zero_grad(set_to_none=True)
    leaf = x.feats.detach().clone().requires_grad_()
    out = module(x.with_feats(leaf))
    feats = out.feats if isinstance(out, ps.SparseTensor) else out
    (feats * weight_out).sum().backward()
    return leaf.grad, feats.detach(), [p.grad.clone() for p in module.parameters() if p.grad is not None]


def test_conv3d_full_backward_hooks_see_the_feats_gradients_as_torch_gives_a_tensor_module_s():
    torch.manual_seed(0)
    x = make()
    conv = spnn.Conv3d(4, 6, 3).double()
    w_out = torch.randn(len(x), 6, dtype=torch.float64)
    want_in, out, want_params = _grads(conv, x, w_out)
    seen = []
    pre = conv.register_full_backward_pre_hook(lambda m, go: seen.append(("pre", m, go)))
    full = conv.register_full_backward_hook(lambda m, gi, go: seen.append(("full", m, gi, go)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (torch's "module output should be a Tensor" no more)
        got_in, got_out, got_params = _grads(conv, x, w_out)
    assert torch.equal(got_out, out) and torch.equal(got_in, want_in)
    assert all(torch.equal(a, b) for a, b in zip(got_params, want_params))
    assert [s[0] for s in seen] == ["pre", "full"] and seen[0][1] is conv and seen[1][1] is conv
    (grad_output,), (grad_input,), (grad_output2,) = seen[0][2], seen[1][2], seen[1][3]
    assert torch.equal(grad_output, w_out) and torch.equal(grad_output2, w_out)
    assert torch.equal(grad_input, want_in)
    # a full hook's grad_input replaces the input's; a pre-hook's grad_output the output's
    full.remove()
    doubled = conv.register_full_backward_hook(lambda m, gi, go: (gi[0] * 2,))
    assert torch.equal(_grads(conv, x, w_out)[0], 2 * want_in)
    doubled.remove()
    pre.remove()
    conv.register_full_backward_pre_hook(lambda m, go: (torch.zeros_like(go[0]),))
    got_in, _, got_params = _grads(conv, x, w_out)
    assert not got_in.any() and not any(p.any() for p in got_params)


def test_hooks_fire_in_order_and_go_with_their_handles():
    x = make(c=3)
    relu = spnn.ReLU()
    order = []
    a = relu.register_full_backward_hook(lambda m, gi, go: order.append("a"))
    relu.register_full_backward_hook(lambda m, gi, go: order.append("b"))
    relu.register_full_backward_hook(lambda m, gi, go: order.append("first"), prepend=True)
    _grads(relu, x, torch.ones(len(x), 3, dtype=torch.float64))
    assert order == ["first", "a", "b"]
    a.remove()
    order.clear()
    _grads(relu, x, torch.ones(len(x), 3, dtype=torch.float64))
    assert order == ["first", "b"]
    with pytest.raises(TypeError, match="hook must be callable"):
        relu.register_full_backward_hook("not a function")


def test_only_positional_arguments_are_in_grad_input_and_a_tensor_output_is_itself():
    torch.manual_seed(1)
    x = make(c=4)
    conv = spnn.Conv3d(4, 4, 3).double()
    seen = []
    conv.register_full_backward_hook(lambda m, gi, go: seen.append((gi, go)))
    skip = x.feats.detach().clone().requires_grad_()
    leaf = x.feats.detach().clone().requires_grad_()
    conv(x.with_feats(leaf), add=x.with_feats(skip)).feats.sum().backward()
    (gi, go), = seen
    assert len(gi) == 1 and torch.equal(gi[0], leaf.grad) and len(go) == 1
    assert torch.equal(skip.grad, torch.ones_like(skip))  # (the keyword argument's gradient, untouched)
    # a pool to one row per item returns a tensor: grad_output is its gradient
    pool = spnn.GlobalAvgPool()
    pooled = []
    pool.register_full_backward_hook(lambda m, gi, go: pooled.append((gi, go)))
    leaf = x.feats.detach().clone().requires_grad_()
    rows = pool(x.with_feats(leaf))
    rows.sum().backward()
    (gi, go), = pooled
    items = int(x.coords[:, 0].max()) + 1
    assert torch.equal(gi[0], leaf.grad) and torch.equal(go[0], torch.ones(items, 4, dtype=torch.float64))


def test_a_hooked_batch_norm_before_an_in_place_relu_in_a_minkunet():
    """Every BatchNorm of a MinkUNet hooked (each followed by an in-place
    ReLU, which autograd refuses on a hooked module's output in torch's own
    models): the same gradients as the model without hooks, each hook once."""
    torch.manual_seed(2)
    net = ps.models.MinkUNet(4, 3, cr=0.125, blocks=1).double()
    x = make(400, 4, extent=20, seed=3)
    w_out = torch.randn(len(x), 3, dtype=torch.float64)
    want_in, out, want_params = _grads(net, x, w_out)
    counts = {}
    norms = [(name, m) for name, m in net.named_modules() if isinstance(m, spnn.BatchNorm)]
    for name, m in norms:
        m.register_full_backward_hook(lambda m, gi, go, name=name: counts.__setitem__(name, counts.get(name, 0) + 1))
    blocks = [m for m in net.modules() if isinstance(m, (ps.models.minkunet.ConvBlock, ps.models.minkunet.ResidualBlock))]
    block_seen = []
    for m in blocks:
        m.register_full_backward_hook(lambda m, gi, go: block_seen.append(gi[0].shape))
    net_seen = []
    net.register_full_backward_hook(lambda m, gi, go: net_seen.append((gi[0], go[0])))
    got_in, got_out, got_params = _grads(net, x, w_out)
    assert torch.equal(got_out, out) and torch.equal(got_in, want_in)
    assert all(torch.equal(a, b) for a, b in zip(got_params, want_params))
    assert counts == {name: 1 for name, _ in norms} and len(block_seen) == len(blocks)
    (gi, go), = net_seen
    assert torch.equal(gi, want_in) and torch.equal(go, w_out)
    # every module of the package in it hooked: still the same gradients
    from pointsparse.nn._hooks import SparseBackwardHooks

    hooked = [m for m in net.modules() if isinstance(m, SparseBackwardHooks)]
    fired = []
    for m in hooked:
        m.register_full_backward_hook(lambda m, gi, go: fired.append(m))
    got_in, got_out, got_params = _grads(net, x, w_out)
    assert torch.equal(got_out, out) and torch.equal(got_in, want_in)
    assert all(torch.equal(a, b) for a, b in zip(got_params, want_params))
    assert len(fired) == len(hooked) > 60


@pytest.mark.parametrize("compiled", [False, True])
def test_in_place_relus_by_hooked_modules_eager_and_compiled(compiled):
    """A hooked BatchNorm before an in-place ReLU, and a hooked in-place ReLU:
    autograd refused the hook function's output changed in place (eager:
    'is a view and is being modified inplace'; torch.compile: the same from
    its fake tensors). The same output and gradient as without hooks."""
    x = make(300, 4, extent=8, seed=4, dtype=torch.float32)
    torch.manual_seed(4)
    net = torch.nn.Sequential(spnn.Conv3d(4, 8, 3), spnn.BatchNorm(8), spnn.ReLU(inplace=True), spnn.Conv3d(8, 2, 3))
    w_out = torch.randn(len(x), 2)
    want_in, want_out, _ = _grads(net, x, w_out)
    seen = []
    net[1].register_full_backward_hook(lambda m, gi, go: seen.append("bn"))
    net[2].register_full_backward_hook(lambda m, gi, go: seen.append("relu"))
    run = torch.compile(net, backend="eager") if compiled else net
    got_in, got_out, _ = _grads(run, x, w_out)
    torch.testing.assert_close(got_out, want_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_in, want_in, rtol=1e-5, atol=1e-5)
    assert seen == ["relu", "bn"]


def test_a_hooked_module_copies_runs_without_gradients_and_after_a_forward_that_raised():
    x = make(c=4, dtype=torch.float32)
    conv = spnn.Conv3d(4, 2, 3)
    fired = []
    conv.register_full_backward_hook(lambda m, gi, go: fired.append(m))
    with pytest.raises(ValueError):
        conv(make(c=3, dtype=torch.float32))  # (3 channels for a 4-channel conv)
    assert conv._sparse_backward_calls == []  # (the failed call's entry went with it)
    with torch.no_grad():
        assert conv(x).feats.shape == (len(x), 2)
    assert conv._sparse_backward_calls == []
    twin = copy.deepcopy(conv)  # torch's hooks are copied with a module: so are these
    _grads(twin, x, torch.ones(len(x), 2))
    assert fired == [twin]


def test_removing_the_last_hook_takes_the_runners_out_and_a_new_hook_fires_once():
    x = make(c=4, dtype=torch.float32)
    conv = spnn.Conv3d(4, 2, 3)
    fired = []
    full = conv.register_full_backward_hook(lambda m, gi, go: fired.append("full"))
    pre = conv.register_full_backward_pre_hook(lambda m, go: fired.append("pre"))
    assert len(conv._forward_pre_hooks) == 1 and len(conv._forward_hooks) == 1
    full.remove()
    assert len(conv._forward_pre_hooks) == 1  # (a hook is left: the runners stay)
    pre.remove()
    pre.remove()  # (twice, as torch's handles allow)
    # the module as one never hooked: torch's fast call path, nothing of ours left in it
    assert not conv._forward_pre_hooks and not conv._forward_hooks and not conv._forward_hooks_always_called
    assert not any(key.startswith("_sparse_backward") for key in vars(conv))
    assert not fuse.has_hooks(conv)  # (fuse_for_inference folds it again: the runners had kept it unfolded)
    _grads(conv, x, torch.ones(len(x), 2))
    assert fired == []
    conv.register_full_backward_hook(lambda m, gi, go: fired.append("again"))
    _grads(conv, x, torch.ones(len(x), 2))
    assert fired == ["again"]  # (once: one pair of runners)
    # a handle kept past its module's life does no harm
    import gc

    other = spnn.ReLU()
    handle = other.register_full_backward_hook(lambda m, gi, go: None)
    del other
    gc.collect()
    assert handle._module_ref() is None  # (a weak reference: the handle kept no module alive)
    handle.remove()


def test_a_hook_removed_during_a_forward_fires_for_that_call_and_the_runners_go_after_it():
    """torch's hooks removed during a forward still fire for that call (its
    lists are taken when the call starts); the runners taken out at once
    left that call's hooks unfired. They go once the call ends now, and
    nothing of ours is left in the module after it."""
    x = make(c=4, dtype=torch.float32)
    conv = spnn.Conv3d(4, 2, 3)
    fired = []
    handle = conv.register_full_backward_hook(lambda m, gi, go: fired.append("h"))
    conv.register_forward_pre_hook(lambda m, args: handle.remove())  # (after the runner: the call is under way)
    _grads(conv, x, torch.ones(len(x), 2))
    assert fired == ["h"]
    assert len(conv._forward_pre_hooks) == 1 and not conv._forward_hooks  # (the user's pre-hook only)
    assert not any(key.startswith("_sparse_backward") for key in vars(conv))
    _grads(conv, x, torch.ones(len(x), 2))
    assert fired == ["h"]


def test_runners_a_module_holds_without_tables_are_taken_not_doubled():
    """A module given the runners without their tables (compress copied a
    layer's forward hooks so before this stop: a compressed model pickled
    then) made a second pair on its first backward hook, which then fired
    twice, and kept the old pair after the hook went."""
    from pointsparse.nn._hooks import RUNNERS

    x = make(c=4, dtype=torch.float32)
    conv = spnn.Conv3d(4, 2, 3)
    for _ in range(2):  # (a copy of a copy: two pairs)
        conv.register_forward_pre_hook(RUNNERS[0])
        conv.register_forward_hook(RUNNERS[1], always_call=True)
    fired = []
    handle = conv.register_full_backward_hook(lambda m, gi, go: fired.append("h"))
    assert len(conv._forward_pre_hooks) == 1 and len(conv._forward_hooks) == 1
    _grads(conv, x, torch.ones(len(x), 2))
    assert fired == ["h"]
    handle.remove()
    assert not conv._forward_pre_hooks and not conv._forward_hooks


def test_compress_keeps_the_runners_among_the_layers_forward_hooks_in_their_places():
    """A forward pre-hook and a forward hook registered after a backward
    hook change what the hook sees (the runners run first); compress put
    the compressed layer's runners after them, so its hooks saw other
    gradients (half and a third of the source's here). Their places are
    kept: the same gradients on both."""
    from pointsparse import formats

    torch.manual_seed(0)
    x = make(c=4, dtype=torch.float32)
    conv = spnn.Conv3d(4, 5, 3)
    seen = []
    conv.register_full_backward_hook(lambda m, gi, go: seen.append((gi[0], go[0])))
    conv.register_forward_pre_hook(lambda m, args: (args[0].with_feats(args[0].feats * 2),))
    conv.register_forward_hook(lambda m, args, out: out.with_feats(out.feats * 3))
    compressed = formats.compress(conv, "csr")
    w_out = torch.randn(len(x), 5)
    for layer in (conv, compressed):
        _grads(layer, x, w_out)
    (source_in, source_out), (got_in, got_out) = seen
    torch.testing.assert_close(got_in, source_in)
    torch.testing.assert_close(got_out, source_out)
    assert torch.equal(source_out, 3 * w_out)  # (the output hook runs after the runner: the gradient through it)
