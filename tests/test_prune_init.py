"""Pruning at initialisation: SNIP, GraSP and SynFlow against hand / autograd
references, and masks of the promised sparsity on dense and sparse nets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pointsparse.prune import adapters, init
from prune_procedures_support import mlp, region_chain, sparse_chain, sparse_input, teacher_data  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def _batches(n=2):
    x, y = teacher_data(64)
    return [(x[i * 32:(i + 1) * 32], y[i * 32:(i + 1) * 32]) for i in range(n)]


def loss(out, y):
    return nn.functional.cross_entropy(out, y)


def test_snip_is_mean_gradient_times_weight():
    net = mlp(0)
    batches = _batches()
    scores = init.snip_scores(net, batches, loss)
    grads = [torch.autograd.grad(loss(net(x), y), net[0].weight)[0] for x, y in batches]
    ref = ((grads[0] + grads[1]) / 2 * net[0].weight).abs()
    assert torch.allclose(scores["0"], ref, atol=1e-7)


def test_grasp_is_minus_weight_times_hessian_gradient():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
    T = 200.0
    params = [net[0].weight, net[2].weight]
    sizes = [p.numel() for p in params]

    def f(flat):
        w0, w2 = flat[:sizes[0]].view(4, 3), flat[sizes[0]:].view(2, 4)
        h = torch.tanh(x @ w0.t() + net[0].bias)
        return loss((h @ w2.t() + net[2].bias) / T, y)

    flat = torch.cat([p.detach().flatten() for p in params])
    g = torch.autograd.functional.jacobian(f, flat)
    H = torch.autograd.functional.hessian(f, flat)
    ref = -(flat * (H @ g))
    scores = init.grasp_scores(net, [(x, y)], loss, temperature=T)
    got = torch.cat([scores["0"].flatten(), scores["2"].flatten()])
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-12)


def test_synflow_single_pass_matches_hand_formula():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4, bias=False), nn.ReLU(), nn.Linear(4, 2, bias=False))
    w1, w2 = net[0].weight.detach().abs().double(), net[2].weight.detach().abs().double()
    scores, masks = init.synflow_scores(net, torch.zeros(1, 3), sparsity=0.0)
    # R = 1' |W2| |W1| 1 ; dR/dW1[j,i] = (1'|W2|)_j ; dR/dW2[k,j] = (|W1| 1)_j
    ref1 = w1 * w2.sum(0)[:, None]
    ref2 = w2 * w1.sum(1)[None, :]
    assert torch.allclose(scores["0"].double(), ref1, rtol=1e-5)
    assert torch.allclose(scores["2"].double(), ref2, rtol=1e-5)
    assert all(bool(m.all()) for m in masks.values())
    assert torch.equal(net[0].weight.detach().abs().double(), w1)  # the model itself is untouched


@pytest.mark.parametrize("method", init.METHODS)
def test_prune_at_init_reaches_sparsity(method):
    net = mlp(0, widths=(8, 32, 32, 3))
    masks = init.prune_at_init(net, method, 0.8, _batches(), loss, torch.zeros(1, 8), iterations=10)
    total = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    assert abs((1 - kept / total) - 0.8) <= 1 / total
    assert adapters.sparsity(net) == pytest.approx(0.8, abs=1 / total)
    assert all(int(m.sum()) > 0 for m in masks.values())  # no layer collapses at 80%


def test_synflow_on_sparse_convs_is_data_free():
    net = sparse_chain()
    x = sparse_input()
    masks = init.prune_at_init(net, "synflow", 0.7, example_input=x, iterations=5)
    total = sum(m.numel() for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == round(0.3 * total)
    assert net(x).feats.shape == (len(x), 4)


def test_snip_on_sparse_convs():
    net = sparse_chain().train()
    x = sparse_input()
    y = torch.randint(0, 4, (len(x),))
    init.prune_at_init(net, "snip", 0.5, [(x, y)], lambda out, t: nn.functional.cross_entropy(out.feats, t))
    assert adapters.sparsity(net) == pytest.approx(0.5, abs=1e-3)


def test_bad_inputs():
    with pytest.raises(ValueError, match="method"):
        init.prune_at_init(mlp(0), "magnitude", 0.5)
    with pytest.raises(ValueError, match="batches and loss_fn"):
        init.prune_at_init(mlp(0), "snip", 0.5)
    with pytest.raises(ValueError, match="example_input"):
        init.prune_at_init(mlp(0), "synflow", 0.5)
    with pytest.raises(ValueError, match="sparsity"):
        init.prune_at_init(mlp(0), "synflow", 1.0, example_input=torch.zeros(1, 8))
    with pytest.raises(ValueError, match="at least one"):
        init.snip_scores(mlp(0), [], loss)
    batch = _batches(1)
    for temperature, error in ((0, ValueError), (float("nan"), ValueError), (-1.0, ValueError), ("1", TypeError)):
        with pytest.raises(error, match="temperature must be a finite number > 0"):  # 0: ZeroDivisionError; NaN scores
            init.grasp_scores(mlp(0), batch, loss, temperature=temperature)
    with pytest.raises(TypeError, match="iterations must be a positive int; got True"):  # was one iteration
        init.prune_at_init(mlp(0), "synflow", 0.5, example_input=torch.zeros(1, 8), iterations=True)
    for method in ("snip", "grasp"):
        with pytest.raises(TypeError, match="loss_fn must be callable"):
            init.prune_at_init(mlp(0), method, 0.5, batches=batch, loss_fn=3)


def test_a_loss_fn_that_gives_no_scalar_loss_is_named():
    """A per-sample loss, a float and a detached loss failed inside
    torch.autograd.grad ("grad can be implicitly created only for scalar
    outputs", "element 0 of tensors does not require grad"), GraSP's always
    and SNIP's under a message naming loss_fn(model, batch), which is not
    how init calls it."""
    batch = _batches(1)
    per_sample = lambda out, y: nn.functional.cross_entropy(out, y, reduction="none")  # noqa: E731
    cases = [(per_sample, TypeError, r"loss_fn\(model\(inputs\), targets\) must return a scalar loss tensor "
                                     r"\(0-d: reduce it, e.g. .mean\(\)\); got a tensor of shape \(32,\)"),
             (lambda out, y: float(loss(out, y)), TypeError,
              r"loss_fn\(model\(inputs\), targets\) must return a scalar loss tensor; got float"),
             (lambda out, y: loss(out, y).detach(), ValueError,
              r"loss_fn\(model\(inputs\), targets\) returned a loss without gradient")]
    for fn, error, message in cases:
        for scores in (init.snip_scores, init.grasp_scores):
            with pytest.raises(error, match=message):
                scores(mlp(0), batch, fn)
    with pytest.raises(TypeError, match="batches must be an iterable of \\(inputs, targets\\) pairs; got int"):
        init.snip_scores(mlp(0), 3, loss)


@pytest.mark.parametrize("make", [np.int64, np.int32])
def test_synflow_iterations_take_numpy_integers(make):
    """iterations may be a numpy integer (it was refused: isinstance int),
    with the scores and masks the int gives."""
    x = torch.ones(1, 8)
    scores, masks = init.synflow_scores(mlp(0), x, 0.5, make(3))
    want_scores, want_masks = init.synflow_scores(mlp(0), x, 0.5, 3)
    assert all(torch.equal(scores[n], want_scores[n]) and torch.equal(masks[n], want_masks[n]) for n in want_masks)


@pytest.mark.parametrize("bad", [True, np.bool_(True), 2.0, 1.5])
def test_synflow_iterations_refuse_bools_and_floats(bad):
    with pytest.raises(TypeError, match="iterations must be a positive int"):
        init.synflow_scores(mlp(0), torch.ones(1, 8), 0.5, bad)


@pytest.mark.parametrize("method", ["synflow", "snip", "grasp"])
@pytest.mark.parametrize("outside", [0.0, 1e-3])
def test_a_kernel_region_conv_is_pruned_inside_its_region(method, outside):
    """Pruning at initialisation reaches the target over the layers'
    weights, a kernel_region conv's region's: SynFlow counted and ranked
    all 27 offsets of a 'cross' conv, whose 20 outside ones score 0 (never
    run), so they were pruned first and the network ended 27% sparse for
    0.5. The values outside keep their mask."""
    net = region_chain(0, outside)
    x = sparse_input()
    init.prune_at_init(net, method, 0.5, batches=[(x, None)], loss_fn=lambda out, y: out.feats.square().mean(),
                       example_input=x, iterations=5)
    assert adapters.sparsity(net) == pytest.approx(0.5, abs=1 / (7 * 18 + 27 * 24))
    rest = [k for k in range(27) if k not in net[0].kernel_region]
    assert bool(net[0].weight_mask[rest].all())


def test_synflow_on_a_model_pruned_with_torch():
    """A layer pruned with torch.nn.utils.prune holds a computed weight
    (weight_orig * weight_mask, no graph leaf), which copy.deepcopy refuses:
    synflow's copy of the model failed with torch's RuntimeError 'Only
    Tensors created explicitly by the user (graph leaves) support the
    deepcopy protocol'. The copy now takes that value detached; the layer's
    own mask is kept (never un-pruned) and the sparsity reached."""
    net = mlp(0)
    torch.nn.utils.prune.l1_unstructured(net[0], "weight", 0.3)
    before = net[0].weight_mask.clone()
    masks = init.prune_at_init(net, "synflow", 0.5, example_input=torch.randn(4, 8), iterations=3)
    assert not bool((masks["0"].bool() & ~before.bool()).any())
    assert adapters.sparsity(net) == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("method", ["snip", "grasp"])
def test_a_frozen_layer_is_named(method):
    """A frozen layer (requires_grad=False) has no gradient to score: GraSP
    failed with torch's RuntimeError 'One of the differentiated Tensors does
    not require grad' (SNIP's message spoke of a ``parameters`` argument
    prune_at_init has not). Now a ValueError naming the layer and ``layers``,
    before anything is pruned; leaving it out works."""
    net = mlp(0)
    net[2].weight.requires_grad_(False)
    x, y = teacher_data(32)
    batches = [(x, y)]
    with pytest.raises(ValueError, match=r"layer '2' is frozen \(requires_grad=False\).*out of layers"):
        init.prune_at_init(net, method, 0.5, batches, nn.functional.cross_entropy)
    assert not any(hasattr(m, "weight_mask") for m in net)
    masks = init.prune_at_init(net, method, 0.5, batches, nn.functional.cross_entropy, layers=["0", "4"])
    assert sorted(masks) == ["0", "4"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_grasp_of_a_half_precision_model_is_taken_in_float32(dtype):
    """GraSP's ``H g`` of outputs divided by the temperature (200) is ~1e-8:
    in float16 it underflowed, 125 of a small MLP's first 128 scores were
    0 and its ranking was lost, silently. A float16 / bfloat16 model is
    scored on a float32 copy now (its inputs cast too): the scores of the
    float32 model holding the same weights, and the model is left as it was."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).to(dtype)
    wide = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    wide.load_state_dict({k: v.float() for k, v in net.state_dict().items()})
    x, y = torch.randn(64, 8).to(dtype), torch.randint(0, 3, (64,))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    got = init.grasp_scores(net, [(x, y)], lambda out, t: loss(out.float(), t))
    want = init.grasp_scores(wide, [(x.float(), y)], loss)
    for name in ("0", "2"):
        assert got[name].dtype == torch.float32 and bool((got[name] != 0).all())
        torch.testing.assert_close(got[name], want[name])
    assert all(torch.equal(v, net.state_dict()[k]) and v.dtype == dtype for k, v in before.items())
    masks = init.prune_at_init(net, "grasp", 0.5, [(x, y)], lambda out, t: loss(out.float(), t))
    assert adapters.sparsity(net) == pytest.approx(0.5, abs=0.01) and masks["0"].shape == (16, 8)


class _TwoInputs(nn.Module):
    """A model of two arguments (as SPVCNN's ``model(*inputs)``)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 3), nn.Linear(4, 3)

    def forward(self, x, z):
        return self.a(x) + self.b(z)


def test_grasp_of_a_half_precision_model_of_several_arguments_casts_every_argument():
    """GraSP's float32 copy of a bfloat16 model cast a batch's input when it
    was one tensor, but a tuple of inputs (a model of several arguments, as
    SPVCNN's) went in as it was: its bfloat16 tensors then met the float32
    copy's weights (a dtype error). Every floating argument is cast now: the
    scores of the float32 model holding the same weights."""
    torch.manual_seed(0)
    net = _TwoInputs().to(torch.bfloat16)
    wide = _TwoInputs()
    wide.load_state_dict({k: v.float() for k, v in net.state_dict().items()})
    x, z, y = torch.randn(32, 8).bfloat16(), torch.randn(32, 4).bfloat16(), torch.randint(0, 3, (32,))
    got = init.grasp_scores(net, [((x, z), y)], lambda out, t: loss(out.float(), t))
    want = init.grasp_scores(wide, [((x.float(), z.float()), y)], loss)
    for name in ("a", "b"):
        assert got[name].dtype == torch.float32
        torch.testing.assert_close(got[name], want[name])


def test_synflow_ranks_a_tied_weight_once():
    """Two layers sharing one weight Parameter stood twice in SynFlow's
    global ranking and count: asked for 0.5, 0.464 of the distinct weights
    were pruned, and the two layers got different masks of the one weight.
    The weight is ranked and counted once, its layers get one mask, and
    layers naming one of them only is a ValueError naming both (as
    global_magnitude_prune)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    net[1].weight = net[0].weight
    masks = init.prune_at_init(net, "synflow", 0.5, example_input=torch.zeros(1, 4), iterations=3)
    assert torch.equal(masks["0"], masks["1"])
    assert int((~masks["0"]).sum() + (~masks["2"]).sum()) == 16
    assert adapters.sparsity(net) == pytest.approx(0.5)
    fresh = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    fresh[1].weight = fresh[0].weight
    with pytest.raises(ValueError, match=r"layers '0' and '1' share one weight"):
        init.synflow_scores(fresh, torch.zeros(1, 4), 0.5, 3, layers=["0"])


@pytest.mark.parametrize("method", ["snip", "grasp"])
def test_scoring_at_init_leaves_batchnorm_statistics_and_modes_as_they_were(method):
    # SNIP and GraSP score on the user's batches in train mode, as their papers do; what the model keeps
    # afterwards is its masks only: the BatchNorm statistics those forwards moved are put back (the reference
    # implementations score a deep copy).
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    net.train()
    net[3].eval()  # a module in its own mode keeps it
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    buffers = {k: v.clone() for k, v in net.named_buffers()}
    init.prune_at_init(net, method, 0.5, batches=[(x, y), (x * 2, y)], loss_fn=loss)
    for k, v in net.named_buffers():
        if k in buffers:
            assert torch.equal(v, buffers[k]), k
    assert [m.training for m in net.modules()] == [True, True, True, True, False]
    assert adapters.get_mask(net[0]).float().mean() < 1.0
