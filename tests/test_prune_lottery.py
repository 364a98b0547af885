"""Lottery tickets: per-round sparsity, exact rewinding under the mask, the
rewind point at iteration k, and the two controls."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pointsparse.prune import adapters, lottery, procedure
from prune_procedures_support import Trainer, mlp, region_chain

pytestmark = pytest.mark.usefixtures("one_thread")


def test_rounds_prune_twenty_percent_of_the_rest():
    tr = Trainer()
    net = mlp(0)
    res = lottery.lottery_ticket(net, tr, tr.accuracy, train_steps=20, rounds=3)
    total = sum(m.weight.numel() for _, m in adapters.prunable_layers(net))
    for r, row in enumerate(res.rounds):
        assert row["round"] == r
        assert abs(row["sparsity"] - (1 - 0.8**r)) <= 1 / total
    assert [c[0] for c in tr.calls] == [20] * 4
    # masks only shrink from round to round
    for a, b in zip(res.masks, res.masks[1:]):
        for n in a:
            assert not bool((b[n] & ~a[n]).any())


def test_rewind_restores_exactly_the_saved_weights_under_the_mask():
    tr = Trainer()
    net = mlp(0)
    init = {k: v.clone() for k, v in net.state_dict().items()}
    res = lottery.lottery_ticket(net, tr, tr.accuracy, train_steps=15, rounds=2, rewind_step=0)
    for k, v in init.items():  # k = 0: the state is the original initialisation
        assert torch.equal(res.state[k], v)
    lottery.rewind(net, res.state)
    named = dict(net.named_modules())
    for n, mask in res.masks[-1].items():
        m = named[n]
        assert torch.equal(m.weight, init[f"{n}.weight"] * mask)
        assert torch.equal(m.bias, init[f"{n}.bias"])
        assert int((m.weight == 0).sum()) == int((~mask).sum())


def test_rewind_point_is_iteration_k():
    tr = Trainer()
    twin_tr = Trainer()
    net, twin = mlp(0), mlp(0)
    res = lottery.lottery_ticket(net, tr, tr.accuracy, train_steps=20, rounds=1, rewind_step=6)
    twin_tr(twin, 6)  # same seed, same data order: the weights after 6 steps
    for k, v in twin.state_dict().items():
        assert torch.allclose(res.state[k], v, atol=1e-6)
    assert [c[0] for c in tr.calls] == [6, 14, 14]


def test_controls_keep_the_mask_or_its_sparsity():
    tr = Trainer()
    res = lottery.lottery_ticket(mlp(0), tr, tr.accuracy, train_steps=10, rounds=2)
    rnd = lottery.random_masks_like(res.masks[2], seed=3)
    for n, m in res.masks[2].items():
        assert int(rnd[n].sum()) == int(m.sum()) and not torch.equal(rnd[n], m)
    out = lottery.controls(mlp, res, 2, tr, tr.accuracy, train_steps=10)
    assert set(out) == {"reinit", "random_mask"} and all(0 <= v <= 1 for v in out.values())
    # re-initialised ticket: same mask, other weights
    other = mlp(1)
    lottery.train_masked(other, res.masks[2], lambda m, s: None, tr.accuracy, 0)
    named = dict(other.named_modules())
    for n, mask in res.masks[2].items():
        assert torch.equal(named[n].weight != 0, mask)
        assert not torch.equal(named[n].weight, res.state[f"{n}.weight"] * mask)


def test_bad_inputs():
    tr = Trainer()
    with pytest.raises(ValueError, match="prune_fraction"):
        lottery.lottery_ticket(mlp(0), tr, tr.accuracy, 10, prune_fraction=0.0)
    with pytest.raises(ValueError, match="rewind_step"):
        lottery.lottery_ticket(mlp(0), tr, tr.accuracy, 10, rewind_step=10)
    with pytest.raises(ValueError, match="does not fit"):
        lottery.rewind(mlp(0, widths=(8, 4, 3)), lottery.snapshot(mlp(0)))
    net = mlp(0)
    procedure.global_magnitude_prune(net, 0.5)
    with pytest.raises(ValueError, match="already pruned"):
        lottery.train_masked(net, adapters.masks(net), tr, tr.accuracy, 1)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"train_steps": 2.5}, TypeError, "train_steps must be an int"),
    ({"train_steps": "10"}, TypeError, "train_steps must be an int"),
    ({"train_steps": 10, "rewind_step": 1.5}, TypeError, "rewind_step must be an int"),
    ({"train_steps": 10, "rounds": True}, TypeError, "rounds"),
    ({"train_steps": 10, "lr": float("nan")}, ValueError, "lr must be a finite number"),
    ({"train_steps": 10, "lr": -0.1}, ValueError, "lr must be a finite number"),
])
def test_step_counts_and_lr_are_checked_by_name_before_training(kwargs, error, match):
    tr = Trainer()
    net = mlp(0)
    before = lottery.snapshot(net)
    with pytest.raises(error, match=match):
        lottery.lottery_ticket(net, tr, tr.accuracy, **kwargs)
    assert tr.calls == []
    assert all(torch.equal(before[k], v) for k, v in lottery.snapshot(net).items())


@pytest.mark.parametrize("make", [np.int64, np.int32])
def test_counts_take_numpy_integers(make):
    """rounds, train_steps, rewind_step, round_index and seed may be numpy
    integers (rounds and round_index were refused: isinstance int); the run
    is the one the ints give and the train function gets Python ints."""
    runs = []
    for cast in (int, make):
        tr = Trainer()
        res = lottery.lottery_ticket(mlp(0), tr, tr.accuracy, train_steps=cast(4), rounds=cast(1),
                                     rewind_step=cast(1))
        ctl = Trainer()
        runs.append((tr.calls, res, lottery.controls(mlp, res, cast(-1), ctl, ctl.accuracy, cast(4), seed=cast(2)),
                     ctl.calls))
    (calls, res, controls, ctl_calls), (np_calls, np_res, np_controls, np_ctl_calls) = runs
    assert np_calls == calls and np_ctl_calls == ctl_calls
    assert all(type(steps) is int for steps, _ in np_calls + np_ctl_calls)
    assert np_res.rounds == res.rounds and np_controls == controls
    assert all(torch.equal(a[n], b[n]) for a, b in zip(np_res.masks, res.masks) for n in a)


@pytest.mark.parametrize("bad", [True, np.bool_(True), 2.0, 1.5])
def test_counts_refuse_bools_and_floats(bad):
    tr = Trainer()
    with pytest.raises(TypeError, match="rounds must be an int >= 0"):
        lottery.lottery_ticket(mlp(0), tr, tr.accuracy, 4, rounds=bad)
    result = lottery.LotteryResult(rewind_step=0, masks=[adapters.masks(mlp(0))] * 2, state=lottery.snapshot(mlp(0)))
    with pytest.raises(TypeError, match="round_index must be an int naming one of the 2 rounds"):
        lottery.controls(mlp, result, bad, tr, tr.accuracy, 4)  # (a wrong type, as at every count: was ValueError)
    with pytest.raises(TypeError, match="seed must be an int >= 0"):  # was checked after training the reinit control
        lottery.controls(mlp, result, 0, tr, tr.accuracy, 4, seed=bad)
    assert tr.calls == []


def test_controls_check_round_index_and_train_steps():
    tr = Trainer()
    result = lottery.lottery_ticket(mlp(0), tr, tr.accuracy, 2, rounds=1, rewind_step=1)
    with pytest.raises(ValueError, match="round_index"):
        lottery.controls(mlp, result, 5, tr, tr.accuracy, 2)
    with pytest.raises(ValueError, match="train_steps must be > the result's rewind_step=1"):
        lottery.controls(mlp, result, 1, tr, tr.accuracy, 1)


def test_magnitude_pruning_checks_target_and_scores_by_name():
    for prune_fn in (procedure.global_magnitude_prune, procedure.layer_magnitude_prune):
        with pytest.raises(TypeError, match="target sparsity must be a number"):  # was '<=' not supported
            prune_fn(mlp(0), "0.5")
        with pytest.raises(ValueError, match=r"target sparsity must be in \[0, 1\)"):
            prune_fn(mlp(0), float("nan"))
    net = mlp(0)
    with pytest.raises(ValueError, match="scores has no entry for layer"):  # was a bare KeyError
        procedure.global_magnitude_prune(net, 0.5, scores={"0": torch.ones(16, 8)})
    with pytest.raises(TypeError, match="scores must be a dict"):
        procedure.global_magnitude_prune(net, 0.5, scores=[torch.ones(16, 8)])
    good = {n: m.weight.detach().abs().clone() for n, m in adapters.prunable_layers(net)}
    nan = {**good, "0": good["0"].clone().index_fill_(1, torch.tensor([0]), float("nan"))}
    for bad, error, match in (({**good, "0": torch.ones(3)}, ValueError,  # an IndexError inside torch's
                               r"scores\['0'\] must have the layer's weight shape \(16, 8\); got \(3,\)"),
                              ({**good, "0": [1.0]}, TypeError, r"scores\['0'\] must be a tensor"),  # AttributeError
                              (nan, ValueError, r"scores\['0'\] hold NaN")):  # the NaN weights were kept
        with pytest.raises(error, match=match):
            procedure.global_magnitude_prune(net, 0.5, scores=bad)
    assert adapters.sparsity(net) == 0.0


def test_random_masks_like_takes_a_dict_of_tensors():
    with pytest.raises(TypeError, match=r"mask_dict\['a'\] must be a mask tensor; got str"):
        lottery.random_masks_like({"a": "x"})
    with pytest.raises(TypeError, match=r"mask_dict must be a dict \{layer name: mask tensor\}; got list"):
        lottery.random_masks_like([torch.ones(2, 2)])
    with pytest.raises(TypeError, match="seed must be an int >= 0; got 'a'"):  # torch's RuntimeError
        lottery.random_masks_like({"a": torch.ones(2, 2)}, seed="a")
    with pytest.raises(ValueError, match=r"mask_dict\['a'\] must hold only 0 and 1"):  # (0.5 counted as kept)
        lottery.random_masks_like({"a": torch.full((2, 2), 0.5)})
    with pytest.raises(TypeError, match=r"state must be a dict \{name: tensor\} .*; got list"):  # AttributeError
        lottery.rewind(mlp(0), [1, 2])
    out = lottery.random_masks_like({"a": torch.tensor([[1, 0], [1, 1]], dtype=torch.bool)})
    assert out["a"].shape == (2, 2) and int(out["a"].sum()) == 3


def _region_sparsities(net) -> dict[str, float]:
    from pointsparse.prune import sparsity_report
    return {name: row["sparsity"] for name, row in sparsity_report(net)["layers"].items()}


@pytest.mark.parametrize("outside", [0.0, 1e-3])
@pytest.mark.parametrize("scores", [False, True])
def test_global_magnitude_prune_counts_a_kernel_region_conv_inside_its_region(outside, scores):
    """A kernel_region conv's weights are the region's: the 20 offsets
    outside a 'cross' conv (zeros, or values smaller than every weight) were
    counted as pruned or pruned first, so the network ended far from the
    target. They are neither counted nor pruned: the sparsity over the
    region's weights is the target and the values outside are untouched."""
    net = region_chain(0, outside)
    before = net[0].weight.detach().clone()
    given = {n: m.weight.detach().abs().clone() for n, m in adapters.prunable_layers(net)} if scores else None
    procedure.global_magnitude_prune(net, 0.5, scores=given)
    region = net[0].weight.new_zeros(27, dtype=torch.bool)
    region[list(net[0].kernel_region)] = True
    assert adapters.sparsity(net) == pytest.approx(0.5, abs=1 / (7 * 18 + 27 * 24))
    assert torch.equal(net[0].weight.detach()[~region], before[~region])
    assert bool(net[0].weight_mask[~region].all())


@pytest.mark.parametrize("outside", [0.0, 1e-3])
def test_layer_magnitude_prune_counts_a_kernel_region_conv_inside_its_region(outside):
    net = region_chain(0, outside)
    before = net[0].weight.detach().clone()
    procedure.layer_magnitude_prune(net, 0.5)
    assert _region_sparsities(net) == {"0": pytest.approx(0.5, abs=1 / (7 * 18)), "2": pytest.approx(0.5, abs=1e-9)}
    region = list(net[0].kernel_region)
    rest = [k for k in range(27) if k not in region]
    assert torch.equal(net[0].weight.detach()[rest], before[rest])


@pytest.mark.parametrize("outside", [0.0, 1e-3])
def test_random_mask_control_of_a_kernel_region_conv_is_as_sparse_inside_its_region(outside):
    """The random-mask control keeps each layer's count of kept weights: for
    a kernel_region conv those of its region (the ticket's mask is True
    outside it, values never run), which random_masks_like spread over all
    27 offsets, so the control's region was far denser than the ticket's.
    Given the model it draws inside each layer's weights and keeps the mask
    outside as it is."""
    def no_training(model, steps):
        pass

    res = lottery.lottery_ticket(region_chain(0, outside), no_training, adapters.sparsity, train_steps=1, rounds=1,
                                 scope="layer")
    ticket = res.masks[1]
    assert res.rounds[1]["metric"] == pytest.approx(0.2, abs=1 / 126)
    net = region_chain(1, outside)
    rnd = lottery.random_masks_like(ticket, seed=3, model=net)
    used = {n: adapters.used_mask(m) for n, m in adapters.prunable_layers(net)}
    for n, m in ticket.items():
        assert int((rnd[n] & used[n]).sum()) == int((m & used[n]).sum())
        assert torch.equal(rnd[n][~used[n]], m[~used[n]])
    assert not torch.equal(rnd["0"], ticket["0"])
    out = lottery.controls(lambda seed: region_chain(seed, outside), res, 1, no_training, adapters.sparsity,
                           train_steps=1)
    assert out == {"reinit": pytest.approx(res.rounds[1]["metric"]),
                   "random_mask": pytest.approx(res.rounds[1]["metric"])}
    with pytest.raises(ValueError, match=r"layer 'x' is not a submodule"):
        lottery.random_masks_like({"x": torch.ones(2, 2, dtype=torch.bool)}, model=net)
    with pytest.raises(ValueError, match=r"mask_dict\['0'\] must have the layer's weight shape"):
        lottery.random_masks_like({"0": torch.ones(2, 2, dtype=torch.bool)}, model=net)


@pytest.mark.parametrize("layers", [None, ["x"]])
def test_layers_are_checked_before_any_training(layers):
    """A model without prunable layers, or a ``layers`` naming none of its
    layers, was found only after training to the rewind step and through the
    whole first round (the masks of round 0 are read then): a full training
    run before the ValueError. It comes before any training now."""
    calls = []
    net = torch.nn.Sequential(torch.nn.ReLU()) if layers is None else torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="no prunable layer" if layers is None else "'x' is not a submodule"):
        lottery.lottery_ticket(net, lambda m, steps: calls.append(steps), lambda m: 0.5, 5, rounds=2,
                               rewind_step=2, layers=layers)
    assert calls == []


def test_snapshot_keeps_a_users_own_buffer_named_like_a_mask():
    class Gated(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)
            self.register_buffer("attn_mask", torch.ones(4))

        def forward(self, x):
            return self.fc(x) * self.attn_mask

    net = Gated()
    torch.nn.utils.prune.l1_unstructured(net.fc, "weight", amount=0.5)
    state = lottery.snapshot(net)
    assert sorted(state) == ["attn_mask", "fc.bias", "fc.weight"]  # not fc.weight_mask: the pruning's own
    assert torch.equal(state["fc.weight"], net.fc.weight_orig)

    def train(model, steps):  # changes the buffer as training would
        with torch.no_grad():
            model.attn_mask.mul_(2)

    net = Gated()
    res = lottery.lottery_ticket(net, train, lambda m: 0.5, train_steps=2, rounds=1)
    assert torch.equal(res.state["attn_mask"], torch.ones(4))  # rewound each round, trained once after it
    assert torch.equal(net.attn_mask, torch.full((4,), 2.0))


@pytest.mark.parametrize("bad", [None, "0.5", torch.ones(3), True])
def test_an_eval_fn_returning_no_number_is_a_type_error_naming_it(bad):
    with pytest.raises(TypeError, match="eval_fn must return a number"):
        lottery.lottery_ticket(mlp(0), lambda m, s: None, lambda m: bad, train_steps=1, rounds=0)
    res = lottery.lottery_ticket(mlp(0), lambda m, s: None, lambda m: torch.tensor([0.5]), train_steps=1, rounds=1)
    with pytest.raises(TypeError, match="eval_fn must return a number"):
        lottery.controls(mlp, res, 1, lambda m, s: None, lambda m: bad, train_steps=1)


def test_a_rewound_ticket_deep_copies():
    """rewind recomputed each pruned weight (weight_orig * weight_mask) with
    autograd on: a computed tensor that copy.deepcopy refuses, so copying the
    rewound ticket (to train it under several seeds) failed with torch's
    'Only Tensors created explicitly by the user'."""
    import copy

    tr = Trainer()
    net = mlp(0)
    res = lottery.lottery_ticket(net, tr, tr.accuracy, train_steps=3, rounds=1)
    lottery.rewind(net, res.state)
    twin = copy.deepcopy(net)
    x = torch.randn(4, 8)
    assert torch.equal(twin(x), net(x))
    tr(twin, 2)  # the copy trains, its masks hold
    assert all(bool((twin[i].weight[net[i].weight_mask == 0] == 0).all()) for i in (0, 2, 4))


def test_a_model_with_a_shared_layer_is_rewound():
    """A layer used twice (registered under two names) is in state_dict under
    both, but named_modules() lists it once: rewind raised 'state entry
    '2.weight' names no submodule of the model', so lottery_ticket failed
    after its first round of pruning."""
    torch.manual_seed(0)
    shared = torch.nn.Linear(8, 8)
    net = torch.nn.Sequential(shared, torch.nn.ReLU(), shared, torch.nn.ReLU(), torch.nn.Linear(8, 3))
    init = shared.weight.detach().clone()
    tr = Trainer()
    res = lottery.lottery_ticket(net, tr, tr.accuracy, train_steps=4, rounds=1)
    assert [row["round"] for row in res.rounds] == [0, 1]
    lottery.rewind(net, res.state)
    assert torch.equal(shared.weight, init * shared.weight_mask)


def test_a_model_already_pruned_is_refused_before_any_training():
    """lottery_ticket on a model whose layers are pruned (a ticket of an
    earlier run, run again): round 0, 'the dense network', reported the old
    sparsity and the rounds' targets (0.2, 0.36, ...) lay under it, so no
    round pruned anything, silently. Refused now, as train_masked refuses
    such a model, before any training."""
    tr = Trainer()
    net = mlp(0)
    procedure.global_magnitude_prune(net, 0.5)
    with pytest.raises(ValueError, match=r"layer '0' is already pruned .*pass an unpruned model"):
        lottery.lottery_ticket(net, tr, tr.accuracy, 4, rounds=2)
    assert tr.calls == []
    fresh = mlp(0)
    procedure.global_magnitude_prune(fresh, 0.5, layers=["2"])  # a layer left out of layers is the user's own
    res = lottery.lottery_ticket(fresh, tr, tr.accuracy, 2, rounds=1, layers=["0"])
    assert [r["sparsity"] for r in res.rounds] == [0.0, pytest.approx(0.2, abs=0.01)]


def _tied_mlp():
    """Three Linear(4, 4); the second shares the first's weight: 32 distinct weights."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(*(torch.nn.Linear(4, 4, bias=False) for _ in range(3)))
    net[1].weight = net[0].weight
    return net


def _distinct_zeros(net) -> int:
    return int((net[0].weight == 0).sum() + (net[2].weight == 0).sum())


@pytest.mark.parametrize("target", [0.5, 0.25, 15 / 32])
def test_global_magnitude_prune_thresholds_a_tied_weight_once(target):
    """A weight shared by two layers (b.weight = a.weight) stood twice in
    the global ranking: asked for 0.5, 14 of the 32 distinct weights were
    pruned (each pruned shared entry counted twice), and an odd count could
    split a shared entry's pair, one layer pruning it and the other running
    it. The target is met over the distinct weights and the layers sharing
    one run it with one mask; remove keeps them tied."""
    net = _tied_mlp()
    procedure.global_magnitude_prune(net, target)
    assert _distinct_zeros(net) == round(target * 32)
    assert torch.equal(net[0].weight_mask, net[1].weight_mask)
    assert net[0].weight_orig is net[1].weight_orig
    assert adapters.sparsity(net) == pytest.approx(round(target * 32) / 32)
    procedure.global_magnitude_prune(net, 0.75)  # again, on top of the masks
    assert _distinct_zeros(net) == 24 and torch.equal(net[0].weight_mask, net[1].weight_mask)
    for m in net:
        torch.nn.utils.prune.remove(m, "weight")
    assert net[0].weight is net[1].weight and _distinct_zeros(net) == 24


def test_global_magnitude_prune_gives_tied_layers_one_mask_when_theirs_differ():
    """One of two tied layers pruned on its own runs the shared weight
    masked while the other runs it whole: the entries it pruned are pruned
    (masks never un-prune) and both layers end with one mask, the target
    counted over the distinct weights."""
    net = _tied_with_one_pruned_alone()
    procedure.global_magnitude_prune(net, 0.5)
    _assert_one_mask_keeping_the_first_pruned(net)
    assert _distinct_zeros(net) == 16


def _tied_with_one_pruned_alone():
    """:func:`_tied_mlp` with 4 entries (the first row) pruned in layer 0 only."""
    net = _tied_mlp()
    torch.nn.utils.prune.custom_from_mask(net[0], "weight", (torch.arange(16).reshape(4, 4) >= 4).float())
    return net


def _assert_one_mask_keeping_the_first_pruned(net) -> None:
    assert torch.equal(net[0].weight_mask, net[1].weight_mask)
    assert not bool(net[1].weight_mask[0].any())


def test_global_magnitude_prune_refuses_different_scores_for_a_tied_weight():
    net = _tied_mlp()
    scores = {"0": torch.rand(4, 4), "1": torch.rand(4, 4), "2": torch.rand(4, 4)}
    with pytest.raises(ValueError, match=r"layers '0' and '1' share one weight.*scores"):
        procedure.global_magnitude_prune(net, 0.5, scores=scores)
    assert not any(torch.nn.utils.prune.is_pruned(m) for m in net)
    scores["1"] = scores["0"].clone()
    procedure.global_magnitude_prune(net, 0.5, scores=scores)
    assert _distinct_zeros(net) == 16 and torch.equal(net[0].weight_mask, net[1].weight_mask)


def test_global_magnitude_prune_refuses_layers_naming_one_of_two_tied_layers():
    """Pruning a shared weight through one of its layers left the other
    running it whole, until remove wrote the mask into the shared tensor
    and pruned a layer that layers had left out."""
    net = _tied_mlp()
    with pytest.raises(ValueError, match=r"layers '0' and '1' share one weight.*name both in layers, or neither"):
        procedure.global_magnitude_prune(net, 0.5, layers=["0", "2"])
    assert not any(torch.nn.utils.prune.is_pruned(m) for m in net)
    procedure.global_magnitude_prune(net, 0.5, layers=["2"])
    assert int((net[2].weight == 0).sum()) == 8


def test_layer_magnitude_prune_gives_tied_layers_one_mask():
    """Layers sharing one weight, one of them pruned on its own before:
    layer_magnitude_prune pruned each by its own mask, so the two ran the
    one weight with different masks (and remove wrote both into it). The
    entries either pruned are pruned in both, the target met over the
    weight once, one mask; layers naming one of them is a ValueError as in
    global_magnitude_prune."""
    net = _tied_with_one_pruned_alone()
    procedure.layer_magnitude_prune(net, 0.5)
    _assert_one_mask_keeping_the_first_pruned(net)
    assert int((net[0].weight_mask == 0).sum()) == 8 and int((net[2].weight_mask == 0).sum()) == 8
    with pytest.raises(ValueError, match=r"layers '0' and '1' share one weight"):
        procedure.layer_magnitude_prune(_tied_mlp(), 0.5, layers=["0"])


def test_snapshot_names_a_model_that_is_no_module():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module; got str"):  # (an AttributeError)
        lottery.snapshot("m")
