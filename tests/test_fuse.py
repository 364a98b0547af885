"""Inference fusion: BatchNorm folded into the conv before it, ReLU in the
conv kernel's store; a fused MinkUNet gives model.eval()'s output."""

from __future__ import annotations

import pytest
import torch

import pointsparse as ps
from pointsparse import _ext
from pointsparse import nn as spnn
from pointsparse.models import MinkUNet
from pointsparse.nn import _engine


def _cloud(n=600, channels=4, seed=0, extent=20):
    g = torch.Generator().manual_seed(seed)
    coords = torch.unique(torch.cat([torch.zeros(n, 1, dtype=torch.int64),
                                     torch.randint(0, extent, (n, 3), generator=g)], 1), dim=0).int()
    return ps.SparseTensor(torch.randn(len(coords), channels, generator=g), coords)


def _randomise_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, spnn.BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.2)


@pytest.mark.parametrize("forward_first", [False, True])
def test_fused_pruned_minkunet_equals_eval(forward_first):
    """A MinkUNet with pruning masks (weight_orig, weight_mask, the hook):
    the fused copy has them made permanent before folding, so its logits
    are model.eval()'s; the model keeps its masks. Without a forward first
    the masked weight is not a leaf (deepcopy refuses those: the copy takes
    its value); after a no-grad forward it is, and the fold once went into a
    weight the hook then overwrote."""
    from pointsparse import prune

    torch.manual_seed(0)
    net = MinkUNet(4, 6, cr=0.25)
    _randomise_bn(net)
    net.eval()
    convs = [m for m in net.modules() if isinstance(m, spnn.Conv3d) and m.weight.shape[0] > 1]
    for conv in convs:
        prune.panel_structured(conv, "weight", 0.5)
    x = _cloud(3000, 4, extent=40)
    if forward_first:
        with torch.no_grad():
            net(x)
    fused = spnn.fuse_for_inference(net)
    with torch.no_grad():
        ref = net(x).feats
        out = fused(ps.SparseTensor(x.feats, x.coords)).feats
    assert not any(hasattr(m, "weight_orig") for m in fused.modules())
    assert all(hasattr(m, "weight_orig") for m in convs)  # the model keeps its masks
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("isa", _ext.core.runnable_isas())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_relu_in_the_kernel_store_equals_relu_after(isa, dtype):
    x = _cloud(channels=5)
    x = x.with_feats(x.feats.to(dtype))
    kmap = ps.kmap.get_kmap(x, 3)
    plan = _engine.make_fused_plan(kmap)
    w = torch.randn(27, 5, 17, dtype=dtype)
    b = torch.randn(17, dtype=dtype)
    plain, fused = torch.empty(len(x), 17, dtype=dtype), torch.empty(len(x), 17, dtype=dtype)
    for nt in (1, 2):
        plan.core.forward(x.feats.numpy(), w.numpy(), b.numpy(), plain.numpy(), nt, isa)
        plan.core.forward(x.feats.numpy(), w.numpy(), b.numpy(), fused.numpy(), nt, isa, True)
        assert torch.equal(fused, torch.relu(plain)) and (plain < 0).any()


def test_conv3d_relu_with_and_without_gradients():
    """relu=True: fused where no gradient is needed, ReLU after the autograd
    conv otherwise; the same values, and gradients through the ReLU."""
    x = _cloud(channels=3)
    w = torch.randn(27, 3, 8, requires_grad=True)
    ref = torch.relu(spnn.functional.conv3d(x, w, 3).feats)
    y = spnn.functional.conv3d(x, w, 3, relu=True)
    assert y.feats.requires_grad and torch.equal(y.feats, ref)
    y.feats.sum().backward()
    g = w.grad.clone()
    w.grad = None
    ref.sum().backward()
    assert torch.equal(g, w.grad)
    with torch.no_grad():
        assert torch.equal(spnn.functional.conv3d(x, w, 3, relu=True).feats, ref)


def test_fold_batchnorm_checks():
    conv = spnn.Conv3d(3, 4, 3)
    with pytest.raises(ValueError, match="running statistics"):
        spnn.fold_batchnorm(conv, spnn.BatchNorm(4, track_running_stats=False))
    with pytest.raises(ValueError, match="features"):
        spnn.fold_batchnorm(conv, spnn.BatchNorm(5))
    damaged = spnn.BatchNorm(4).eval()
    damaged.running_var[1] = -1.0  # (the fold wrote NaN into conv.weight, silently)
    with pytest.raises(ValueError, match=r"bn\.running_var holds negative values"):
        spnn.fold_batchnorm(conv, damaged)
    assert torch.isfinite(conv.weight).all()
    # a conv whose ReLU runs in its store (fuse_for_inference's): relu(conv) then bn, which no fold gives
    # (it was folded as if the bn came before the ReLU)
    conv.relu = True
    weight = conv.weight.detach().clone()
    with pytest.raises(ValueError, match="relu=True"):
        spnn.fold_batchnorm(conv, spnn.BatchNorm(4))
    assert torch.equal(conv.weight, weight) and conv.bias is None
    with pytest.raises(TypeError, match="model must be"):
        spnn.fuse_for_inference("net")



def test_fold_batchnorm_into_a_pruned_conv():
    """fold_batchnorm on a conv pruned with torch's masks (weight_orig,
    weight_mask, the hook): the fold goes into weight_orig, so the forward
    (which recomputes weight = weight_orig * mask) gives conv then bn; it
    once went into the weight the hook then overwrote. A pruned bias (no
    product of a mask can hold the folded one) is refused by name."""
    from pointsparse import prune

    torch.manual_seed(0)
    conv, bn = spnn.Conv3d(4, 8, 3, bias=True), spnn.BatchNorm(8)
    _randomise_bn(torch.nn.Sequential(bn))
    prune.l1_unstructured(conv, "weight", 0.5)
    x = _cloud(500, 4)
    with torch.no_grad():
        ref = bn.eval()(conv(x)).feats
        spnn.fold_batchnorm(conv, bn)
        out = conv(ps.SparseTensor(x.feats, x.coords)).feats
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert bool((conv.weight[conv.weight_mask == 0] == 0).all())
    pruned_bias = spnn.Conv3d(4, 8, 3, bias=True)
    prune.l1_unstructured(pruned_bias, "bias", 0.5)
    with pytest.raises(ValueError, match="bias is pruned"):
        spnn.fold_batchnorm(pruned_bias, bn)

class _TiedWeights(torch.nn.Module):
    """Two conv - BatchNorm branches whose convs hold one weight Parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Sequential(spnn.Conv3d(4, 4, 3), spnn.BatchNorm(4), spnn.ReLU())
        self.b = torch.nn.Sequential(spnn.Conv3d(4, 4, 3), spnn.BatchNorm(4))
        self.b[0].weight = self.a[0].weight

    def forward(self, x):
        return spnn.cat([self.a(x), self.b(x)])


@pytest.mark.parametrize("pruned", [False, True])
def test_fused_model_with_tied_conv_weights_equals_eval(pruned):
    """Convs that share one weight Parameter each get their own BatchNorm's
    fold (it was written into the shared tensor in place: both convs took
    both folds, outputs off by 0.1); fold_batchnorm on a pruned conv alike
    (weight_orig tied)."""
    from pointsparse import prune

    torch.manual_seed(3)
    net = _TiedWeights()
    _randomise_bn(net)
    x = _cloud(500, 4)
    with torch.no_grad():
        ref = net.eval()(x).feats
        fused = spnn.fuse_for_inference(net)
        torch.testing.assert_close(fused(x).feats, ref, rtol=1e-5, atol=1e-5)
        assert net.a[0].weight is net.b[0].weight  # the model itself unchanged
    if pruned:
        prune.l1_unstructured(net.a[0], "weight", 0.5)
        prune.custom_from_mask(net.b[0], "weight", net.a[0].weight_mask)
        assert net.a[0].weight_orig is net.b[0].weight_orig
    with torch.no_grad():
        ref = net(x).feats
        for seq in (net.a, net.b):
            spnn.fold_batchnorm(seq[0], seq[1])
            seq[1] = torch.nn.Identity()
        torch.testing.assert_close(net(x).feats, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cr", [0.25, 0.5])
def test_fused_minkunet_equals_eval(cr):
    """Every conv-BN(-ReLU) of MinkUNet folded: the same logits as
    model.eval() to float32 rounding, the original model untouched, no BN and
    no ReLU left in a conv's Sequential."""
    torch.manual_seed(0)
    net = MinkUNet(4, 6, cr=cr)
    _randomise_bn(net)
    net.eval()
    x = _cloud(3000, 4, extent=40)
    with torch.no_grad():
        ref = net(x).feats
        fused = spnn.fuse_for_inference(net)
        out = fused(ps.SparseTensor(x.feats, x.coords)).feats
    assert not fused.training
    assert not any(isinstance(m, spnn.BatchNorm) for m in fused.modules())
    assert sum(isinstance(m, spnn.Conv3d) and m.relu for m in fused.modules()) > 10
    assert any(isinstance(m, spnn.BatchNorm) for m in net.modules())  # the original keeps its BN
    scale = ref.abs().max()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5 * float(scale))
    # float64: the folding itself is exact up to float64 rounding
    net64, x64 = net.double(), x.with_feats(x.feats.double())
    with torch.no_grad():
        ref64 = net64(x64).feats
        out64 = spnn.fuse_for_inference(net64)(ps.SparseTensor(x64.feats, x64.coords)).feats
    torch.testing.assert_close(out64, ref64, rtol=1e-10, atol=1e-10)


def test_a_fused_minkunet_in_training_mode_is_its_eval_function():
    """What fuse_for_inference's docstring says of train(): no BatchNorm is left to take batch statistics,
    so the fused copy in training mode computes what it computes in eval mode (the original's eval
    function, not its training-mode forward), and its gradients are that function's (the input's equal the
    original's in eval mode; the folded convs' weights train as a network without BatchNorm)."""
    torch.manual_seed(0)
    net = MinkUNet(3, 4, cr=0.25, blocks=1).double()
    _randomise_bn(net)
    net.eval()
    x = _cloud(300, 3)
    x = x.with_feats(x.feats.double())
    fused = spnn.fuse_for_inference(net).train()
    grads = []
    for model in (fused, net):
        feats = x.feats.clone().requires_grad_()
        out = model(ps.SparseTensor(feats, x.coords)).feats
        out.square().sum().backward()
        grads.append((out.detach(), feats.grad))
    assert fused.training and torch.equal(grads[0][0], fused.eval()(x).feats.detach())
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-10, atol=1e-10)
    assert all(p.grad is not None for p in fused.parameters())


@pytest.mark.parametrize("isa", _ext.core.runnable_isas())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_residual_in_the_kernel_store_equals_the_sum_after(isa, dtype):
    """``add``: the residual summed into every block's rows before the ReLU,
    bit for bit the conv's output + add (then the ReLU), through the dense,
    offset-skipping and vector kernels, 1 and 2 threads, with and without a
    bias; every row written (NaN-filled first)."""
    x = _cloud(n=3000, channels=16, extent=30)
    x = x.with_feats(x.feats.to(dtype))
    kmap = ps.kmap.get_kmap(x, 3)
    plan = _engine.make_fused_plan(kmap)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(27, 16, 40, generator=g, dtype=dtype)
    sparse = w * (torch.rand(27, 16, 1, generator=g) < 0.2).to(dtype)
    sparse[:4] = 0
    res = torch.randn(len(x), 40, generator=g, dtype=dtype)
    for weight, vector in ((w, False), (sparse, False), (sparse, True)):
        active = _engine.choose_execution(weight).active
        for bias in (None, torch.randn(40, generator=g, dtype=dtype)):
            b = None if bias is None else bias.numpy()
            plain = torch.empty(len(x), 40, dtype=dtype)
            plan.core.forward(x.feats.numpy(), weight.numpy(), b, plain.numpy(), 1, isa, active=active, vector=vector)
            for relu in (False, True):
                want = torch.relu(plain + res) if relu else plain + res
                for nt in (1, 2):
                    out = torch.full((len(x), 40), float("nan"), dtype=dtype)
                    plan.core.forward(x.feats.numpy(), weight.numpy(), b, out.numpy(), nt, isa, relu, active=active,
                                      vector=vector, add=res.numpy())
                    assert torch.equal(out, want)
    assert (plain + res < 0).any()


def test_residual_argument_checks():
    x = _cloud(channels=3)
    plan = _engine.make_fused_plan(ps.kmap.get_kmap(x, 3))
    w = torch.randn(27, 3, 8)
    out = torch.empty(len(x), 8)
    call = lambda add: plan.core.forward(x.feats.numpy(), w.numpy(), None, out.numpy(), 1, add=add)  # noqa: E731
    with pytest.raises(ValueError, match="add"):
        call(torch.zeros(len(x) - 1, 8).numpy())
    with pytest.raises(ValueError, match="add"):
        call(torch.zeros(len(x), 7).numpy())
    with pytest.raises(ValueError, match="dtype"):
        call(torch.zeros(len(x), 8, dtype=torch.float64).numpy())
    with pytest.raises(ValueError, match="add"):
        call(torch.zeros(8, len(x)).numpy().T)  # not C-contiguous
    with pytest.raises(ValueError, match="share memory"):
        call(out.numpy())
    with pytest.raises(TypeError, match="add"):
        call([0.0])
    with pytest.raises(TypeError, match="add"):
        spnn.functional.conv3d(x, w, 3, add=torch.zeros(len(x), 8))
    with pytest.raises(ValueError, match="output channels"):
        spnn.functional.conv3d(x, w, 3, add=x)
    with pytest.raises(ValueError, match="output coords"):
        spnn.functional.conv3d(x, w, 3, add=ps.SparseTensor(torch.zeros(len(x) - 1, 8), x.coords[1:]))
    with pytest.raises(ValueError, match="output coords"):
        spnn.functional.conv3d(x, torch.randn(8, 3, 8), 2, 2, add=x.with_feats(torch.zeros(len(x), 8)))
    elsewhere = ps.SparseTensor(torch.zeros(len(x), 8, device="meta"), x.coords.to("meta"), validate=False)
    with pytest.raises(ValueError, match="add is on meta"):
        spnn.functional.conv3d(x, w, 3, add=elsewhere)


def test_conv3d_add_with_and_without_gradients():
    """``conv3d(..., add=r, relu=True)`` is relu(conv + r): in the kernel's
    store without gradients, in autograd ops with them (float64 gradcheck
    for feats, weight, bias and the residual); the torch backend and a
    float64 residual on float32 feats (summed after, promoted as
    ``functional.add``) give the same values."""
    x = _cloud(n=300, channels=3, extent=10)
    x64 = x.with_feats(x.feats.double())
    w = torch.randn(27, 3, 5, dtype=torch.float64)
    b = torch.randn(5, dtype=torch.float64)
    r = x64.with_feats(torch.randn(len(x), 5, dtype=torch.float64))
    ref = torch.relu(spnn.functional.conv3d(x64, w, 3, bias=b).feats + r.feats)
    with torch.no_grad():
        assert torch.equal(spnn.functional.conv3d(x64, w, 3, bias=b, relu=True, add=r).feats, ref)
    with ps.backend("torch"):
        torch.testing.assert_close(spnn.functional.conv3d(x64, w, 3, bias=b, relu=True, add=r).feats, ref)

    def f(feats, weight, bias, res):
        return spnn.functional.conv3d(x64.with_feats(feats), weight, 3, bias=bias, relu=True,
                                      add=r.with_feats(res)).feats
    inputs = [t.clone().requires_grad_() for t in (x64.feats, w, b, r.feats)]
    assert torch.equal(f(*inputs), ref)
    assert torch.autograd.gradcheck(f, inputs)
    mixed = spnn.functional.conv3d(x, w.float(), 3, add=r).feats
    assert mixed.dtype == torch.float64
    torch.testing.assert_close(mixed, spnn.functional.conv3d(x, w.float(), 3).feats + r.feats)


def test_fused_minkunet_runs_the_residual_sum_in_the_conv():
    """fuse_for_inference moves every residual block's sum and ReLU into its
    last conv's store: the logits are bit for bit those of the same fused
    model with the sum and the ReLU after (and model.eval()'s to float32
    rounding); the state_dict keys do not change."""
    from pointsparse.models import ResidualBlock

    torch.manual_seed(0)
    net = MinkUNet(4, 6, cr=0.5)
    _randomise_bn(net)
    net.eval()
    x = _cloud(3000, 4, extent=40)
    fused = spnn.fuse_for_inference(net)
    blocks = [m for m in fused.modules() if isinstance(m, ResidualBlock)]
    assert blocks and all(m.sum_in_conv is not None for m in blocks)
    assert all(m.sum_in_conv is None for m in net.modules() if isinstance(m, ResidualBlock))
    assert not blocks[0].fuse_residual()  # once only
    unfused = spnn.fuse_for_inference(net)
    for m in unfused.modules():
        if isinstance(m, ResidualBlock):
            m.main[m.sum_in_conv].relu, m.relu, m.sum_in_conv = False, spnn.ReLU(inplace=True), None
    with torch.no_grad():
        ref = net(x).feats
        out = fused(ps.SparseTensor(x.feats, x.coords)).feats
        assert torch.equal(out, unfused(ps.SparseTensor(x.feats, x.coords)).feats)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    assert list(fused.state_dict()) == list(unfused.state_dict())

    blocks[0].main = spnn.VoxelSkip(blocks[0].main, 0.5)  # after fusing: refused, not silently wrong
    with torch.no_grad(), pytest.raises(ValueError, match="before fusing"):
        fused(ps.SparseTensor(x.feats, x.coords))


def _shared_models():
    conv, other = spnn.Conv3d(4, 4, 3), spnn.Conv3d(4, 4, 3)
    bn1, bn2 = spnn.BatchNorm(4), spnn.BatchNorm(4)
    yield "two places, two BatchNorms", torch.nn.Sequential(torch.nn.Sequential(conv, bn1),
                                                            torch.nn.Sequential(conv, bn2))
    conv = spnn.Conv3d(4, 4, 3)
    yield "conv bn relu conv relu", torch.nn.Sequential(conv, spnn.BatchNorm(4), spnn.ReLU(), conv, spnn.ReLU())
    conv = spnn.Conv3d(4, 4, 3)
    ps.prune.vector_structured(conv, "weight", 0.5)
    yield "pruned, conv bn conv", torch.nn.Sequential(conv, spnn.BatchNorm(4), conv)
    shared = torch.nn.Sequential(other, spnn.BatchNorm(4), spnn.ReLU())
    # a guard, not a case the untying mends: a shared Sequential is fused once
    # and the same for both places (its conv must not be copied apart from it)
    yield "a shared Sequential", torch.nn.Sequential(shared, shared)


@pytest.mark.parametrize("case", range(4))
def test_fused_model_with_a_shared_conv_equals_eval(case):
    """A conv held in two places (or twice in one Sequential) followed by
    different BatchNorms / ReLUs: the fused copy gives each place its own
    conv, so its output equals eval's (it took both places' folds and
    flags: differences of 0.6-3.5); the model itself is unchanged."""
    name, model = list(_shared_models())[case]
    _randomise_bn(model, seed=case)
    model.eval()
    x = _cloud(channels=4, seed=case)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        want = model(x).feats
        got = spnn.fuse_for_inference(model)(x).feats
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (name, float((got - want).abs().max()))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_fused_copy_folds_an_attached_filter_skeleton():
    """A conv with a filter skeleton attached (prune.attach_filter_skeleton:
    weight = weight_orig * mask * skeleton, by its own pre-hook): the fused
    copy folds the skeleton into the weight before making the pruning
    permanent. It once removed weight_orig under the skeleton's hook, and
    the copy's first forward raised AttributeError; the model keeps its
    skeleton."""
    from pointsparse import prune

    torch.manual_seed(0)
    net = torch.nn.Sequential(spnn.Conv3d(4, 8, bias=True), spnn.BatchNorm(8), spnn.ReLU(),
                              spnn.Conv3d(8, 5, kernel_region="cross"), spnn.BatchNorm(5))
    _randomise_bn(net)
    net.eval()
    for conv in (net[0], net[3]):
        skeleton = prune.attach_filter_skeleton(conv)
        with torch.no_grad():
            skeleton.uniform_(0.2, 2.0)
    x = _cloud(300, 4, extent=12)
    fused = spnn.fuse_for_inference(net)
    with torch.no_grad():
        ref = net(x).feats
        out = fused(ps.SparseTensor(x.feats, x.coords)).feats
    assert not any(hasattr(m, "weight_skeleton") or hasattr(m, "weight_orig") for m in fused.modules())
    assert hasattr(net[0], "weight_skeleton")
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


def test_channel_cut_through_a_batchnorm_without_affine_or_statistics_fuses():
    """prune_model of a model whose BatchNorm has neither affine weights nor
    running statistics (nothing to slice: it normalises by each batch): the
    cut narrows its num_features (it once raised "BatchNorm has no 'out'
    channel axis"), and the fused copy of the cut model (that BatchNorm is
    not folded) gives the cut model's output."""
    from pointsparse.prune.graph import prune_model

    torch.manual_seed(0)
    net = torch.nn.Sequential(spnn.Conv3d(4, 16), spnn.BatchNorm(16, affine=False, track_running_stats=False),
                              spnn.ReLU(), spnn.Conv3d(16, 16, bias=True), spnn.BatchNorm(16), spnn.ReLU(),
                              spnn.Conv3d(16, 5))
    _randomise_bn(torch.nn.Sequential(net[4]))
    net.eval()
    x = _cloud(300, 4, extent=12)
    prune_model(net, x, 0.5)
    assert net[0].out_channels == net[1].num_features == net[3].in_channels < 16
    fused = spnn.fuse_for_inference(net)
    with torch.no_grad():
        ref = net(x).feats
        out = fused(ps.SparseTensor(x.feats, x.coords)).feats
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


def test_fused_copy_of_a_parametrized_conv_and_fold_batchnorm_refusing_one():
    """A conv whose weight is a torch parametrization (weight_norm): the
    fused copy makes it permanent first, as it does pruning, and gives
    model.eval()'s output (the fold once failed in register_parameter with
    KeyError "attribute 'weight' already exists"); fold_batchnorm itself
    refuses such a conv with a ValueError naming the parametrization."""
    from torch.nn.utils import parametrizations

    torch.manual_seed(0)
    net = torch.nn.Sequential(spnn.Conv3d(4, 8, bias=True, kernel_region="cross"), spnn.BatchNorm(8), spnn.ReLU(),
                              spnn.Conv3d(8, 5), spnn.BatchNorm(5))
    _randomise_bn(net)
    net.eval()
    parametrizations.weight_norm(net[0], "weight", dim=2)
    x = _cloud(300, 4, extent=12)
    fused = spnn.fuse_for_inference(net)
    with torch.no_grad():
        ref = net(x).feats
        out = fused(ps.SparseTensor(x.feats, x.coords)).feats
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    assert hasattr(net[0], "parametrizations")  # the model is unchanged
    with pytest.raises(ValueError, match="parametriz"):
        spnn.fold_batchnorm(net[0], net[1])


def test_fused_copy_of_a_model_with_a_pruned_tensor_not_named_weight():
    """A layer of the user's own with a parameter of another name pruned by
    torch (``prune.l1_unstructured(layer, "gain", ...)``) holds the computed
    ``gain``, which copy.deepcopy refuses: the fused copy failed with torch's
    'Only Tensors created explicitly by the user'. The copy keeps that
    pruning (fusion makes only weights and biases permanent) and computes
    model.eval()'s logits."""
    from torch.nn.utils import prune

    class Gain(torch.nn.Module):
        def __init__(self, channels):
            super().__init__()
            self.gain = torch.nn.Parameter(torch.linspace(-1.0, 1.0, channels))

        def forward(self, x):
            return x.with_feats(x.feats * self.gain)

    torch.manual_seed(0)
    net = torch.nn.Sequential(spnn.Conv3d(4, 8, 3), spnn.BatchNorm(8), Gain(8))
    _randomise_bn(net)
    net.eval()
    prune.l1_unstructured(net[2], "gain", 0.5)
    x = _cloud(400)
    fused = spnn.fuse_for_inference(net)
    with torch.no_grad():
        ref = net(x).feats
        out = fused(ps.SparseTensor(x.feats, x.coords)).feats
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert hasattr(net[2], "gain_orig")


@pytest.mark.parametrize("where", ["conv", "bn", "relu", "block_relu", "block_conv"])
def test_fused_copy_keeps_what_a_forward_hook_sees_and_returns(where):
    """A forward (post) hook that changes an output (a VoxelPrune run on a
    module's output, a clamp): a hooked BatchNorm or ReLU was folded away
    and its hook dropped, and a hooked conv's hook saw (and changed) the
    folded conv + BatchNorm + ReLU output instead of the conv's, so the
    fused model computed another function than model.eval() without a word
    (other rows, or logits off by 0.2-0.5). Such modules stay unfolded now;
    pruning's own bookkeeping hook (keep_copyable) still fuses."""
    from pointsparse import prune

    torch.manual_seed(0)
    net = MinkUNet(4, 5, cr=0.25, blocks=1)
    _randomise_bn(net)
    net.eval()
    module = {"conv": net.stem[0][0], "bn": net.stem[0][1], "relu": net.stem[0][2],
              "block_relu": net.fuse[3][0].relu, "block_conv": net.fuse[3][0].main[3]}[where]
    pruner = spnn.VoxelPrune(0.5)
    module.register_forward_hook(lambda m, args, out: pruner(out) if where in ("bn", "relu") else
                                 out.with_feats(out.feats.clamp(-0.1, 0.1)))
    prune.l1_unstructured(net.stem[1][0], "weight", 0.3)  # (its keep_copyable forward hook)
    x = _cloud(1500, 4, extent=20)
    fused = spnn.fuse_for_inference(net)
    with torch.no_grad():
        ref = net(x)
        out = fused(ps.SparseTensor(x.feats, x.coords))
    assert torch.equal(out.coords, ref.coords)
    torch.testing.assert_close(out.feats, ref.feats, rtol=1e-4, atol=1e-5 * float(ref.feats.abs().max()))
    assert isinstance(fused.stem[1][1], torch.nn.Identity) and fused.stem[1][0].relu  # the pruned conv still fused


@pytest.mark.parametrize("library", ["torch", "pointsparse"])
def test_fold_batchnorm_reads_a_pruned_batchnorm_as_it_computes_now(library):
    """A BatchNorm whose gamma and beta are pruned (weight_orig * weight_mask):
    its ``weight`` / ``bias`` are the products the pruning hook cached at
    the last forward. After a checkpoint is loaded into it (new weight_orig
    and bias_orig, no forward since) fold_batchnorm folded those stale
    values: the folded conv's outputs were off by up to 2. It folds
    orig * mask, what the BatchNorm computes with now."""
    from torch.nn.utils import prune as torch_prune

    from pointsparse import prune as ps_prune

    prune = torch_prune if library == "torch" else ps_prune
    torch.manual_seed(0)
    conv, bn = spnn.Conv3d(4, 8, bias=True), spnn.BatchNorm(8)
    net = torch.nn.Sequential(conv, bn).eval()
    _randomise_bn(net)
    prune.l1_unstructured(bn, "weight", 0.5)
    prune.l1_unstructured(bn, "bias", 0.25)
    state = net.state_dict()
    state["1.weight_orig"] = state["1.weight_orig"] * 2 + 0.1
    state["1.bias_orig"] = state["1.bias_orig"] - 0.3
    net.load_state_dict(state)  # no forward since: bn.weight and bn.bias are the products of the old values
    x = _cloud(400)
    with torch.no_grad():
        gamma, beta = bn.weight_orig * bn.weight_mask, bn.bias_orig * bn.bias_mask
        assert not torch.equal(gamma, bn.weight)
        h = conv(x)
        ref = torch.nn.functional.batch_norm(h.feats, bn.running_mean, bn.running_var, gamma, beta, False, 0.0,
                                             bn.eps)
        spnn.fold_batchnorm(conv, bn)
        out = conv(ps.SparseTensor(x.feats, x.coords)).feats
        torch.testing.assert_close(bn(h).feats, ref)  # what the BatchNorm computes (its hook: orig * mask)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_a_fused_spvcnn_folds_its_point_mlps_and_in_training_mode_is_its_eval_function():
    """SPVCNN's point MLPs (Linear, BatchNorm1d, ReLU) have their BatchNorm
    folded into the Linear as the voxel branch's convs do: fuse_for_inference
    left the three BatchNorm1d in place, so the fused copy set to train()
    normalised the points by their batch's statistics (logits off by the
    order of the logits themselves), where README says no BatchNorm is left
    to do so; now none is, the copy equals the original's eval function in
    both modes (its dropout, an unfolded module, set to eval as the
    docstring says it keeps its own training behaviour), float64 within
    1e-10."""
    from pointsparse.models import SPVCNN

    torch.manual_seed(0)
    net = SPVCNN(3, 4, cr=0.25, blocks=1).double()
    _randomise_bn(net)
    for bn in [m for m in net.point_mlps.modules() if isinstance(m, torch.nn.BatchNorm1d)]:
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.3, 0.3)
    net.eval()
    points = torch.rand(400, 3, dtype=torch.float64) * 12
    x, inverse = ps.voxelize(points, torch.randn(400, 3, dtype=torch.float64), voxel_size=1.0)
    batch = torch.zeros(400, dtype=torch.long)
    fused = spnn.fuse_for_inference(net)
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in fused.modules())
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in net.point_mlps.modules())  # the original keeps them
    with torch.no_grad():
        ref = net(x, inverse, points, batch)
        out = fused(x, inverse, points, batch)
        fused.train()
        fused.dropout.eval()
        trained = fused(x, inverse, points, batch)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(trained, ref, rtol=1e-10, atol=1e-10)


def test_fold_linear_batchnorm_checks():
    """fold_linear_batchnorm refuses a pair it cannot fold, changing
    nothing: not a plain torch Linear and a torch BatchNorm1d (TypeError
    naming both types), a BatchNorm1d without running statistics, one of
    other width than the Linear's outputs, or a Linear whose weight or bias
    is computed (pruned or parametrized: the folded tensors would be lost).
    A parametrized Linear (weight_norm) got the TypeError for its class,
    ParametrizedLinear, torch's subclass of Linear, where the ValueError
    saying to make it permanent first was meant for it."""
    from torch.nn.utils import parametrizations, prune

    from pointsparse.nn.fuse import fold_linear_batchnorm

    class Shifted(torch.nn.Linear):
        pass

    linear = torch.nn.Linear(3, 4)
    weight, bias = linear.weight.detach().clone(), linear.bias.detach().clone()
    with pytest.raises(TypeError, match="torch.nn.BatchNorm1d; got Linear and BatchNorm$"):
        fold_linear_batchnorm(linear, spnn.BatchNorm(4))
    with pytest.raises(TypeError, match="got Shifted and BatchNorm1d"):
        fold_linear_batchnorm(Shifted(3, 4), torch.nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match="running statistics"):
        fold_linear_batchnorm(linear, torch.nn.BatchNorm1d(4, track_running_stats=False))
    with pytest.raises(ValueError, match="bn has 5 features but linear 4 outputs"):
        fold_linear_batchnorm(linear, torch.nn.BatchNorm1d(5))
    damaged = torch.nn.BatchNorm1d(4).eval()
    damaged.running_var[0] = -1.0  # (NaN weights, silently)
    with pytest.raises(ValueError, match=r"bn\.running_var holds negative values"):
        fold_linear_batchnorm(linear, damaged)
    assert torch.equal(linear.weight, weight) and torch.equal(linear.bias, bias)
    for name in ("weight", "bias"):
        pruned = torch.nn.Linear(3, 4)
        prune.l1_unstructured(pruned, name, 0.5)
        with pytest.raises(ValueError, match=r"computed \(pruned or parametrized\)"):
            fold_linear_batchnorm(pruned, torch.nn.BatchNorm1d(4))
    parametrizations.weight_norm(linear)
    with pytest.raises(ValueError, match=r"computed \(pruned or parametrized\)"):
        fold_linear_batchnorm(linear, torch.nn.BatchNorm1d(4))


def test_a_fold_keeps_the_layers_trainable_flags():
    """fold_batchnorm and fold_linear_batchnorm give the folded weight the
    weight's requires_grad and the folded bias the layer's bias's (the
    weight's where the layer had none): a frozen layer stays frozen. The new
    bias was always trainable, so a frozen backbone fused and fine-tuned
    (a fused copy set to train() trains, fuse_for_inference's docstring)
    trained its biases, and a frozen bias came back trainable."""
    from pointsparse.nn.fuse import fold_linear_batchnorm

    for bias in (False, True):
        conv = spnn.Conv3d(3, 4, 3, bias=bias).requires_grad_(False)
        spnn.fold_batchnorm(conv, spnn.BatchNorm(4).eval())
        assert not conv.weight.requires_grad and not conv.bias.requires_grad
    conv = spnn.Conv3d(3, 4, 3, bias=True)
    conv.bias.requires_grad_(False)  # (only the bias frozen: the weight trains on)
    spnn.fold_batchnorm(conv, spnn.BatchNorm(4).eval())
    assert conv.weight.requires_grad and not conv.bias.requires_grad
    conv = spnn.Conv3d(3, 4, 3)  # (a trainable conv's new bias trains, as before)
    spnn.fold_batchnorm(conv, spnn.BatchNorm(4).eval())
    assert conv.weight.requires_grad and conv.bias.requires_grad
    for bias in (False, True):
        linear = torch.nn.Linear(3, 4, bias=bias).requires_grad_(False)
        fold_linear_batchnorm(linear, torch.nn.BatchNorm1d(4).eval())
        assert not linear.weight.requires_grad and not linear.bias.requires_grad
    frozen = MinkUNet(3, 2, cr=0.125, blocks=1).requires_grad_(False)
    fused = spnn.fuse_for_inference(frozen)
    assert [n for n, p in fused.named_parameters() if p.requires_grad] == []


@pytest.mark.parametrize("case", ["pruned_weight", "pruned_bias", "parametrized", "linear_subclass",
                                  "no_running_stats", "hooked_linear", "hooked_bn"])
def test_spvcnn_fuse_point_mlps_keeps_a_pair_it_cannot_fold(case):
    """SPVCNN.fuse_point_mlps called on the model itself (not through
    fuse_for_inference, whose copy has its pruning and parametrizations made
    permanent first): a point MLP whose pair fold_linear_batchnorm refuses
    (a pruned or parametrized Linear, a Linear subclass, a BatchNorm1d
    without running statistics) or whose Linear's output or BatchNorm runs
    forward hooks keeps its BatchNorm1d, the other two are folded, and the
    model computes what it did (float64, within 1e-10). Folded anyway, a
    pruned Linear's hook would put back the unfolded weight, and a hook
    would see the folded output or be dropped."""
    from torch.nn.utils import parametrizations, prune

    from pointsparse.models import SPVCNN

    class Shifted(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) + 0.25

    torch.manual_seed(0)
    net = SPVCNN(3, 4, cr=0.25, blocks=1).double()
    mlp = net.point_mlps[1]
    if case == "no_running_stats":
        mlp[1] = torch.nn.BatchNorm1d(mlp[1].num_features, track_running_stats=False).double()
    _randomise_bn(net)
    for bn in [m for m in net.point_mlps.modules() if isinstance(m, torch.nn.BatchNorm1d)]:
        if bn.running_mean is not None:
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.3, 0.3)
    linear = mlp[0]
    if case in ("pruned_weight", "pruned_bias"):
        prune.l1_unstructured(linear, case.removeprefix("pruned_"), 0.5)
    elif case == "parametrized":
        parametrizations.weight_norm(linear)
    elif case == "linear_subclass":
        mlp[0] = Shifted(linear.in_features, linear.out_features).double()
        mlp[0].load_state_dict(linear.state_dict())
    elif case == "hooked_linear":
        linear.register_forward_hook(lambda module, args, out: out.clamp(-0.1, 0.1))
    elif case == "hooked_bn":
        mlp[1].register_forward_hook(lambda module, args, out: out.clamp(-0.1, 0.1))
    kept = mlp[1]
    net.eval()
    points = torch.rand(400, 3, dtype=torch.float64) * 12
    x, inverse = ps.voxelize(points, torch.randn(400, 3, dtype=torch.float64), voxel_size=1.0)
    batch = torch.zeros(400, dtype=torch.long)
    with torch.no_grad():
        ref = net(x, inverse, points, batch)
        net.fuse_point_mlps()
        out = net(x, inverse, points, batch)
    assert mlp[1] is kept
    assert isinstance(net.point_mlps[0][1], torch.nn.Identity) and isinstance(net.point_mlps[2][1], torch.nn.Identity)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
