"""Spatial (activation) pruning: VoxelPrune keeps the most important voxels
per batch item; convs after it build maps on the kept voxels, and the
transposed conv back meets the coords of the skip connection."""

from __future__ import annotations

import contextlib
import math
import pickle
import re

import numpy as np
import pytest
import torch

import pointsparse as ps
from pointsparse.nn import functional as F
from reference import dense_conv, dense_conv_transpose, random_coords

BACKEND = {"core": contextlib.nullcontext, "torch": ps._ext.torch_path}


def make(n=300, c=4, extent=8, dtype=torch.float64, seed=0):
    coords = random_coords(n, extent, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    return ps.SparseTensor(torch.randn(len(coords), c, generator=g, dtype=dtype), coords)


def brute_keep(x, ratio):
    keep = []
    for b in x.coords[:, 0].unique().tolist():
        rows = [i for i in range(len(x)) if int(x.coords[i, 0]) == b]
        norms = [float(x.feats[i].norm()) for i in rows]
        ranked = sorted(range(len(rows)), key=lambda j: (-norms[j], j))
        keep += [rows[j] for j in ranked[:math.ceil(round(ratio * len(rows), 9))]]
    return sorted(keep)


@pytest.mark.parametrize("ratio", [1.0, 0.5, 0.3, 0.01])
def test_magnitude_keeps_the_largest_per_batch_item(ratio):
    x = make()
    out = ps.nn.VoxelPrune(ratio)(x)
    keep = brute_keep(x, ratio)
    assert torch.equal(out.coords, x.coords[keep]) and torch.equal(out.feats, x.feats[keep])
    assert out.stride == x.stride and out.cache is not x.cache


def test_threshold_and_learned_score():
    x = make()
    out = ps.nn.VoxelPrune(score="magnitude", threshold=2.0)(x)
    assert torch.equal(out.feats, x.feats[x.feats.norm(dim=1) >= 2.0])
    torch.manual_seed(0)
    layer = ps.nn.VoxelPrune(0.5, score="learned", in_channels=4).double()
    feats = x.feats.clone().requires_grad_()
    out = layer(x.with_feats(feats))
    score = layer.scorer(x.feats).squeeze(1).detach()
    batch = x.coords[:, 0]
    rows = F.keep_per_batch(score, batch, 0.5)
    assert torch.equal(out.coords, x.coords[rows])
    torch.testing.assert_close(out.feats, x.feats[rows] * torch.sigmoid(score[rows]).unsqueeze(1))
    out.feats.sum().backward()
    assert layer.scorer.weight.grad.abs().sum() > 0
    assert torch.autograd.gradcheck(lambda f: layer(x.with_feats(f)).feats, (x.feats.clone().requires_grad_(),))


def test_pruned_voxels_in_a_unet_step_against_dense_references():
    """down (k2 s2) -> prune half -> submanifold conv -> transposed conv back
    -> cat with the skip: the coarse convs see only the kept voxels, the
    transposed conv lands on the skip's fine coords."""
    x = make(n=600, c=3, extent=10)
    torch.manual_seed(1)
    down = ps.nn.Conv3d(3, 4, 2, 2).double()
    mid = ps.nn.Conv3d(4, 4, 3).double()
    up = ps.nn.Conv3d(4, 3, 2, 2, transposed=True).double()
    coarse = down(x)
    kept = ps.nn.VoxelPrune(0.5)(coarse)
    assert len(kept) == sum(math.ceil(len(coarse.coords[coarse.coords[:, 0] == b]) / 2) for b in (0, 1))
    y = mid(kept)
    fresh = ps.SparseTensor(kept.feats, kept.coords, 2)  # the same voxels, no history
    torch.testing.assert_close(y.feats, dense_conv(fresh, mid.weight.detach(), kept.coords), rtol=1e-10, atol=1e-10)
    z = up(y)
    assert torch.equal(z.coords, x.coords)
    torch.testing.assert_close(z.feats, dense_conv_transpose(y, up.weight.detach(), x.coords), rtol=1e-10,
                               atol=1e-10)
    skip = ps.nn.functional.cat([z, x])
    assert skip.num_channels == 6
    assert coarse.cache.get_coords((2, 2, 2)).shape[0] == len(coarse)  # the source cache is untouched
    assert kept.cache.get_coords((4, 4, 4)) is None
    z.feats.sum().backward()  # gradients flow through the kept rows
    assert down.weight.grad.abs().sum() > 0


def test_voxel_skip_refuses_a_module_holding_a_voxel_prune():
    """VoxelSkip(nn.Sequential(conv, VoxelPrune(0.5))) was taken: every
    forward then failed as "VoxelSkip: module must return a SparseTensor on
    the 80 kept sites ...; got 40 sites", naming neither the VoxelPrune nor
    the fix. It is refused naming it; a VoxelSkip inside (its own VoxelPrune
    gives back every site it keeps) is no matter."""
    for module, name in ((ps.nn.VoxelPrune(0.5), "module"),
                         (torch.nn.Sequential(ps.nn.Conv3d(3, 3, 3), ps.nn.VoxelPrune(0.5)), "module.1")):
        with pytest.raises(ValueError, match=rf"VoxelSkip: module holds a VoxelPrune \({name!r}\), which would leave "
                                             r"the branch fewer sites .*keep_ratio or threshold instead"):
            ps.nn.VoxelSkip(module, 0.5)
    x = make(n=200, c=3, extent=9, dtype=torch.float32)
    nested = ps.nn.VoxelSkip(torch.nn.Sequential(ps.nn.VoxelSkip(ps.nn.Conv3d(3, 3, 3), 0.5), ps.nn.ReLU()), 0.5)
    assert torch.equal(nested(x).coords, x.coords)


def test_voxel_skip_names_a_voxel_prune_added_on_its_modules_input_or_after_it():
    """The same VoxelPrune by add_voxel_prune's hook (VoxelSkip(block.main)
    built by hand after add_voxel_prune(net, "fuse.1.0.main.0")), or put in
    the module after the VoxelSkip was built, failed every forward as
    "module must return a SparseTensor on the 80 kept sites ...; got 40
    sites", naming neither: the first is refused, the forward's error of the
    second names the VoxelPrune."""
    from pointsparse.models import add_voxel_prune

    class Net(torch.nn.Module):  # (inside a ResidualBlock's main add_voxel_prune refuses it: every forward failed)
        def __init__(self):
            super().__init__()
            self.main = torch.nn.Sequential(ps.nn.Conv3d(3, 3, 3), ps.nn.ReLU())

        def forward(self, x):
            return self.main(x)

    net = Net()
    add_voxel_prune(net, "main.0", 0.5)
    with pytest.raises(ValueError, match=r"VoxelSkip: module holds a VoxelPrune on the input of 'module.0' "
                                         r"\(add_voxel_prune's\).*VoxelSkip before adding VoxelPrune"):
        ps.nn.VoxelSkip(net.main, 0.5)
    skip = ps.nn.VoxelSkip(torch.nn.Sequential(ps.nn.Conv3d(3, 3, 3)), 0.5)
    skip.module.append(ps.nn.VoxelPrune(0.5))
    with pytest.raises(ValueError, match=r"got \d+ sites at stride .*: the VoxelPrune 'module.1' inside it dropped "
                                         r"them"):
        skip(make(n=200, c=3, extent=9, dtype=torch.float32))


def test_voxel_skip_convolves_the_kept_voxels_and_zeroes_the_others():
    """VoxelSkip(conv): on the kept voxels (brute-force magnitude ranking)
    the dense conv3d of a grid holding only them, zero at the others, on the
    input's coords and cache; float64 gradcheck through it."""
    x = make(n=400, c=3, extent=9)
    torch.manual_seed(2)
    conv = ps.nn.Conv3d(3, 5, 3).double()
    skip = ps.nn.VoxelSkip(conv, 0.5)
    out = skip(x)
    keep = brute_keep(x, 0.5)
    kept = ps.SparseTensor(x.feats[keep], x.coords[keep])
    expect = torch.zeros(len(x), 5, dtype=torch.float64)
    expect[keep] = dense_conv(kept, conv.weight.detach(), kept.coords, bias=conv.bias)
    assert out.coords is x.coords and out.cache is x.cache and out.stride == x.stride
    torch.testing.assert_close(out.feats, expect, rtol=1e-10, atol=1e-10)
    small = make(n=120, c=3, extent=6)  # (the full gradcheck perturbs every input: 400 x 3 of them took 14 s)
    assert torch.autograd.gradcheck(lambda f: skip(small.with_feats(f)).feats, (small.feats.clone().requires_grad_(),))


def test_voxel_skip_in_a_residual_block_passes_skipped_voxels_through_the_shortcut():
    from pointsparse.models.minkunet import ResidualBlock

    x = make(n=400, c=4, extent=9)
    torch.manual_seed(3)
    block = ResidualBlock(4, 6).double().eval()
    reference = ResidualBlock(4, 6).double().eval()
    reference.load_state_dict(block.state_dict())
    block.main = ps.nn.VoxelSkip(block.main, 0.3)
    out = block(x)
    keep = brute_keep(x, 0.3)
    dropped = torch.ones(len(x), dtype=torch.bool)
    dropped[keep] = False
    shortcut = reference.shortcut(x).feats.clamp_min(0)
    torch.testing.assert_close(out.feats[dropped], shortcut[dropped], rtol=1e-12, atol=1e-12)
    kept = ps.SparseTensor(x.feats[keep], x.coords[keep])
    torch.testing.assert_close(out.feats[keep], reference(kept).feats, rtol=1e-10, atol=1e-10)
    out.feats.sum().backward()
    assert block.main.module[0].weight.grad.abs().sum() > 0


def test_voxel_skip_add_to_is_the_sum_with_the_zero_rows():
    """add_to (the residual block's one pass) gives add(skip(x), other)'s
    values and gradients; ResidualBlock takes it when main is a VoxelSkip."""
    from pointsparse.models.minkunet import ResidualBlock

    x = make(n=400, c=4, extent=9)
    torch.manual_seed(5)
    block = ResidualBlock(4, 6).double()
    block.main = ps.nn.VoxelSkip(block.main, 0.4)
    other = block.shortcut(x).with_feats(block.shortcut(x).feats.detach())
    feats = x.feats.clone().requires_grad_()
    got = block.main.add_to(x.with_feats(feats), other)
    feats2 = x.feats.clone().requires_grad_()
    expect = F.add(block.main(x.with_feats(feats2)), other)
    assert torch.equal(got.feats, expect.feats) and got.coords is other.coords
    g = torch.randn(got.feats.shape, dtype=torch.float64)
    assert torch.equal(torch.autograd.grad(got.feats, feats, g)[0], torch.autograd.grad(expect.feats, feats2, g)[0])
    block.eval()
    out = block(x)
    torch.testing.assert_close(out.feats, (F.add(block.main(x), block.shortcut(x))).feats.clamp_min(0),
                               rtol=0, atol=0)
    # (fast mode: a full gradcheck perturbs each of the 361 x 4 inputs and backpropagates each output, 40 s)
    assert torch.autograd.gradcheck(lambda f: block(x.with_feats(f)).feats, (x.feats.clone().requires_grad_(),),
                                    fast_mode=True)
    with pytest.raises(ValueError, match="VoxelSkip.add_to: item 1"):
        block.main.add_to(x, make(n=300, c=6, extent=9))
    with pytest.raises(ValueError, match="VoxelSkip.add_to: other has 4 channels; the module gives 6"):
        block.main.add_to(x, x)


def test_keep_per_batch_is_a_stable_ranking():
    """The selection (kthvalue / partition) keeps what a stable descending
    sort keeps: ties to the earlier row, NaN above inf, per batch item in
    any row order."""
    def ranked(scores, batch, ratio):
        kept = []
        for b in torch.unique(batch).tolist():
            rows = (batch == b).nonzero().flatten()
            n = math.ceil(round(ratio * rows.numel(), 9))
            kept.append(rows[torch.sort(scores[rows], descending=True, stable=True).indices[:n]])
        return torch.sort(torch.cat(kept)).values

    g = torch.Generator().manual_seed(0)
    for t in range(200):
        n = int(torch.randint(1, 120, (1,), generator=g))
        # float32/64 take numpy's partition, bfloat16 torch's kthvalue
        scores = torch.randint(0, 4, (n,), generator=g).to((torch.float32, torch.float64, torch.bfloat16)[t % 4 % 3])
        if t % 3 == 0:
            scores[torch.rand(n, generator=g) < 0.1] = float("nan")
        if t % 5 == 0:
            scores[torch.rand(n, generator=g) < 0.1] = float("inf")
        batch = torch.randint(0, 1 + t % 3, (n,), generator=g)
        ratio = 0.01 + 0.99 * float(torch.rand(1, generator=g))
        assert torch.equal(F.keep_per_batch(scores, batch, ratio), ranked(scores, batch, ratio)), t
    assert F.keep_per_batch(torch.zeros(0), torch.zeros(0, dtype=torch.int64), 0.5).numel() == 0


class _FullLengthMasks(torch.overrides.TorchFunctionMode):
    """Counts the torch calls that give a bool mask over all ``n`` rows."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n, self.count = n, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.dtype == torch.bool and tuple(out.shape) == (self.n,):
            self.count += 1
        return out


@pytest.mark.parametrize("shuffled", [False, True])
def test_keep_per_batch_reads_all_rows_a_fixed_number_of_times(shuffled):
    """keep_per_batch compared the whole batch column with each item's id
    (``batch == b`` per item): B items of N rows cost B * N. Each item's
    rows are found once for all (its slice where the batch ids are sorted, as
    a tensor's key-ordered coords hold them; a stable sort otherwise): the
    passes over every row do not grow with the items."""
    def passes(items: int) -> int:
        g = torch.Generator().manual_seed(items)
        n = 640
        batch = torch.sort(torch.randint(0, items, (n,), generator=g)).values
        if shuffled:
            batch = batch[torch.randperm(n, generator=g)]
        scores = torch.randn(n, generator=g)
        with _FullLengthMasks(n) as mode:
            F.keep_per_batch(scores, batch, 0.5)
        return mode.count

    assert passes(64) == passes(2)


def test_voxel_skip_errors():
    with pytest.raises(TypeError, match="module must be a torch.nn.Module"):
        ps.nn.VoxelSkip(lambda t: t, 0.5)
    with pytest.raises(ValueError, match="keep_ratio"):
        ps.nn.VoxelSkip(ps.nn.ReLU(), 0.0)
    x = make(n=200, c=2)
    with pytest.raises(ValueError, match="VoxelSkip: module must return a SparseTensor on the"):
        ps.nn.VoxelSkip(ps.nn.Conv3d(2, 2, 2, 2).double(), 0.5)(x)
    class Feats(torch.nn.Module):
        def forward(self, t):
            return t.feats

    with pytest.raises(TypeError, match="VoxelSkip: module must return a SparseTensor; got Tensor"):
        ps.nn.VoxelSkip(Feats(), 0.5)(x)

    class Reversed(torch.nn.Module):  # the kept sites' count and stride, in another order
        def forward(self, t):
            return ps.SparseTensor(t.feats.flip(0), t.coords.flip(0), t.stride)

    for call in (lambda skip: skip(x), lambda skip: skip.add_to(x, x)):  # (their rows went to the wrong sites)
        with pytest.raises(ValueError, match="in their order; got other coords"):
            call(ps.nn.VoxelSkip(Reversed(), 0.5))
    with pytest.raises(TypeError, match="SparseTensor"):
        ps.nn.VoxelSkip(torch.nn.Identity(), 0.5)(x.feats)


def test_errors():
    with pytest.raises(ValueError, match="keep_ratio"):
        ps.nn.VoxelPrune(0.0)
    with pytest.raises(ValueError, match="keep_ratio"):
        ps.nn.VoxelPrune(1.5)
    with pytest.raises(ValueError, match="score"):
        ps.nn.VoxelPrune(0.5, score="random")
    with pytest.raises(TypeError, match="score='learned' needs in_channels"):  # (None: no count)
        ps.nn.VoxelPrune(0.5, score="learned")
    with pytest.raises(TypeError, match="threshold"):
        ps.nn.VoxelPrune(0.5, threshold="high")
    with pytest.raises(TypeError, match="SparseTensor"):
        ps.nn.VoxelPrune(0.5)(torch.ones(3, 2))
    empty = ps.SparseTensor(torch.zeros(0, 2), torch.zeros(0, 4, dtype=torch.int32))
    assert len(ps.nn.VoxelPrune(0.5)(empty)) == 0


def test_keep_rules_out_of_range_are_refused():
    """keep_per_batch: a keep_ratio outside (0, 1], a NaN threshold, or batch
    ids of another length than the scores are ValueErrors (a ratio of 1.5,
    and a batch one element short, were taken; a NaN threshold kept nothing);
    VoxelPrune refuses a NaN or infinite threshold when it is built."""
    scores, batch = torch.rand(10), torch.zeros(10, dtype=torch.int64)
    for ratio in (1.5, 0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="keep_ratio"):
            F.keep_per_batch(scores, batch, ratio)
    with pytest.raises(TypeError, match="keep_ratio"):  # (not a number: as threshold's, below)
        F.keep_per_batch(scores, batch, True)
    with pytest.raises(ValueError, match="threshold must be a finite"):
        F.keep_per_batch(scores, batch, threshold=float("nan"))
    for bad in ("0.5", True, torch.ones(2)):  # (a str was Python's 'must be real number, not str'; True was 1)
        with pytest.raises(TypeError, match="threshold must be a real number"):
            F.keep_per_batch(scores, batch, threshold=bad)
    assert F.keep_per_batch(scores, batch, threshold=torch.tensor(0.0)).tolist() == list(range(10))
    with pytest.raises(ValueError, match="same length"):
        F.keep_per_batch(scores, batch[:9], 0.5)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="threshold must be a finite"):
            ps.nn.VoxelPrune(0.5, threshold=bad)
    assert F.keep_per_batch(scores, batch, 1.0).tolist() == list(range(10))


def test_select_voxels_checks_its_rows_and_feats():
    """select_voxels takes increasing int rows within the input and feats of
    one row each: repeated, unsorted or out-of-range rows (a tensor with
    duplicate coords, or torch's IndexError), float rows and feats of another
    length are refused; a Conv3d kernel_region of floats is a TypeError (13.9
    was truncated to 13)."""
    x = ps.SparseTensor(torch.randn(6, 2), random_coords(6, 4, seed=1))
    kept = F.select_voxels(x, torch.tensor([0, 2, 5]))
    assert torch.equal(kept.coords, x.coords[[0, 2, 5]]) and torch.equal(kept.feats, x.feats[[0, 2, 5]])
    for rows, error in (([1, 1, 2], ValueError), ([2, 1], ValueError), ([0, 6], ValueError), ([-1, 2], ValueError),
                        ([0.0, 1.0], TypeError)):
        with pytest.raises(error, match="rows"):
            F.select_voxels(x, torch.tensor(rows))
    with pytest.raises(ValueError, match="feats must be"):
        F.select_voxels(x, torch.tensor([0, 2]), torch.randn(3, 2))
    # feats a SparseTensor cannot hold (it was made of them, unchecked: int64 or bool feats, meta data)
    for feats, error in ((torch.ones(2, 2, dtype=torch.int64), TypeError), (torch.ones(2, 2, dtype=torch.bool), TypeError),
                         (torch.ones(2, 2, device="meta"), ValueError)):
        with pytest.raises(error, match="feats"):
            F.select_voxels(x, torch.tensor([0, 2]), feats)
    assert F.select_voxels(x, torch.tensor([0, 2]), torch.ones(2, 5, dtype=torch.float64)).feats.shape == (2, 5)
    with pytest.raises(TypeError, match="kernel_region"):
        ps.nn.Conv3d(1, 1, 3, kernel_region=[13.9])
    assert ps.nn.Conv3d(1, 1, 3, kernel_region=[13, torch.tensor(4)]).kernel_region == (4, 13)


@pytest.mark.parametrize("make_layer", [lambda: ps.nn.VoxelPrune(0.5, "learned", in_channels=4),
                                        lambda: ps.nn.VoxelSkip(ps.nn.Conv3d(4, 4), 0.5, "learned", in_channels=4)])
def test_a_learned_score_runs_after_compress(make_layer):
    """formats.compress replaces the learned scorer (an nn.Linear) with a
    formats.SparseLinear, which has no ``weight``: the layer read
    ``scorer.weight`` for its checks and failed with an AttributeError, so
    a compressed model holding a learned VoxelPrune / VoxelSkip could not
    run. It keeps the same voxels and gives the same feats."""
    from pointsparse import formats

    torch.manual_seed(0)
    layer = make_layer().eval()
    x = make(c=4, dtype=torch.float32)
    compressed = formats.compress(layer, "csr")
    with torch.no_grad():
        want, got = layer(x), compressed(x)
    assert torch.equal(got.coords, want.coords)
    torch.testing.assert_close(got.feats, want.feats, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="the input's feats have 3 channels but in_channels is 4"):
        compressed(make(c=3, dtype=torch.float32))


def test_channel_surgery_does_not_take_a_learned_score_for_the_next_layer():
    """prune.surgery's static chains took a learned VoxelPrune for a wrapper
    of its scorer (as nn.Linear wraps a torch Linear): conv -> scorer ->
    conv, so removing the first conv's output channels shrank the scorer
    but not the conv after it (which then refused its input), and the
    scorer (one output, a score) was offered as a producer. The prune layer
    is a barrier: the convs around it keep their widths and the model runs."""
    from pointsparse.prune import surgery

    x = make(c=3, dtype=torch.float32)
    for ratios in ({"0": 0.5}, {"1.scorer": 0.5}):
        torch.manual_seed(0)
        model = torch.nn.Sequential(ps.nn.Conv3d(3, 8, 3), ps.nn.VoxelPrune(0.5, "learned", in_channels=8),
                                    ps.nn.Conv3d(8, 4, 3)).eval()
        with torch.no_grad():
            want = model(x).feats
        with pytest.raises(ValueError, match="is not a prunable producer"):
            surgery.apply_channel_ratios(model, ratios)
        with torch.no_grad():
            assert torch.equal(model(x).feats, want)


@pytest.mark.parametrize("dtype, small, large", [(torch.bfloat16, [256.0, 0.0], [254.0, 32.0]),
                                                 (torch.float16, [2048.0, 0.0], [2040.0, 190.0])])
def test_magnitude_ranks_low_precision_feats_by_their_true_norm(dtype, small, large):
    """The magnitude score was the norm in the feats' own dtype: bf16 / fp16
    rounded norms of 256 and 256.008 (2048 and 2048.83) to one value, and
    the tie went to the earlier, smaller voxel. The norm is taken in float32
    for them (the feats are exact there), so the larger one is kept, and a
    threshold between the two norms tells them apart."""
    coords = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0], [0, 2, 0, 0]], dtype=torch.int32)
    x = ps.SparseTensor(torch.tensor([small, large, [1.0, 1.0]], dtype=dtype), coords)
    assert torch.equal(ps.nn.VoxelPrune(0.3)(x).coords, coords[[1]])
    middle = (torch.tensor(small).norm() + torch.tensor(large, dtype=torch.float64).norm()) / 2
    assert torch.equal(ps.nn.VoxelPrune(threshold=float(middle))(x).coords, coords[[1]])
    out = ps.nn.VoxelSkip(ps.nn.ReLU(), 0.3)(x)
    assert out.feats.dtype == dtype and torch.equal(out.feats[1], x.feats[1]) and not out.feats[0].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("scale", [2.0**70, 2.0**-75, 1.0])
def test_magnitude_ranks_feats_beyond_a_squares_range_by_their_norm(dtype, scale):
    """The magnitude score summed the squares of the feats: float32 (and
    bf16, normed in float32) feats past ~1.8e19 gave inf scores, below
    ~1e-19 zero ones, and the tie went to the earlier voxels (a keep of
    rows 0 and 1 where rows 1 and 2 were the largest). Each row is scaled
    by a power of two before it is squared where the plain norm was inf or
    near the underflow (eager; a graph takes the plain norm): the ranking,
    and scores equal to the norm (bit for bit where nothing overflowed
    before)."""
    if dtype == torch.float16 and scale != 1.0:
        scale = 2.0**10 if scale > 1 else 2.0**-10  # (its whole range)
    base = torch.tensor([[3.0, 0.0], [4.0, 3.0], [6.0, 8.0], [0.0, 0.0]], dtype=torch.float64)
    coords = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0], [0, 2, 0, 0], [0, 3, 0, 0]], dtype=torch.int32)
    x = ps.SparseTensor((base * scale).to(dtype), coords)
    prune = ps.nn.VoxelPrune(0.5)
    want = torch.tensor([3.0, 5.0, 10.0, 0.0], dtype=torch.float64) * scale
    assert torch.equal(prune.scores(x).double(), want)
    assert torch.equal(prune(x).coords, coords[[1, 2]])
    assert torch.equal(ps.nn.VoxelPrune(threshold=float(4 * scale))(x).coords, coords[[1, 2]])
    if dtype == torch.float32 and scale == 1.0:  # a graph takes the plain norm (the same where nothing overflows)
        assert torch.equal(torch.compile(prune.scores, fullgraph=True, backend="aot_eager")(x).double(), want)
    # the ends of the range: float64 norms near its largest, float32 subnormal rows (scaled part way)
    for far, kind in ((2.0**1000, torch.float64), (2.0**-140, torch.float32)):
        x = ps.SparseTensor((base * far).to(kind), coords)
        assert torch.equal(prune.scores(x).double(), torch.tensor([3.0, 5.0, 10.0, 0.0], dtype=torch.float64) * far)
    # the norm as before where it fitted (the scaling by a power of two is exact)
    feats = torch.randn(64, 5, dtype=dtype) * torch.logspace(-3, 3, 64).to(dtype)[:, None]
    wide = torch.float32 if dtype in (torch.bfloat16, torch.float16) else None
    got = prune.scores(ps.SparseTensor(feats, (torch.arange(64).repeat(4, 1).T * torch.tensor([0, 1, 1, 1])).int()))
    assert torch.equal(got, torch.linalg.vector_norm(feats, dim=1, dtype=wide))


def test_scores_checks_its_input_as_select_does():
    """VoxelPrune.scores (the importance select ranks by) read input.feats
    unchecked: a Tensor was an AttributeError and feats of another width
    than a learned score's in_channels torch's matmul RuntimeError. It
    gives select's TypeError / ValueError, and select's scores."""
    x = make(c=4)
    for layer in (ps.nn.VoxelPrune(0.5), ps.nn.VoxelPrune(0.5, "learned", in_channels=4).double()):
        with pytest.raises(TypeError, match="SparseTensor"):
            layer.scores(x.feats)
        assert torch.equal(layer.select(x)[0], F.keep_per_batch(layer.scores(x).detach(), x.coords[:, 0], 0.5))
    with pytest.raises(ValueError, match="the input's feats have 3 channels but in_channels is 4"):
        ps.nn.VoxelPrune(0.5, "learned", in_channels=4).double().scores(make(c=3))


def test_an_in_channels_that_is_no_channel_count_is_refused_for_magnitude_too():
    """score='magnitude' ignores in_channels, and took any value for it
    (-2, 'x', 2.5, True) without a word; a count (or None) is still taken."""
    for bad, error in ((-2, ValueError), (0, ValueError), ("x", TypeError), (2.5, TypeError), (True, TypeError)):
        for make_layer in (ps.nn.VoxelPrune, lambda *a: ps.nn.VoxelSkip(ps.nn.ReLU(), *a)):
            with pytest.raises(error, match="in_channels must be a positive int"):
                make_layer(0.5, "magnitude", bad)
    assert ps.nn.VoxelPrune(0.5, "magnitude", 3).scorer is None and ps.nn.VoxelPrune(0.5, "magnitude", None)


def test_keep_per_batch_refuses_scores_and_batch_ids_of_the_wrong_dtype():
    """bool or complex scores reached torch's kthvalue ('not implemented for
    Bool'), and float batch ids were taken (0.5 made an item of its own):
    both are TypeErrors naming the argument; int and float scores, int32 and
    int64 batch ids are taken."""
    batch = torch.zeros(4, dtype=torch.int64)
    for scores in (torch.tensor([True, False, True, False]), torch.randn(4, dtype=torch.cfloat)):
        with pytest.raises(TypeError, match="scores must be a real-valued"):
            F.keep_per_batch(scores, batch, 0.5)
    with pytest.raises(TypeError, match="batch must be an integer"):
        F.keep_per_batch(torch.randn(4), torch.tensor([0.0, 0.5, 1.0, 1.0]), 0.5)
    assert F.keep_per_batch(torch.tensor([3, 1, 2, 5]), batch.int(), 0.5).tolist() == [0, 3]


def test_a_threshold_is_compared_with_the_scores_exactly():
    """keep_per_batch compared the scores with the threshold rounded to
    their dtype: a bf16 score of 0.2988 passed a threshold of 0.2995 (which
    rounds to 0.2988 in bf16), a float32 1.0 a threshold of 1.00000001. The
    comparison is in float64, so only scores >= the threshold are kept."""
    batch = torch.zeros(2, dtype=torch.int64)
    scores = torch.tensor([0.298828125, 0.30078125], dtype=torch.bfloat16)
    assert F.keep_per_batch(scores, batch, threshold=0.2995).tolist() == [1]
    assert F.keep_per_batch(scores, batch, threshold=0.298828125).tolist() == [0, 1]
    assert F.keep_per_batch(torch.tensor([1.0, 2.0]), batch, threshold=1.00000001).tolist() == [1]
    assert F.keep_per_batch(torch.tensor([3, 1]), batch, threshold=2.5).tolist() == [0]
    x = ps.SparseTensor(scores.view(2, 1), torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.int32))
    assert ps.nn.VoxelPrune(threshold=0.2995)(x).coords[:, 1].tolist() == [1]


@pytest.mark.parametrize("make_layer", [lambda: ps.nn.VoxelPrune(0.5),
                                        lambda: ps.nn.VoxelPrune(0.5, "learned", in_channels=3),
                                        lambda: ps.nn.VoxelSkip(ps.nn.Conv3d(3, 4, 3), 0.5)])
def test_a_compiled_layer_takes_an_empty_cloud(make_layer):
    """torch.compile(dynamic=True) of VoxelPrune / VoxelSkip first called on
    an empty cloud (0 rows: a size torch.compile specialises) failed in
    inductor ('index is out of bounds for dimension with size 0', the kept
    feats' index_select); eager mode gives an empty tensor, and so does the
    compiled layer now, then runs other clouds."""
    torch.manual_seed(0)
    layer = make_layer().eval()
    compiled = torch.compile(layer, dynamic=True, fullgraph=True)
    empty = ps.SparseTensor(torch.zeros(0, 3), torch.zeros(0, 4, dtype=torch.int32))
    with torch.no_grad():
        want, got = layer(empty), compiled(empty)
        assert got.feats.shape == want.feats.shape and len(got.coords) == 0
        x = make(c=3, dtype=torch.float32)
        got, want = compiled(x), layer(x)
        assert torch.equal(got.coords, want.coords)
        torch.testing.assert_close(got.feats, want.feats, rtol=1e-6, atol=1e-6)  # (inductor's own sums)


def _voxelized_two_items(n=300, c=4, seed=0):
    """``(points, batch, x, inverse)``: ``n`` float64 points in two batch items, voxelised at 0.5."""
    g = torch.Generator().manual_seed(seed)
    points = torch.rand(n, 3, generator=g, dtype=torch.float64) * 5
    batch = (torch.arange(n) >= n // 2).long()
    feats = torch.randn(n, c, generator=g, dtype=torch.float64)
    x, inverse = ps.voxelize(points, feats, voxel_size=0.5, batch=batch)
    return points, batch, x, inverse


def _through_kept_rows(y, rows, inverse):
    """The reference of nearest devoxelize on ``y`` (the voxels ``rows`` of the tensor ``inverse`` maps
    into): each point gets its voxel's kept row of ``y.feats``, zeros where its voxel was dropped."""
    where = {int(r): i for i, r in enumerate(rows.tolist())}
    want = torch.zeros(len(inverse), y.num_channels, dtype=y.dtype)
    for p, v in enumerate(inverse.tolist()):
        if v in where:
            want[p] = y.feats[where[v]]
    return want


@pytest.mark.parametrize("between", ["nothing", "conv", "conv, batch norm, relu, add"])
def test_nearest_devoxelize_after_a_stride_1_prune_reads_the_kept_voxels(between):
    """devoxelize(y, inverse) with voxelize's inverse, y pruned at stride 1
    (K of the N voxels kept, the same row order) and maybe convolved on the
    kept coords: read y.feats[inverse] it gave the points other voxels'
    feats, silently wherever inverse.max() < K. The inverse now goes through
    the kept rows: a point of a kept voxel gets that voxel's row, a point of
    a dropped voxel zeros (trilinear's value for a point with no active
    voxel), whatever the inverse's range; differentiable in the feats."""
    points, batch, x, inverse = _voxelized_two_items()
    rows, kept = ps.nn.VoxelPrune(0.5).select(x)
    torch.manual_seed(4)
    conv, norm = ps.nn.Conv3d(4, 3, 3).double(), ps.nn.BatchNorm(3).double()
    y = {"nothing": lambda: kept, "conv": lambda: conv(kept),
         "conv, batch norm, relu, add": lambda: F.add(ps.nn.ReLU()(norm(conv(kept))), conv(kept))}[between]()
    assert torch.equal(y.coords, x.coords[rows]) and 0 < len(y) < len(x)
    assert set(x.coords[rows][:, 0].tolist()) == {0, 1}
    want = _through_kept_rows(y, rows, inverse)
    dropped = ~torch.isin(inverse, rows)
    assert dropped.any() and want[dropped].abs().sum() == 0 and want[~dropped].abs().sum() > 0
    low = inverse < len(y)  # an inverse whose every row is < K: no range check can tell
    assert low.sum() > 10 and not torch.equal(y.feats[inverse[low]], want[low])
    assert torch.equal(ps.devoxelize(y, inverse[low]), want[low])
    assert torch.equal(ps.devoxelize(y, inverse), want)
    assert torch.equal(ps.devoxelize(y, inverse.int()), want)
    feats = y.feats.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda f: ps.devoxelize(y.with_feats(f), inverse[:40]), (feats,))
    with pytest.raises(ValueError, match=rf"inverse holds rows outside \[0, {len(x)}\)"):
        ps.devoxelize(y, torch.tensor([0, len(x)]))


def test_nearest_devoxelize_through_two_prunes_and_a_coarser_one():
    """Two stride-1 prunes compose (the second keeps rows of the first's
    voxels); a stride-2 prune between a downsampling and the transposed conv
    back keeps the stride-1 record: the upsampled tensor is on the first
    prune's voxels and devoxelizes through them."""
    points, batch, x, inverse = _voxelized_two_items(seed=1)
    first, a = ps.nn.VoxelPrune(0.7).select(x)
    second, b = ps.nn.VoxelPrune(0.5).select(a)
    assert torch.equal(ps.devoxelize(b, inverse), _through_kept_rows(b, first[second], inverse))
    torch.manual_seed(5)
    down, up = ps.nn.Conv3d(4, 4, 2, 2).double(), ps.nn.Conv3d(4, 2, 2, 2, transposed=True).double()
    z = up(ps.nn.VoxelPrune(0.5)(down(a)))
    assert torch.equal(z.coords, a.coords)
    assert torch.equal(ps.devoxelize(z, inverse), _through_kept_rows(z, first, inverse))
    none = ps.nn.VoxelPrune(threshold=1e9)(x)  # nothing kept: every point gets zeros
    assert len(none) == 0 and torch.equal(ps.devoxelize(none, inverse), torch.zeros(len(inverse), 4, dtype=x.dtype))


def test_minkunet_with_a_prune_before_its_last_decoder_stage_devoxelizes_through_the_kept_voxels():
    """A MinkUNet whose last (stride-1) decoder stage has a VoxelPrune in
    front of it gives logits on the kept voxels (residual blocks, their
    shortcut and sum, the classifier after); its points get those logits
    and zeros, not other voxels' logits."""
    from pointsparse.models import MinkUNet

    points, batch, x, inverse = _voxelized_two_items(n=400, c=3, seed=3)
    torch.manual_seed(7)
    model = MinkUNet(3, 5, cr=0.25, blocks=1).double().eval()
    prune, seen = ps.nn.VoxelPrune(0.5), []

    def hook(module, args):
        rows, kept = prune.select(args[0])
        seen.append(rows)
        return (kept,)

    model.fuse[3].register_forward_pre_hook(hook)
    with torch.no_grad():
        out = model(x)
    rows, = seen
    assert len(out) == len(rows) < len(x) and torch.equal(out.coords, x.coords[rows])
    with torch.no_grad():
        assert torch.equal(ps.devoxelize(out, inverse), _through_kept_rows(out, rows, inverse))


def test_devoxelize_after_a_coarse_prune_and_trilinear_after_any_are_as_before():
    """A prune at stride 2 then the transposed conv back to stride 1: the
    coords are the voxelised ones again and nearest reads feats[inverse]
    as it always did; trilinear looks the voxels up by their coords, so a
    pruned tensor interpolates as the same voxels without the record."""
    points, batch, x, inverse = _voxelized_two_items(seed=2)
    torch.manual_seed(6)
    down, up = ps.nn.Conv3d(4, 4, 2, 2).double(), ps.nn.Conv3d(4, 3, 2, 2, transposed=True).double()
    z = up(ps.nn.VoxelPrune(0.5)(down(x)))
    assert torch.equal(z.coords, x.coords)
    assert torch.equal(ps.devoxelize(z, inverse), z.feats[inverse])
    y = ps.nn.VoxelPrune(0.5)(x)
    for t in (y, z):
        fresh = ps.SparseTensor(t.feats, t.coords)  # the same voxels, no history
        assert torch.equal(ps.devoxelize(t, points=points, voxel_size=0.5, batch=batch, mode="trilinear"),
                           ps.devoxelize(fresh, points=points, voxel_size=0.5, batch=batch, mode="trilinear"))


def _trained_block(seed=6):
    """A ResidualBlock(4, 6) as a trained model holds it: weights and batch
    norm statistics that are not the initial ones (a few training steps)."""
    from pointsparse.models.minkunet import ResidualBlock

    torch.manual_seed(seed)
    block = ResidualBlock(4, 6).double()
    optimizer = torch.optim.SGD(block.parameters(), lr=0.1)
    for step in range(3):
        x = make(n=300, c=4, extent=9, seed=seed + step)
        optimizer.zero_grad()
        block(x).feats.square().mean().backward()
        optimizer.step()
    return block.eval()


def test_voxel_skip_loads_the_state_dict_of_the_module_it_wraps():
    """Wrapping a trained block's main in VoxelSkip renames its keys
    (main.0.weight -> main.module.0.weight): load_state_dict of the trained
    weights into the wrapped block was refused (missing / unexpected keys).
    The unwrapped keys load strictly (magnitude score: nothing else to
    load), whole models too (the blocks of a MinkUNet, as
    bench/voxel_prune.py wraps them), and the outputs are the wrapped
    trained block's; the wrapped keys load as before."""
    from pointsparse.models import MinkUNet
    from pointsparse.models.minkunet import ResidualBlock

    trained = _trained_block()
    state = trained.state_dict()
    expect = ResidualBlock(4, 6).double().eval()
    expect.load_state_dict(state)
    expect.main = ps.nn.VoxelSkip(expect.main, 0.4)
    block = ResidualBlock(4, 6).double().eval()
    block.main = ps.nn.VoxelSkip(block.main, 0.4)
    result = block.load_state_dict(state, strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    for key, value in expect.state_dict().items():
        assert torch.equal(block.state_dict()[key], value), key
    x = make(n=400, c=4, extent=9, seed=11)
    with torch.no_grad():
        assert torch.equal(block(x).feats, expect(x).feats)
    assert set(state) == set(trained.state_dict())  # the caller's dict is left as it was
    # its own (wrapped) keys, as before
    again = ResidualBlock(4, 6).double().eval()
    again.main = ps.nn.VoxelSkip(again.main, 0.4)
    again.load_state_dict(block.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(again(x).feats, expect(x).feats)
    # a whole model's blocks
    torch.manual_seed(0)
    net = MinkUNet(4, 3, cr=0.25, blocks=1).eval()
    wrapped = MinkUNet(4, 3, cr=0.25, blocks=1).eval()
    for j in (0, 1, 2):
        for block in wrapped.fuse[j]:
            block.main = ps.nn.VoxelSkip(block.main, 0.5)
    wrapped.load_state_dict(net.state_dict(), strict=True)
    assert torch.equal(wrapped.fuse[0][0].main.module[0].weight, net.fuse[0][0].main[0].weight)


def test_voxel_skip_loading_unwrapped_keys_still_reports_what_is_missing_or_unexpected():
    """Strict loading of the unwrapped keys names the tensors truly missing
    (under the wrapped name) and unexpected (as given); a learned score's
    scorer, which the unwrapped block never had, is missing under strict
    loading, and with strict=False listed missing and left as initialised;
    a key given in both forms loads the wrapped one and names the other."""
    from pointsparse.models.minkunet import ResidualBlock

    state = _trained_block().state_dict()

    def wrapped(score="magnitude"):
        block = ResidualBlock(4, 6).double()
        block.main = ps.nn.VoxelSkip(block.main, 0.5, score, 4 if score == "learned" else None)
        return block.double()

    partial = {k: v for k, v in state.items() if k != "main.0.weight"}
    partial["main.7.weight"] = torch.zeros(2, dtype=torch.float64)
    with pytest.raises(RuntimeError) as info:
        wrapped().load_state_dict(partial)
    message = str(info.value)
    assert '"main.module.0.weight"' in message.split("Unexpected")[0] and '"main.7.weight"' in message
    result = wrapped().load_state_dict(partial, strict=False)
    assert result.missing_keys == ["main.module.0.weight"] and result.unexpected_keys == ["main.7.weight"]

    learned = wrapped("learned")
    scorer = learned.main.prune.scorer.weight.detach().clone()
    with pytest.raises(RuntimeError, match='Missing key.*"main.prune.scorer.weight", "main.prune.scorer.bias"'):
        learned.load_state_dict(state)
    result = learned.load_state_dict(state, strict=False)
    assert result.missing_keys == ["main.prune.scorer.weight", "main.prune.scorer.bias"]
    assert result.unexpected_keys == []
    assert torch.equal(learned.main.module[0].weight, state["main.0.weight"])
    assert torch.equal(learned.main.prune.scorer.weight, scorer)

    both = dict(wrapped().state_dict(), **{"main.0.weight": torch.zeros_like(state["main.0.weight"])})
    block = wrapped()
    result = block.load_state_dict(both, strict=False)
    assert result.unexpected_keys == ["main.0.weight"] and result.missing_keys == []
    assert block.main.module[0].weight.abs().sum() > 0


@pytest.mark.parametrize("path", ["core", "torch"])
@pytest.mark.parametrize("kind", ["k2 s2 into it", "k3 s2 into it"])
@pytest.mark.parametrize("share", [0.5, 0.1, 1.0, 0.0])
def test_a_selections_maps_are_the_maps_a_search_over_its_voxels_makes(kind, share, path):
    """A selection's convs took their maps by a fresh search over the kept coords (a downsampling into the
    selected stride with its out coords given: kmap_parents refused them, then a merge search; on the
    north star's model with VoxelPrune(0.5) 4.8 ms of its 53 a call). The maps the input's cache holds onto
    the selected sites are now restricted to the kept ones: equal, pair for pair, to a search's, and the
    search never runs."""
    x = make(n=900, c=3, extent=12, dtype=torch.float32, seed=3)
    k = {"k2 s2 into it": 2, "k3 s2 into it": 3}[kind]
    coarse = ps.nn.Conv3d(3, 3, 2, 2)(x)  # stride 2: the selection's stride
    full = ps.kmap.get_kmap(x, k, 2)  # the map onto every site at stride 2, in the input's cache
    g = torch.Generator().manual_seed(7)
    rows = torch.sort(torch.randperm(len(coarse), generator=g)[:int(share * len(coarse))]).values
    kept = F.select_voxels(coarse, rows)
    calls = []
    real = ps.kmap._build
    try:
        ps.kmap._build = lambda *a, **kw: calls.append(a) or real(*a, **kw)
        with BACKEND[path]():
            got = kept.cache.get_kmap(full.key, lambda: pytest.fail("searched"))
    finally:
        ps.kmap._build = real
    assert not calls
    want = ps.kmap.build(x.coords, k, 2, out_coords=kept.coords)
    assert got.out_coords is kept.coords and (got.num_in, got.num_out) == (want.num_in, want.num_out)
    assert torch.equal(got.sizes, want.sizes) and got.key == full.key
    assert torch.equal(got.in_idx, want.in_idx) and torch.equal(got.out_idx, want.out_idx)


def test_a_unet_with_voxel_prune_gives_the_same_bits_with_its_maps_restricted_and_searched(monkeypatch):
    """MinkUNet with VoxelPrune(0.5) before its three coarse decoder stages (the north star's placement): the
    same output, bit for bit, whether its selections restrict the maps they inherit or every map is searched
    as before; the restricted run makes no map onto given out coords (the searches kmap_parents refused)."""
    from pointsparse.models import MinkUNet, add_voxel_prune

    torch.manual_seed(0)
    model = MinkUNet(4, 5, cr=0.25, blocks=1).eval()
    for j in (0, 1, 2):
        add_voxel_prune(model, f"fuse.{j}", 0.5)
    x = make(n=4000, c=4, extent=40, dtype=torch.float32, seed=9)
    real_build, real_select = ps.kmap._build, F.select_voxels

    def run(derived: bool):
        built = []

        def counted(coords, k, t, d, s, method=None, out_coords=None, trusted=False):
            built.append(out_coords is not None)
            return real_build(coords, k, t, d, s, method, out_coords, trusted)

        def select(*args, **kwargs):
            out = real_select(*args, **kwargs)
            if not derived:
                out.cache.derived.clear()
            return out

        monkeypatch.setattr(ps.kmap, "_build", counted)
        monkeypatch.setattr(F, "select_voxels", select)
        with torch.no_grad():
            out = model(ps.SparseTensor(x.feats, x.coords))
        return out, built

    restricted, built_restricted = run(True)
    searched, built_searched = run(False)
    assert torch.equal(restricted.feats, searched.feats) and torch.equal(restricted.coords, searched.coords)
    assert sum(built_searched) == 3 and sum(built_restricted) == 0
    assert len(built_restricted) == len(built_searched) - 3


def test_the_cores_restriction_checks_its_arguments():
    """_core.kmap_restrict reads out_new at every out_idx: each is checked against its length, and the sizes
    against the pairs, before any work (a ValueError naming the array)."""
    core = ps._ext.core
    i64 = lambda *v: np.array(v, dtype=np.int64)  # noqa: E731
    assert [a.tolist() for a in core.kmap_restrict(i64(0, 1, 2), i64(0, 1, 1), i64(1, 2), i64(-1, 0), 1)] == \
        [[1, 2], [0, 0], [0, 2]]
    for args, message in [((i64(0, 1), i64(0, 2), i64(2), i64(0, 1)), r"out_idx\[1\] = 2 is not a row of out_new's 2"),
                          ((i64(0, 1), i64(-1, 0), i64(2), i64(0, 1)), r"out_idx\[0\] = -1 is not a row"),
                          ((i64(0, 1), i64(0, 1), i64(1), i64(0, 1)), "sizes must sum to the pairs' 2; they sum to 1"),
                          ((i64(0, 1), i64(0, 1), i64(3, -1), i64(0, 1)), "sizes must be >= 0"),
                          ((i64(0, 1), i64(0), i64(2), i64(0, 1)), "out_idx must be 1-D of length 2")]:
        with pytest.raises(ValueError, match=message):
            core.kmap_restrict(*args, 1)


def test_restricted_checks_its_rows_and_coords():
    """KernelMap.restricted read rows as given: unsorted rows made a map whose pairs were not sorted by output
    row (another map than a search's), a repeated row an output row with no pairs, a row past the outputs
    torch's bare IndexError (a device assert on a GPU), floats were truncated; out_coords were not looked at.
    Each is now a TypeError / ValueError naming the argument."""
    x = make(n=400, c=3, extent=10, dtype=torch.float32, seed=5)
    m = ps.kmap.get_kmap(x, 2, 2)
    coarse = m.out_coords
    rows = torch.tensor([0, 2, 3])
    assert m.restricted(rows, coarse[rows]).num_out == 3
    assert m.restricted(rows.int(), coarse[rows]).num_out == 3
    for bad, error, match in [(torch.tensor([3, 1]), ValueError, "increasing output rows"),
                              (torch.tensor([1, 1]), ValueError, "increasing output rows"),
                              (torch.tensor([m.num_out]), ValueError, rf"in \[0, {m.num_out}\)"),
                              (torch.tensor([-1]), ValueError, "increasing output rows"),
                              (torch.tensor([0.0, 1.0]), TypeError, "rows must be a 1-D int64"),
                              ([0, 1], TypeError, "rows must be a 1-D int64")]:
        with pytest.raises(error, match=match):
            m.restricted(bad, coarse[:len(bad)])
    with pytest.raises(ValueError, match="out_coords must be the 3 kept rows' coords"):
        m.restricted(rows, coarse[:2])
    with pytest.raises(TypeError, match="out_coords must be int32"):
        m.restricted(rows, coarse[rows].long())


def test_restricted_refuses_out_coords_that_are_not_the_kept_rows_coords():
    """KernelMap.restricted(rows, out_coords) took any int32 coords of the right row count and labelled the
    restricted map's outputs with them (the coords of other rows, or none of the map's), so a conv through it
    put each output at another site without a word. They are checked against the map's own coords of those rows
    now (a ValueError naming the first that differs); select_voxels' own restrictions skip it (trusted)."""
    x = make(n=400, c=3, extent=10, dtype=torch.float32, seed=5)
    m = ps.kmap.get_kmap(x, 2, 2)
    coarse = m.out_coords
    rows = torch.tensor([0, 2, 3])
    for bad, first in ((coarse[[0, 3, 2]], (1, 2)), (coarse[[1, 2, 3]], (0, 0)), (coarse[rows] + 2, (0, 0))):
        with pytest.raises(ValueError, match=rf"out_coords must be the map's coords of the kept rows: row {first[0]} "
                                             rf"\(output row {first[1]}\) is \[.*\], not \["):
            m.restricted(rows, bad)
    assert m.restricted(rows, coarse[[0, 3, 2]], trusted=True).num_out == 3  # (unchecked: the library's own)


@pytest.mark.parametrize("path", ["core", "torch"])
@pytest.mark.parametrize("used", ["unused by the first selection", "used by the first selection"])
def test_a_selection_of_a_selection_restricts_the_maps_of_the_first(used, path):
    """Two selections in a row at one stride (two VoxelPrunes, a prune of a pruned tensor): the second restricted
    only the maps the first cache held, not those the first selection had still to restrict (made when a conv
    first asks), so a transposed conv back up from the second searched them again. The second selection now
    restricts the source maps through both selections' rows: the maps a search over its voxels makes, no search,
    and a U-Net step through it gives the searched run's values."""
    x = make(n=900, c=3, extent=12, dtype=torch.float64, seed=4)
    torch.manual_seed(2)
    down3 = ps.nn.Conv3d(3, 4, 3, 2).double()
    coarse = down3(x)
    ps.kmap.get_kmap(x, 2, 2)  # a second map onto the stride-2 sites (a k2 s2), held by x's cache too
    g = torch.Generator().manual_seed(5)
    first = F.select_voxels(coarse, torch.sort(torch.randperm(len(coarse), generator=g)[:len(coarse) * 2 // 3]).values)
    if used == "used by the first selection":
        for k in (2, 3):
            first.cache.get_kmap(ps.kmap.get_kmap(x, k, 2).key, lambda: pytest.fail("searched"))
    second = F.select_voxels(first, torch.sort(torch.randperm(len(first), generator=g)[:len(first) // 2]).values)
    third = F.select_voxels(second, torch.arange(0, len(second), 3))
    calls = []
    real = ps.kmap._build
    try:
        ps.kmap._build = lambda *a, **kw: calls.append(a) or real(*a, **kw)
        with BACKEND[path]():
            got = {(k, s): s.cache.get_kmap(ps.kmap.get_kmap(x, k, 2).key, lambda: pytest.fail("searched"))
                   for k in (2, 3) for s in (second, third)}
            up = ps.nn.Conv3d(4, 3, 3, 2, transposed=True).double()
            y = up(third)  # (on the k3 s2 map just restricted, now held by third's cache)
    finally:
        ps.kmap._build = real
    assert not calls
    for (k, s), m in got.items():
        want = ps.kmap.build(x.coords, k, 2, out_coords=s.coords)
        assert m.out_coords is s.coords and (m.num_in, m.num_out) == (want.num_in, want.num_out)
        assert torch.equal(m.sizes, want.sizes) and torch.equal(m.in_idx, want.in_idx)
        assert torch.equal(m.out_idx, want.out_idx)
    assert torch.equal(y.coords, x.coords)
    fresh = ps.SparseTensor(third.feats, third.coords, 2)
    fresh.cache.set_coords((1, 1, 1), x.coords)  # the fine coords only: its map searched
    with BACKEND[path]():
        assert torch.equal(y.feats, up(fresh).feats)
    torch.testing.assert_close(y.feats, dense_conv_transpose(third, up.weight.detach(), x.coords, 3), rtol=1e-10,
                               atol=1e-10)


@pytest.mark.parametrize("alias", [False, True])
def test_a_selection_of_coords_changed_in_place_is_refused(alias):
    """select_voxels (a VoxelPrune) on a tensor whose coords were changed in
    place after its cache built the downsampling map onto them restricted
    that stale map for the transposed conv back up: the conv ran on the old
    sites silently, where the conv on the tensor itself refused. Now the
    selection refuses them too; on coords given with ``cache=`` equal to the
    cache's own (another tensor), the selection restricts the cache's maps
    as on its own coords, and matches the dense transposed conv."""
    coords = random_coords(200, extent=10, batch=1)
    x = ps.SparseTensor(torch.randn(len(coords), 2, dtype=torch.float64), coords)
    down = ps.nn.Conv3d(2, 2, 2, stride=2).double()
    up = ps.nn.Conv3d(2, 3, 2, stride=2, transposed=True).double()
    with torch.no_grad():
        y = down(x)
        if alias:
            y = ps.SparseTensor(y.feats, y.coords.clone(), 2, cache=y.cache)
        rows = torch.arange(0, len(y), 2)
        kept = F.select_voxels(y, rows)
        assert len(kept.cache.derived) == 1  # the downsampling map, to restrict
        torch.testing.assert_close(up(kept).feats, dense_conv_transpose(kept, up.weight, coords))
        y.coords[:, 1] = 18 - y.coords[:, 1]  # in place: still multiples of 2, unique
        with pytest.raises(ValueError, match="changed in place"):
            F.select_voxels(y, rows)


def test_dense_of_a_selection_that_emptied_the_last_item_keeps_its_batch_items():
    """A VoxelPrune by threshold that drops every voxel of the last batch
    item: ``dense()`` (and ``batch_size``) of its output, and of the layers
    after it, count the input's batch items as the global poolings do (the
    emptied item a slab of zeros). They counted the items left in the
    output's own coords and gave B - 1 slabs, no longer lining up with the
    input's items (the labels) while the poolings gave B rows."""
    coords = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0], [0, 2, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.int32)
    feats = torch.tensor([[3.0, 0.0], [2.0, 0.0], [5.0, 0.0], [0.1, 0.0], [0.2, 0.0]])
    x = ps.SparseTensor(feats, coords)
    out = ps.nn.VoxelPrune(threshold=1.0)(x)
    assert out.coords[:, 0].tolist() == [0, 0, 0]  # (every voxel of item 1 dropped)
    torch.manual_seed(0)
    for t in (out, ps.nn.Conv3d(2, 2, 3)(out), ps.nn.Conv3d(2, 2, 2, stride=2)(out)):
        assert t.batch_size == 2 and F.global_avg_pool(t).shape[0] == 2
        dense = t.dense()
        assert dense.shape[0] == 2 and not dense[1].any()
        assert torch.equal(dense[:1], ps.SparseTensor(t.feats, t.coords, t.stride).dense())
        assert t.dense((4, 4, 4)).shape == (2, 2, 4, 4, 4)
    nothing = ps.nn.VoxelPrune(threshold=1e9)(x)
    assert nothing.batch_size == 2 and nothing.dense().shape == (2, 2, 0, 0, 0)


def test_a_keep_rule_past_the_float_range_is_a_value_error_naming_it():
    """An int keep_ratio or threshold too large for a float (10**400) raised
    Python's bare OverflowError ("int too large to convert to float") from
    VoxelPrune, add_voxel_prune and keep_per_batch, naming no argument: a
    ValueError naming it, as any other out-of-range keep rule."""
    from pointsparse.models import MinkUNet, add_voxel_prune

    huge = 10**400
    with pytest.raises(ValueError, match="keep_ratio"):
        ps.nn.VoxelPrune(huge)
    with pytest.raises(ValueError, match="threshold"):
        ps.nn.VoxelPrune(0.5, threshold=-huge)
    with pytest.raises(ValueError, match="threshold"):
        add_voxel_prune(MinkUNet(4, 3, cr=0.25, blocks=1), "fuse.1", threshold=huge)
    scores, batch = torch.rand(10), torch.zeros(10, dtype=torch.int64)
    with pytest.raises(ValueError, match="keep_ratio"):
        F.keep_per_batch(scores, batch, huge)
    with pytest.raises(ValueError, match="threshold"):
        F.keep_per_batch(scores, batch, threshold=huge)


def test_settings_changed_after_construction_take_effect_or_are_refused():
    """VoxelPrune.score set to "learned" after construction kept ranking by
    magnitude silently (the scorer, made only by the constructor, decides),
    and keep_ratio / threshold took any value until a forward refused it. A
    score other than the layer's is a ValueError now (a learned score is its
    trained scorer, Linear(in_channels, 1): build a new VoxelPrune), and
    keep_ratio and threshold are checked when set and take effect."""
    x = make()
    layer = ps.nn.VoxelPrune(0.5)
    layer.score = "magnitude"  # (what it is: nothing changes)
    for bad in ("learned", "Learned", 5):
        with pytest.raises(ValueError, match="score"):
            layer.score = bad
        assert layer.score == "magnitude" and layer.scorer is None
    learned = ps.nn.VoxelPrune(0.5, "learned", in_channels=4)
    with pytest.raises(ValueError, match="score cannot change from 'learned' to 'magnitude'"):
        learned.score = "magnitude"
    assert learned.score == "learned" and learned.scorer is not None
    layer.keep_ratio = np.float32(0.25)
    assert type(layer.keep_ratio) is float and layer.select(x)[0].tolist() == brute_keep(x, 0.25)
    for bad, error in ((0, ValueError), (1.5, ValueError), (float("nan"), ValueError), ("0.5", TypeError),
                       (True, TypeError)):
        with pytest.raises(error, match="keep_ratio must be a number in"):
            layer.keep_ratio = bad
    assert layer.keep_ratio == 0.25
    layer.threshold = 1.0
    rows = layer.select(x)[0]
    assert rows.tolist() == (x.feats.norm(dim=1) >= 1.0).nonzero().flatten().tolist()
    with pytest.raises(TypeError, match="threshold must be a number or None"):
        layer.threshold = "1"
    with pytest.raises(ValueError, match="threshold must be a finite number"):
        layer.threshold = float("inf")
    assert layer.threshold == 1.0
    layer.threshold = None
    assert layer.select(x)[0].tolist() == brute_keep(x, 0.25)
    copied = pickle.loads(pickle.dumps(learned))
    assert (copied.keep_ratio, copied.threshold, copied.score) == (0.5, None, "learned")
    # a layer pickled when the settings were plain attributes (under their public names)
    legacy = {k.lstrip("_") if k in ("_keep_ratio", "_threshold") else k: v for k, v in vars(layer).items()}
    old = ps.nn.VoxelPrune.__new__(ps.nn.VoxelPrune)
    old.__setstate__({**legacy, "score": "magnitude"})
    assert (old.keep_ratio, old.threshold, old.score) == (0.25, None, "magnitude")
    assert old.select(x)[0].tolist() == brute_keep(x, 0.25)


def test_voxel_skip_settings_are_its_voxel_prunes():
    """VoxelSkip takes keep_ratio, score and threshold for its VoxelPrune
    (``prune``), but setting them on the VoxelSkip afterwards made a plain
    attribute that nothing read: the skip kept half its voxels whatever
    ``skip.keep_ratio`` said. They are the VoxelPrune's now, read and set
    (and checked) through the VoxelSkip."""
    x = make()
    class Same(torch.nn.Module):
        def forward(self, t):
            return t

    skip = ps.nn.VoxelSkip(Same(), keep_ratio=0.5)
    assert (skip.keep_ratio, skip.threshold, skip.score) == (0.5, None, "magnitude")
    skip.keep_ratio = 0.25
    assert skip.prune.keep_ratio == 0.25 and skip.prune.select(x)[0].tolist() == brute_keep(x, 0.25)
    kept = (skip(x).feats != 0).any(1).sum().item()
    assert kept == len(brute_keep(x, 0.25))
    skip.threshold = 1.0
    assert skip.prune.threshold == 1.0
    skip.threshold = None
    with pytest.raises(ValueError, match="keep_ratio must be a number in"):
        skip.keep_ratio = 1.5
    with pytest.raises(ValueError, match="score cannot change"):
        skip.score = "learned"
    assert (skip.keep_ratio, skip.score) == (0.25, "magnitude")
    assert "keep_ratio" not in vars(skip) and "threshold" not in vars(skip)


@pytest.mark.parametrize("score", ["magnitude", "learned"])
@pytest.mark.parametrize("rows", [0, 5])
def test_the_kept_feats_never_alias_the_inputs(score, rows):
    """By magnitude, a VoxelPrune given an empty cloud returned a view of the
    input's feats (``feats[:0]``) where every other input gets a copy of
    the kept rows: an in-place layer after it (a VoxelSkip's branch
    starting with ``ReLU(inplace=True)``) then failed on an input whose
    feats are a leaf requiring grad ('a view of a leaf Variable that
    requires grad is being used in an in-place operation'). The kept feats
    are now a tensor of their own for every input, empty or not, and the
    gradient reaches the input."""
    torch.manual_seed(0)
    feats = torch.randn(rows, 4, dtype=torch.float64, requires_grad=True)
    coords = torch.tensor([[0, i, 0, 0] for i in range(rows)], dtype=torch.int32).reshape(rows, 4)
    x = ps.SparseTensor(feats, coords)
    width = 4 if score == "learned" else None
    out = ps.nn.VoxelPrune(1.0, score, width).double()(x)
    assert out.feats._base is None and (rows == 0 or out.feats.data_ptr() != feats.data_ptr())
    branch = torch.nn.Sequential(ps.nn.ReLU(inplace=True), ps.nn.Conv3d(4, 4, 3)).double()
    y = ps.nn.VoxelSkip(branch, 1.0, score, width).double()(x)
    assert y.feats.shape == (rows, 4)
    y.feats.sum().backward()
    assert feats.grad is not None and feats.grad.shape == feats.shape


def test_a_learned_score_is_made_on_the_device_and_in_the_dtype_given():
    """VoxelPrune and VoxelSkip took no ``device`` / ``dtype`` (torch's factory kwargs): a learned score's
    scorer, Linear(in_channels, 1), was made in float32 on the default device whatever the model's, and
    ``torch.nn.utils.skip_init`` could not build them. Keyword-only now, checked as Conv3d's; the float64
    scorer scores as the float32 one converted does."""
    x = make()
    torch.manual_seed(0)
    layer = ps.nn.VoxelPrune(0.5, "learned", 4, dtype=torch.float64)
    assert layer.scorer.weight.dtype == layer.scorer.bias.dtype == torch.float64
    out = layer(x)
    score = layer.scorer(x.feats).squeeze(1).detach()
    rows = F.keep_per_batch(score, x.coords[:, 0], 0.5)
    assert torch.equal(out.coords, x.coords[rows])
    torch.testing.assert_close(out.feats, x.feats[rows] * torch.sigmoid(score[rows]).unsqueeze(1))
    meta = ps.nn.VoxelPrune(0.5, "learned", 4, device="meta")
    assert meta.scorer.weight.is_meta
    skipped = torch.nn.utils.skip_init(ps.nn.VoxelPrune, 0.5, "learned", 4)
    assert skipped.scorer.weight.device == torch.device("cpu") and skipped.scorer.weight.shape == (1, 4)
    conv = ps.nn.Conv3d(4, 4, 3, dtype=torch.float64)
    skip = ps.nn.VoxelSkip(conv, 0.5, "learned", 4, dtype=torch.float64, device="cpu")
    assert skip.prune.scorer.weight.dtype == torch.float64 and skip(x).feats.shape == (len(x), 4)
    for score in ("learned", "magnitude"):
        with pytest.raises(TypeError, match="dtype must be None or a floating torch.dtype"):
            ps.nn.VoxelPrune(0.5, score, 4, dtype=torch.int64)
        with pytest.raises(ValueError, match="device must be None, a torch.device or a device string"):
            ps.nn.VoxelSkip(conv, 0.5, score, 4, device="nonsense")


def test_voxel_skip_on_meta_refuses_a_wrapped_module_with_values():
    """``torch.nn.utils.skip_init(VoxelSkip, conv, ...)`` builds the layer
    with ``device="meta"`` and calls ``to_empty``, which replaced the
    weights of ``conv``, the caller's module built before, with
    uninitialised memory, saying nothing. ``device="meta"`` around a module
    that holds real tensors is a ValueError naming one now; around a meta
    module (``device="meta"`` given to both) and under ``with
    torch.device("meta")`` (a whole model built there) it builds as
    before, and skip_init of a VoxelSkip of a module without tensors
    keeps working."""
    torch.manual_seed(0)
    conv = ps.nn.Conv3d(4, 4, 3)
    before = conv.weight.detach().clone()
    for build in (lambda: torch.nn.utils.skip_init(ps.nn.VoxelSkip, conv, 0.5, "learned", 4),
                  lambda: ps.nn.VoxelSkip(conv, 0.5, device="meta"),
                  lambda: ps.nn.VoxelSkip(torch.nn.Sequential(conv), 0.5, device=torch.device("meta"))):
        with pytest.raises(ValueError, match=r"device='meta'.*module holds .*weight.* on cpu"):
            build()
    assert torch.equal(conv.weight, before)
    skip = ps.nn.VoxelSkip(ps.nn.Conv3d(4, 4, 3, device="meta"), 0.5, "learned", 4, device="meta")
    assert skip.module.weight.is_meta and skip.prune.scorer.weight.is_meta
    with torch.device("meta"):
        skip = ps.nn.VoxelSkip(ps.nn.Conv3d(4, 4, 3), 0.5, "learned", 4)
    assert skip.module.weight.is_meta and skip.prune.scorer.weight.is_meta
    skipped = torch.nn.utils.skip_init(ps.nn.VoxelSkip, torch.nn.Identity(), 0.5, "learned", 4)
    assert skipped.prune.scorer.weight.device == torch.device("cpu")



def test_a_voxel_prunes_repr_shows_the_keep_ratio_a_threshold_leaves_unused():
    """A review: VoxelPrune(0.25, threshold=0.0) printed as
    VoxelPrune(threshold=0.0, score='magnitude'), its keep_ratio of 0.25
    hidden though kept (and recorded by voxel_prunes)."""
    assert repr(ps.nn.VoxelPrune(0.25, threshold=0.0)) == \
        "VoxelPrune(threshold=0.0 (keep_ratio=0.25 unused), score='magnitude')"
    assert repr(ps.nn.VoxelPrune(0.25)) == "VoxelPrune(keep_ratio=0.25, score='magnitude')"


@pytest.mark.parametrize("model", ["minkunet", "spvcnn"])
def test_add_voxel_prune_refuses_a_module_whose_pruned_output_meets_unpruned_sites(model):
    """add_voxel_prune took a module inside a ResidualBlock's main or shortcut, a MinkUNet's strided stage
    (its input is the decoder's skip too) and an up stage past its transposed conv (its output meets the skip
    in the cat): every forward then failed in the block's sum or the cat. They are refused when added, naming
    where to prune instead; every module of the model add_voxel_prune takes runs its forward (MinkUNet: the
    pruned input meets no other sites; SPVCNN's point branch may still find a point's voxel pruned)."""
    from pointsparse.models import MinkUNet, SPVCNN, add_voxel_prune

    make_net = (lambda: MinkUNet(4, 3, cr=0.125, blocks=1).eval()) if model == "minkunet" else \
        (lambda: SPVCNN(4, 3, cr=0.125, blocks=1).eval())
    pre = "" if model == "minkunet" else "unet."
    for name, match in ((f"{pre}fuse.1.0.main.0", r"inside the main of the ResidualBlock '" + pre +
                         r"fuse\.1\.0'.*prune the input of '" + pre + r"fuse\.1\.0' itself"),
                        (f"{pre}down.0.1.shortcut", r"inside the shortcut of the ResidualBlock"),
                        (f"{pre}down.2", r"decoder's skip"), (f"{pre}down.2.0", r"decoder's skip"),
                        (f"{pre}down.2.0.0", r"decoder's skip"),
                        (f"{pre}up.1.1", r"transposed conv '?" + pre + r"up\.1\.0"), (f"{pre}up.3.2", r"cat")):
        net = make_net()
        with pytest.raises(ValueError, match=rf"module_name '{re.escape(name)}' is .*{match}"):
            add_voxel_prune(net, name, 0.5)
        assert not hasattr(net, "voxel_prune")  # nothing registered
    if model == "spvcnn":
        return

    class Wrapper(torch.nn.Module):  # (a MinkUNet a user's model holds: the same rules under its name)
        def __init__(self):
            super().__init__()
            self.backbone = make_net()

        def forward(self, x):
            return self.backbone(x)

    with pytest.raises(ValueError, match=r"module_name 'backbone\.down\.1\.0' is .*prune the input of "
                                         r"backbone\.down\.1\.1"):
        add_voxel_prune(Wrapper(), "backbone.down.1.0", 0.5)
    from pointsparse.models import ResidualBlock  # (a model that is a ResidualBlock: its own main too)
    with pytest.raises(ValueError, match=r"module_name 'main\.0' is inside the main of the ResidualBlock the model "
                                         r"is.*prune the model's input"):
        add_voxel_prune(ResidualBlock(3, 3), "main.0", 0.5)
    coords = random_coords(600, 12, seed=4)
    x = ps.SparseTensor(torch.randn(len(coords), 4), coords)
    refused = 0
    for name, _ in make_net().named_modules():
        net = make_net()
        try:
            add_voxel_prune(net, name, 0.5)
        except ValueError:
            refused += 1
            continue
        with torch.no_grad():
            assert net(x).feats.shape[1] == 3, name
    assert refused > 0
