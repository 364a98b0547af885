"""The torch.nn.utils.prune contract, on torch modules and on the sparse conv.

Mirrors what torch's own test_pruning.py checks (reparametrisation, hooks,
container composition, remove, pickling, state_dict, parameter identity,
rollback, importance_scores, global pruning, amount validation) and holds the
new methods of pointsparse.prune to the same contract."""

from __future__ import annotations

import copy
import io
import pickle
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune as torch_prune

import pointsparse.prune as prune
from pointsparse import formats
from prune_support import SparseConv, naive_sparse_conv, sparse_input

TORCH_NAMES = [
    "BasePruningMethod", "PruningContainer", "Identity", "RandomUnstructured", "L1Unstructured",
    "RandomStructured", "LnStructured", "CustomFromMask", "identity", "random_unstructured",
    "l1_unstructured", "random_structured", "ln_structured", "global_unstructured",
    "custom_from_mask", "remove", "is_pruned",
]

KINDS = ["linear", "conv1d", "conv2d", "conv3d", "sparse"]


def make(kind: str) -> tuple[nn.Module, object]:
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Linear(8, 4), torch.randn(2, 8)
    if kind == "conv1d":
        return nn.Conv1d(4, 4, 3), torch.randn(2, 4, 7)
    if kind == "conv2d":
        return nn.Conv2d(4, 4, 3), torch.randn(2, 4, 5, 5)
    if kind == "conv3d":
        return nn.Conv3d(4, 4, 3), torch.randn(1, 4, 4, 4, 4)
    return SparseConv(4, 4, kernel_size=3), sparse_input(n=10, channels=4)


def reference(kind: str, module: nn.Module, weight: torch.Tensor, x) -> torch.Tensor:
    """The layer's output computed from an explicit ``weight``."""
    if kind == "linear":
        return F.linear(x, weight, module.bias)
    if kind == "sparse":
        return naive_sparse_conv(x, weight, module.kernel_size, module.dilation)
    conv = {"conv1d": F.conv1d, "conv2d": F.conv2d, "conv3d": F.conv3d}[kind]
    return conv(x, weight, module.bias)


def output(module, x) -> torch.Tensor:
    out = module(x)
    return out.feats if hasattr(out, "feats") else out


# Every new method, as a function taking (module, kind), applicable to any kind.
NEW_METHODS = {
    "vector": lambda m, k: prune.vector_structured(m, "weight", 0.5, axis=-1),
    "channel_out": lambda m, k: prune.channel_structured(m, "weight", 0.5, axis="out"),
    "channel_in": lambda m, k: prune.channel_structured(m, "weight", 1, axis="in"),
    "block": lambda m, k: prune.block_structured(m, "weight", 0.5, block_size=2),
    "nm": lambda m, k: prune.nm_structured(m, "weight", 2, 4),
    "kernel": lambda m, k: prune.kernel_structured(m, "weight", 0.5, scope="pair"),
    "offset": lambda m, k: prune.kernel_structured(m, "weight", 0.5, scope="offset"),
    "stripe": lambda m, k: prune.stripe_structured(m, "weight", 0.5),
    "pattern": lambda m, k: prune.pattern_structured(m, "weight", num_patterns=2, pattern_size=2),
}
NEEDS_KERNEL = {"offset", "stripe", "pattern"}
METHOD_CASES = [
    (kind, method) for kind in KINDS for method in sorted(NEW_METHODS) if not (kind == "linear" and method in NEEDS_KERNEL)
]


def test_reexports_are_the_torch_objects():
    for name in TORCH_NAMES:
        assert getattr(prune, name) is getattr(torch_prune, name), name
    assert set(TORCH_NAMES) <= set(prune.__all__)


def test_the_channel_pruning_modules_are_attributes_of_the_package():
    """The README's ``prune.workflow.prune_channels`` after ``import
    pointsparse.prune as prune`` raised AttributeError unless the module was
    imported by its own name first (in a fresh process: nothing else has
    imported it)."""
    from reference import run_python

    run = run_python("import pointsparse.prune as prune\n"
                     "print(prune.workflow.prune_channels.__name__, prune.graph.plan.__name__, prune.surgery.__name__)")
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["prune_channels", "plan", "pointsparse.prune.surgery"]


@pytest.mark.parametrize("kind", KINDS)
def test_reparametrization_and_forward(kind):
    module, x = make(kind)
    original = module.weight
    prune.l1_unstructured(module, "weight", amount=0.3)
    params, buffers = dict(module.named_parameters()), dict(module.named_buffers())
    assert "weight_orig" in params and "weight" not in params
    assert "weight_mask" in buffers
    assert module.weight_orig is original
    assert int((module.weight_mask == 0).sum()) == round(0.3 * original.numel())
    torch.testing.assert_close(module.weight, module.weight_orig * module.weight_mask)
    hooks = list(module._forward_pre_hooks.values())
    assert len(hooks) == 1 and isinstance(hooks[0], prune.L1Unstructured) and hooks[0]._tensor_name == "weight"
    assert prune.is_pruned(module)
    torch.testing.assert_close(output(module, x), reference(kind, module, module.weight_orig * module.weight_mask, x))
    # The hook recomputes the weight from the (trained) original every forward.
    with torch.no_grad():
        module.weight_orig.add_(1.0)
    torch.testing.assert_close(output(module, x), reference(kind, module, module.weight_orig * module.weight_mask, x))


@pytest.mark.parametrize("kind", KINDS)
def test_existing_optimizer_keeps_training_the_pruned_parameter(kind):
    module, x = make(kind)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    prune.random_unstructured(module, "weight", amount=0.5)
    before = module.weight_orig.detach().clone()
    output(module, x).sum().backward()
    grad = module.weight_orig.grad
    assert torch.all(grad[module.weight_mask == 0] == 0)  # masked entries get no gradient
    optimizer.step()
    assert not torch.equal(module.weight_orig.detach(), before)  # the optimizer's param is weight_orig
    # the engine sums offsets in its own order: equal up to float32 rounding
    torch.testing.assert_close(output(module, x), reference(kind, module, module.weight_orig * module.weight_mask, x))


@pytest.mark.parametrize("kind", KINDS)
def test_identity_and_zero_amount(kind):
    module, _ = make(kind)
    prune.identity(module, "weight")
    assert torch.all(module.weight_mask == 1)
    other, _ = make(kind)
    prune.l1_unstructured(other, "weight", amount=0)
    assert torch.all(other.weight_mask == 1)


@pytest.mark.parametrize("kind", KINDS)
def test_repeated_pruning_composes_and_never_unprunes(kind):
    module, x = make(kind)
    prune.l1_unstructured(module, "weight", amount=0.5)
    first = module.weight_mask.clone()
    prune.random_unstructured(module, "weight", amount=0.5)
    second = module.weight_mask.clone()
    hook = next(iter(module._forward_pre_hooks.values()))
    assert isinstance(hook, prune.PruningContainer) and len(hook) == 2
    assert torch.all(second <= first)
    alive = int(first.sum())
    assert int(second.sum()) == alive - round(0.5 * alive)  # half of what was still alive
    out_axis = prune.layout_of(module).out_axis
    prune.ln_structured(module, "weight", amount=1, n=2, dim=out_axis)
    assert len(hook) == 3 and torch.all(module.weight_mask <= second)
    torch.testing.assert_close(output(module, x), reference(kind, module, module.weight_orig * module.weight_mask, x))


@pytest.mark.parametrize("kind, method", METHOD_CASES)
def test_new_methods_keep_the_contract(kind, method):
    module, x = make(kind)
    original = module.weight
    prune.random_unstructured(module, "weight", amount=0.3)
    first = module.weight_mask.clone()
    NEW_METHODS[method](module, kind)
    hook = next(iter(module._forward_pre_hooks.values()))
    assert isinstance(hook, prune.PruningContainer) and len(hook) == 2
    assert isinstance(hook[-1], prune.BasePruningMethod) and hook[-1]._tensor_name == "weight"
    assert module.weight_orig is original
    mask = module.weight_mask
    assert mask.shape == original.shape and mask.dtype == original.dtype
    assert torch.all(mask <= first)  # never un-prunes
    torch.testing.assert_close(output(module, x), reference(kind, module, module.weight_orig * mask, x))
    # pickling and deep copies keep the pruning working
    clone = pickle.loads(pickle.dumps(module))
    torch.testing.assert_close(output(clone, x), output(module, x))
    assert type(next(iter(clone._forward_pre_hooks.values()))[-1]) is type(hook[-1])
    prune.remove(module, "weight")
    assert module.weight is original and not prune.is_pruned(module)
    assert torch.equal(module.weight.detach(), (clone.weight_orig * clone.weight_mask).detach())


@pytest.mark.parametrize("kind", KINDS)
def test_remove_makes_pruning_permanent(kind):
    module, x = make(kind)
    original = module.weight
    prune.l1_unstructured(module, "weight", amount=0.4)
    expected = output(module, x)
    masked = (module.weight_orig * module.weight_mask).detach()
    prune.remove(module, "weight")
    assert "weight" in dict(module.named_parameters())
    assert "weight_orig" not in dict(module.named_parameters())
    assert "weight_mask" not in dict(module.named_buffers())
    assert not module._forward_pre_hooks and not prune.is_pruned(module)
    assert module.weight is original and torch.equal(module.weight.detach(), masked)
    torch.testing.assert_close(output(module, x), expected)
    with pytest.raises(ValueError, match="has to be pruned"):
        prune.remove(module, "weight")


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_round_trip(kind):
    module, x = make(kind)
    prune.l1_unstructured(module, "weight", amount=0.5)
    prune.channel_structured(module, "weight", amount=1)
    state = module.state_dict()
    assert {"weight_orig", "weight_mask"} <= set(state) and "weight" not in state
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    fresh, _ = make(kind)
    prune.identity(fresh, "weight")  # the same reparametrisation, then load
    fresh.load_state_dict(torch.load(buffer))
    torch.testing.assert_close(output(fresh, x), output(module, x))
    prune.remove(module, "weight")
    assert "weight" in module.state_dict() and "weight_orig" not in module.state_dict()


@pytest.mark.parametrize("kind", KINDS)
def test_pickle_round_trip(kind):
    module, x = make(kind)
    prune.random_unstructured(module, "weight", amount=0.5)
    prune.nm_structured(module, "weight", 2, 4)
    # (copy.deepcopy of a pruned module fails in torch itself: module.weight
    # is a non-leaf tensor; pickling is the supported round trip.)
    for clone in (pickle.loads(pickle.dumps(module)),):
        assert prune.is_pruned(clone)
        assert torch.equal(clone.weight_mask, module.weight_mask)
        torch.testing.assert_close(output(clone, x), output(module, x))
        prune.remove(clone, "weight")
        assert not prune.is_pruned(clone)


@pytest.mark.parametrize("kind", KINDS)
def test_rollback_when_a_step_fails(kind):
    module, _ = make(kind)
    original = module.weight
    with mock.patch("torch.nn.utils.prune.L1Unstructured.compute_mask") as compute_mask:
        compute_mask.side_effect = Exception("HA!")
        with pytest.raises(Exception, match="HA!"):
            prune.l1_unstructured(module, "weight", amount=0.9)
    assert module.weight is original and "weight_orig" not in dict(module.named_parameters())
    # A new method failing inside compute_mask rolls back the same way.
    with pytest.raises(ValueError, match="multiple of m=3"):
        prune.nm_structured(module, "weight", 1, 3)
    with pytest.raises(ValueError, match="more than the"):
        prune.channel_structured(module, "weight", amount=10**6)
    assert module.weight is original and not prune.is_pruned(module)
    assert not module._forward_pre_hooks and "weight_mask" not in dict(module.named_buffers())


@pytest.mark.parametrize("kind", KINDS)
def test_importance_scores_decide_the_mask(kind):
    module, _ = make(kind)
    scores = torch.arange(module.weight.numel(), dtype=torch.float32).reshape(module.weight.shape)
    prune.l1_unstructured(module, "weight", amount=5, importance_scores=scores)
    assert torch.equal(module.weight_mask.flatten()[:5], torch.zeros(5))
    assert torch.all(module.weight_mask.flatten()[5:] == 1)
    # the new methods take importance_scores the same way: prune the lowest-scoring output channel
    other, _ = make(kind)
    layout = prune.layout_of(other)
    channel_scores = torch.ones_like(other.weight).movedim(layout.out_axis, 0)
    channel_scores[2] = 0.0
    prune.channel_structured(other, "weight", amount=1, importance_scores=channel_scores.movedim(0, layout.out_axis))
    kept = other.weight_mask.movedim(layout.out_axis, 0).flatten(1).sum(1)
    assert kept[2] == 0 and torch.all(kept[[0, 1, 3]] > 0)
    with pytest.raises(AssertionError, match="importance_scores should have the same shape"):
        prune.l1_unstructured(make(kind)[0], "weight", amount=1, importance_scores=torch.ones(3))
    # the toolkit's own methods check the shape themselves (a ValueError, not torch's assert)
    with pytest.raises(ValueError, match=r"importance_scores must have the shape of .*; got \(3,\)"):
        prune.channel_structured(make(kind)[0], "weight", amount=1, importance_scores=torch.ones(3))


def test_global_unstructured_across_dense_and_sparse_layers():
    dense, _ = make("linear")
    sparse, _ = make("sparse")
    parameters = [(dense, "weight"), (sparse, "weight")]
    total = dense.weight.numel() + sparse.weight.numel()
    everything = torch.cat([dense.weight.detach().abs().flatten(), sparse.weight.detach().abs().flatten()])
    prune.global_unstructured(parameters, pruning_method=prune.L1Unstructured, amount=0.4)
    masks = torch.cat([dense.weight_mask.flatten(), sparse.weight_mask.flatten()])
    assert int((masks == 0).sum()) == round(0.4 * total)
    assert everything[masks == 1].min() >= everything[masks == 0].max()
    # with importance scores, and composing with the earlier pruning
    scores = {(dense, "weight"): torch.rand_like(dense.weight), (sparse, "weight"): torch.rand_like(sparse.weight)}
    prune.global_unstructured(parameters, prune.L1Unstructured, importance_scores=scores, amount=0.5)
    new = torch.cat([dense.weight_mask.flatten(), sparse.weight_mask.flatten()])
    assert torch.all(new <= masks) and int(new.sum()) == int(masks.sum()) - round(0.5 * int(masks.sum()))


@pytest.mark.parametrize("kind", KINDS)
def test_custom_from_mask(kind):
    module, x = make(kind)
    mask = (torch.rand_like(module.weight) > 0.5).to(module.weight.dtype)
    prune.custom_from_mask(module, "weight", mask)
    assert torch.equal(module.weight_mask, mask)
    prune.block_structured(module, "weight", amount=0.5, block_size=2)
    assert torch.all(module.weight_mask <= mask)
    torch.testing.assert_close(output(module, x), reference(kind, module, module.weight_orig * module.weight_mask, x))


@pytest.mark.parametrize(
    "amount, error",
    [(-0.1, ValueError), (1.1, ValueError), (-1, ValueError), ("1", TypeError), (None, TypeError), (True, TypeError)],
)
def test_amount_validation(amount, error):
    if amount is not True:  # torch takes a bool as the int 1
        for cls in (prune.L1Unstructured, prune.RandomUnstructured):
            with pytest.raises(error):
                cls(amount)
    for cls in (prune.ChannelStructured, prune.BlockStructured, prune.KernelStructured, prune.StripeStructured):
        with pytest.raises(error, match="amount"):
            cls(amount)
    with pytest.raises(error, match="amount"):
        prune.VectorStructured(amount, axis=0)


@pytest.mark.parametrize("amount, error", [(True, TypeError), (float("nan"), ValueError), (float("inf"), ValueError)])
def test_the_toolkits_function_forms_refuse_a_bool_or_non_finite_amount(amount, error):
    # torch's own functions (ln_structured, ...) are re-exported as they are and not checked here
    module, _ = make("conv2d")
    forms = [
        lambda: prune.vector_structured(module, "weight", amount),
        lambda: prune.kernel_structured(module, "weight", amount),
        lambda: prune.channel_structured(module, "weight", amount),
        lambda: prune.block_structured(module, "weight", amount, block_size=2),
        lambda: prune.stripe_structured(module, "weight", amount),
        lambda: prune.global_structured([(module, "weight")], prune.ChannelStructured, amount),
    ]
    for form in forms:
        with pytest.raises(error, match="amount"):
            form()
    linear_module, _ = make("linear")
    with pytest.raises(error, match="amount"):
        prune.panel_structured(linear_module, "weight", amount)
    assert not prune.is_pruned(module) and not prune.is_pruned(linear_module)


@pytest.mark.parametrize("kind", KINDS)
def test_int_amount_larger_than_the_tensor(kind):
    module, _ = make(kind)
    with pytest.raises(ValueError):
        prune.l1_unstructured(module, "weight", amount=module.weight.numel() + 1)
    with pytest.raises(ValueError, match="amount=99 is more than the 4"):
        prune.channel_structured(module, "weight", amount=99)
    assert not prune.is_pruned(module)


def test_both_libraries_understand_each_other():
    module, x = make("conv2d")
    torch_prune.l1_unstructured(module, "weight", amount=0.3)  # pruned by torch
    assert prune.is_pruned(module)
    prune.channel_structured(module, "weight", amount=1)  # extended by pointsparse
    hook = next(iter(module._forward_pre_hooks.values()))
    assert isinstance(hook, torch_prune.PruningContainer)
    assert torch_prune.is_pruned(module)
    torch_prune.remove(module, "weight")  # made permanent by torch again
    assert not module._forward_pre_hooks
    assert int((module.weight.detach().flatten(1).abs().sum(1) == 0).sum()) == 1


def test_torch_structured_methods_on_the_sparse_conv():
    module, x = make("sparse")
    prune.ln_structured(module, "weight", amount=2, n=1, dim=2)  # output channels are axis 2
    kept = module.weight_mask.sum(dim=(0, 1))
    assert int((kept == 0).sum()) == 2
    norms = module.weight_orig.detach().abs().sum(dim=(0, 1))
    assert norms[kept == 0].max() <= norms[kept > 0].min()
    prune.random_structured(module, "weight", amount=1, dim=0)  # a whole kernel offset
    assert int((module.weight_mask.sum(dim=(1, 2)) == 0).sum()) == 1
    torch.testing.assert_close(output(module, x), reference("sparse", module, module.weight_orig * module.weight_mask, x))


@pytest.mark.parametrize("kind", KINDS)
def test_wrong_dim_is_reported_and_rolled_back(kind):
    module, _ = make(kind)
    original = module.weight
    with pytest.raises(IndexError, match="Invalid index 7"):  # torch's own message
        prune.ln_structured(module, "weight", amount=1, n=2, dim=7)
    with pytest.raises(ValueError, match="axis=7 is out of range"):
        prune.vector_structured(module, "weight", amount=1, axis=7)
    assert module.weight is original and not prune.is_pruned(module)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("earlier", [1, 2])  # one method before (its hook), two (a PruningContainer)
def test_a_refused_method_leaves_a_pruned_module_as_it_was(kind, earlier):
    """A toolkit method refused on an already pruned tensor (torch's apply
    took the old hook off the module, or added the method to its container,
    before the mask failed) leaves the hook, the container, the mask and the
    output as they were: the mask keeps applying (it silently stopped, and
    the weight then held a tensor of the last forward's graph)."""
    module, x = make(kind)
    prune.l1_unstructured(module, "weight", amount=0.3)
    if earlier == 2:
        prune.random_unstructured(module, "weight", amount=0.2)
    module.register_forward_pre_hook(lambda *_: None)  # a hook of the user's after the pruning's
    hooks = list(module._forward_pre_hooks.items())
    methods = [getattr(h, "_pruning_methods", None) for _, h in hooks]
    mask = module.weight_mask.clone()
    before = output(module, x).detach()
    for refused, error in ((lambda: prune.nm_structured(module, "weight", 1, 3), "multiple of m=3"),
                           (lambda: prune.channel_structured(module, "weight", amount=10**6), "more than the"),
                           (lambda: prune.kernel_structured(module, "weight", 0.5, scope="bogus"), "scope")):
        with pytest.raises(ValueError, match=error):
            refused()
        assert list(module._forward_pre_hooks.items()) == hooks  # in their order
        assert [getattr(h, "_pruning_methods", None) for _, h in hooks] == methods
        assert torch.equal(module.weight_mask, mask)
    with torch.no_grad():
        module.weight_orig.add_(1.0)  # the hook recomputes the weight from weight_orig and the mask
    after = output(module, x)
    assert not torch.equal(after.detach(), before)
    torch.testing.assert_close(after, reference(kind, module, module.weight_orig * mask, x))
    after.sum().backward()  # a fresh graph: the weight is not last forward's
    assert torch.equal(module.weight_orig.grad == 0, (mask == 0) | (module.weight_orig.grad == 0))
    prune.channel_structured(module, "weight", amount=1)  # and the module still takes more pruning
    assert int((module.weight_mask == 0).sum()) > int((mask == 0).sum())


# The toolkit's own entry points, each called as f(module, name); torch's re-exported functions (the very
# objects of torch.nn.utils.prune, test_reexports_are_the_torch_objects) keep torch's errors.
OWN_ENTRY_POINTS = {
    "vector_structured": lambda m, n: prune.vector_structured(m, n, 0.5),
    "kernel_structured": lambda m, n: prune.kernel_structured(m, n, 0.5),
    "channel_structured": lambda m, n: prune.channel_structured(m, n, 0.5),
    "ChannelStructured.apply": lambda m, n: prune.ChannelStructured.apply(m, n, 0.5),
    "block_structured": lambda m, n: prune.block_structured(m, n, 0.5, block_size=1),
    "panel_structured": lambda m, n: prune.panel_structured(m, n, 0.5),
    "stripe_structured": lambda m, n: prune.stripe_structured(m, n, 0.5),
    "nm_structured": lambda m, n: prune.nm_structured(m, n, 1, 2),
    "pattern_structured": lambda m, n: prune.pattern_structured(m, n, num_patterns=2, pattern_size=2),
    "global_structured": lambda m, n: prune.global_structured([(m, n)], prune.ChannelStructured, 0.5),
    "attach_filter_skeleton": lambda m, n: prune.attach_filter_skeleton(m, n),
    "detach_filter_skeleton": lambda m, n: prune.detach_filter_skeleton(m, n),
    "prune_stripes": lambda m, n: prune.prune_stripes(m, n),
    "load_balanced_unstructured": lambda m, n: formats.load_balanced_unstructured(m, n, 0.5, 2),
    "current_weight": lambda m, n: prune.current_weight(m, n),
    "weight_now": lambda m, n: prune.weight_now(m, n),
    "layout_of": lambda m, n: prune.layout_of(m, n),
}


@pytest.mark.parametrize("entry", sorted(OWN_ENTRY_POINTS))
def test_own_entry_points_name_a_wrong_module_or_name_with_a_type_error(entry):
    """A name that is no str (name=5: "unsupported operand type(s) for +"),
    a tensor given as the module (AttributeError: 'Tensor' object has no
    attribute '_parameters') and a pointsparse.nn.Linear, whose torch Linear
    is its ``fn`` (AttributeError, or "has no tensor named 'weight'" without
    saying where the weight is) were torch's errors or ours, of three types,
    depending on the function. Each is a TypeError naming the argument now,
    and the module is left as it was."""
    from pointsparse import nn as psnn

    call = OWN_ENTRY_POINTS[entry]
    conv = SparseConv(4, 4, 3)
    before = {k: v.clone() for k, v in conv.state_dict().items()}
    cases = [(conv, 5, r"name must be a str.*got int"),
             (torch.randn(4, 4), "weight", r"module must be a torch.nn.Module.*got Tensor"),
             (psnn.Linear(4, 4), "weight", r"Linear has no tensor named 'weight'.*'fn'.*module\.fn")]
    for module, name, match in cases:
        if entry == "global_structured" and module is not cases[2][0]:
            match = r"parameters\[0\] must be a \(module, name\) pair"
        with pytest.raises(TypeError, match=match):
            call(module, name)
    assert conv.state_dict().keys() == before.keys() and not prune.is_pruned(conv)
    assert all(torch.equal(conv.state_dict()[k], v) for k, v in before.items())


# (these three name what they miss in their own words: a skeleton, or load_balanced_unstructured's ValueError on name)
_OWN_WORDS = ("detach_filter_skeleton", "prune_stripes", "load_balanced_unstructured")


@pytest.mark.parametrize("entry", sorted(set(OWN_ENTRY_POINTS) - set(_OWN_WORDS)))
def test_own_entry_points_name_a_tensor_the_module_lacks_with_a_type_error(entry):
    """A module holding no tensor ``name`` (a ReLU; a Linear without bias;
    a layer formats.compress made, whose weight lives in its format): every
    granularity said "has no tensor named", but vector_structured gave
    torch's AttributeError ('SparseConv3d' object has no attribute
    'weight') or, on a None bias, "ones_like(): argument 'input' must be
    Tensor, not NoneType", and panel_structured a ValueError. Each is the
    same TypeError naming the tensor now, the module left unpruned."""
    call = OWN_ENTRY_POINTS[entry]
    compressed = formats.compress(SparseConv(4, 4, 3).eval(), "csr")
    for module, name in ((nn.ReLU(), "weight"), (nn.Linear(4, 4, bias=False), "bias"), (compressed, "weight")):
        with pytest.raises(TypeError, match=rf"{type(module).__name__} has no tensor named '{name}'"):
            call(module, name)
        assert not prune.is_pruned(module)


# (the entry points that put a mask on the tensor; the others read it, or need a skeleton attached first)
_MASKING = sorted(set(OWN_ENTRY_POINTS) - {"current_weight", "weight_now", "layout_of", "detach_filter_skeleton",
                                           "prune_stripes"})


@pytest.mark.parametrize("entry", _MASKING)
@pytest.mark.parametrize("kind", ["sparse", "conv2d"])
def test_own_entry_points_name_a_parametrized_tensor_with_a_type_error(entry, kind):
    """A weight under torch.nn.utils.parametrize (register_parametrization,
    weight_norm, spectral_norm) is computed from its originals on every
    access: no mask can be put on it. Every masking entry point failed
    inside torch with "cannot assign 'torch.FloatTensor' object to
    parameter 'weight_orig' (torch.nn.Parameter or None required)", no word
    of the parametrization; now a TypeError naming the tensor, the
    parametrization and how to remove it, the module left as it was. The
    entry points that only read the weight read the parametrized one."""
    from torch.nn.utils import parametrize
    from torch.nn.utils.parametrizations import weight_norm

    module, x = make(kind)
    weight_norm(module, "weight", dim=0)
    expect = output(module, x).detach()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(TypeError, match=r"weight is parametrized \(torch\.nn\.utils\.parametrize.*"
                                        r"remove_parametrizations\(module, 'weight'\)"):
        OWN_ENTRY_POINTS[entry](module, "weight")
    assert parametrize.is_parametrized(module, "weight") and not prune.is_pruned(module)
    assert module.state_dict().keys() == before.keys()
    assert all(torch.equal(module.state_dict()[k], v) for k, v in before.items())
    assert torch.equal(output(module, x).detach(), expect)
    assert torch.equal(prune.weight_now(module, "weight").detach(), module.weight.detach())
    # removed (its value kept in a plain weight), the tensor takes the mask
    parametrize.remove_parametrizations(module, "weight")
    OWN_ENTRY_POINTS[entry](module, "weight")


def test_global_structured_refuses_a_parametrized_tensor_before_anything_is_pruned():
    """A parametrized tensor listed after a plain one: the plain one was
    pruned, then torch's error from inside the method on the second; now
    the TypeError names the item before any layer is pruned."""
    from torch.nn.utils.parametrizations import weight_norm

    plain, _ = make("sparse")
    norm, _ = make("sparse")
    weight_norm(norm, "weight", dim=2)
    with pytest.raises(TypeError, match=r"parameters\[1\]: ParametrizedConv3d\.weight is parametrized"):
        prune.global_structured([(plain, "weight"), (norm, "weight")], prune.ChannelStructured, 0.5)
    assert not prune.is_pruned(plain) and not prune.is_pruned(norm)


@pytest.mark.parametrize("kind,method", METHOD_CASES)
def test_a_loss_reading_module_weight_reaches_weight_orig_and_the_module_still_copies(kind, method):
    """After a forward the package's methods leave ``module.weight`` the
    product autograd made, as torch's do: a hand-written penalty on it (a
    Torch-Pruning user's L1 term) gives ``weight_orig`` the gradient torch's
    own masking gives (it was detached there, silently no gradient). The
    module still deep-copies, pickles and saves in that state, each copy
    computing what the module computes."""
    module, x = make(kind)
    NEW_METHODS[method](module, kind)
    twin, _ = make(kind)
    torch_prune.custom_from_mask(twin, "weight", module.weight_mask.clone())
    for m in (module, twin):
        (output(m, x).square().sum() + 0.1 * m.weight.abs().sum()).backward()
    torch.testing.assert_close(module.weight_orig.grad, twin.weight_orig.grad, rtol=1e-6, atol=1e-6)
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    for clone in (copy.deepcopy(module), pickle.loads(pickle.dumps(module)), torch.load(buffer, weights_only=False)):
        assert type(clone.weight) is torch.Tensor and not clone.weight.requires_grad
        torch.testing.assert_close(output(clone, x), output(module, x), rtol=0, atol=0)


def test_copy_model_copies_what_torchs_own_methods_masked():
    """torch's functions, re-exported as they are, leave a product deepcopy
    refuses (after pruning, after a forward in grad mode) as torch does;
    ``prune.copy_model`` copies such a model: the copy computes the same
    outputs from its own tensors, and a change to the copy's mask leaves
    the original alone."""
    import pointsparse as ps
    from pointsparse import prune as pp
    from pointsparse.nn import Conv3d
    from reference import random_coords

    torch.manual_seed(0)
    conv, head = Conv3d(4, 8, 3), nn.Linear(8, 3)
    pp.l1_unstructured(conv, "weight", 0.5)
    pp.ln_structured(head, "weight", 0.5, 2, dim=0)
    coords = random_coords(200, 6)
    x = ps.SparseTensor(torch.randn(len(coords), 4), coords)

    def run(c, h):
        return h(c(x).feats)

    want = run(conv, head)
    model = nn.ModuleDict({"conv": conv, "head": head})
    with pytest.raises(RuntimeError, match="graph leaves"):
        copy.deepcopy(model)  # (torch's behaviour, kept: these are torch's objects)
    copied = pp.copy_model(model)
    assert torch.equal(run(copied["conv"], copied["head"]), want)
    assert copied["conv"].weight_orig.data_ptr() != conv.weight_orig.data_ptr()
    with torch.no_grad():
        copied["conv"].weight_mask.zero_()
    assert torch.equal(run(conv, head), want) and not run(copied["conv"], copied["head"]).equal(want)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module; got dict"):
        pp.copy_model({"conv": conv})
