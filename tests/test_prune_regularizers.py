"""Sparsity regularizers: values and gradients against hand computations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pointsparse.prune as prune
from pointsparse.prune import regularizers
from prune_support import SparseBatchNorm, SparseConv, set_weight


def linear(values) -> nn.Linear:
    values = torch.as_tensor(values, dtype=torch.float32)
    module = nn.Linear(values.shape[1], values.shape[0], bias=False)
    set_weight(module, values)
    return module


def test_l1_and_l2_values_and_gradients():
    module = linear([[3.0, -4.0], [0.5, 0.0]])
    penalty = regularizers.l1(module)
    assert penalty.item() == pytest.approx(7.5)
    penalty.backward()
    assert torch.equal(module.weight.grad, torch.tensor([[1.0, -1.0], [1.0, 0.0]]))
    module.weight.grad = None
    penalty = regularizers.l2([(module, "weight")])
    assert penalty.item() == pytest.approx(25.25)
    penalty.backward()
    assert torch.equal(module.weight.grad, 2 * module.weight.detach())


def test_penalties_skip_pruned_entries_and_reach_weight_orig():
    module = linear([[3.0, -4.0], [0.5, 2.0]])
    prune.custom_from_mask(module, "weight", torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
    module(torch.ones(1, 2))  # a forward has run: the penalty must not use its cached weight
    penalty = regularizers.l1(module)
    assert penalty.item() == pytest.approx(5.5)
    penalty.backward()
    assert torch.equal(module.weight_orig.grad, torch.tensor([[1.0, 0.0], [1.0, 1.0]]))


def test_group_lasso_channels_and_stripes():
    conv = nn.Conv2d(1, 2, (1, 2), bias=False)
    set_weight(conv, torch.tensor([[[[3.0, 4.0]]], [[[0.0, 0.0]]]]))
    penalty = regularizers.group_lasso(conv, group="out")
    assert penalty.item() == pytest.approx(5.0)  # ||(3, 4)|| + ||(0, 0)||
    penalty.backward()
    expected = torch.tensor([[[[0.6, 0.8]]], [[[0.0, 0.0]]]])  # w / ||w||; a zero group gets 0, not NaN
    torch.testing.assert_close(conv.weight.grad, expected)
    assert regularizers.group_lasso(conv, group="stripe").item() == pytest.approx(7.0)  # |3| + |4| + 0 + 0
    scaled = regularizers.group_lasso(conv, group="out", scale_by_size=True)
    assert scaled.item() == pytest.approx(5.0 * 2**0.5)


def test_group_lasso_scale_by_size_must_be_a_bool():
    """Checked for truthiness, the string "no" scaled every group."""
    conv = nn.Conv2d(1, 2, (1, 2), bias=False)
    set_weight(conv, torch.tensor([[[[3.0, 4.0]]], [[[0.0, 0.0]]]]))
    for bad in ("no", "False", 0, None):
        with pytest.raises(TypeError, match=f"scale_by_size must be True or False \\(a bool\\); got {bad!r}"):
            regularizers.group_lasso(conv, scale_by_size=bad)
    assert regularizers.group_lasso(conv, scale_by_size=False).item() == pytest.approx(5.0)


def test_group_lasso_offsets_of_a_sparse_conv():
    sparse = SparseConv(1, 2, kernel_size=(1, 1, 2))
    set_weight(sparse, torch.tensor([[[3.0, 4.0]], [[0.0, 1.0]]]))  # (K=2, C_in=1, C_out=2)
    assert regularizers.group_lasso([(sparse, "weight")], group="offset").item() == pytest.approx(6.0)
    assert regularizers.group_lasso([(sparse, "weight")], group="out").item() == pytest.approx(3.0 + 17**0.5)
    with pytest.raises(ValueError, match="group must be one of"):
        regularizers.group_lasso(sparse, group="block")


def test_slimming_on_dense_and_pointsparse_batchnorm():
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2), SparseConv(2, 3, 3), SparseBatchNorm(3))
    bn_sparse = prune.criteria.find_batchnorm(model[3])
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([1.0, -2.0]))
        bn_sparse.weight.copy_(torch.tensor([0.5, 0.5, -0.25]))
    penalty = regularizers.slimming(model)
    assert penalty.item() == pytest.approx(4.25)
    penalty.backward()
    assert torch.equal(model[1].weight.grad, torch.tensor([1.0, -1.0]))
    assert torch.equal(bn_sparse.weight.grad, torch.tensor([1.0, 1.0, -1.0]))
    assert regularizers.slimming([model[3]]).item() == pytest.approx(1.25)
    with pytest.raises(TypeError, match="BatchNorm"):
        regularizers.slimming([nn.ReLU()])


def test_skeleton_l1_and_empty_inputs():
    model = nn.Sequential(nn.Conv2d(2, 2, 3), nn.Conv2d(2, 2, 3))
    with pytest.raises(ValueError, match="no filter skeletons"):
        regularizers.skeleton_l1(model)
    first = prune.attach_filter_skeleton(model[0])
    second = prune.attach_filter_skeleton(model[1], init=0.5)
    assert regularizers.skeleton_l1(model).item() == pytest.approx(first.numel() * 1.0 + second.numel() * 0.5)
    with pytest.raises(ValueError, match="no \\(module, name\\) pairs"):
        regularizers.l1([])


def test_l1_and_l2_of_a_kernel_region_conv_count_its_region():
    """The values outside a kernel_region conv's region are no weights of
    it (the conv never runs them): they entered l1 and l2 and got their
    gradient, as group_lasso's groups did before they took the region."""
    from pointsparse.nn import Conv3d

    conv = Conv3d(2, 3, 3, kernel_region="cross")
    inside = list(conv.kernel_region)
    rest = [k for k in range(27) if k not in inside]
    with torch.no_grad():
        conv.weight.fill_(-2.0)
        conv.weight[rest] = 5.0
    assert regularizers.l1(conv).item() == pytest.approx(2.0 * 7 * 6)
    penalty = regularizers.l2(conv)
    assert penalty.item() == pytest.approx(4.0 * 7 * 6)
    penalty.backward()
    assert bool((conv.weight.grad[rest] == 0).all()) and bool((conv.weight.grad[inside] == -4.0).all())


def test_l1_training_drives_weights_toward_zero():
    torch.manual_seed(0)
    module = nn.Linear(6, 1, bias=False)
    x = torch.randn(32, 6)
    y = x[:, :2].sum(1, keepdim=True)  # only two inputs matter
    optimizer = torch.optim.SGD(module.parameters(), lr=0.05)
    for _ in range(300):
        optimizer.zero_grad()
        loss = (module(x) - y).pow(2).mean() + 0.05 * regularizers.l1(module)
        loss.backward()
        optimizer.step()
    weights = module.weight.detach().abs().flatten()
    assert weights[:2].min() > 0.5 and weights[2:].max() < 0.05


def test_skeleton_l1_counts_a_region_convs_region_only():
    # a cross-region conv (7 of 27 offsets) has 7 * 5 stripes that hold weights; the other 20 * 5 scales
    # multiply nothing the conv runs, and neither add to the penalty nor take its gradient
    from pointsparse.nn import Conv3d

    conv = Conv3d(3, 5, 3, kernel_region="cross")
    skeleton = prune.attach_filter_skeleton(conv, init=2.0)
    assert skeleton.shape == (27, 1, 5)
    penalty = regularizers.skeleton_l1(conv)
    assert penalty.item() == pytest.approx(7 * 5 * 2.0)
    penalty.backward()
    inside = torch.zeros(27, dtype=torch.bool)
    inside[list(conv.kernel_region)] = True
    assert torch.equal(skeleton.grad[inside], torch.ones(7, 1, 5))
    assert torch.equal(skeleton.grad[~inside], torch.zeros(20, 1, 5))


def test_parameters_that_are_no_model_nor_iterable_of_pairs_name_the_argument():
    """``regularizers.l1(3)`` was Python's bare "'int' object is not
    iterable" and ``l1("weight")`` complained about the pair ``'w'``; both
    now say what ``parameters`` must be (the criteria read it the same way)."""
    from pointsparse.prune import criteria

    for bad, got in [(3, "int"), ("weight", "str"), (None, "NoneType")]:
        for fn in (regularizers.l1, regularizers.l2, regularizers.group_lasso, criteria.magnitude):
            with pytest.raises(TypeError, match=r"parameters must be a model or an iterable of \(module, name\) "
                                                rf"pairs; got {got}"):
                fn(bad)
    module = linear([[3.0, -4.0]])
    assert regularizers.l1(iter([(module, "weight")])).item() == pytest.approx(7.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_group_lasso_of_a_half_precision_layer_has_finite_gradients(dtype):
    """In float16 the 1e-30 floor under a group's squared norm is 0, so a
    zero (or pruned) group's sqrt backward was inf * 0: NaN gradients on the
    whole group (one optimizer step: NaN weights); and squares of weights
    ~1e-4 underflowed, the penalty 0. Now summed in float32 (and returned in
    float32: see the next test)."""
    module = linear([[0.0, 0.0, 0.0], [3.0, 4.0, 0.0]]).to(dtype)
    penalty = regularizers.group_lasso([(module, "weight")])
    assert penalty.item() == pytest.approx(5.0)
    grad = torch.autograd.grad(penalty, module.weight)[0]
    assert torch.equal(grad[0], torch.zeros(3, dtype=dtype))
    assert torch.allclose(grad[1].float(), torch.tensor([0.6, 0.8, 0.0]), atol=1e-2)
    pruned = linear([[1.0, 2.0, 2.0], [3.0, 4.0, 0.0]]).to(dtype)
    prune.channel_structured(pruned, "weight", 1)
    grad = torch.autograd.grad(regularizers.group_lasso([(pruned, "weight")]), pruned.weight_orig)[0]
    assert bool(torch.isfinite(grad).all()) and torch.equal(grad[0], torch.zeros(3, dtype=dtype))
    tiny = linear([[1e-4, 1e-4, 1e-4, 1e-4]]).to(dtype)
    assert regularizers.group_lasso([(tiny, "weight")]).item() == pytest.approx(2e-4, rel=1e-2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_penalties_of_a_half_precision_model_are_summed_in_float32(dtype):
    """sum |w| of a float16 MinkUNet (165k) is past float16's largest value
    (65504): l1 returned inf. The penalties are summed and returned in
    float32 for a float16 / bfloat16 model (gradients still reach the layer
    in its dtype)."""
    module = linear(torch.ones(100, 4000)).to(dtype)
    for penalty, want in [(regularizers.l1(module), 400_000.0), (regularizers.l2(module), 400_000.0),
                          (regularizers.group_lasso(module, scale_by_size=True), 400_000.0)]:
        assert penalty.dtype == torch.float32 and penalty.item() == pytest.approx(want, rel=1e-3)
    grad = torch.autograd.grad(regularizers.l1(module), module.weight)[0]
    assert grad.dtype == dtype and bool((grad == 1).all())


@pytest.mark.parametrize("bad, got", [(3, "int"), ("bn", "str"), (None, "NoneType")])
def test_slimming_and_skeleton_l1_of_no_model_name_the_argument(bad, got):
    """``slimming("bn")`` was AttributeError "'str' object has no attribute
    '_parameters'" (the str iterated as norms), ``slimming(3)`` Python's
    "'int' object is not iterable", ``skeleton_l1`` of no model an error
    from inside; as l1's (test above), each now names what it takes."""
    with pytest.raises(TypeError, match=rf"model_or_norms must be a model or an iterable of BatchNorm modules "
                                        rf".*; got {got}"):
        regularizers.slimming(bad)
    with pytest.raises(TypeError, match=rf"model must be a torch.nn.Module .*; got {got}"):
        regularizers.skeleton_l1(bad)
