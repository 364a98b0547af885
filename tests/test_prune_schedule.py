"""Iterative pruning schedules: AGP and constant targets, the sparsity reached
at each round, the fine-tuning learning rate, one-shot."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pointsparse.prune import adapters, schedule
from prune_procedures_support import Trainer, mlp

pytestmark = pytest.mark.usefixtures("one_thread")

def test_agp_formula():
    assert schedule.agp_sparsity(0, 10, 0.9) == 0.0
    assert schedule.agp_sparsity(10, 10, 0.9) == pytest.approx(0.9)
    assert schedule.agp_sparsity(5, 10, 0.9) == pytest.approx(0.9 * (1 - 0.5**3))
    assert schedule.agp_sparsity(5, 10, 0.8, 0.2) == pytest.approx(0.8 - 0.6 * 0.125)
    assert schedule.agp_sparsity(99, 10, 0.9) == pytest.approx(0.9)  # clamped
    assert schedule.constant_sparsity(3, 4, 0.8) == pytest.approx(0.6)
    agp = schedule.sparsity_schedule(0.9, 4, "agp")
    assert agp == pytest.approx([0.9 * (1 - (1 - t / 4) ** 3) for t in range(1, 5)])
    assert all(b > a for a, b in zip(agp, agp[1:]))
    # AGP front-loads: its increments shrink
    steps = [b - a for a, b in zip([0.0] + agp, agp)]
    assert all(b < a for a, b in zip(steps, steps[1:]))


@pytest.mark.parametrize("kind", ["agp", "constant"])
@pytest.mark.parametrize("factor", [0.1, 0.01])
def test_iterative_reaches_each_target_and_fine_tunes_at_lower_lr(kind, factor):
    tr = Trainer(lr=0.1)
    net = mlp(0)
    tr(net, 50)
    tr.calls.clear()
    res = schedule.iterative_prune(net, tr, 0.8, rounds=4, steps_per_round=5, schedule=kind, lr=0.1,
                                   finetune_lr_factor=factor, eval_fn=tr.accuracy)
    targets = schedule.sparsity_schedule(0.8, 4, kind)
    total = sum(m.weight.numel() for _, m in adapters.prunable_layers(net))
    for row, t in zip(res.history, targets):
        assert row["target"] == pytest.approx(t)
        assert abs(row["sparsity"] - t) <= 1 / total
        assert 0 <= row["metric"] <= 1
    assert tr.calls == [(5, pytest.approx(0.1 * factor))] * 4
    assert adapters.sparsity(net) == pytest.approx(0.8, abs=1 / total)  # fine-tuning kept the masks


def test_layer_scope_and_one_shot():
    tr = Trainer()
    net = mlp(0)
    res = schedule.one_shot_prune(net, tr, 0.6, finetune_steps=7, scope="layer", lr=0.1)
    assert len(res.history) == 1 and tr.calls == [(7, pytest.approx(0.01))]
    for v in adapters.layer_sparsity(net).values():
        assert v == pytest.approx(0.6, abs=0.02)


def test_train_fn_without_lr_is_called_plainly():
    calls = []
    net = mlp(0)
    schedule.iterative_prune(net, lambda m, steps: calls.append(steps), 0.5, rounds=2, steps_per_round=3, lr=0.1)
    assert calls == [3, 3]


def test_bad_inputs():
    net = mlp(0)
    tr = Trainer()
    with pytest.raises(ValueError, match="schedule"):
        schedule.iterative_prune(net, tr, 0.5, schedule="cubic")
    with pytest.raises(ValueError, match="final"):
        schedule.iterative_prune(net, tr, 1.0)
    with pytest.raises(ValueError, match="rounds"):
        schedule.iterative_prune(net, tr, 0.5, rounds=0)
    with pytest.raises(ValueError, match="finetune_lr_factor"):
        schedule.iterative_prune(net, tr, 0.5, finetune_lr_factor=0)
    with pytest.raises(ValueError, match="scope"):
        schedule.iterative_prune(net, tr, 0.5, scope="net")
    for lr, error in ((float("nan"), ValueError), (-0.1, ValueError), (0.0, ValueError), ("0.1", TypeError)):
        with pytest.raises(error, match="lr must be"):  # NaN trained the pruned model to NaN
            schedule.iterative_prune(net, tr, 0.5, lr=lr)
    with pytest.raises(TypeError, match="eval_fn must be callable"):  # was found after pruning and training
        schedule.one_shot_prune(net, tr, 0.5, eval_fn=3)
    assert tr.calls == [] and adapters.sparsity(net) == 0.0


@pytest.mark.parametrize("fn", [schedule.agp_sparsity, schedule.constant_sparsity])
def test_step_formulas_check_their_arguments(fn):
    assert fn(10, 10, 1.0) == pytest.approx(1.0)  # a sparsity of 1 is a value of the formula
    for final in (2.0, -0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="final must be in"):
            fn(2, 5, final)
    with pytest.raises(ValueError, match="initial must be in"):
        fn(2, 5, 0.5, float("nan"))
    with pytest.raises(TypeError, match="final must be a number"):
        fn(2, 5, "0.5")
    for step in (2.5, True, "2", None):
        with pytest.raises(TypeError, match="step must be an int"):
            fn(step, 5, 0.5)
    for num_steps in (5.0, False):
        with pytest.raises(TypeError, match="num_steps must be an int"):
            fn(2, num_steps, 0.5)
    with pytest.raises(ValueError, match="num_steps must be >= 1"):
        fn(0, 0, 0.5)


def test_rounds_are_capped_before_the_list_is_built():
    assert len(schedule.sparsity_schedule(0.5, schedule.MAX_ROUNDS, "constant")) == schedule.MAX_ROUNDS
    with pytest.raises(ValueError, match=f"rounds must be <= MAX_ROUNDS={schedule.MAX_ROUNDS}; got 1000000000"):
        schedule.sparsity_schedule(0.5, 10**9)  # was a billion-entry list
    with pytest.raises(ValueError, match="rounds must be <= MAX_ROUNDS"):
        schedule.iterative_prune(mlp(0), Trainer(), 0.5, rounds=schedule.MAX_ROUNDS + 1)
    with pytest.raises(TypeError, match="rounds must be a positive int; got True"):
        schedule.sparsity_schedule(0.5, True)


def test_a_falling_schedule_is_refused():
    # was [0.39, 0.31, 0.3]: the masks stayed at 0.39, never the final 0.3 the call asked for
    with pytest.raises(ValueError, match=r"initial \(0.6\) must be <= final \(0.3\)"):
        schedule.sparsity_schedule(0.3, 3, initial=0.6)
    net, tr = mlp(0), Trainer()
    with pytest.raises(ValueError, match="initial"):
        schedule.iterative_prune(net, tr, 0.3, rounds=3, initial_sparsity=0.6)
    assert tr.calls == [] and adapters.sparsity(net) == 0.0
    assert schedule.sparsity_schedule(0.3, 2, "constant", initial=0.3) == [0.3, 0.3]


@pytest.mark.parametrize("fn", [schedule.agp_sparsity, schedule.constant_sparsity])
def test_step_formulas_refuse_a_falling_schedule_as_sparsity_schedule_does(fn):
    """agp_sparsity(1, 4, 0.2, initial=0.8) returned 0.45 (a target falling
    from 0.8 to 0.2, which masks that never un-prune cannot follow) where
    sparsity_schedule with the same arguments is a ValueError; both now
    refuse it, naming initial and final."""
    with pytest.raises(ValueError, match=r"initial \(0.8\) must be <= final \(0.2\)"):
        fn(1, 4, 0.2, 0.8)
    assert fn(2, 4, 0.5, 0.5) == pytest.approx(0.5)  # a flat schedule is one
    assert fn(4, 4, 1.0, 0.25) == pytest.approx(1.0)  # final=1 stays a value of the formula


@pytest.mark.parametrize("kwargs, error", [(dict(steps_per_round=-1), ValueError),
                                           (dict(steps_per_round=2.5), TypeError),
                                           (dict(steps_per_round=True), TypeError),
                                           (dict(finetune_lr_factor=float("nan")), ValueError),
                                           (dict(finetune_lr_factor=0), ValueError)])
def test_iterative_prune_checks_its_step_counts_before_pruning(kwargs, error):
    """A negative step count, a NaN or zero learning-rate factor: a
    ValueError naming it; a fractional or bool step count: a TypeError; each
    before the model is pruned (a negative count was handed to train_fn;
    NaN passed the factor's check)."""
    import torch

    from pointsparse import prune

    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    with pytest.raises(error, match=next(iter(kwargs))):
        schedule.iterative_prune(model, lambda m, steps: None, 0.5, rounds=2, **kwargs)
    assert not prune.is_pruned(model)


def test_fractions_as_numpy_numbers():
    """np.float32 is no float subclass: check_fraction refused it (a TypeError
    for a fraction read from a numpy array), np.float64 passed."""
    sparsity_schedule = schedule.sparsity_schedule
    want = sparsity_schedule(0.8, 4)
    for kind in (np.float32, np.float64, np.float16):
        got = sparsity_schedule(kind(0.75) + kind(0.05) if kind is np.float64 else kind(0.8), 4)
        assert len(got) == len(want) and all(abs(a - b) < 1e-3 for a, b in zip(got, want))
    for bad in (torch.tensor(0.5), "0.5", True, np.bool_(True), None):
        with pytest.raises(TypeError, match="final must be a number"):
            sparsity_schedule(bad, 4)
    with pytest.raises(ValueError, match=r"final must be in \[0, 1\)"):
        sparsity_schedule(np.float32(1.5), 4)


@pytest.mark.parametrize("make", [np.int64, np.int32])
def test_rounds_take_numpy_integers(make):
    """rounds may be a numpy integer (it was refused: isinstance int)."""
    assert schedule.sparsity_schedule(0.5, make(4)) == schedule.sparsity_schedule(0.5, 4)
    tr = Trainer()
    res = schedule.iterative_prune(mlp(0), tr, 0.5, rounds=make(2), steps_per_round=1)
    assert [row["target"] for row in res.history] == schedule.sparsity_schedule(0.5, 2)


@pytest.mark.parametrize("make", [np.int64, np.int32])
def test_step_counts_take_numpy_integers_and_pass_on_python_ints(make):
    """steps_per_round given as a numpy integer reached train_fn as one
    (np.int64 in a user's logs and JSON); num_steps made the AGP and
    constant targets np.float64. They are Python ints and floats now."""
    seen = []
    net = mlp(0)
    res = schedule.iterative_prune(net, lambda m, steps: seen.append(steps), 0.5, rounds=2,
                                   steps_per_round=make(3))
    assert seen == [3, 3] and all(type(s) is int for s in seen)
    assert [row["target"] for row in res.history] == schedule.sparsity_schedule(0.5, 2)
    for fn in (schedule.agp_sparsity, schedule.constant_sparsity):
        got = fn(make(1), make(4), 0.5)
        assert type(got) is float and got == fn(1, 4, 0.5)


@pytest.mark.parametrize("bad", [True, np.bool_(True), 2.0, 1.5])
def test_rounds_refuse_bools_and_floats(bad):
    with pytest.raises(TypeError, match="rounds must be a positive int"):
        schedule.sparsity_schedule(0.5, bad)


@pytest.mark.parametrize("layers, error", [("10", TypeError), (5, TypeError), (["4", 2], TypeError)])
def test_layers_must_be_a_list_of_names(layers, error):
    """``layers="10"`` (one name, not in a list) was read character by
    character: layers '1' and '0' were pruned in its place, silently; an int
    gave Python's "'int' object is not iterable". Now a TypeError naming
    ``layers``, before anything is pruned."""
    import torch.nn as nn
    net = nn.Sequential(*[nn.Linear(4, 4) for _ in range(12)])
    with pytest.raises(error, match="layers must be a list of layer names"):
        schedule.iterative_prune(net, lambda m, s: None, 0.5, rounds=1, steps_per_round=0, layers=layers)
    assert adapters.sparsity(net) == 0.0
    schedule.iterative_prune(net, lambda m, s: None, 0.5, rounds=1, steps_per_round=0, layers=["10"])
    assert adapters.layer_sparsity(net)["10"] == 0.5 and adapters.sparsity(net, ["0", "1"]) == 0.0


def test_errors_name_the_callers_sparsity_arguments():
    """iterative_prune's and one_shot_prune's sparsities were checked as
    sparsity_schedule's: 'final must be in [0, 1)' for one_shot_prune(...,
    sparsity=1.5), 'initial' for initial_sparsity. Each error names the
    argument the user gave now."""
    net, tr = mlp(0), Trainer()
    with pytest.raises(ValueError, match=r"^final_sparsity must be in \[0, 1\); got 1.0"):
        schedule.iterative_prune(net, tr, 1.0)
    with pytest.raises(TypeError, match=r"^final_sparsity must be a number"):
        schedule.iterative_prune(net, tr, "0.5")
    with pytest.raises(ValueError, match=r"^initial_sparsity must be in \[0, 1\); got -0.5"):
        schedule.iterative_prune(net, tr, 0.5, initial_sparsity=-0.5)
    with pytest.raises(ValueError, match=r"^initial_sparsity \(0.6\) must be <= final_sparsity \(0.5\)"):
        schedule.iterative_prune(net, tr, 0.5, initial_sparsity=0.6)
    with pytest.raises(ValueError, match=r"^sparsity must be in \[0, 1\); got 1.5"):
        schedule.one_shot_prune(net, tr, 1.5)
    assert tr.calls == [] and adapters.sparsity(net) == 0.0


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_a_model_pruned_by_the_procedures_deep_copies_after_a_forward(scope):
    """iterative_prune / one_shot_prune (and lottery_ticket, ERK masks:
    adapters.apply_masks) prune through torch's l1_unstructured /
    global_unstructured / custom_from_mask, whose hook leaves the weight a
    product autograd made: ``copy.deepcopy`` of the model after a forward
    raised torch's "Only Tensors created explicitly by the user ... support
    the deepcopy protocol". Their layers now stay deep-copyable, as the
    toolkit's own methods leave them, with the copy's outputs equal."""
    import copy

    model = mlp()
    schedule.iterative_prune(model, lambda m, s: None, 0.5, rounds=1, steps_per_round=0, scope=scope)
    x = torch.randn(5, model[0].in_features)
    want = model(x)
    copied = copy.deepcopy(model)
    torch.testing.assert_close(copied(x), want)
    masks = {n: torch.ones_like(m.weight_mask) for n, m in model.named_modules() if hasattr(m, "weight_mask")}
    other = mlp()
    adapters.apply_masks(other, masks)
    other(x)
    copy.deepcopy(other)


@pytest.mark.parametrize("bad", [None, "0.5", torch.ones(3), True])
def test_an_eval_fn_returning_no_number_is_a_type_error_naming_it(bad):
    """float() of what eval_fn returned: Python's own 'could not convert
    string', 'NoneType', 'only one element tensors' (a str '0.5' and a bool
    even taken as metrics)."""
    with pytest.raises(TypeError, match="eval_fn must return a number"):
        schedule.iterative_prune(mlp(0), lambda m, s: None, 0.5, rounds=1, steps_per_round=0, eval_fn=lambda m: bad)


@pytest.mark.parametrize("good", [np.float32(0.25), np.array(0.25), np.array([0.25]), torch.tensor(0.25),
                                  torch.tensor([0.25]), 0.25])
def test_an_eval_fn_may_return_any_real_number(good):
    res = schedule.one_shot_prune(mlp(0), lambda m, s: None, 0.5, finetune_steps=0, eval_fn=lambda m: good)
    assert res.history[0]["metric"] == 0.25 and type(res.history[0]["metric"]) is float


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_rounds_rank_the_weights_as_fine_tuning_left_them(scope):
    """A round ranked the weights cached by the last forward (torch's
    ``module.weight``), not those the fine-tuning's last optimizer step left
    in ``weight_orig``: here the step turns 4.0 into 0.5 after the forward,
    and round 2 pruned 2.0 (its old rank) and kept 0.5."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))

    def train_fn(net, steps):  # a forward, then the optimizer's step: the cached weight is now stale
        net(torch.ones(1, 4))
        with torch.no_grad():
            net[0].weight_orig.copy_(torch.tensor([[1.0, 4.0, 3.0, 0.5]]))

    schedule.iterative_prune(model, train_fn, 0.5, rounds=2, steps_per_round=1, schedule="constant", scope=scope)
    assert model[0].weight_mask.tolist() == [[0.0, 1.0, 1.0, 0.0]]


def test_numpy_fractions_give_python_floats():
    """A np.float32 final / initial (read from a numpy array) came back as
    np.float32 targets, which json.dumps refuses (a history written to a log
    file); every schedule value is a Python float, as annotated."""
    import json

    values = [schedule.agp_sparsity(1, 4, np.float32(0.5), np.float32(0.25)),
              schedule.constant_sparsity(1, 4, np.float32(0.5), np.float16(0.25)),
              *schedule.sparsity_schedule(np.float32(0.5), 3, initial=np.float32(0.25)),
              *schedule.sparsity_schedule(np.float32(0.5), 2, "constant")]
    assert all(type(v) is float for v in values)
    json.dumps(values)
