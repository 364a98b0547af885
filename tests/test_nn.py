"""nn modules over SparseTensor: normalisation, activations, pooling, global
pooling, cat/add, and composition in torch.nn.Sequential."""

from __future__ import annotations

import pytest
import torch

import pointsparse as ps
from pointsparse import nn as spnn
from pointsparse.nn import functional as F
from reference import brute_global, brute_pool, random_coords


def make(n=200, c=4, extent=7, stride=1, dtype=torch.float64, seed=0):
    coords = random_coords(n, extent, stride=stride, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    return ps.SparseTensor(torch.randn(len(coords), c, generator=g, dtype=dtype), coords, stride)


@pytest.mark.parametrize("module,fn", [
    (spnn.ReLU(), torch.relu), (spnn.LeakyReLU(0.2), lambda t: torch.nn.functional.leaky_relu(t, 0.2)),
    (spnn.GELU(), torch.nn.functional.gelu), (spnn.SiLU(), torch.nn.functional.silu), (spnn.Sigmoid(), torch.sigmoid),
    (spnn.Tanh(), torch.tanh), (spnn.ELU(), torch.nn.functional.elu),
])
def test_pointwise(module, fn):
    x = make()
    y = module(x)
    assert torch.equal(y.feats, fn(x.feats)) and y.coords is x.coords and y.cache is x.cache


def test_dropout_train_and_eval():
    x = make(n=400)
    drop = spnn.Dropout(0.5)
    assert torch.equal(drop.eval()(x).feats, x.feats)
    y = drop.train()(x).feats
    kept = y != 0
    torch.testing.assert_close(y[kept], 2 * x.feats[kept])
    assert 0.3 < kept.double().mean() < 0.7


def test_batchnorm_over_feats():
    x = make(n=300, c=5)
    bn = spnn.BatchNorm(5).double()
    y = bn(x).feats
    ref = (x.feats - x.feats.mean(0)) / torch.sqrt(x.feats.var(0, unbiased=False) + bn.eps)
    torch.testing.assert_close(y, ref)
    bn.eval()
    torch.testing.assert_close(bn(x).feats, torch.nn.functional.batch_norm(
        x.feats, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps))


def test_batchnorm_in_training_on_one_site_says_so():
    """A batch norm that normalises with the batch's statistics (training
    mode, or no running statistics) given one site: a ValueError naming the
    layer, the site count and its stride (a small cloud at a large voxel size
    thins out to one voxel at a U-Net's coarsest stride), not torch's
    'Expected more than 1 value per channel when training'. Eval mode, and
    two sites or none in training, run as before."""
    one = ps.SparseTensor(torch.randn(1, 4), torch.tensor([[0, 0, 0, 0]], dtype=torch.int32), 16)
    for bn in (spnn.BatchNorm(4).train(), spnn.BatchNorm(4, track_running_stats=False).eval()):
        with pytest.raises(spnn.BatchStatisticsError, match=r"BatchNorm\(4\).* 1 site at stride \(16, 16, 16\)"):
            bn(one)
        assert issubclass(spnn.BatchStatisticsError, ValueError)
    assert spnn.BatchNorm(4).eval()(one).feats.shape == (1, 4)
    assert spnn.BatchNorm(4).train()(make(n=2, c=4, dtype=torch.float32)).feats.shape == (2, 4)
    empty = ps.SparseTensor(torch.zeros(0, 4), torch.zeros(0, 4, dtype=torch.int32))
    assert spnn.BatchNorm(4).train()(empty).feats.shape == (0, 4)


@pytest.mark.parametrize("k,t,s", [(2, 2, 1), (3, 2, 1), (2, 2, 2), (3, 1, 1), (3, 3, 1)])
@pytest.mark.parametrize("reduce", ["max", "avg"])
def test_pooling_equals_brute_force(k, t, s, reduce):
    x = make(stride=s)
    pool = spnn.MaxPool3d(k, t) if reduce == "max" else spnn.AvgPool3d(k, t)
    y = pool(x)
    assert y.stride == (s * t,) * 3
    if t > 1:
        assert len(y) == len(F.conv3d(x, torch.zeros(k**3, 4, 1, dtype=torch.float64), k, t))
    torch.testing.assert_close(y.feats, brute_pool(x, y.coords, k, t, reduce[:3] if reduce == "max" else "mean"))


def test_pool_stride_defaults_to_kernel_and_grad_flows():
    x = make()
    pool = spnn.MaxPool3d(2)
    assert pool.stride == (2, 2, 2)
    feats = x.feats.clone().requires_grad_()
    y = spnn.AvgPool3d(2)(x.with_feats(feats))
    y.feats.sum().backward()
    # every input lands in exactly one window: its gradient is 1 / window count
    assert torch.all(feats.grad > 0) and torch.all(feats.grad <= 1)
    assert torch.autograd.gradcheck(lambda f: F.avg_pool3d(x.with_feats(f), 2).feats, (feats,))


@pytest.mark.parametrize("reduce", ["max", "avg"])
def test_pooling_gradient_is_the_same_in_every_run(reduce):
    """A pooling whose windows overlap (k3 s1: each input in up to 27
    windows) summed each input's gradients through the backward of
    feats[in_idx] (float atomics on the CPU's threads): two runs of one
    backward differed in the last bits (up to 1e-6 on 40k voxels, 32
    channels), so training was not reproducible. They are summed in a fixed
    order now, as the convs' and devoxelize's are."""
    coords = random_coords(40000, 40, batch=3, seed=3)
    g = torch.Generator().manual_seed(4)
    feats = torch.randn(len(coords), 32, generator=g)
    x = ps.SparseTensor(feats, coords)
    pool = F.max_pool3d if reduce == "max" else F.avg_pool3d
    grad_out = None
    grads = []
    with torch.autograd.set_grad_enabled(True):
        old = torch.get_num_threads()
        torch.set_num_threads(max(old, 2))  # (the atomics race on two threads or more)
        try:
            for _ in range(6):
                f = feats.clone().requires_grad_()
                y = pool(x.with_feats(f), 3, 1)
                if grad_out is None:
                    grad_out = torch.randn(y.feats.shape, generator=g)
                (y.feats * grad_out).sum().backward()
                grads.append(f.grad)
        finally:
            torch.set_num_threads(old)
    assert all(torch.equal(grads[0], other) for other in grads[1:])


@pytest.mark.parametrize("pool", [lambda x: spnn.MaxPool3d(2)(x).feats, lambda x: spnn.MaxPool3d(3, 1)(x).feats,
                                  lambda x: spnn.GlobalMaxPool()(x)], ids=["k2s2", "k3s1", "global"])
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_in_place_op_after_max_pooling_keeps_the_gradient(pool, backend):
    """``MaxPool3d -> ReLU(inplace=True)`` (or ``y.feats += b``, an in-place
    Dropout) failed in backward with autograd's "one of the variables needed
    for gradient computation has been modified by an inplace operation": the
    max's backward read the output it returned. torch's max_pool3d takes
    the same; now the gradients are those of the out-of-place ReLU."""
    x = make(n=300, c=3)
    grads = []
    with ps.backend(backend):
        for inplace in (False, True):
            feats = x.feats.clone().requires_grad_()
            y = pool(x.with_feats(feats * 1.0))
            y = y.relu_() if inplace else y.relu()
            (y * torch.arange(y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
            grads.append(feats.grad)
    assert torch.equal(grads[0], grads[1]) and grads[0].abs().sum() > 0


@pytest.mark.parametrize("reduce", ["max", "avg"])
def test_global_pooling(reduce):
    x = make(n=300, c=3)
    # drop batch item 0 entirely? keep ragged batches: item 1 only a few sites
    keep = (x.coords[:, 0] == 0) | (torch.arange(len(x)) % 7 == 0)
    x = ps.SparseTensor(x.feats[keep], x.coords[keep])
    module = spnn.GlobalMaxPool() if reduce == "max" else spnn.GlobalAvgPool()
    out = module(x)
    assert out.shape == (2, 3)
    torch.testing.assert_close(out, brute_global(x, "max" if reduce == "max" else "mean"))
    fn = F.global_max_pool if reduce == "max" else F.global_avg_pool
    torch.testing.assert_close(fn(x), out)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_average_poolings_round_once(dtype):
    """fp16 / bf16 average poolings: the sum and the count in float32, the
    mean rounded once to the feats' dtype, as torch.mean gives it. The count
    was taken in the feats' dtype: past 65504 sites (a LiDAR scan's voxels)
    fp16 made it inf and global_avg_pool gave 0 for a mean of 0.55; bf16
    rounded it (70000 -> 70144) and the sum, about a whole bf16 ulp off."""
    n = 70000
    grid = torch.stack(torch.meshgrid(torch.arange(50), torch.arange(50), torch.arange(28), indexing="ij"), -1)
    coords = torch.cat([torch.zeros(n, 1, dtype=torch.int32), grid.reshape(-1, 3)[:n].int()], 1)
    feats = (torch.rand(n, 3, generator=torch.Generator().manual_seed(0)) * 0.1 + 0.5).to(dtype)
    x = ps.SparseTensor(feats, coords)
    out = F.global_avg_pool(x)
    assert out.dtype == dtype and torch.equal(out, feats.double().mean(0, keepdim=True).to(dtype))
    pooled = F.avg_pool3d(x, 2)
    want = F.avg_pool3d(x.with_feats(feats.double()), 2).feats.to(dtype)
    assert pooled.feats.dtype == dtype and torch.equal(pooled.feats, want)


def test_global_pooling_empty_batch_item_is_zero():
    coords = torch.tensor([[0, 0, 0, 0], [2, 1, 1, 1]], dtype=torch.int32)
    x = ps.SparseTensor(torch.tensor([[1.0], [-3.0]]), coords)
    assert F.global_avg_pool(x).tolist() == [[1.0], [0.0], [-3.0]]
    assert F.global_max_pool(x).tolist() == [[1.0], [0.0], [-3.0]]


@pytest.mark.parametrize("pool", [spnn.GlobalMaxPool(), spnn.GlobalAvgPool(), spnn.MaxPool3d(2), spnn.AvgPool3d(2)])
def test_pooling_of_no_sites_is_linked_to_the_feats(pool):
    """An input with no sites: the output is linked to feats that need a
    gradient (a zero one), as every other op's is. GlobalMaxPool's was a
    fresh tensor, and backward of a loss on it alone raised "element 0 of
    tensors does not require grad and does not have a grad_fn"."""
    feats = torch.zeros(0, 3, requires_grad=True)
    out = pool(ps.SparseTensor(feats, torch.zeros(0, 4, dtype=torch.int32)))
    out = out if isinstance(out, torch.Tensor) else out.feats
    assert out.requires_grad
    out.sum().backward()
    assert feats.grad is not None and feats.grad.shape == (0, 3)


@pytest.mark.parametrize("emptied", [2, 1])
def test_global_pooling_keeps_the_row_of_an_item_a_selection_emptied(emptied):
    """A VoxelPrune (or select_voxels) that drops every voxel of one batch item: the pooled rows are still one
    per item of the network's input, the emptied item's row 0 as for an item with no sites. An emptied last
    item gave (B - 1, C) rows: a classifier's logits stopped lining up with its labels (a middle one gave its
    zero row: no shift). Also at stride 2, after a selection of a selection, and for the pooling of a tensor
    on the kept coords (a conv after the VoxelPrune)."""
    coords = torch.tensor([[b, x, y, 0] for b in range(3) for x in range(3) for y in range(2)], dtype=torch.int32)
    item = coords[:, 0].long()
    feats = torch.where(item == emptied, 0.01, 1.0 + item.double()).unsqueeze(1) * torch.tensor([1.0, -2.0],
                                                                                               dtype=torch.float64)
    x = ps.SparseTensor(feats, coords)
    kept = spnn.VoxelPrune(threshold=0.5)(x)
    down = spnn.Conv3d(2, 2, 2, stride=2).double()(x)
    first = F.select_voxels(x, torch.arange(len(x) - 1))  # (all but the last voxel)
    twice = F.select_voxels(first, (first.coords[:, 0] != emptied).nonzero()[:, 0])
    for pruned in (kept, F.select_voxels(down, (down.coords[:, 0] != emptied).nonzero()[:, 0]), twice,
                   spnn.Conv3d(2, 3, 3).double()(kept)):
        assert emptied not in pruned.coords[:, 0].tolist()
        for reduce, pool in (("mean", spnn.GlobalAvgPool()), ("max", spnn.GlobalMaxPool())):
            out = pool(pruned)
            assert out.shape == (3, pruned.num_channels)
            assert torch.equal(out[emptied], torch.zeros(pruned.num_channels, dtype=out.dtype))
            rest = [b for b in range(3) if b != emptied]
            torch.testing.assert_close(out[rest], brute_global(pruned, reduce)[rest])


def test_cat_and_add():
    x = make(c=2)
    y = x.with_feats(torch.randn(len(x), 3, dtype=torch.float64))
    assert torch.equal(F.cat([x, y]).feats, torch.cat([x.feats, y.feats], 1))
    assert torch.equal(spnn.cat([x, y]).feats, F.cat([x, y]).feats)
    z = x.with_feats(torch.ones_like(x.feats))
    assert torch.equal(spnn.add(x, z).feats, x.feats + 1)
    other = make(c=2, seed=5)
    with pytest.raises(ValueError):
        F.add(x, other)
    with pytest.raises(ValueError):
        F.cat([])


def test_cat_and_add_name_an_item_on_another_device():
    """An item on another device than item 0 failed inside torch (the coords
    compare, or the sum) with a message that named no item; now a ValueError
    naming the item and both devices."""
    x = make(c=2)
    for coords in (x.coords.to("meta"), x.coords):  # (coords and feats there, or the feats only)
        elsewhere = ps.SparseTensor(torch.zeros(len(x), 2, device="meta"), coords, validate=False)
        for call, what in ((lambda: F.add(x, elsewhere), "add"), (lambda: F.cat([x, x, elsewhere]), "cat")):
            item = 1 if what == "add" else 2
            with pytest.raises(ValueError, match=rf"{what}: item {item} is on meta but item 0 on cpu"):
                call()


def test_cat_of_tensors_given_one_by_one_says_to_give_a_list():
    """``cat(a, b)`` (MinkowskiEngine's ME.cat takes its tensors one by
    one) was Python's "cat() takes 1 positional argument but 2 were
    given"; now a TypeError saying cat takes one list, as torch.cat."""
    x = make(c=2)
    with pytest.raises(TypeError, match=r"cat takes one list of SparseTensors .*got 3 arguments.*cat\(\[a, b, \.\.\.\]\)"):
        F.cat(x, x, x)
    assert F.cat([x, x]).num_channels == 4


@pytest.mark.parametrize("given", [5, None, 2.0])
def test_cat_of_no_list_names_what_it_takes(given):
    """``cat(5)`` or ``cat(None)`` was Python's bare "'int' object is not
    iterable"; now a TypeError saying cat takes a list of SparseTensors and
    what it got."""
    with pytest.raises(TypeError, match=rf"cat takes a list of SparseTensors; got {type(given).__name__}"):
        F.cat(given)


def test_sequential_unet_trains():
    torch.manual_seed(0)
    x = make(n=500, c=4, extent=10, dtype=torch.float32)
    enc = torch.nn.Sequential(spnn.Conv3d(4, 8, 3), spnn.BatchNorm(8), spnn.ReLU())
    down = torch.nn.Sequential(spnn.Conv3d(8, 16, 2, stride=2), spnn.BatchNorm(16), spnn.LeakyReLU(0.1),
                               spnn.Conv3d(16, 16, 3), spnn.GELU())
    up = spnn.Conv3d(16, 8, 2, stride=2, transposed=True)
    head = torch.nn.Sequential(spnn.Conv3d(16, 8, 3, bias=True), spnn.Dropout(0.1), spnn.Conv3d(8, 2, 1))
    params = [p for m in (enc, down, up, head) for p in m.parameters()]
    opt = torch.optim.Adam(params, lr=0.01)
    target = (x.feats[:, 0] > 0).long()
    losses = []
    for _ in range(20):
        a = enc(x)
        b = up(down(a))
        logits = head(F.cat([a, b])).feats
        loss = torch.nn.functional.cross_entropy(logits, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(p.grad is not None for p in params)
    assert losses[-1] < 0.5 * losses[0]
    classifier = torch.nn.Sequential(spnn.Conv3d(4, 8, 3), spnn.ReLU(), spnn.MaxPool3d(2), spnn.AvgPool3d(3, 1),
                                     spnn.GlobalAvgPool(), torch.nn.Linear(8, 3))
    assert classifier(x).shape == (2, 3)


def test_pool_and_module_errors():
    x = make()
    with pytest.raises(TypeError, match="SparseTensor"):
        spnn.ReLU()(x.feats)
    with pytest.raises(TypeError, match="SparseTensor"):
        F.max_pool3d(x.feats, 2)
    with pytest.raises(ValueError, match="kernel_size"):
        spnn.MaxPool3d(0)
    with pytest.raises(ValueError, match="in_channels"):
        spnn.Conv3d(0, 3)
    # a weight too large to hold is refused before it is allocated (not torch's allocation error)
    for args in ((1 << 20, 1 << 20, 3), (1 << 16, 1 << 16, 5), (50000, 50000, 1)):
        with pytest.raises(ValueError, match="in_channels .* out_channels .* over the limit"):
            spnn.Conv3d(*args)


def test_weights_larger_than_the_memory_available_are_refused_before_allocating(monkeypatch):
    """A weight within the value limit but over the memory the system has
    (Conv3d(1, 2**31, 1): 8 GiB, granted by overcommit, then the process
    killed as reset_parameters wrote it) is refused naming the layer, on the
    CPU only, counting the dtype's bytes; a meta-device build allocates
    nothing and is not refused. The models' builders check their parameter
    total the same way before any layer is built."""
    from pointsparse import tensor as tensor_module
    from pointsparse.models import SPVCNN, MinkUNet

    monkeypatch.setattr(tensor_module, "available_memory", lambda: 1000)  # (27 x 4 x 4 float32: 1,728 bytes)
    with pytest.raises(ValueError, match=r"Conv3d weight of kernel_size \(3, 3, 3\) x in_channels 4 x out_channels "
                                         r"4 needs 1,728 bytes, more than the 1,000 bytes of memory available"):
        spnn.Conv3d(4, 4, 3)
    assert spnn.Conv3d(4, 4, 3, dtype=torch.bfloat16).weight.dtype == torch.bfloat16  # (864 bytes)
    assert spnn.Conv3d(4, 4, 3, device="meta").weight.is_meta
    with torch.device("meta"):
        assert spnn.Conv3d(4, 4, 3).weight.is_meta
    with pytest.raises(ValueError, match=r"Linear weight of in_features 20 x out_features 20 needs 1,600 bytes, more "
                                         r"than the 1,000 bytes of memory available"):
        spnn.Linear(20, 20)
    assert spnn.Linear(20, 20, device="meta").fn.weight.is_meta
    built = []
    monkeypatch.setattr(spnn.Conv3d, "reset_parameters", lambda self: built.append(self))
    for cls in (MinkUNet, SPVCNN):
        with pytest.raises(ValueError, match=rf"{cls.__name__}\(in_channels=3, num_classes=2, cr=0.125, blocks=1\) "
                                             r"with [\d,]+ parameter values needs [\d,]+ bytes, more than the 1,000 "
                                             r"bytes of memory available \(use a smaller cr"):
            cls(3, 2, cr=0.125, blocks=1)
    assert not built
    monkeypatch.setattr(tensor_module, "available_memory", lambda: None)  # (no /proc/meminfo: not checked)
    assert spnn.Conv3d(4, 4, 3).weight.shape == (27, 4, 4)


def test_channel_counts_accept_numpy_and_tensor_integers():
    import numpy as np

    from pointsparse.models import SPVCNN, MinkUNet
    conv = spnn.Conv3d(np.int64(3), torch.tensor(4))
    assert (conv.in_channels, conv.out_channels) == (3, 4) and type(conv.in_channels) is int
    net = MinkUNet(np.int64(4), np.int32(5), cr=np.float32(0.125))
    assert (net.in_channels, net.num_classes, net.cr) == (4, 5, 0.125)
    assert SPVCNN(np.int64(4), 5, cr=torch.tensor(0.125)).classifier.out_features == 5
    for bad, error in ((3.0, TypeError), (True, TypeError), ("3", TypeError), (0, ValueError),
                       (np.int64(-1), ValueError), (torch.tensor([3]), TypeError)):
        with pytest.raises(error, match="in_channels"):
            spnn.Conv3d(bad, 4)


def test_feats_that_do_not_fit_a_module_are_named():
    """BatchNorm, Linear, Conv3d, a learned VoxelPrune and add refuse feats of
    the wrong channel count (ValueError) or dtype (TypeError), naming the
    module and what it expected, instead of torch's error from inside the op
    (a Conv3d said its weight "must be (27, 3, C_out) ... got (27, 4, 2)", as
    if the module's own weight were wrong)."""
    x3 = make(c=3)
    x3d = x3.with_feats(x3.feats.double())
    x3f = x3.with_feats(x3.feats.float())
    cases = [(lambda: spnn.Conv3d(4, 2)(x3f), ValueError, "Conv3d: .* 3 channels but in_channels is 4"),
             (lambda: spnn.Conv3d(4, 2, 2, stride=2, transposed=True)(F.conv3d(x3f, torch.randn(8, 3, 3), 2, 2)),
              ValueError, "Conv3d: .* 3 channels but in_channels is 4"),
             (lambda: spnn.Conv3d(3, 2)(x3d), TypeError, "Conv3d: .*float64 but its parameters torch.float32"),
             (lambda: spnn.BatchNorm(4)(x3), ValueError, "BatchNorm: .* 3 channels but num_features is 4"),
             (lambda: spnn.BatchNorm(3)(x3d), TypeError, "BatchNorm: .*float64 but its parameters torch.float32"),
             (lambda: spnn.Linear(4, 2)(x3), ValueError, "Linear: .* 3 channels but in_features is 4"),
             (lambda: spnn.Linear(3, 2)(x3d), TypeError, "Linear: .*float64"),
             (lambda: spnn.VoxelPrune(0.5, score="learned", in_channels=4)(x3), ValueError,
              "VoxelPrune: .* 3 channels but in_channels is 4"),
             (lambda: F.add(x3, x3.with_feats(torch.randn(len(x3), 1))), ValueError, "add: .*channels"),
             (lambda: F.add(x3, x3.with_feats(torch.randn(len(x3), 4))), ValueError, "add: .*channels")]
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call()
    # what fits still runs: float64 modules on float64 feats
    assert spnn.BatchNorm(3).double().eval()(x3d).feats.dtype == torch.float64
    assert spnn.Linear(3, 2).double()(x3d).feats.shape == (len(x3), 2)
    assert spnn.Conv3d(3, 2).double()(x3d).feats.shape == (len(x3), 2)


def test_non_tensor_arguments_are_type_errors_naming_them():
    """A list where a tensor belongs (conv3d's weight_mask, global_structured's
    importance_scores) or a string for a model (sparsity_report): a
    TypeError naming the argument, not an AttributeError from inside."""
    from pointsparse import prune
    x = make(c=3)
    with pytest.raises(TypeError, match="weight_mask must be a torch.Tensor"):
        F.conv3d(x, torch.zeros(27, 3, 2, dtype=x.dtype), 3, weight_mask=[1])
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        prune.sparsity_report("x")
    m = spnn.Conv3d(4, 4, 3)
    with pytest.raises(TypeError, match="importance_scores for weight must be a torch.Tensor"):
        prune.global_structured([(m, "weight")], prune.ChannelStructured, 0.5, importance_scores={(m, "weight"): [1]})


def test_functional_star_import_gives_the_ops_not_the_module_imports():
    """API.md's ``pointsparse.nn.functional.conv3d``: the module had no
    ``__all__``, so ``from pointsparse.nn.functional import *`` also brought
    in ``torch``, ``np``, ``math``, ``functools``, ``operator``,
    ``SparseTensor``, ``as_bool``... over the user's names."""
    names: dict = {}
    exec("from pointsparse.nn.functional import *", names)
    assert {"conv3d", "add", "cat", "max_pool3d", "avg_pool3d", "global_avg_pool", "global_max_pool",
            "select_voxels"} <= set(names)
    assert not {"torch", "np", "math", "functools", "operator", "annotations", "SparseTensor", "as_bool",
                "as_float", "as_triple"} & set(names)
    assert all(hasattr(F, name) for name in F.__all__)


def test_pooling_windows_are_the_strided_convs_offsets_not_the_cell():
    """As documented: kernel 2 stride 2 covers each output cell exactly; an odd
    kernel's window is centred (kernel 3 stride 3 takes q - 1 .. q + 1), so an
    input at q + 2 reaches no window and its output holds 0, as in
    MinkowskiEngine's pooling (torch's dense MaxPool3d(3) would give 5)."""
    from pointsparse import nn as pnn

    x = ps.SparseTensor(torch.tensor([[5.0], [7.0]]), torch.tensor([[0, 2, 0, 0], [0, 1, 1, 1]], dtype=torch.int32))
    two = pnn.MaxPool3d(2)(x)
    assert sorted(two.feats.flatten().tolist()) == [5.0, 7.0]
    three = pnn.MaxPool3d(3)(x)
    assert three.coords.tolist() == [[0, 0, 0, 0]] and three.feats.flatten().tolist() == [7.0]


def _items_cloud(dtype=torch.float64, seed=0):
    """Three batch items of 7, 1 and 12 sites, 4 channels."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for b, n in ((0, 7), (1, 1), (2, 12)):
        xyz = torch.randperm(64, generator=g)[:n]
        rows.append(torch.stack([torch.full((n,), b), xyz // 16, (xyz // 4) % 4, xyz % 4], 1))
    coords = torch.cat(rows).int()
    return ps.SparseTensor(torch.randn(len(coords), 4, generator=g, dtype=dtype), coords)


def test_instance_norm_normalises_each_item_as_torchs_instance_norm():
    """Each batch item's sites normalised by their own statistics, as
    torch.nn.functional.instance_norm of the item's (1, C, n) feats (an item
    of one site gives the bias: torch refuses one position); the module's
    affine parameters; gradcheck in float64; bf16 feats in float32, rounded
    once; bad eps / weight named."""
    from pointsparse import nn as pnn

    x = _items_cloud()
    weight, bias = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    got = ps.nn.functional.instance_norm(x, weight, bias, eps=1e-5).feats
    for b in range(3):
        rows = x.coords[:, 0] == b
        item = x.feats[rows]
        if len(item) == 1:
            torch.testing.assert_close(got[rows], bias.unsqueeze(0))
            continue
        want = torch.nn.functional.instance_norm(item.t().unsqueeze(0), weight=weight, bias=bias, eps=1e-5)
        torch.testing.assert_close(got[rows], want[0].t())
    layer = pnn.InstanceNorm(4).double()
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    torch.testing.assert_close(layer(x).feats, got)
    assert torch.equal(layer.eval()(x).feats, layer.train()(x).feats)  # (no running statistics)
    f = x.feats.clone().requires_grad_()
    w, c = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda f, w, c: ps.nn.functional.instance_norm(x.with_feats(f), w, c).feats,
                                    (f, w, c))
    low = x.with_feats(x.feats.bfloat16())
    wide = ps.nn.functional.instance_norm(x.with_feats(low.feats.float())).feats
    assert torch.equal(ps.nn.functional.instance_norm(low).feats, wide.bfloat16())
    with pytest.raises(ValueError, match="eps must be a positive finite number"):
        pnn.InstanceNorm(4, eps=0)
    with pytest.raises(ValueError, match=r"instance_norm: weight must be None or a \(4,\) tensor"):
        ps.nn.functional.instance_norm(x, torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="InstanceNorm: the input's feats have 4 channels but num_features is 5"):
        pnn.InstanceNorm(5)(x.with_feats(x.feats.float()))


@pytest.mark.parametrize("make", [lambda **kw: spnn.Conv3d(2, 3, **kw),
                                  lambda **kw: spnn.Conv3d(2, 3, transposed=True, **kw),
                                  lambda **kw: spnn.MaxPool3d(**kw), lambda **kw: spnn.AvgPool3d(**kw)])
def test_modules_refuse_at_construction_what_every_forward_refuses(make):
    """Conv3d(2, 3, stride=2**31), dilation=2**31 and the pooling modules'
    kernel_size 2**20 were built without a word: the forward refused them
    (output stride past int32, an offset past int32, over 32,768 offsets)
    whatever the input. Construction gives the forward's ValueError now (the
    same check, at tensor stride 1), and what a forward runs still builds."""
    big = 2**31
    cases = ((dict(stride=big), r"output stride \(2147483648,"),
             (dict(stride=(1, 1, big)), r"strides must be in \[1, 2147483647\]"),
             (dict(kernel_size=3, dilation=big), r"reaches an offset of 2147483648 on one axis"),
             (dict(kernel_size=(1, 1, 2**20)), r"1,048,576 offsets; a kernel may have at most 32,768"))
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            make(**kwargs)
    coords = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0], [0, 5, 2, 1]], dtype=torch.int32)
    x = ps.SparseTensor(torch.randn(3, 2), coords)
    for kwargs in (dict(kernel_size=1, dilation=big), dict(kernel_size=3, dilation=2**30), dict(stride=2**30)):
        module = make(**kwargs)  # (built: a forward of these runs, or is refused only for its input)
        if isinstance(module, spnn.Conv3d) and module.transposed:
            continue
        assert len(module(x).coords) >= 1


def test_instance_norm_refuses_weight_and_bias_that_are_not_floating_point():
    """An int64 or bool weight or bias was cast to the feats' float dtype
    without a word (True read as 1.0), where conv3d refuses a weight or bias
    of another dtype than its feats and torch's instance_norm refuses integer
    ones: a TypeError names the argument and its dtype now."""
    x = _items_cloud()
    for name, bad in (("weight", torch.tensor([1, 2, 3, 4])), ("weight", torch.ones(4, dtype=torch.bool)),
                      ("bias", torch.zeros(4, dtype=torch.int32)), ("bias", torch.zeros(4, dtype=torch.complex64))):
        args = (bad, None) if name == "weight" else (None, bad)
        with pytest.raises(TypeError, match=rf"instance_norm: {name} must be a floating-point tensor; got "
                                            rf"{bad.dtype}"):
            ps.nn.functional.instance_norm(x, *args)
    float64 = ps.nn.functional.instance_norm(x, torch.full((4,), 2.0, dtype=torch.float64),
                                             torch.ones(4, dtype=torch.float64)).feats
    torch.testing.assert_close(float64, ps.nn.functional.instance_norm(x).feats * 2 + 1)


def test_instance_norm_refuses_a_dtype_or_device_it_cannot_make():
    """InstanceNorm(4, dtype=torch.int64) failed in nn.Parameter ("Only Tensors of floating point ... can
    require gradients", naming no argument): its factory kwargs are checked as Conv3d's, a TypeError naming
    ``dtype``, an error naming ``device``; what it takes is made there (meta too)."""
    from pointsparse import nn as pnn

    for dtype in (torch.int64, torch.bool, "float64"):
        with pytest.raises(TypeError, match="dtype must be None or a floating torch.dtype"):
            pnn.InstanceNorm(4, dtype=dtype)
    with pytest.raises(ValueError, match="device must be None, a torch.device or a device string"):
        pnn.InstanceNorm(4, device="nonsense")
    layer = pnn.InstanceNorm(4, device="meta", dtype=torch.float64)
    assert layer.weight.is_meta and layer.bias.dtype == torch.float64


def test_linear_and_batch_norm_take_device_and_dtype_as_the_other_layers_do():
    """Conv3d, VoxelPrune, VoxelSkip and InstanceNorm take ``device`` / ``dtype`` by name (so
    ``torch.nn.utils.skip_init`` builds them), but Linear and BatchNorm passed them on through ``**kwargs``:
    skip_init, which looks for a ``device`` parameter, refused both ("Module must support a 'device' arg"),
    and an int64 dtype failed in nn.Parameter naming no argument. Now both name them (keyword-only, checked
    as Conv3d's); their positional ``device`` and ``dtype`` (torch's order) still work."""
    coords = random_coords(12, 4, seed=1)
    x = ps.SparseTensor(torch.randn(len(coords), 4, dtype=torch.float64), coords)
    for cls, args in ((spnn.Linear, (4, 5)), (spnn.BatchNorm, (4,))):
        skipped = torch.nn.utils.skip_init(cls, *args)
        assert all(p.device == torch.device("cpu") and p.dtype == torch.float32 for p in skipped.parameters())
        layer = cls(*args, device=torch.device("cpu"), dtype=torch.float64)
        assert all(p.dtype == torch.float64 for p in layer.parameters())
        assert layer.train()(x).feats.dtype == torch.float64
        assert all(p.is_meta for p in cls(*args, device="meta").parameters())
        with pytest.raises(TypeError, match="dtype must be None or a floating torch.dtype"):
            cls(*args, dtype=torch.int64)
        with pytest.raises(ValueError, match="device must be None, a torch.device or a device string"):
            cls(*args, device="nonsense")
    assert spnn.Linear(4, 5, False, dtype=torch.float64).fn.bias is None
    assert spnn.Linear(4, 5, True, "cpu", torch.float64).fn.weight.dtype == torch.float64
    norm = spnn.BatchNorm(4, 1e-5, 0.1, True, True, "cpu", torch.float64)
    assert norm.weight.dtype == norm.running_mean.dtype == torch.float64


def test_instance_norm_refuses_parameters_of_another_float_dtype_as_the_module_does():
    """functional.instance_norm cast a float64 (or float32) weight and bias to the feats' dtype without a
    word, where nn.InstanceNorm refuses parameters of another dtype than its feats (a TypeError naming
    both): the functional form takes the module's rule now (one check): the same dtype, or, under
    torch.autocast on the feats' device, a mix without float64 (float32 parameters on bf16 feats, cast)."""
    from pointsparse import nn as pnn

    x = _items_cloud(torch.float32)
    layer = pnn.InstanceNorm(4).double()
    with pytest.raises(TypeError, match="InstanceNorm: the input's feats are torch.float32 but its parameters "
                                        "torch.float64"):
        layer(x)
    for name in ("weight", "bias"):
        args = {name: torch.ones(4, dtype=torch.float64)}
        with pytest.raises(TypeError, match=rf"instance_norm: {name} is torch.float64 but the input's feats are "
                                            r"torch.float32 \(convert one of them\)"):
            ps.nn.functional.instance_norm(x, **args)
    low = x.with_feats(x.feats.bfloat16())
    weight, bias = torch.randn(4), torch.randn(4)
    with pytest.raises(TypeError, match=r"instance_norm: weight is torch.float32 but the input's feats are "
                                        r"torch.bfloat16"):
        ps.nn.functional.instance_norm(low, weight, bias)
    layer = pnn.InstanceNorm(4)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = ps.nn.functional.instance_norm(low, weight, bias).feats
        assert torch.equal(layer(low).feats, mixed)
        with pytest.raises(TypeError, match="instance_norm: weight is torch.float64"):  # (autocast keeps float64)
            ps.nn.functional.instance_norm(low, weight.double())
    wide = ps.nn.functional.instance_norm(x.with_feats(low.feats.float()), weight, bias).feats
    torch.testing.assert_close(mixed.float(), wide, atol=0.05, rtol=0.02)


def test_linear_names_fn_where_its_weight_is_asked_for():
    """pointsparse.nn.Linear keeps its torch Linear at ``fn``; torch's pruning functions on the wrapper
    (prune.l1_unstructured(layer, "weight", 0.5)) and ``layer.weight`` were a bare AttributeError
    ("'Linear' object has no attribute 'weight'"): the error now names ``fn`` and the two ways to prune it.
    hasattr stays False (an AttributeError still), and every other missing name keeps torch's message."""
    from pointsparse import prune

    layer = spnn.Linear(4, 3)
    for name in ("weight", "bias", "weight_orig", "weight_mask", "in_features", "out_features"):
        with pytest.raises(AttributeError, match=rf"keeps its torch Linear at \.fn: use layer\.fn\.{name}"):
            getattr(layer, name)
        assert not hasattr(layer, name)
    with pytest.raises(AttributeError, match=r"prune\.l1_unstructured\(layer\.fn, 'weight', amount\)"):
        prune.l1_unstructured(layer, "weight", 0.5)
    with pytest.raises(AttributeError, match="'Linear' object has no attribute 'nonsense'$"):
        layer.nonsense
    prune.l1_unstructured(layer.fn, "weight", 0.5)  # (the way the message gives)
    x = make(c=4, dtype=torch.float32)
    assert torch.equal(layer(x).feats, torch.nn.functional.linear(x.feats, layer.fn.weight, layer.fn.bias))
    assert int((layer.fn.weight == 0).sum()) == 6


@pytest.mark.parametrize("make, error, match", [
    (lambda: spnn.BatchNorm(8, momentum="a"), TypeError, "momentum must be a real number"),
    (lambda: spnn.BatchNorm(8, 1e-5, 2.0), ValueError, r"momentum must be a number in \[0, 1\] or None; got 2.0"),
    (lambda: spnn.BatchNorm(8, eps=-1), ValueError, "eps must be a finite number >= 0; got -1"),
    (lambda: spnn.BatchNorm(8, affine="no"), TypeError, "affine must be True or False"),
    (lambda: spnn.BatchNorm(8, track_running_stats=1.0), TypeError, "track_running_stats must be True or False"),
    (lambda: spnn.BatchNorm(8, affine=2), TypeError, "affine must be True or False"),
    (lambda: spnn.GELU(approximate="foo"), ValueError, "approximate must be 'none' or 'tanh'; got 'foo'"),
    (lambda: spnn.LeakyReLU("a"), TypeError, "negative_slope must be a real number"),
    (lambda: spnn.ELU(alpha=float("nan")), ValueError, "alpha must be a finite number"),
    (lambda: spnn.ReLU(inplace="yes"), TypeError, "inplace must be True or False"),
    (lambda: spnn.Linear(4, 2, bias="no"), TypeError, "bias must be True or False"),
    (lambda: spnn.Linear(4, 2, "no"), TypeError, "bias must be True or False"),
])
def test_module_options_torch_keeps_as_given_are_named_at_construction(make, error, match):
    """torch keeps these options as given: momentum="a" and eps=-1 failed
    in the first forward (torch's positional TypeError, its ValueError),
    GELU's approximate="foo" there with a RuntimeError, bias="no" and
    affine="no" made weights (truthy). Refused where the module is made."""
    with pytest.raises(error, match=match):
        make()


def test_module_options_in_range_still_build():
    """What torch takes stays taken: eps 0, the ints 0 and 1 for flags."""
    assert spnn.BatchNorm(8, momentum=None).momentum is None and spnn.BatchNorm(8, eps=0).eps == 0
    assert spnn.BatchNorm(8, affine=0, track_running_stats=1).affine is False
    assert spnn.Linear(4, 2, bias=0).fn.bias is None and spnn.ReLU(inplace=1).fn.inplace is True
    assert spnn.BatchNorm(8, 1e-3, 0.5, False, False).affine is False
    assert spnn.LeakyReLU(0.2).fn.negative_slope == 0.2 and spnn.GELU("tanh").fn.approximate == "tanh"
    assert spnn.Linear(4, 2, False).fn.bias is None and spnn.ReLU(True).fn.inplace is True


def test_union_sums_tensors_on_other_sites_as_their_dense_grids_sum():
    """MinkowskiEngine's MinkowskiUnion had no counterpart (add refused
    tensors on other sites without saying what sums them): ``nn.union``
    holds every item's sites, item 0's rows first, and sums the feats of
    the items holding a site, checked against the sum of the dense grids;
    a conv after it matches dense conv3d on that sum; float64 gradcheck."""
    coords = [random_coords(60, extent=6, seed=s) for s in (1, 2, 3)]
    g = torch.Generator().manual_seed(0)
    items = [ps.SparseTensor(torch.randn(len(c), 3, dtype=torch.float64, generator=g), c) for c in coords]
    u = spnn.union(items)
    shape = (2, 3, 6, 6, 6)
    assert torch.equal(u.dense(shape), sum(t.dense(shape) for t in items))
    assert torch.equal(u.coords[:len(items[0])], items[0].coords)  # item 0's rows first, in order
    assert len(u) == len(torch.unique(torch.cat(coords), dim=0)) < sum(map(len, coords))
    # a conv builds its maps on the union's sites
    conv = spnn.Conv3d(3, 4, 3).double()
    want = torch.nn.functional.conv3d(u.dense(shape), conv.weight.reshape(3, 3, 3, 3, 4).permute(4, 3, 0, 1, 2),
                                      padding=1)
    mask = u.dense(shape)[:, :1] != 0
    got = conv(u).dense((2, 4, 6, 6, 6))
    assert torch.allclose(got, want * mask, atol=1e-12)
    # where item 0 holds every site, the output is on its coords and cache (as add's)
    sub = ps.SparseTensor(torch.ones(10, 3, dtype=torch.float64), items[0].coords[5:15])
    v = spnn.union([items[0], sub])
    assert v.coords is items[0].coords and v.cache is items[0].cache
    assert torch.equal(v.feats, items[0].feats + torch.nn.functional.pad(torch.ones(10, 3), (0, 0, 5, len(v) - 15)))
    a, b = (t.feats.clone().requires_grad_() for t in items[:2])
    assert torch.autograd.gradcheck(lambda x, y: spnn.union([items[0].with_feats(x), items[1].with_feats(y)]).feats,
                                    (a, b))
    # add names it; bad items are named
    with pytest.raises(ValueError, match=r"add: item 1 .*; nn\.union\(\[a, b\]\)"):
        spnn.add(items[0], items[1])
    with pytest.raises(ValueError, match=r"add: item 1 has other coords .*; nn\.union\(\[a, b\]\)"):
        spnn.add(items[0], ps.SparseTensor(items[0].feats, items[0].coords.flip(0)))
    with pytest.raises(ValueError, match=r"union: item 1 has stride"):
        spnn.union([items[0], ps.SparseTensor(items[1].feats, items[1].coords * 2, 2)])
    with pytest.raises(ValueError, match="union: item 2's feats have"):
        spnn.union([items[0], items[1], items[2].with_feats(items[2].feats[:, :2])])
    with pytest.raises(TypeError, match="union takes one list"):
        spnn.union(items[0], items[1])
    with pytest.raises(TypeError, match="union takes SparseTensors; item 1 is Tensor"):
        spnn.union([items[0], items[1].feats])
