"""Mask structure of every granularity on small hand-computed examples."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pointsparse.prune as prune
from prune_support import SparseConv, naive_sparse_conv, set_weight, sparse_input
from reference import run_python


def linear(values) -> nn.Linear:
    values = torch.as_tensor(values, dtype=torch.float32)
    module = nn.Linear(values.shape[1], values.shape[0], bias=False)
    set_weight(module, values)
    return module


def conv2d(values) -> nn.Conv2d:
    values = torch.as_tensor(values, dtype=torch.float32)
    module = nn.Conv2d(values.shape[1], values.shape[0], tuple(values.shape[2:]), bias=False)
    set_weight(module, values)
    return module


def sparse_conv(values, kernel_size) -> nn.Module:
    """A sparse conv with weight ``values`` ``(K, C_in, C_out)``."""
    values = torch.as_tensor(values, dtype=torch.float32)
    module = SparseConv(values.shape[1], values.shape[2], kernel_size=kernel_size)
    set_weight(module, values)
    return module


# ---------------------------------------------------------------- vector

def test_vector_rows_and_columns_of_a_linear():
    w = [[1.0, 1.0, 1.0], [0.1, 0.2, 0.1], [3.0, 0.0, 0.0]]
    module = prune.vector_structured(linear(w), "weight", amount=1, axis=1, n=1)  # rows: L1 3, 0.4, 3
    assert torch.equal(module.weight_mask, torch.tensor([[1.0, 1, 1], [0, 0, 0], [1, 1, 1]]))
    module = prune.vector_structured(linear(w), "weight", amount=2, axis=0, n=2)  # columns: L2 3.17, 1.02, 1.00
    assert torch.equal(module.weight_mask, torch.tensor([[1.0, 0, 0], [1, 0, 0], [1, 0, 0]]))


def test_vector_kernel_rows_of_a_conv():
    w = torch.ones(1, 1, 3, 3)
    w[0, 0, 1] = 0.1  # the middle row of the kernel is weakest
    module = prune.vector_structured(conv2d(w), "weight", amount=1, axis=-1)
    expected = torch.ones(1, 1, 3, 3)
    expected[0, 0, 1] = 0
    assert torch.equal(module.weight_mask, expected)


@pytest.mark.parametrize("axis", [-1, 0, 1])
def test_vector_structured_prunes_a_kernel_region_conv_inside_its_region(axis):
    """The vectors at the offsets outside a 'cross' conv's region (zeros,
    never run) were the weakest: axis=-1 at 0.5 pruned them and none of the
    region (0% sparse); a vector along the offsets (axis=0) zeroed its
    entries outside too. Those entries are neither scored nor pruned now."""
    conv = SparseConv(4, 16, kernel_size=3, kernel_region="cross")
    rest = [k for k in range(27) if k not in conv.kernel_region]
    with torch.no_grad():
        conv.weight[rest] = 0.0
    prune.vector_structured(conv, "weight", 0.5, axis=axis)
    assert prune.sparsity_report(conv)["layers"][""]["sparsity"] == pytest.approx(0.5)
    assert bool(conv.weight_mask[rest].all())
    other = SparseConv(4, 16, kernel_size=3, kernel_region="cross")
    full = sparse_conv(torch.ones(27, 4, 16), 3)
    with torch.no_grad():
        other.weight[rest] = 0.0
    prune.global_structured([(other, "weight"), (full, "weight")], prune.VectorStructured, amount=0.25, axis=axis)
    assert bool(other.weight_mask[rest].all())
    assert not bool(other.weight_mask.all())  # (the region's small random values go before the ones)


# ---------------------------------------------------------------- kernel

def test_kernel_level_on_a_dense_conv():
    # (out=2, in=2, 2x2): kernel (o, i) has every entry equal to 1 + o*2 + i, except (1, 0) scaled down
    w = torch.stack([torch.full((2, 2), 1.0 + o * 2 + i) for o in range(2) for i in range(2)]).reshape(2, 2, 2, 2)
    w[1, 0] = 0.5
    module = prune.kernel_structured(conv2d(w), "weight", amount=2, scope="pair")
    kept = module.weight_mask.sum(dim=(2, 3))
    assert torch.equal(kept, torch.tensor([[0.0, 4.0], [0.0, 4.0]]))  # (0,0) norm 2, (1,0) norm 1 pruned
    w2 = w.clone()
    w2[:, :, 0, 1] = 0.01
    module = prune.kernel_structured(conv2d(w2), "weight", amount=1, scope="offset")
    expected = torch.ones(2, 2, 2, 2)
    expected[:, :, 0, 1] = 0
    assert torch.equal(module.weight_mask, expected)


def test_kernel_level_on_a_sparse_conv():
    # K=3 offsets (kernel 1x1x3), C_in=2, C_out=2
    w = torch.ones(3, 2, 2)
    w[:, 1, 0] = 0.1  # the (in=1, out=0) kernel is weakest over all offsets
    w[2] = w[2] * 0.2  # offset 2 is the weakest offset of the layer
    module = prune.kernel_structured(sparse_conv(w, (1, 1, 3)), "weight", amount=1, scope="pair")
    expected = torch.ones(3, 2, 2)
    expected[:, 1, 0] = 0
    assert torch.equal(module.weight_mask, expected)
    module = prune.kernel_structured(sparse_conv(w, (1, 1, 3)), "weight", amount=1, scope="offset")
    expected = torch.ones(3, 2, 2)
    expected[2] = 0
    assert torch.equal(module.weight_mask, expected)


@pytest.mark.parametrize("outside", [0.0, 1e-3, 10.0])
def test_kernel_level_on_a_kernel_region_conv_counts_its_region(outside):
    """A kernel_region conv's kernels and offsets are its region's: the
    offsets outside a 'cross' conv (zeros, small values, or large ones it
    never runs) were offset groups pruned first and counted in the amount,
    and their values entered each pair's norm. Now they are neither scored,
    counted nor pruned (their mask stays as it was)."""
    conv = SparseConv(2, 2, kernel_size=3, kernel_region="cross")
    region = list(conv.kernel_region)  # 4, 10, 12, 13, 14, 16, 22
    rest = [k for k in range(27) if k not in region]
    w = torch.zeros(27, 2, 2)
    w[rest] = outside * (1 + torch.rand(len(rest), 2, 2))
    w[region] = 1.0
    w[region[:3]] = torch.tensor([0.5, 0.3, 0.4]).view(3, 1, 1)  # the weakest offsets of the region
    w[region, 1, 0] = 0.05  # the weakest pair of the region (outside, its values are the largest when 10)
    set_weight(conv, w)
    offsets = prune.kernel_structured(conv, "weight", amount=3 / 7, scope="offset")
    kept = offsets.weight_mask.flatten(1).all(1)
    assert kept.nonzero().flatten().tolist() == sorted(rest + region[3:])
    assert prune.sparsity_report(offsets)["layers"][""]["sparsity"] == pytest.approx(3 / 7)
    conv = SparseConv(2, 2, kernel_size=3, kernel_region="cross")
    set_weight(conv, w)
    pairs = prune.kernel_structured(conv, "weight", amount=1, scope="pair")
    expected = torch.ones(27, 2, 2)
    expected[region, 1, 0] = 0
    assert torch.equal(pairs.weight_mask, expected)


def test_global_structured_offsets_count_a_kernel_region_conv_inside_its_region():
    """Ranked across layers, the zero offsets outside a fresh 'cross' conv
    were the weakest groups: the amount fell on them and no weight of either
    layer was pruned. They are no groups: the weakest offsets of the
    region go, the values outside keep their mask."""
    cross = SparseConv(2, 2, kernel_size=3, kernel_region="cross")
    region = list(cross.kernel_region)
    w = torch.zeros(27, 2, 2)
    w[region] = torch.linspace(0.1, 0.7, 7).view(7, 1, 1)
    set_weight(cross, w)
    full = sparse_conv(torch.ones(27, 2, 2), 3)
    prune.global_structured([(cross, "weight"), (full, "weight")], prune.KernelStructured, amount=3 / 34,
                            scope="offset")
    assert (~cross.weight_mask.flatten(1).all(1)).nonzero().flatten().tolist() == region[:3]
    assert bool(full.weight_mask.all())


@pytest.mark.parametrize("outside", [0.0, 1e-3])
@pytest.mark.parametrize("method", [
    lambda m: prune.block_structured(m, "weight", 0.5, block_size=4),
    lambda m: prune.panel_structured(m, "weight", 0.5),
    lambda m: prune.stripe_structured(m, "weight", 0.5),
    lambda m: prune.channel_structured(m, "weight", 0.5),
], ids=["block", "panel", "stripe", "channel"])
def test_group_methods_prune_a_kernel_region_conv_inside_its_region(method, outside):
    """Blocks, engine vectors (panels) and stripes at the offsets outside a
    'cross' conv's region (zeros or small values, never run) were groups,
    the weakest ones: 0.5 pruned them and none of the conv's weights. They
    are no groups now, and a channel's norm and mask leave them out too."""
    conv = SparseConv(4, 16, kernel_size=3, kernel_region="cross")
    rest = [k for k in range(27) if k not in conv.kernel_region]
    with torch.no_grad():
        conv.weight[rest] = outside * torch.rand(len(rest), 4, 16)
    before = conv.weight.detach().clone()
    method(conv)
    assert prune.sparsity_report(conv)["layers"][""]["sparsity"] == pytest.approx(0.5)
    assert bool(conv.weight_mask[rest].all()) and torch.equal(conv.weight.detach()[rest], before[rest])


# ---------------------------------------------------------------- channel

def test_output_and_input_channels_of_a_dense_conv():
    w = torch.ones(3, 2, 1, 1)
    w[1] = 0.1
    w[:, 0] = w[:, 0] * 0.01
    module = prune.channel_structured(conv2d(w), "weight", amount=1, axis="out")
    assert torch.equal(module.weight_mask[:, :, 0, 0], torch.tensor([[1.0, 1], [0, 0], [1, 1]]))
    module = prune.channel_structured(conv2d(w), "weight", amount=1, axis="in")
    assert torch.equal(module.weight_mask[:, :, 0, 0], torch.tensor([[0.0, 1], [0, 1], [0, 1]]))


def test_output_and_input_channels_of_a_sparse_conv():
    w = torch.ones(3, 2, 4)  # (K, C_in, C_out): output channels on axis 2
    w[:, :, 3] = 0.1
    w[:, 1, :] = w[:, 1, :] * 0.01
    module = prune.channel_structured(sparse_conv(w, (1, 1, 3)), "weight", amount=1, axis="out")
    expected = torch.ones(3, 2, 4)
    expected[:, :, 3] = 0
    assert torch.equal(module.weight_mask, expected)
    module = prune.channel_structured(sparse_conv(w, (1, 1, 3)), "weight", amount=0.5, axis="in")
    expected = torch.ones(3, 2, 4)
    expected[:, 1, :] = 0
    assert torch.equal(module.weight_mask, expected)
    x = sparse_input(n=8, channels=2, seed=3)
    torch.testing.assert_close(module(x).feats, naive_sparse_conv(x, w * expected, (1, 1, 3)))


def test_fraction_counts_only_alive_channels():
    module = linear(torch.arange(1.0, 9.0).reshape(8, 1).expand(8, 2))
    prune.channel_structured(module, "weight", amount=0.5)  # 4 of 8 rows: the 4 smallest
    assert torch.equal(module.weight_mask[:, 0], torch.tensor([0.0, 0, 0, 0, 1, 1, 1, 1]))
    prune.channel_structured(module, "weight", amount=0.5)  # half of the 4 still alive
    assert torch.equal(module.weight_mask[:, 0], torch.tensor([0.0, 0, 0, 0, 0, 0, 1, 1]))
    with pytest.raises(ValueError, match="amount=3 is more than the 2"):
        prune.channel_structured(module, "weight", amount=3)


# ---------------------------------------------------------------- block

def test_blocks_of_a_linear_with_ragged_edges():
    w = torch.ones(3, 4)
    w[0:2, 2:4] = 0.1  # block (0, 1)
    w[2, 0:2] = 0.3  # edge block (1, 0), one row only: L2 0.42; blocks (0, 0) 2.0, (1, 1) 1.41
    module = prune.block_structured(linear(w), "weight", amount=2, block_size=2)
    expected = torch.ones(3, 4)
    expected[0:2, 2:4] = 0
    expected[2, 0:2] = 0
    assert torch.equal(module.weight_mask, expected)


def test_blocks_per_offset_of_a_sparse_conv():
    w = torch.ones(2, 4, 2)  # K=2, each offset a (C_in=4, C_out=2) GEMM matrix
    w[1, 2:4, 0:2] = 0.01
    module = prune.block_structured(sparse_conv(w, (1, 1, 2)), "weight", amount=1, block_size=(2, 2))
    expected = torch.ones(2, 4, 2)
    expected[1, 2:4, :] = 0
    assert torch.equal(module.weight_mask, expected)


def test_block_size_validation():
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        prune.BlockStructured(0.5, block_size=0)
    with pytest.raises(TypeError, match="block_size"):
        prune.BlockStructured(0.5, block_size=(2, 2, 2))


# ---------------------------------------------------------------- N:M

def test_2_4_along_the_inputs_of_a_linear():
    w = [[1.0, -4.0, 3.0, 2.0, 0.5, 0.1, -0.2, 0.3], [8.0, 7.0, -6.0, 5.0, 1.0, 2.0, 3.0, 4.0]]
    module = prune.nm_structured(linear(w), "weight", 2, 4)
    expected = torch.tensor([[0.0, 1, 1, 0, 1, 0, 0, 1], [1, 1, 0, 0, 0, 0, 1, 1]])
    assert torch.equal(module.weight_mask, expected)
    assert prune.is_nm_sparse(module.weight, 2, 4) and not prune.is_nm_sparse(torch.tensor(w), 2, 4)


def test_general_n_m_on_conv_and_sparse_conv():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 3, 3)
    prune.nm_structured(conv, "weight", 1, 3)
    counts = conv.weight_mask.reshape(3, 2, 3, 3, 3).sum(dim=2)  # groups of 3 along C_in
    assert torch.all(counts == 1)
    chosen = conv.weight_mask.reshape(3, 2, 3, 3, 3).argmax(dim=2)
    assert torch.equal(chosen, conv.weight_orig.detach().abs().reshape(3, 2, 3, 3, 3).argmax(dim=2))
    sparse = SparseConv(8, 2, kernel_size=3)
    prune.nm_structured(sparse, "weight", 2, 4)
    counts = sparse.weight_mask.reshape(27, 2, 4, 2).sum(dim=2)  # (K, C_in/4, 4, C_out)
    assert torch.all(counts == 2)
    assert prune.is_nm_sparse(sparse.weight.detach(), 2, 4, prune.layout_of(sparse))


def test_n_m_prunes_a_kernel_region_conv_inside_its_region():
    """A kernel_region conv's weights are its region's, as for every other
    method: N:M masked the offsets outside too (values the conv never runs);
    they keep their mask now, and the region's offsets are N:M."""
    torch.manual_seed(0)
    conv = SparseConv(8, 2, kernel_size=3, kernel_region="cross")
    region = list(conv.kernel_region)
    rest = [k for k in range(27) if k not in region]
    with torch.no_grad():
        conv.weight.normal_()
    prune.nm_structured(conv, "weight", 2, 4)
    assert bool((conv.weight_mask[rest] == 1).all())
    assert torch.all(conv.weight_mask[region].reshape(len(region), 2, 4, 2).sum(dim=2) == 2)
    with pytest.raises(TypeError, match="region must be a 1-D bool tensor"):
        prune.NMStructured(2, 4, region=[13])
    method = prune.NMStructured(2, 4, prune.layout_of(conv), region=torch.ones(8, dtype=torch.bool))
    with pytest.raises(ValueError, match="region has 8 kernel positions"):
        method.compute_mask(conv.weight_orig, torch.ones_like(conv.weight_orig))


def test_n_m_after_earlier_pruning_keeps_only_survivors():
    module = linear([[5.0, 4.0, 3.0, 2.0]])
    prune.custom_from_mask(module, "weight", torch.tensor([[0.0, 0.0, 0.0, 1.0]]))
    prune.nm_structured(module, "weight", 2, 4)
    assert torch.equal(module.weight_mask, torch.tensor([[0.0, 0, 0, 1]]))


@pytest.mark.parametrize(
    "n, m, error, message",
    [(3, 2, ValueError, "1 <= n <= m"), (0, 4, ValueError, "n must be an int >= 1; got 0"),
     (1, 0, ValueError, "m must be an int >= 1; got 0"),
     (2.0, 4, TypeError, "n must be an int")],
)
def test_n_m_bad_arguments(n, m, error, message):
    with pytest.raises(error, match=message):
        prune.nm_structured(linear(torch.ones(2, 4)), "weight", n, m)


def test_n_m_and_pattern_refuse_nan_scores_and_a_layout_of_another_type():
    """topk ranks NaN above every number (an N:M group kept its NaN entry);
    a layout that is no WeightLayout failed later on an attribute of it."""
    scores = torch.rand(2, 4)
    scores[1, 2] = float("nan")
    module = linear(torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"importance_scores for Linear.weight hold 1 NaN value\(s\)"):
        prune.nm_structured(module, "weight", 2, 4, importance_scores=scores)
    with pytest.raises(TypeError, match="layout must be a WeightLayout or None; got str"):
        prune.NMStructured(2, 4, layout="dense")
    conv = conv2d(torch.rand(2, 2, 2, 2))
    with pytest.raises(ValueError, match=r"importance_scores for Conv2d.weight hold 1 NaN"):
        prune.pattern_structured(conv, "weight", patterns=[[0, 3], [1, 2]],
                                 importance_scores=torch.rand(2, 2, 2, 2).index_put_((torch.tensor([0]),) * 4,
                                                                                   torch.tensor(float("nan"))))
    with pytest.raises(TypeError, match="layout must be a WeightLayout or None; got str"):
        prune.pattern_structured(conv, "weight", patterns=[[0, 3]], layout="dense")
    with pytest.raises(TypeError, match="layout must be a WeightLayout or None; got str"):
        prune.PatternStructured(torch.ones(1, 4, dtype=torch.bool), layout="dense")
    assert not prune.is_pruned(module) and not prune.is_pruned(conv)


def test_n_m_and_pattern_refuse_an_unpruned_nan_weight_as_the_group_methods_do():
    """Without importance_scores the weights are the scores: a NaN among the
    unpruned ones was kept by N:M (topk ranks NaN first) and chose the
    pattern (argmax takes a NaN energy), silently, where the group methods
    and NaN importance_scores are a ValueError. A NaN already pruned is no
    score and prunes as any other pruned entry."""
    nan = float("nan")
    module = linear(torch.tensor([[nan, 0.1, 2.0, 3.0]]))
    with pytest.raises(ValueError, match=r"hold 1 NaN value\(s\)"):
        prune.nm_structured(module, "weight", 2, 4)
    conv = conv2d(torch.tensor([[[[nan, 0.1], [2.0, 3.0]]]]))
    with pytest.raises(ValueError, match=r"hold 1 NaN value\(s\)"):
        prune.pattern_structured(conv, "weight", patterns=[[0, 1], [2, 3]])
    assert not prune.is_pruned(module) and not prune.is_pruned(conv)
    prune.custom_from_mask(module, "weight", torch.tensor([[0.0, 1.0, 1.0, 1.0]]))
    prune.nm_structured(module, "weight", 2, 4)
    assert module.weight_mask.tolist() == [[0.0, 0.0, 1.0, 1.0]]
    for method in (lambda m: prune.nm_structured(m, "weight", 2, 4),  # (outside a region: no weight, no score)
                   lambda m: prune.pattern_structured(m, "weight", num_patterns=2, pattern_size=3)):
        cross = SparseConv(4, 4, kernel_size=3, kernel_region="cross")
        with torch.no_grad():
            cross.weight[0, 0, 0] = nan  # (offset 0, a corner: outside the cross)
        method(cross)
        assert prune.is_pruned(cross) and bool(cross.weight_mask[0].all())


def test_n_m_needs_whole_groups():
    with pytest.raises(ValueError, match="multiple of m=4; got 6"):
        prune.nm_structured(linear(torch.ones(2, 6)), "weight", 2, 4)


def test_is_nm_sparse_takes_a_tensor_and_a_layout():
    with pytest.raises(TypeError, match="t must be a torch.Tensor.*got list"):
        prune.is_nm_sparse([[0.0] * 4], 2, 4)
    with pytest.raises(TypeError, match="layout must be a WeightLayout or None; got str"):
        prune.is_nm_sparse(torch.zeros(1, 4), 2, 4, layout="dense")
    with pytest.raises(ValueError, match="t must have 3 dims"):
        prune.is_nm_sparse(torch.zeros(1, 4), 2, 4, layout=prune.WeightLayout(2, 1, (0,)))
    assert prune.is_nm_sparse(torch.tensor([[1.0, 0, 0, 2]]), 2, 4)


# ---------------------------------------------------------------- pattern

def test_given_patterns_on_a_dense_conv():
    # 2 kernels of 2x2; patterns: keep the diagonal {0, 3} or the anti-diagonal {1, 2}
    w = torch.tensor([[[[9.0, 1.0], [1.0, 9.0]], [[1.0, 5.0], [5.0, 1.0]]]])
    module = prune.pattern_structured(conv2d(w), "weight", patterns=[[0, 3], [1, 2]])
    assert torch.equal(module.weight_mask, torch.tensor([[[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]]]))


def test_learned_patterns_take_the_most_frequent():
    # 3 kernels prefer {0, 1}, 1 kernel prefers {2, 3}: with one pattern every kernel keeps {0, 1}
    rows = [[5.0, 4.0, 0.1, 0.2], [3.0, 6.0, 0.3, 0.1], [7.0, 2.0, 0.0, 1.0], [0.1, 0.2, 9.0, 8.0]]
    w = torch.tensor(rows).reshape(2, 2, 2, 2)
    patterns = prune.learn_patterns(w, num_patterns=1, pattern_size=2)
    assert torch.equal(patterns, torch.tensor([[True, True, False, False]]))
    module = prune.pattern_structured(conv2d(w), "weight", num_patterns=1, pattern_size=2)
    assert torch.all(module.weight_mask.reshape(4, 4) == torch.tensor([1.0, 1, 0, 0]))
    two = prune.learn_patterns(w, num_patterns=2, pattern_size=2)
    assert torch.equal(two, torch.tensor([[True, True, False, False], [False, False, True, True]]))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_pruned_nan_or_inf_weight_does_not_steer_the_pattern(value):
    """An entry an earlier mask pruned is no candidate; its value times the
    mask's 0 was NaN for a NaN or inf weight (NaN * 0, inf * 0), and that
    NaN entered every pattern's energy and every learned vote: the kernel
    took the pattern keeping 0.1 over the one keeping 2 and 3, and
    learn_patterns preferred the pruned position."""
    module = conv2d(torch.tensor([[[[value, 0.1], [2.0, 3.0]]]]))
    prune.custom_from_mask(module, "weight", torch.tensor([[[[0.0, 1.0], [1.0, 1.0]]]]))
    prune.pattern_structured(module, "weight", patterns=[[0, 1], [2, 3]])
    assert module.weight_mask.flatten().tolist() == [0.0, 0.0, 1.0, 1.0]
    learned = prune.learn_patterns(module.weight_orig, 1, 2, mask=module.weight_mask)
    assert learned.tolist() == [[False, False, True, True]]


def test_learn_patterns_names_a_bad_argument():
    """learn_patterns (public) gave AttributeErrors for a weight, mask or
    layout of the wrong type ("'str' object has no attribute 'dim'") and,
    for a mask of another shape, a ValueError about "tensor"."""
    w = torch.randn(2, 2, 3, 3)
    for kwargs, error, match in [
        ({"t": "w"}, TypeError, r"t must be a torch.Tensor \(the weight or its importance scores\); got str"),
        ({"t": w, "layout": "oik"}, TypeError, r"layout must be a WeightLayout or None; got str"),
        ({"t": w, "mask": [1]}, TypeError, r"mask must be a tensor of t's shape \(2, 2, 3, 3\) or None; got list"),
        ({"t": w, "mask": torch.ones(3)}, ValueError, r"mask must have t's shape \(2, 2, 3, 3\); got \(3,\)"),
    ]:
        with pytest.raises(error, match=match):
            prune.learn_patterns(num_patterns=1, pattern_size=2, **kwargs)
    assert prune.learn_patterns(w, 1, 2, mask=torch.ones(2, 2, 3, 3)).shape == (1, 9)


def test_patterns_of_offsets_on_a_sparse_conv():
    # kernel 1x1x3: K=3; a pattern is a subset of offsets of each (in, out) kernel W[:, i, o]
    w = torch.zeros(3, 1, 2)
    w[:, 0, 0] = torch.tensor([3.0, 2.0, 0.1])
    w[:, 0, 1] = torch.tensor([0.1, 2.0, 3.0])
    module = prune.pattern_structured(sparse_conv(w, (1, 1, 3)), "weight", patterns=[[0, 1], [1, 2]])
    assert torch.equal(module.weight_mask[:, 0, 0], torch.tensor([1.0, 1.0, 0.0]))
    assert torch.equal(module.weight_mask[:, 0, 1], torch.tensor([0.0, 1.0, 1.0]))


@pytest.mark.parametrize("outside", [0.0, 5.0])
def test_patterns_of_a_kernel_region_conv_keep_offsets_inside_its_region(outside):
    """Patterns were learned and chosen over all 27 offsets: large values
    outside a 'cross' conv's region (never run) made every pattern keep
    offsets outside and prune the whole region (100% sparse). A pattern's
    offsets are the region's now, and the values outside keep their mask."""
    torch.manual_seed(0)
    conv = SparseConv(4, 8, kernel_size=3, kernel_region="cross")
    region = list(conv.kernel_region)
    rest = [k for k in range(27) if k not in region]
    with torch.no_grad():
        conv.weight[rest] = outside
    before = conv.weight.detach().clone()
    layout = prune.adapters.layout_of(conv)
    inside = torch.zeros(27, dtype=torch.bool)
    inside[region] = True
    learned = prune.learn_patterns(conv.weight, num_patterns=4, pattern_size=3, layout=layout, region=inside)
    assert not bool(learned[:, rest].any())
    prune.pattern_structured(conv, "weight", num_patterns=4, pattern_size=3)
    assert torch.equal(conv.weight_mask[region].sum(0), torch.full((4, 8), 3.0))
    assert bool(conv.weight_mask[rest].all()) and torch.equal(conv.weight.detach()[rest], before[rest])
    assert prune.sparsity_report(conv)["layers"][""]["sparsity"] == pytest.approx(4 / 7)
    given = SparseConv(4, 8, kernel_size=3, kernel_region="cross")
    prune.pattern_structured(given, "weight", patterns=[region[:3], region[3:6]])
    assert torch.equal(given.weight_mask[region].sum(0), torch.full((4, 8), 3.0))
    with pytest.raises(ValueError, match=r"patterns\[1\] keeps kernel positions \[0\] outside"):
        prune.pattern_structured(given, "weight", patterns=[region[:2], [0, region[0]]])
    with pytest.raises(ValueError, match="pattern_size=8 exceeds the 7 kernel positions"):
        prune.pattern_structured(given, "weight", pattern_size=8)


def test_pattern_bad_arguments():
    module = conv2d(torch.ones(1, 1, 2, 2))
    with pytest.raises(ValueError, match="outside"):
        prune.pattern_structured(module, "weight", patterns=[[0, 4]])
    with pytest.raises(ValueError, match=r"patterns must be \(P, 4\)"):
        prune.pattern_structured(module, "weight", patterns=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="pattern_size=5 exceeds"):
        prune.pattern_structured(module, "weight", pattern_size=5)
    # an amount where the patterns go, a flat list, a string: TypeError naming patterns (was "'float' object is
    # not iterable" from inside)
    for patterns, match in [(0.5, r"patterns must be a bool tensor \(P, 4\) or a list of lists .*got 0.5 \(float\)"),
                            ("ab", r"patterns must be .*got 'ab' \(str\)"),
                            ([0, 3], r"patterns\[0\] must be a list of kept kernel-position indices; got 0 \(int\)")]:
        with pytest.raises(TypeError, match=match):
            prune.pattern_structured(module, "weight", patterns)
    assert not prune.is_pruned(module)


# ---------------------------------------------------------------- stripes

def test_stripes_by_norm_on_dense_and_sparse_convs():
    w = torch.ones(2, 3, 1, 2)  # stripe (o, position) = W[o, :, 0, position]
    w[1, :, 0, 0] = 0.1
    module = prune.stripe_structured(conv2d(w), "weight", amount=1)
    expected = torch.ones(2, 3, 1, 2)
    expected[1, :, 0, 0] = 0
    assert torch.equal(module.weight_mask, expected)
    s = torch.ones(2, 3, 2)  # sparse: stripe (offset k, out o) = W[k, :, o]
    s[1, :, 0] = 0.1
    module = prune.stripe_structured(sparse_conv(s, (1, 1, 2)), "weight", amount=1)
    expected = torch.ones(2, 3, 2)
    expected[1, :, 0] = 0
    assert torch.equal(module.weight_mask, expected)


@pytest.mark.parametrize("kind", ["conv2d", "conv3d", "sparse"])
def test_filter_skeleton_trains_and_prunes_stripes(kind):
    torch.manual_seed(0)
    if kind == "conv2d":
        module, x = nn.Conv2d(2, 3, 3, bias=False), torch.randn(1, 2, 5, 5)
        run = lambda m, w: F.conv2d(x, w)  # noqa: E731
    elif kind == "conv3d":
        module, x = nn.Conv3d(2, 3, 3, bias=False), torch.randn(1, 2, 4, 4, 4)
        run = lambda m, w: F.conv3d(x, w)  # noqa: E731
    else:
        module, x = SparseConv(2, 3, kernel_size=3), sparse_input(n=10, channels=2)
        run = lambda m, w: naive_sparse_conv(x, w, m.kernel_size)  # noqa: E731
    forward = lambda m: m(x).feats if kind == "sparse" else m(x)  # noqa: E731
    original = module.weight
    skeleton = prune.attach_filter_skeleton(module, "weight")
    layout = prune.layout_of(module)
    expected_shape = list(original.shape)
    expected_shape[layout.in_axis] = 1
    assert skeleton.shape == tuple(expected_shape) and torch.all(skeleton == 1)
    assert any(p is skeleton for p in module.parameters())
    # the skeleton scales every stripe in the forward and learns from the loss + its L1 penalty
    with torch.no_grad():
        skeleton.copy_(0.5 + 0.5 * torch.rand(skeleton.shape))
    torch.testing.assert_close(forward(module), run(module, original * skeleton))
    loss = forward(module).pow(2).sum() + 0.1 * prune.regularizers.skeleton_l1(module)
    loss.backward()
    assert skeleton.grad is not None and skeleton.grad.abs().sum() > 0
    # stripes under the threshold are pruned; the rest keep the folded scale
    with torch.no_grad():
        skeleton.flatten()[:4] = 0.001
    folded = (original * skeleton).detach()
    keep = (skeleton.abs() >= 0.01).expand_as(original)
    pruned = prune.prune_stripes(module, "weight", threshold=0.01)
    assert pruned == 4
    assert "weight_skeleton" not in dict(module.named_parameters())
    assert module.weight_orig is original
    assert torch.equal(module.weight_mask, keep.to(module.weight_mask.dtype))
    torch.testing.assert_close(forward(module), run(module, folded * keep))
    prune.remove(module, "weight")
    assert module.weight is original and not module._forward_pre_hooks


def _skeleton_layer(kind):
    """A fresh layer with a bias, its input, and its forward's output tensor."""
    torch.manual_seed(0)
    if kind == "conv3d":
        return lambda: nn.Conv3d(2, 3, 3), torch.randn(1, 2, 4, 4, 4), lambda m, x: m(x)
    return lambda: SparseConv(2, 3, kernel_size=3, bias=True), sparse_input(n=10, channels=2), lambda m, x: m(x).feats


@pytest.mark.parametrize("order", ["skeleton", "mask_then_skeleton", "skeleton_then_mask"])
@pytest.mark.parametrize("kind", ["conv3d", "sparse"])
def test_remove_folds_an_attached_filter_skeleton(kind, order):
    """prune.remove (torch's own function, which knows only the mask) on a tensor with a filter skeleton
    attached removed the mask's hook and weight_orig but left the skeleton's hook, which read weight_orig:
    AttributeError at the next forward. The skeleton is folded into the now-plain weight (the same
    Parameter) at the next forward: the layer computes weight_orig * mask * skeleton as before, with no hook
    or skeleton left, trains, and its state_dict loads into a plain layer. Pruned while the skeleton is
    attached (refused at the forward), remove folds the skeleton over the new mask."""
    make, x, forward = _skeleton_layer(kind)
    module = make()
    original = module.weight
    if order == "mask_then_skeleton":
        prune.l1_unstructured(module, "weight", amount=0.4)
    skeleton = prune.attach_filter_skeleton(module)
    with torch.no_grad():
        skeleton.uniform_(0.2, 1.5)
    if order == "skeleton_then_mask":
        prune.l1_unstructured(module, "weight", amount=0.4)
        with pytest.raises(RuntimeError, match="prune_stripes"):
            forward(module, x)
    reference = make()  # a plain layer holding the weight the masked one computes with
    with torch.no_grad():
        reference.weight.copy_(module.weight_orig * module.weight_mask * skeleton)
        reference.bias.copy_(module.bias)
        want = forward(reference, x)
    prune.remove(module, "weight")
    assert not prune.is_pruned(module)
    got = forward(module, x)
    torch.testing.assert_close(got, want)
    assert module.weight is original and type(module.weight) is nn.Parameter
    assert "weight_skeleton" not in dict(module.named_parameters()) and not module._forward_pre_hooks
    got.pow(2).sum().backward()  # a training step runs on the plain weight
    assert original.grad is not None and original.grad.abs().sum() > 0
    fresh = make()
    fresh.load_state_dict(module.state_dict())  # strict: nothing but weight and bias
    with torch.no_grad():
        torch.testing.assert_close(forward(fresh, x), want)
    with pytest.raises(ValueError, match="has to be pruned before pruning can be removed"):  # torch's answer
        prune.remove(module, "weight")
    with pytest.raises(ValueError, match="has no filter skeleton"):
        prune.detach_filter_skeleton(module)


def test_a_skeleton_left_by_remove_folds_when_detached_and_is_cut_with_the_weight():
    """After prune.remove and before any forward, detach_filter_skeleton read weight_orig, gone: it folds
    the skeleton into the plain weight; channel surgery narrows the skeleton waiting with the weight."""
    make, x, forward = _skeleton_layer("sparse")
    module = make()
    skeleton = prune.attach_filter_skeleton(module)
    with torch.no_grad():
        skeleton.uniform_(0.2, 1.5)
        want = forward(module, x)
    prune.remove(module, "weight")
    assert torch.equal(prune.detach_filter_skeleton(module), skeleton.detach())
    with torch.no_grad():
        torch.testing.assert_close(forward(module, x), want)
    assert "weight_skeleton" not in dict(module.named_parameters()) and not module._forward_pre_hooks
    from pointsparse.prune import surgery

    cut = make()
    with torch.no_grad():
        prune.attach_filter_skeleton(cut).uniform_(0.2, 1.5)
        want = forward(cut, x)
    prune.remove(cut, "weight")
    surgery.remove_output_channels(cut, [0, 2])
    with torch.no_grad():
        torch.testing.assert_close(forward(cut, x), want[:, [0, 2]])


def test_a_skeleton_left_by_remove_is_in_the_weight_that_formats_and_the_graph_read():
    """Between prune.remove and the next forward the skeleton waits to be
    folded: formats.module_weight (compress's) and the dependency graph's
    effective weight read the plain weight without it (compress then built
    a layer of other outputs, silently); both multiply it in now."""
    from pointsparse import formats
    from pointsparse.prune import graph as G

    make, x, forward = _skeleton_layer("sparse")
    module = make()
    skeleton = prune.attach_filter_skeleton(module)
    with torch.no_grad():
        skeleton.uniform_(0.2, 1.5)
        want = forward(module, x)
        folded = formats.module_weight(module).clone()
    prune.remove(module, "weight")
    assert hasattr(module, "weight_skeleton")  # (not folded yet: no forward since)
    torch.testing.assert_close(formats.module_weight(module), folded)
    torch.testing.assert_close(G._effective(module, "weight"), folded)
    compressed = formats.compress(torch.nn.Sequential(module))
    with torch.no_grad():
        torch.testing.assert_close(compressed(x).feats, want)


def test_a_skeleton_left_by_remove_folds_under_torch_compile():
    """The fold that a skeleton left by prune.remove makes at the next
    forward writes the weight: torch.compile (no fullgraph) breaks its graph
    there and runs it eagerly (the compiled conv equals the eager one after);
    with fullgraph=True the error says what to call first (it was a
    data-dependent guard in the fold's region check, naming nothing)."""
    make, x, forward = _skeleton_layer("sparse")
    for fullgraph in (False, True):
        module = make()
        with torch.no_grad():
            prune.attach_filter_skeleton(module).uniform_(0.2, 1.5)
            want = forward(module, x)
        prune.remove(module, "weight")
        torch.compiler.reset()
        compiled = torch.compile(module, fullgraph=fullgraph, backend="eager")
        if fullgraph:
            with pytest.raises(Exception, match=r"call prune.detach_filter_skeleton\(module\), or run one forward"):
                with torch.no_grad():
                    forward(compiled, x)
            prune.detach_filter_skeleton(module)
        with torch.no_grad():
            torch.testing.assert_close(forward(compiled, x), want)
        assert not hasattr(module, "weight_skeleton")


def test_an_unpickled_skeleton_makes_its_fold_outside_graphs(tmp_path):
    """The fold's torch.compiler.disable is made with the process's first
    FilterSkeleton, not at import (pointsparse prune's start imported
    torch's compiler for it): a skeleton unpickled in a fresh process makes
    it too (before a first compiled call could meet it unmade), and its
    fold gives the forward of before the pickle."""
    import pickle

    make, x, forward = _skeleton_layer("conv3d")
    module = make()
    with torch.no_grad():
        prune.attach_filter_skeleton(module).uniform_(0.2, 1.5)
        want = forward(module, x)
    prune.remove(module, "weight")
    (tmp_path / "m.pkl").write_bytes(pickle.dumps((module, x, want)))
    code = ("import pickle, sys, torch\n"
            "from pointsparse.prune import stripe\n"
            "assert stripe._fold_outside_graphs is None and 'torch._dynamo' not in sys.modules\n"
            f"module, x, want = pickle.loads(open({str(tmp_path / 'm.pkl')!r}, 'rb').read())\n"
            "assert stripe._fold_outside_graphs is not None\n"
            "with torch.no_grad():\n"
            "    torch.testing.assert_close(module(x), want)\n"
            "assert not hasattr(module, 'weight_skeleton')\n"
            "print('ok')\n")
    run = run_python(code)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]


def test_filter_skeleton_prunes_a_kernel_region_conv_inside_its_region():
    """The skeleton's scales at the offsets outside a 'cross' conv's region
    get no gradient but the L1 penalty's, which drives them to 0:
    prune_stripes pruned those stripes, counted them (62 pruned where 2 of
    the conv's 21 stripes were) and folded their scale into the values
    outside. Those stripes are neither pruned, counted nor folded now."""
    conv = SparseConv(2, 3, kernel_size=3, kernel_region="cross")
    region = list(conv.kernel_region)
    rest = [k for k in range(27) if k not in region]
    with torch.no_grad():
        conv.weight[rest] = 0.5
    before = conv.weight.detach().clone()
    skeleton = prune.attach_filter_skeleton(conv)
    with torch.no_grad():
        skeleton[rest] = 0.0
        skeleton[region[:2], :, 0] = 0.001  # two weak stripes of the region
        skeleton[region[2:]] = 2.0
    assert prune.prune_stripes(conv, threshold=0.05) == 2
    assert bool(conv.weight_mask[rest].all()) and torch.equal(conv.weight_orig.detach()[rest], before[rest])
    assert int((conv.weight_mask[region] == 0).sum()) == 2 * 2  # two stripes of 2 input channels
    torch.testing.assert_close(conv.weight_orig.detach()[region[2:]], 2.0 * before[region[2:]])
    other = SparseConv(2, 3, kernel_size=3, kernel_region="cross")
    kept = other.weight.detach().clone()
    with torch.no_grad():
        prune.attach_filter_skeleton(other)[rest] = 0.0
    prune.detach_filter_skeleton(other, fold=True)
    assert torch.equal(other.weight_orig.detach(), kept)


def test_filter_skeleton_misuse_is_reported():
    module = nn.Conv2d(2, 2, 3)
    with pytest.raises(ValueError, match="needs kernel axes"):
        prune.attach_filter_skeleton(nn.Linear(2, 2))
    prune.attach_filter_skeleton(module)
    with pytest.raises(ValueError, match="already has a filter skeleton"):
        prune.attach_filter_skeleton(module)
    prune.l1_unstructured(module, "weight", amount=0.5)  # pruned while the skeleton is attached
    with pytest.raises(RuntimeError, match="prune_stripes"):
        module(torch.randn(1, 2, 4, 4))
    with pytest.raises(ValueError, match="threshold"):
        prune.prune_stripes(module, threshold=-1)
    # NaN compares false with every scale: it would prune every stripe and report none.
    fresh = nn.Conv2d(2, 2, 3)
    prune.attach_filter_skeleton(fresh)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="threshold must be a finite number >= 0"):
            prune.prune_stripes(fresh, threshold=bad)
        with pytest.raises(ValueError, match="threshold must be a finite number >= 0"):
            prune.StripeFromSkeleton(fresh.weight_skeleton, bad)
    assert bool(fresh.weight_mask.all())
    with pytest.raises(ValueError, match="init must be a finite number"):
        prune.attach_filter_skeleton(nn.Conv2d(2, 2, 3), init=float("nan"))
    with pytest.raises(TypeError, match="fold must be True or False"):  # "no" folded the skeleton in
        prune.detach_filter_skeleton(fresh, fold="no")
    assert fresh.weight_skeleton is not None


def test_methods_that_need_kernel_axes_say_so():
    with pytest.raises(ValueError, match="offset pruning needs kernel axes"):
        prune.kernel_structured(linear(torch.ones(2, 2)), "weight", 1, scope="offset")
    with pytest.raises(ValueError, match="stripe pruning needs kernel axes"):
        prune.stripe_structured(linear(torch.ones(2, 2)), "weight", 1)
    with pytest.raises(ValueError, match="scope must be"):
        prune.KernelStructured(0.5, scope="row")
    with pytest.raises(ValueError, match="axis must be 'out' or 'in'"):
        prune.ChannelStructured(0.5, axis=0)
    with pytest.raises(ValueError, match="axis=5 is out of range"):
        prune.vector_structured(linear(torch.ones(2, 2)), "weight", 1, axis=5)
    with pytest.raises(TypeError, match="cannot tell the channel layout"):
        prune.channel_structured(nn.BatchNorm1d(3), "weight", 1)


def test_a_structured_method_on_a_bias_says_to_prune_it_unstructured():
    """channel_structured(linear, "bias") advised passing a WeightLayout,
    which no 1-D tensor can have (the next error: "must have 2 dims")."""
    module = nn.Linear(2, 3)
    for method in (lambda: prune.channel_structured(module, "bias", 1), lambda: prune.nm_structured(module, "bias"),
                   lambda: prune.pattern_structured(module, "bias"), lambda: prune.block_structured(module, "bias", 1)):
        with pytest.raises(TypeError, match=r"cannot tell the channel layout of Linear.bias \(shape \(3,\)\): a "
                                            r"structured method needs >= 2 dims .*l1_unstructured"):
            method()
    assert not prune.is_pruned(module)
    prune.l1_unstructured(module, "bias", 1)


@pytest.mark.parametrize("shape", [(4, 0, 3, 3), (0, 4, 3, 3), (4, 0), (0, 4)])
def test_structured_methods_take_a_zero_size_weight_as_torch_does(shape):
    """A weight with no entries (a layer of zero channels, as torch's
    ln_structured takes) has nothing to prune: every structured method gave
    a RuntimeError from to_oik's reshape(O, I, -1) ("cannot reshape tensor
    of 0 elements ... ambiguous") on a conv of no input channels, and N:M
    on any empty weight."""
    import warnings

    def make():
        with warnings.catch_warnings():  # ("Initializing zero-element tensors is a no-op")
            warnings.simplefilter("ignore")
            return nn.Linear(shape[1], shape[0]) if len(shape) == 2 else nn.Conv2d(shape[1], shape[0], 3)

    forms = [lambda m: prune.channel_structured(m, "weight", 0.5),
             lambda m: prune.channel_structured(m, "weight", 0, axis="in"),
             lambda m: prune.vector_structured(m, "weight", 0.5), lambda m: prune.block_structured(m, "weight", 0.5),
             lambda m: prune.kernel_structured(m, "weight", 0.5), lambda m: prune.panel_structured(m, "weight", 0.5),
             lambda m: prune.nm_structured(m, "weight", 2, 4),
             lambda m: prune.global_structured([(m, "weight")], prune.ChannelStructured, 0.5)]
    if len(shape) == 4:
        forms += [lambda m: prune.kernel_structured(m, "weight", 0.5, scope="offset"),
                  lambda m: prune.stripe_structured(m, "weight", 0.5),
                  lambda m: prune.pattern_structured(m, "weight", patterns=[[0, 4, 8]])]
    for form in forms:
        module = make()
        form(module)
        assert module.weight_mask.shape == shape and prune.is_pruned(module)
    assert prune.WeightLayout(0, 1, (2, 3)).to_oik(torch.zeros(4, 0, 3, 3)).shape == (4, 0, 9)


# ---------------------------------------------------------------- global structured

def test_global_structured_channels_across_layers():
    first = linear(torch.tensor([[1.0, 1.0], [0.1, 0.1], [2.0, 2.0]]))
    second = linear(torch.tensor([[0.2, 0.2, 0.2], [5.0, 5.0, 5.0]]))
    prune.global_structured(
        [(first, "weight"), (second, "weight"), ], prune.ChannelStructured, amount=2, n=1, axis="out"
    )
    # channel L1 norms: first 2, 0.2, 4; second 0.6, 15 -> prune first[1] and second[0]
    assert torch.equal(first.weight_mask[:, 0], torch.tensor([1.0, 0.0, 1.0]))
    assert torch.equal(second.weight_mask[:, 0], torch.tensor([0.0, 1.0]))
    with pytest.raises(TypeError, match="GroupStructured subclass"):
        prune.global_structured([(first, "weight")], prune.L1Unstructured, amount=1)
    with pytest.raises(ValueError, match="at least one"):
        prune.global_structured([], prune.ChannelStructured, amount=1)
    with pytest.raises(ValueError, match="amount=9 is more than the 3"):
        prune.global_structured([(first, "weight"), (second, "weight")], prune.ChannelStructured, amount=9)


def test_global_structured_names_an_item_that_is_no_module_name_pair():
    """Each item of parameters must be a (module, name) pair naming a tensor
    of the module: a TypeError naming it, before anything is pruned (were an
    AttributeError and "cannot unpack non-iterable Linear object")."""
    first = linear(torch.tensor([[1.0, 1.0], [0.1, 0.1], [2.0, 2.0]]))
    for parameters, match in [
        ([(first, "weight"), (first, "nope")], r"parameters\[1\]: Linear has no tensor named 'nope'"),
        ([first], r"parameters\[0\] must be a \(module, name\) pair .*got Linear"),
        ([("weight", first)], r"parameters\[0\] must be a \(module, name\) pair .*got \(str, Linear\)"),
        ([(first, "weight", 1)], r"parameters\[0\] must be a \(module, name\) pair"),
        (first, r"parameters must be an iterable of \(module, name\) pairs; got Linear"),
        (3, r"parameters must be an iterable of \(module, name\) pairs; got int"),
    ]:
        with pytest.raises(TypeError, match=match):
            prune.global_structured(parameters, prune.ChannelStructured, amount=1)
        assert not prune.is_pruned(first)
    prune.global_structured(iter([(first, "weight")]), prune.ChannelStructured, amount=1, n=1, axis="out")
    assert torch.equal(first.weight_mask[:, 0], torch.tensor([1.0, 0.0, 1.0]))


def test_global_structured_refuses_a_pair_listed_twice():
    """A (module, name) listed twice had its groups counted twice and was
    then pruned twice, each time by the count that fell to one copy: 0.5 of
    a layer's 6 channels pruned all 6 (torch's global_unstructured, given the
    same list, prunes the half asked). Now a ValueError naming both items,
    before anything is pruned."""
    conv = SparseConv(4, 6, kernel_size=3)
    other = linear(torch.ones(3, 2))
    with pytest.raises(ValueError, match=r"parameters\[2\] .*Conv3d.*'weight'.* as parameters\[0\]"):
        prune.global_structured([(conv, "weight"), (other, "weight"), [conv, "weight"]],
                                prune.ChannelStructured, amount=0.5)
    assert not prune.is_pruned(conv) and not prune.is_pruned(other)
    prune.global_structured([(conv, "weight"), (other, "weight")], prune.ChannelStructured, amount=0.5)
    assert int((conv.weight_mask.sum((0, 1)) == 0).sum()) + int((other.weight_mask.sum(1) == 0).sum()) == 4


@pytest.mark.parametrize("dtype, error, match", [
    (torch.bool, TypeError, "importance_scores must be real numbers; got torch.bool"),
    (torch.complex64, TypeError, "importance_scores must be real numbers; got torch.complex64"),
])
def test_global_structured_checks_every_layers_scores_before_pruning_any(dtype, error, match):
    """Scores global_structured cannot rank are refused, as the function
    forms refuse them, before any layer is pruned: bool scores were a bare
    NotImplementedError ('"abs_cpu" not implemented for 'Bool''), and a
    complex tensor for the second layer was refused only by its apply, after
    the first layer had been pruned by the count that fell to it."""
    first, second = linear(torch.rand(3, 4)), linear(torch.rand(3, 4))
    scores = {(second, "weight"): torch.ones(3, 4).to(dtype)}
    with pytest.raises(error, match=match):
        prune.global_structured([(first, "weight"), (second, "weight")], prune.ChannelStructured, 2,
                                importance_scores=scores)
    assert not prune.is_pruned(first) and not prune.is_pruned(second)


@pytest.mark.parametrize("method", [
    lambda m, s: prune.vector_structured(m, "weight", 0.5, importance_scores=s),
    lambda m, s: prune.kernel_structured(m, "weight", 0.5, importance_scores=s),
    lambda m, s: prune.channel_structured(m, "weight", 0.5, importance_scores=s),
    lambda m, s: prune.block_structured(m, "weight", 0.5, block_size=2, importance_scores=s),
    lambda m, s: prune.panel_structured(m, "weight", 0.5, importance_scores=s),
    lambda m, s: prune.nm_structured(m, "weight", importance_scores=s),
], ids=["vector", "kernel", "channel", "block", "panel", "nm"])
def test_importance_scores_of_another_shape_are_a_value_error(method):
    """The toolkit's methods check ``importance_scores`` before pruning: another
    shape is a ValueError naming it and both shapes, a list a TypeError (was
    the AssertionError of torch's own check, which ``python -O`` drops); the
    module is left unpruned; scores of the right shape prune."""
    conv = SparseConv(4, 4, kernel_size=3)
    with pytest.raises(ValueError, match=r"importance_scores must have the shape of .*\(27, 4, 4\); got \(3,\)"):
        method(conv, torch.rand(3))
    with pytest.raises(TypeError, match="importance_scores must be a tensor"):
        method(conv, [1.0] * 432)
    assert not prune.is_pruned(conv)
    method(conv, torch.rand(27, 4, 4))
    assert prune.is_pruned(conv) and bool((conv.weight == 0).any())


def test_a_masked_layer_sees_its_factors_changed_through_data():
    """``weight_orig`` or ``weight_mask`` changed in place through ``.data``
    (a lottery ticket's rewind, an EMA update, gradcheck's perturbation)
    keeps its version counter: the product must be made again on every
    forward, as torch's hook makes it, or the layer runs the old weight
    silently (a product kept while the version counters held, tried in
    stop 54, did)."""
    torch.manual_seed(0)
    conv = SparseConv(4, 4, kernel_size=3)
    prune.panel_structured(conv, "weight", 0.5)
    x = sparse_input(n=12, channels=4)

    def expected():
        return naive_sparse_conv(x, conv.weight_orig.detach() * conv.weight_mask)

    for change in (lambda: conv.weight_orig.data.mul_(2.0), lambda: conv.weight_orig.data.copy_(torch.randn(27, 4, 4)),
                   lambda: conv.weight_mask.data.fill_(1.0)):
        with torch.no_grad():
            conv(x)
            change()
            torch.testing.assert_close(conv(x).feats, expected(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pruned_first", [False, True])
def test_a_layer_with_a_filter_skeleton_deep_copies(pruned_first):
    """attach_filter_skeleton and each forward leave ``weight`` the product
    orig * mask * skeleton that autograd made, and detach_filter_skeleton
    orig * mask: copy.deepcopy refused the layer (torch's 'Only Tensors
    created explicitly by the user') right after attaching, after a forward
    with gradients and right after detaching. The copy computes what the
    layer does, and the skeleton still learns."""
    import copy

    torch.manual_seed(0)
    module, x = SparseConv(2, 3, kernel_size=3), sparse_input(n=10, channels=2)
    if pruned_first:
        prune.channel_structured(module, "weight", 1)
    skeleton = prune.attach_filter_skeleton(module, "weight", init=0.5)
    copy.deepcopy(module)
    module(x).feats.square().sum().backward()
    assert skeleton.grad is not None and skeleton.grad.abs().sum() > 0
    twin = copy.deepcopy(module)
    torch.testing.assert_close(twin(x).feats, module(x).feats)
    prune.detach_filter_skeleton(module)
    twin = copy.deepcopy(module)
    torch.testing.assert_close(twin(x).feats, module(x).feats)


@pytest.mark.parametrize("method, expected", [
    (lambda m: prune.channel_structured(m, "weight", 1, axis="in"), [[1.0, 1.0, 1.0, 0.0]]),
    (lambda m: prune.vector_structured(m, "weight", 1, axis=0), [[1.0, 1.0, 1.0, 0.0]]),
    (lambda m: prune.block_structured(m, "weight", 1, block_size=1), [[1.0, 1.0, 1.0, 0.0]]),
    (lambda m: prune.nm_structured(m, "weight", 2, 4), [[1.0, 1.0, 0.0, 0.0]]),
])
def test_a_pruned_tensor_is_ranked_by_its_weights_now_not_the_last_forwards(method, expected):
    """Pruning a tensor again ranked ``module.weight``, the product torch
    cached at the last forward (or pruning), not ``weight_orig * mask`` as an
    optimizer step since has left it: a weight the step shrank to 0.5 was
    kept, one it grew to 4 pruned."""
    module = linear([[1.0, 2.0, 3.0, 4.0]])
    prune.identity(module, "weight")
    with torch.no_grad():  # an optimizer step after the forward
        module.weight_orig.copy_(torch.tensor([[4.0, 3.0, 2.0, 0.5]]))
    method(module)
    assert module.weight_mask.tolist() == expected


def test_groups_scored_inf_are_pruned_before_any_dead_group_is_counted():
    """Dead groups were ranked as inf, so an alive group whose importance is
    inf tied with them and topk could pick a dead one: global_structured
    asked to prune all 4 alive channels pruned 3."""
    first, second = linear(torch.ones(3, 2)), linear(torch.ones(2, 2))
    prune.channel_structured(first, "weight", 1)
    scores = {(first, "weight"): torch.full((3, 2), float("inf")), (second, "weight"): torch.ones(2, 2)}
    prune.global_structured([(first, "weight"), (second, "weight")], prune.ChannelStructured, 4,
                            importance_scores=scores)
    assert not bool(first.weight_mask.any()) and not bool(second.weight_mask.any())
    for k in (1, 2):  # one layer, the dead channel listed first and last
        for dead in (0, 2):
            module = linear(torch.ones(3, 2))
            prune.custom_from_mask(module, "weight", (torch.arange(3) != dead).float().view(3, 1).expand(3, 2))
            chosen = prune.structured.select_weakest(torch.full((3,), float("inf")), module.weight_mask[:, 0] != 0, k)
            assert int(chosen.sum()) == k and not bool(chosen[dead])


def test_global_structured_vectors_take_the_layout_it_hands_on():
    """global_structured hands its kwargs (a layout among them) to the
    method's apply; VectorStructured.apply took no layout, so the call
    failed with "unexpected keyword argument 'layout'" after scoring,
    nothing pruned. The layout given is used, as the other methods do."""
    a, b = nn.Linear(4, 3, bias=False), nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        a.weight.copy_(torch.arange(1.0, 13.0).view(3, 4))
        b.weight.copy_(torch.arange(13.0, 21.0).view(2, 4))
    layout = prune.WeightLayout(0, 1, ())
    prune.global_structured([(a, "weight"), (b, "weight")], prune.VectorStructured, amount=2, axis=1, layout=layout)
    # vectors along axis 1 are rows: norms a 10, 26, 42; b 58, 74 -> a's first two rows go
    assert a.weight_mask.sum(1).tolist() == [0.0, 0.0, 4.0] and bool(b.weight_mask.all())


@pytest.mark.parametrize("method, kwargs", [
    ("channel_structured", {"amount": 0.5}), ("kernel_structured", {"amount": 0.5}),
    ("vector_structured", {"amount": 0.5}), ("block_structured", {"amount": 0.5}),
    ("stripe_structured", {"amount": 0.5}), ("panel_structured", {"amount": 0.5}),
    ("nm_structured", {"n": 2, "m": 4})])
def test_a_meta_weight_is_named_by_every_granularity(method, kwargs):
    """A meta layer (``device="meta"``: shape only) raised torch's
    ``Tensor.item() cannot be called on meta tensors`` from inside the
    region check; each method names the tensor now, and leaves it unpruned."""
    from pointsparse import nn as spnn

    for layer, what in ((spnn.Conv3d(8, 8, 3, device="meta"), "Conv3d"), (nn.Linear(8, 8, device="meta"), "Linear")):
        with pytest.raises(ValueError, match=rf"^{what}\.weight is a meta tensor \(shape only, no data\)"):
            getattr(prune, method)(layer, "weight", **kwargs)
        assert not hasattr(layer, "weight_mask") and isinstance(layer.weight, nn.Parameter)
