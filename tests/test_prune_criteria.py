"""Every criterion against values computed by hand (closed-form gradients of
a linear least-squares model) or by autograd on tiny models; OBD's Hutchinson
estimate against the exact Hessian diagonal."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import pointsparse.prune as prune
from pointsparse.prune import criteria
from prune_support import SparseBatchNorm, SparseConv, set_weight, sparse_input


def least_squares(seed=0, batches=3, rows=4):
    """``Linear(3, 2)`` without bias, mean squared error, ``batches`` batches."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Linear(3, 2, bias=False)
    set_weight(model, torch.randn(2, 3, generator=g))
    data = [(torch.randn(rows, 3, generator=g), torch.randn(rows, 2, generator=g)) for _ in range(batches)]
    loss_fn = lambda m, batch: (m(batch[0]) - batch[1]).pow(2).mean()  # noqa: E731
    return model, data, loss_fn


def gradient_by_hand(w, x, y):
    """dL/dW of L = mean((x W^T - y)^2) over (rows, 2) entries."""
    return 2.0 / y.numel() * (x @ w.T - y).T @ x


def test_magnitude_element_and_group_scores():
    model = nn.Linear(2, 2, bias=False)
    set_weight(model, torch.tensor([[3.0, -4.0], [-1.0, 0.0]]))
    key = (model, "weight")
    assert torch.equal(criteria.magnitude(model)[key], torch.tensor([[3.0, 4.0], [1.0, 0.0]]))
    assert torch.equal(criteria.magnitude([key], p=2)[key], torch.tensor([[9.0, 16.0], [1.0, 0.0]]))
    torch.testing.assert_close(criteria.magnitude([key], p=2, group="out")[key], torch.tensor([[5.0, 5.0], [1.0, 1.0]]))
    torch.testing.assert_close(criteria.magnitude([key], p=1, group="in")[key], torch.tensor([[4.0, 4.0], [4.0, 4.0]]))
    sparse = SparseConv(2, 3, kernel_size=(1, 1, 2))
    set_weight(sparse, torch.arange(12.0).reshape(2, 2, 3))
    scores = criteria.magnitude([(sparse, "weight")], p=1, group="offset")[(sparse, "weight")]
    assert torch.equal(scores[0], torch.full((2, 3), 15.0)) and torch.equal(scores[1], torch.full((2, 3), 51.0))
    with pytest.raises(ValueError, match="group must be one of"):
        criteria.magnitude(model, group="rows")
    assert torch.equal(criteria.magnitude([key], p=float("inf"), group="out")[key],
                       torch.tensor([[4.0, 4.0], [1.0, 1.0]]))
    small = nn.Linear(2, 1, bias=False)
    set_weight(small, torch.tensor([[0.5, -0.25]]))
    with pytest.raises(ValueError, match="p=inf is a group norm"):  # scored every |w| < 1 as 0, a tie
        criteria.magnitude(small, p=float("inf"))


def test_magnitude_of_a_pruned_tensor_ignores_pruned_entries():
    model = nn.Linear(2, 1, bias=False)
    set_weight(model, torch.tensor([[3.0, 4.0]]))
    prune.custom_from_mask(model, "weight", torch.tensor([[0.0, 1.0]]))
    assert torch.equal(criteria.magnitude(model)[(model, "weight")], torch.tensor([[0.0, 4.0]]))


def test_random_scores_are_reproducible():
    model = nn.Conv2d(2, 3, 3)
    a = criteria.random(model, generator=torch.Generator().manual_seed(1))[(model, "weight")]
    b = criteria.random(model, generator=torch.Generator().manual_seed(1))[(model, "weight")]
    assert a.shape == model.weight.shape and torch.equal(a, b) and 0 <= a.min() and a.max() < 1
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None; got int"):
        criteria.random(model, generator=3)  # (was torch.rand's long signature list)


def test_snip_matches_hand_gradients():
    model, data, loss_fn = least_squares()
    w = model.weight.detach()
    mean_grad = sum(gradient_by_hand(w, x, y) for x, y in data) / len(data)
    scores = criteria.snip(model, loss_fn, data)[(model, "weight")]
    torch.testing.assert_close(scores, (mean_grad * w).abs())


def test_taylor_matches_hand_gradients():
    model, data, loss_fn = least_squares(seed=1)
    w = model.weight.detach()
    expected = sum((gradient_by_hand(w, x, y) * w).pow(2) for x, y in data) / len(data)
    torch.testing.assert_close(criteria.taylor(model, loss_fn, data)[(model, "weight")], expected)


def test_taylor_per_output_channel():
    model, data, loss_fn = least_squares(seed=5)
    w = model.weight.detach()
    # removing output row a changes the loss by about sum_b over that row of g * w
    rows = sum((gradient_by_hand(w, x, y) * w).sum(1).pow(2) for x, y in data) / len(data)
    scores = criteria.taylor(model, loss_fn, data, group="out")[(model, "weight")]
    torch.testing.assert_close(scores, rows.view(2, 1).expand(2, 3))


def test_obd_with_the_empirical_fisher():
    model, data, loss_fn = least_squares(seed=2, batches=5, rows=1)  # single examples
    w = model.weight.detach()
    fisher = sum(gradient_by_hand(w, x, y).pow(2) for x, y in data) / len(data)
    scores = criteria.obd(model, loss_fn, data, estimator="fisher")[(model, "weight")]
    torch.testing.assert_close(scores, 0.5 * fisher * w.pow(2))


def test_obd_hutchinson_on_least_squares_is_exact_per_diagonal():
    # For L = mean((x W^T - y)^2) the Hessian is block diagonal over output rows:
    # H[(a,b),(a,d)] = 2/(rows*2) * sum_n x_nb x_nd, so H_ii = 2/(rows*2) * sum_n x_nb^2.
    model, data, loss_fn = least_squares(seed=3, batches=1, rows=6)
    x, _ = data[0]
    exact = (2.0 / (6 * 2) * x.pow(2).sum(0)).expand(2, 3)
    diag = criteria.hessian_diagonal(model, loss_fn, data, samples=4000, generator=torch.Generator().manual_seed(0))
    gram = 2.0 / 12 * x.T @ x
    off = (gram.pow(2).sum(1) - gram.diagonal().pow(2)).sqrt() / 4000**0.5  # per-entry std
    assert torch.all((diag[(model, "weight")] - exact).abs() <= 5 * off.expand(2, 3) + 1e-9)


def test_obd_hutchinson_against_the_exact_hessian_of_a_nonlinear_model():
    torch.manual_seed(0)
    first, second = nn.Linear(3, 4, bias=False), nn.Linear(4, 1, bias=False)
    model = nn.Sequential(first, nn.Tanh(), second).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 1, dtype=torch.float64)
    loss_fn = lambda m, batch: (m(batch[0]) - batch[1]).pow(2).mean()  # noqa: E731

    def loss_of(flat):
        hidden = torch.tanh(x @ flat.reshape(4, 3).T)
        return (hidden @ second.weight.detach().T - y).pow(2).mean()

    hessian = torch.autograd.functional.hessian(loss_of, first.weight.detach().flatten())
    exact = hessian.diagonal()
    samples = 3000
    std = ((hessian.pow(2).sum(1) - exact.pow(2)).clamp_min(0) / samples).sqrt()
    scores = criteria.obd(
        model, loss_fn, [(x, y)], parameters=[(first, "weight")], samples=samples,
        generator=torch.Generator().manual_seed(0),
    )[(first, "weight")].flatten()
    w2 = first.weight.detach().flatten().pow(2)
    assert torch.all((scores - 0.5 * exact * w2).abs() <= 5 * 0.5 * std * w2 + 1e-12)


def test_pruned_entries_score_zero_in_data_driven_criteria():
    model, data, loss_fn = least_squares(seed=4)
    prune.custom_from_mask(model, "weight", torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]]))
    for scores in (
        criteria.snip(model, loss_fn, data),
        criteria.taylor(model, loss_fn, data),
        criteria.obd(model, loss_fn, data, samples=2),
        criteria.obd(model, loss_fn, data, estimator="fisher"),
    ):
        s = scores[(model, "weight")]
        assert s[0, 1] == 0 and s[1, 2] == 0 and torch.all(s[model.weight_mask == 1] != 0)


@pytest.mark.parametrize("make", [np.int64, np.int32])
def test_obd_samples_as_a_numpy_integer(make):
    """samples passed the check as a numpy integer and was used as it came:
    ``sample + 1 < samples`` handed torch.autograd.grad a numpy bool as
    retain_graph (a TypeError from inside). It is a Python int now: the
    same scores as an int gives."""
    model, data, loss_fn = least_squares(seed=5)
    want = criteria.obd(model, loss_fn, data, samples=3, generator=torch.Generator().manual_seed(0))
    got = criteria.obd(model, loss_fn, data, samples=make(3), generator=torch.Generator().manual_seed(0))
    assert torch.equal(got[(model, "weight")], want[(model, "weight")])
    with pytest.raises(TypeError, match="samples must be an int"):
        criteria.obd(model, loss_fn, data, samples=2.0)


def test_data_driven_criteria_bad_arguments():
    model, data, loss_fn = least_squares()
    with pytest.raises(ValueError, match="batches is empty"):
        criteria.snip(model, loss_fn, [])
    with pytest.raises(ValueError, match="estimator must be"):
        criteria.obd(model, loss_fn, data, estimator="exact")
    with pytest.raises(ValueError, match="samples must be"):
        criteria.obd(model, loss_fn, data, samples=0)
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None; got int"):  # a seed
        criteria.obd(model, loss_fn, data, generator=0)
    with pytest.raises(TypeError, match="scalar"):
        criteria.taylor(model, lambda m, b: m(b[0]), data)


@pytest.mark.parametrize("criterion", [criteria.snip, criteria.taylor, criteria.obd,
                                       lambda *a: criteria.obd(*a, estimator="fisher"), criteria.hessian_diagonal],
                         ids=["snip", "taylor", "obd", "obd-fisher", "hessian_diagonal"])
def test_gradient_criteria_name_a_bad_loss_fn(criterion):
    """A loss_fn that is no callable, or gives a batch of losses, a float or
    a loss without gradient failed inside the loop or torch.autograd.grad
    ("'str' object is not callable", "grad can be implicitly created only for
    scalar outputs", "element 0 of tensors does not require grad")."""
    model, data, loss_fn = least_squares()
    with pytest.raises(TypeError, match=r"loss_fn must be callable \(loss_fn\(model, batch\) -> scalar loss "
                                        r"tensor\); got str"):
        criterion(model, "mse", data)
    with pytest.raises(TypeError, match=r"loss_fn\(model, batch\) must return a scalar loss tensor \(0-d: "
                                        r"reduce it, e.g. .mean\(\)\); got a tensor of shape \(4, 2\)"):
        criterion(model, lambda m, b: (m(b[0]) - b[1]).pow(2), data)
    with pytest.raises(TypeError, match=r"loss_fn\(model, batch\) must return a scalar loss tensor; got float"):
        criterion(model, lambda m, b: float(loss_fn(m, b)), data)
    with pytest.raises(ValueError, match=r"loss_fn\(model, batch\) returned a loss without gradient"):
        criterion(model, lambda m, b: loss_fn(m, b).detach(), data)
    with pytest.raises(TypeError, match="batches must be an iterable of batches .*; got int"):
        criterion(model, loss_fn, 3)
    with pytest.raises(ValueError, match=r"loss_fn\(model, batch\) returned the loss nan; scores need a finite"):
        criterion(model, lambda m, b: loss_fn(m, b) * float("nan"), data)  # every score NaN
    with pytest.raises(TypeError, match=r"\(module, name\) pairs"):
        criteria.magnitude([model.weight])


def test_bn_scaling_dense_network():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([0.5, -0.01, 2.0]))
        model[4].weight.copy_(torch.tensor([0.02, -1.0]))
    scores = criteria.bn_scaling(model)
    assert set(scores) == {(model[0], "weight"), (model[3], "weight")}
    assert torch.equal(scores[(model[0], "weight")][:, 0, 0, 0], torch.tensor([0.5, 0.01, 2.0]))
    assert torch.all(scores[(model[0], "weight")] == torch.tensor([0.5, 0.01, 2.0]).view(3, 1, 1, 1))
    # network slimming: prune the channels of smallest |gamma| over the whole network
    prune.global_structured(list(scores), prune.ChannelStructured, amount=2, n=float("inf"), importance_scores=scores)
    assert torch.equal(model[0].weight_mask.sum((1, 2, 3)) > 0, torch.tensor([True, False, True]))
    assert torch.equal(model[3].weight_mask.sum((1, 2, 3)) > 0, torch.tensor([False, True]))


def test_bn_scaling_sparse_network_with_pointsparse_batchnorm():
    conv, norm = SparseConv(2, 3, kernel_size=3), SparseBatchNorm(3)
    model = nn.Sequential(conv, norm)
    inner = criteria.find_batchnorm(norm)
    with torch.no_grad():
        inner.weight.copy_(torch.tensor([1.0, -3.0, 0.1]))
    scores = criteria.bn_scaling(model)[(conv, "weight")]
    assert scores.shape == conv.weight.shape  # (K, C_in, C_out): channels on axis 2
    assert torch.all(scores == torch.tensor([1.0, 3.0, 0.1]).view(1, 1, 3))
    model(sparse_input(n=6, channels=2))  # the pair is a working network
    prune.channel_structured(conv, "weight", amount=1, n=float("inf"), importance_scores=scores)
    assert torch.equal(conv.weight_mask.sum((0, 1)) > 0, torch.tensor([True, True, False]))


def test_bn_scaling_explicit_pairs_and_errors():
    conv = nn.Conv2d(2, 3, 1)
    scale = nn.Module()
    scale.weight = nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))  # any module with a 1-D weight
    scores = criteria.bn_scaling([(conv, scale)])[(conv, "weight")]
    assert torch.all(scores[:, 0, 0, 0] == torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match=r"expected \(3,\)"):
        criteria.bn_scaling([(conv, nn.BatchNorm2d(4))])
    with pytest.raises(ValueError, match="no \\(layer, batchnorm\\) pairs"):
        criteria.bn_scaling(nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(5)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_bn_scaling_of_a_16_bit_model_is_taken_in_float32(dtype):
    """bn_scaling gave a 16-bit model's scores in its own dtype (every other
    criterion gives them in float32 at least), so ``normalize`` divided them
    in bfloat16: the gammas 1.3515625 and 1.34375 (exact in both dtypes)
    both became 0.2695 under "max", a tie, and pruning by those scores
    could remove the larger channel. They are float32 now and keep their
    order."""
    conv, norm = nn.Conv2d(2, 3, 1).to(dtype), nn.BatchNorm2d(3).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.3515625, 1.34375, -5.0]))
    scores = criteria.bn_scaling([(conv, norm)])
    assert scores[(conv, "weight")].dtype == torch.float32
    assert torch.equal(scores[(conv, "weight")][:, 0, 0, 0], torch.tensor([1.3515625, 1.34375, 5.0]))
    for how in ("l2", "max", "mean"):
        channel = criteria.normalize(scores, how)[(conv, "weight")][:, 0, 0, 0]
        assert channel[1] < channel[0] < channel[2], how
    normalized = criteria.normalize(scores)[(conv, "weight")]
    prune.channel_structured(conv, "weight", 1, n=float("inf"), importance_scores=normalized)
    assert (conv.weight_mask.sum((1, 2, 3)) == 0).nonzero().flatten().tolist() == [1]


def test_normalize_and_global_use():
    a, b = nn.Linear(4, 2, bias=False), nn.Linear(4, 2, bias=False)
    set_weight(a, torch.full((2, 4), 100.0))
    set_weight(b, torch.arange(1.0, 9.0).reshape(2, 4))
    scores = criteria.normalize(criteria.magnitude([(a, "weight"), (b, "weight")]), how="max")
    assert scores[(a, "weight")].max() == 1 and scores[(b, "weight")].max() == 1
    prune.global_unstructured(list(scores), prune.L1Unstructured, importance_scores=scores, amount=4)
    assert int(a.weight_mask.sum()) == 8 and torch.equal(b.weight_mask.flatten(), torch.tensor([0.0] * 4 + [1.0] * 4))
    with pytest.raises(ValueError, match="how must be"):
        criteria.normalize(scores, how="sum")


def test_normalize_takes_a_criterion_dict_of_tensors():
    with pytest.raises(TypeError, match=r"scores must be a dict \{\(module, name\): tensor\}.*got list"):
        criteria.normalize([1, 2])
    layer = nn.Linear(4, 2)
    with pytest.raises(TypeError, match=r"scores\[.*'weight'\)\] must be a tensor; got list"):
        criteria.normalize({(layer, "weight"): [1.0, 2.0]})


def _log_norms(rows: torch.Tensor, p: float) -> torch.Tensor:
    """log ||row||_p of each row in float64, in the log domain (no power is formed)."""
    return torch.logsumexp(p * rows.double().abs().log(), dim=1) / p


@pytest.mark.parametrize("scale", [1e-3, 1e3])
def test_magnitude_group_norm_of_a_large_p_ranks_as_the_exact_norm(scale):
    """p=2000: |w|^p underflows to 0 (every group scored 0, a tie) or
    overflows to inf for |w| ~ 1e-3 / 1e3; the group norm is scaled by the
    group's largest |w| and equals the log-domain reference, the rows
    sharing their largest entry ordered by the others."""
    rows = torch.tensor([[0.5, 0.1, 0.1, 0.1],
                         [0.7, 0.6, 0.5, 0.4],
                         [1.0, 0.9999, 0.5, 0.2],  # rows 2-4 share their largest |w|: the rest decides
                         [-1.0, 0.9998, 0.5, 0.2],
                         [1.0, 0.3, -0.2, 0.1],
                         [0.99, -0.99, 0.99, 0.99]]) * scale
    layer = nn.Linear(4, 6, bias=False)
    set_weight(layer, rows)
    key = (layer, "weight")
    got = criteria.magnitude([key], p=2000, group="out")[key]
    want = _log_norms(rows, 2000).exp()
    assert torch.all(got == got[:, :1])  # each row's norm on each of its entries
    torch.testing.assert_close(got[:, 0].double(), want, rtol=1e-6, atol=0)
    assert torch.equal(torch.argsort(got[:, 0]), torch.argsort(want))
    assert got[2, 0] > got[3, 0] > got[4, 0] and torch.isfinite(got).all()
    # the structured method ranks by the same norms: the two weakest rows (0 and 1) go (tied norms sent 3 and 5)
    prune.channel_structured(layer, "weight", amount=2, n=2000)
    assert torch.equal(layer.weight_mask.sum(1) == 0, torch.tensor([True, True, False, False, False, False]))


def test_magnitude_per_entry_power_that_loses_the_order_is_an_error():
    for values, p in ((torch.full((2, 3), 1e-3), 2000), (torch.full((2, 3), 1e3), 2000)):
        layer = nn.Linear(3, 2, bias=False)
        set_weight(layer, values * torch.arange(1.0, 7.0).reshape(2, 3))
        with pytest.raises(ValueError, match=r"p=2000: \|w\|\^p of 6 weight\(s\) of Linear.weight .* use p=1"):
            criteria.magnitude(layer, p=p)
    half = nn.Linear(2, 1, bias=False).half()
    set_weight(half, torch.tensor([[1e-4, 0.5]]))
    # float16 scores are taken in float32: 1e-8 (the square of 1e-4) is 0 in float16, not in float32
    scores = criteria.magnitude(half, p=2)[(half, "weight")]
    assert scores.dtype == torch.float32 and 0 < scores[0, 0] < scores[0, 1]
    assert torch.equal(criteria.magnitude(half, p=1)[(half, "weight")], half.weight.detach().abs().float())


def test_normalize_l2_of_very_large_and_very_small_scores():
    """vector_norm squares the scores as they are: 1e30 in float32 gave the
    norm inf (every score normalised to 0), 1e-30 the norm 0 (the scores
    left as they were)."""
    a, b = nn.Linear(2, 1), nn.Linear(2, 1)
    for scale in (1e30, 1e-30):
        values = torch.tensor([[3.0, 4.0]]) * scale
        out = criteria.normalize({(a, "weight"): values, (b, "weight"): torch.tensor([[1.0, 0.0]])})
        torch.testing.assert_close(out[(a, "weight")], torch.tensor([[0.6, 0.8]]))
        assert torch.equal(out[(b, "weight")], torch.tensor([[1.0, 0.0]]))


def test_nan_scores_are_an_error_for_group_methods():
    """topk ranks NaN above every number: a NaN-scored group was never pruned."""
    layer = nn.Linear(3, 4, bias=False)
    scores = torch.rand(4, 3)
    scores[0, 1] = float("nan")
    with pytest.raises(ValueError, match=r"importance_scores for Linear.weight hold 1 NaN value\(s\)"):
        prune.channel_structured(layer, "weight", amount=1, importance_scores=scores)
    assert not prune.is_pruned(layer)
    with torch.no_grad():
        layer.weight[2, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        criteria.magnitude(layer, p=2, group="out")
    with pytest.raises(ValueError, match="NaN"):
        prune.global_structured([(layer, "weight")], prune.ChannelStructured, amount=1)


def test_group_magnitude_of_a_kernel_region_conv_counts_its_region():
    """criteria.magnitude(group=...) and regularizers.group_lasso took the
    values outside a kernel_region conv's region (never run) into each
    group's norm: 100s at an offset outside a cross ranked the channels, and
    the penalty pushed on them. Only the region counts now."""
    import pointsparse as ps
    from pointsparse.nn.functional import region_of
    from pointsparse.prune import criteria, regularizers

    conv = ps.nn.Conv3d(2, 4, 3, kernel_region="cross")
    keep = region_of(3, "cross")
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[keep] = torch.tensor([1.0, 2.0, 3.0, 4.0])
        conv.weight[0] = torch.tensor([100.0, 100.0, 0.0, 0.0])  # offset 0 is outside the cross
    scores = criteria.magnitude([(conv, "weight")], p=1, group="out")[(conv, "weight")]
    assert scores[13, 0].tolist() == [14.0, 28.0, 42.0, 56.0]  # 7 offsets x 2 inputs x the value
    penalty = regularizers.group_lasso(conv, group="out")
    want = sum(v * (14 ** 0.5) for v in (1.0, 2.0, 3.0, 4.0))
    assert penalty.item() == pytest.approx(want)
    penalty.backward()
    assert bool((conv.weight.grad[~keep] == 0).all())
    scaled = regularizers.group_lasso(conv, group="out", scale_by_size=True)
    assert scaled.item() == pytest.approx(want * 14 ** 0.5)


@pytest.mark.parametrize("criterion", [criteria.snip, criteria.taylor, criteria.obd,
                                       lambda *a: criteria.obd(*a, estimator="fisher")],
                         ids=["snip", "taylor", "obd", "obd-fisher"])
def test_gradient_criteria_name_a_frozen_layer(criterion):
    """A frozen weight (requires_grad=False) among the scored ones gave
    torch's RuntimeError 'One of the differentiated Tensors does not require
    grad' from inside autograd.grad; now a ValueError naming the layer, checked
    before any batch runs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    model[2].weight.requires_grad_(False)
    data = [(torch.randn(4, 3), torch.randn(4, 2))]
    calls = []

    def loss_fn(m, batch):
        calls.append(1)
        return (m(batch[0]) - batch[1]).pow(2).mean()
    with pytest.raises(ValueError, match=r"layer '2' \(Linear\.weight\) is frozen \(requires_grad=False\)"):
        criterion(model, loss_fn, data)
    assert not calls
    scores = criterion(model, loss_fn, data, [(model[0], "weight")])  # the trainable layers only: as before
    assert list(scores) == [(model[0], "weight")]


@pytest.mark.parametrize("name", ["snip", "taylor", "taylor-out", "obd-fisher", "fisher"])
def test_gradient_criteria_of_a_float16_model_are_taken_in_float32(name):
    """A float16 model's data-driven scores were computed and summed in
    float16: ``(g * w)^2`` ~1e-8 (g ~1e-3, w ~1e-1) underflowed to 0, so a
    quarter of the Taylor / OBD scores of a small MLP tied at 0 where float32
    has none. They are taken in float32 now (as ``magnitude``'s), from the
    float16 gradients."""
    model, data, loss_fn = least_squares(seed=6)
    model.half()
    set_weight(model, torch.tensor([[0.1, -0.02, 0.3], [0.004, 0.2, -0.1]]))
    data = [(x.half(), y.half() * 1e-3 + x.half() @ model.weight.detach().T) for x, y in data]  # small residuals
    w = model.weight.detach().float()
    grads = [torch.autograd.grad(loss_fn(model, b), model.weight)[0].float() for b in data]
    want = {"snip": (sum(grads) / len(grads) * w).abs(),
            "taylor": sum((g * w).pow(2) for g in grads) / len(grads),
            "taylor-out": sum((g * w).sum(1, keepdim=True).pow(2).expand(2, 3) for g in grads) / len(grads),
            "obd-fisher": 0.5 * (sum(g.pow(2) for g in grads) / len(grads)) * w.pow(2),
            "fisher": sum(g.pow(2) for g in grads) / len(grads)}[name]
    run = {"snip": lambda: criteria.snip(model, loss_fn, data),
           "taylor": lambda: criteria.taylor(model, loss_fn, data),
           "taylor-out": lambda: criteria.taylor(model, loss_fn, data, group="out"),
           "obd-fisher": lambda: criteria.obd(model, loss_fn, data, estimator="fisher"),
           "fisher": lambda: criteria.hessian_diagonal(model, loss_fn, data, estimator="fisher")}[name]
    got = run()[(model, "weight")]
    assert bool((want > 0).all())
    assert bool((got > 0).all()) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)


@pytest.mark.parametrize("how", ["l2", "max", "mean"])
def test_normalize_a_layer_without_weights(how):
    """The scores of a layer without weights (Linear(8, 0)) are an empty
    tensor: normalize(..., "max") failed in torch ('amax(): Expected
    reduction dim to be specified for input.numel() == 0'). An empty tensor
    comes back as it is, the others normalised."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 0))
    out = criteria.normalize(criteria.magnitude(model), how)
    assert out[(model[1], "weight")].shape == (0, 4)
    s = out[(model[0], "weight")]
    want = {"l2": torch.linalg.vector_norm(s), "max": s.amax(), "mean": s.mean()}[how]
    assert float(want) == pytest.approx(1.0)


@pytest.mark.parametrize("order", [0, 1])
def test_group_magnitude_of_a_float16_layer_ranks_as_the_exact_norms(order):
    """Group norms were cast back to float16: norms 100.0156 and 100.0 both
    became 100.0, a tie, and channel pruning by those scores could remove
    the larger channel. They are float32 now (at least), as per-entry
    scores are."""
    rows = [[50.0, 50.0, 50.0, 50.03125], [50.0, 50.0, 50.0, 50.0]]  # (exact in float16)
    rows = rows[::-1] if order else rows
    layer = nn.Linear(4, 2, bias=False).half()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(rows))
    scores = criteria.magnitude([(layer, "weight")], p=2, group="out")[(layer, "weight")]
    assert scores.dtype == torch.float32
    assert scores[order, 0] > scores[1 - order, 0]
    prune.channel_structured(layer, "weight", 1, importance_scores=scores)
    assert (layer.weight_mask.sum(1) == 0).nonzero().flatten().tolist() == [1 - order]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("how", ["l2", "max", "mean"])
def test_normalize_takes_16_bit_scores_in_float32(dtype, how):
    # A user's 16-bit scores were divided in their dtype: two distinct scores became one (a tie that a
    # ranking could break either way). Built-in criteria give float32 already (as bn_scaling now does).
    layer = torch.nn.Linear(2, 2)
    scores = {(layer, "weight"): torch.tensor([[1.3515625, 1.34375], [0.5, 0.25]], dtype=dtype)}
    out = criteria.normalize(scores, how)[(layer, "weight")]
    assert out.dtype == torch.float32
    assert out[0, 0] > out[0, 1] > out[1, 0] > out[1, 1]


def test_bn_scaling_names_what_is_no_model_or_pairs():
    conv = SparseConv(2, 3, 3)
    with pytest.raises(TypeError, match="model_or_pairs must be a model or .* pairs; got str"):
        criteria.bn_scaling("x")
    with pytest.raises(TypeError, match=r"model_or_pairs\[0\] must be a \(layer, batchnorm\) pair of modules; got "
                                        "Conv3d"):  # (Python's 'cannot unpack non-iterable')
        criteria.bn_scaling([conv])
    with pytest.raises(TypeError, match=r"model_or_pairs\[0\] must be a \(layer, batchnorm\) pair"):
        criteria.bn_scaling([(conv, "bn")])
