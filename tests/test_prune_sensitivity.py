"""Sensitivity scan: per-layer curves, exact restore, threshold choice, plot."""

from __future__ import annotations

import pytest
import torch

from pointsparse.prune import sensitivity
from prune_procedures_support import Trainer, mlp, region_chain, sparse_chain, sparse_input

pytestmark = pytest.mark.usefixtures("one_thread")

def _density(layer):
    return lambda m: float((m[layer].weight != 0).float().mean())


def test_curves_are_the_layer_alone_and_model_restored():
    net = mlp(0)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    res = sensitivity.sensitivity_scan(net, _density(0))
    assert res.ratios == [round(0.1 * i, 1) for i in range(10)]
    # only layer 0 is pruned while it is scanned: its density is 1 - r; others leave it at 1
    assert res.curves["0"] == pytest.approx([1 - r for r in res.ratios], abs=1 / 128)
    assert res.curves["2"] == [1.0] * 10 and res.curves["4"] == [1.0] * 10
    after = net.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert not any(k.endswith("_orig") for k in after) and not net[0]._forward_pre_hooks


def test_channel_granularity_on_sparse_conv():
    net = sparse_chain()
    x = sparse_input()

    def zero_channels(m):  # fraction of output channels of layer 3 that are entirely zero
        w = m[3].weight
        return float((w.abs().sum((0, 1)) == 0).float().mean())

    res = sensitivity.sensitivity_scan(net, zero_channels, ratios=[0.0, 0.5], granularity="channel", layers=["3"])
    assert res.curves["3"] == [0.0, 0.5]
    net(x)  # still runs


def test_choose_ratios_threshold():
    res = sensitivity.SensitivityResult([0.0, 0.1, 0.2, 0.3], {"a": [0.9, 0.9, 0.88, 0.7], "b": [0.9, 0.85, 0.9, 0.9]},
                                        0.9, "unstructured")
    assert sensitivity.choose_ratios(res, 0.025) == {"a": 0.2, "b": 0.0}  # b's dip at 0.1 stops it
    assert sensitivity.choose_ratios(res, 0.3) == {"a": 0.3, "b": 0.3}
    assert sensitivity.choose_ratios(res, 0.03, relative=True) == {"a": 0.2, "b": 0.0}
    with pytest.raises(TypeError, match="relative must be True or False"):  # "no" was True
        sensitivity.choose_ratios(res, 0.03, relative="no")


def test_real_metric_apply_and_plot(tmp_path):
    tr = Trainer()
    net = mlp(0)
    tr(net, 150)
    res = sensitivity.sensitivity_scan(net, tr.accuracy, ratios=[0.0, 0.5, 0.9])
    assert res.baseline > 0.8 and all(len(v) == 3 for v in res.curves.values())
    chosen = sensitivity.choose_ratios(res, 0.05)
    sensitivity.apply_ratios(net, chosen)
    for name, r in chosen.items():
        assert float((dict(net.named_modules())[name].weight == 0).float().mean()) == pytest.approx(r, abs=0.01)
    path = sensitivity.plot_sensitivity(res, tmp_path / "s.png", 0.05)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for bad in (float("nan"), "0.05", True):
        with pytest.raises(ValueError, match="threshold must be a finite number or None"):
            sensitivity.plot_sensitivity(res, tmp_path / "bad.png", bad)
    assert not (tmp_path / "bad.png").exists()


def test_bad_inputs():
    net = mlp(0)
    with pytest.raises(ValueError, match="granularity"):
        sensitivity.sensitivity_scan(net, _density(0), granularity="block")
    with pytest.raises(ValueError, match="ratios"):
        sensitivity.sensitivity_scan(net, _density(0), ratios=[0.5, 1.0])
    with pytest.raises(TypeError, match="eval_fn"):
        sensitivity.sensitivity_scan(net, None)
    with pytest.raises(ValueError, match="not a submodule"):
        sensitivity.sensitivity_scan(net, _density(0), layers=["9"])
    with pytest.raises(ValueError, match="threshold"):
        sensitivity.choose_ratios(sensitivity.SensitivityResult([0.0], {"a": [1.0]}, 1.0, "unstructured"), -1)



@pytest.mark.parametrize("ratios", [None, 0.5, "0.5", [0.5, None]])
def test_ratios_that_are_not_a_list_of_numbers_are_a_type_error(ratios):
    # were a bare "not iterable" TypeError or "could not convert string to float" ValueError
    with pytest.raises(TypeError, match="ratios must be a list of numbers"):
        sensitivity.sensitivity_scan(mlp(0), _density(0), ratios=ratios)


def test_group_scan_scans_only_the_groups_layers_names():
    from prune_procedures_support import ResidualNet
    net, x = ResidualNet().eval(), sparse_input(n=80)
    res = sensitivity.sensitivity_scan(net, lambda m: 1.0, [0.0, 0.5], "group", layers=["stem.3", "block.main.0"],
                                       example_input=x)
    assert list(res.curves) == ["stem.3", "block.main.0"]  # layers was ignored: every group was scanned
    with pytest.raises(ValueError, match="names no cuttable"):
        sensitivity.sensitivity_scan(net, lambda m: 1.0, [0.5], "group", layers=["head.fn"], example_input=x)

def test_nan_metric_is_never_an_acceptable_drop():
    net = mlp(0)
    pruned_nan = lambda m: 1.0 if float((m[0].weight == 0).float().mean()) == 0 else float("nan")
    res = sensitivity.sensitivity_scan(net, pruned_nan, ratios=[0.0, 0.5, 0.9], layers=["0"])
    assert res.baseline == 1.0 and res.curves["0"][0] == 1.0
    assert all(v != v for v in res.curves["0"][1:])  # recorded as NaN
    assert sensitivity.choose_ratios(res, 0.02) == {"0": 0.0}
    assert sensitivity.choose_ratios(res, 0.02, relative=True) == {"0": 0.0}
    # a NaN, or an infinite, value after a good one stops the layer there
    res = sensitivity.SensitivityResult([0.0, 0.1, 0.2, 0.3], {"a": [1.0, 1.0, float("nan"), 1.0],
                                                               "b": [1.0, 1.0, float("inf"), 1.0]}, 1.0, "unstructured")
    assert sensitivity.choose_ratios(res, 0.5) == {"a": 0.1, "b": 0.1}


def test_non_finite_baseline_or_threshold_is_a_value_error():
    net = mlp(0)

    def nan_metric(m):
        return float("nan")

    with pytest.raises(ValueError, match="nan_metric.*'acc'.*nan on the unpruned model"):
        sensitivity.sensitivity_scan(net, nan_metric, metric="acc")
    with pytest.raises(ValueError, match="eval_fn.*inf on the unpruned model"):
        sensitivity.sensitivity_scan(net, lambda m: float("inf"), ratios=[0.0, 0.5])
    res = sensitivity.sensitivity_scan(net, lambda m: 1.0, ratios=[0.0, 0.5])
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="threshold must be a finite number >= 0"):
            sensitivity.choose_ratios(res, bad)
    for bad in ("0.1", None, True):
        with pytest.raises(TypeError, match="threshold must be a number"):
            sensitivity.choose_ratios(res, bad)
    res.baseline = float("nan")  # a result built or edited by hand
    with pytest.raises(ValueError, match="baseline metric of the scan is nan"):
        sensitivity.choose_ratios(res, 0.1)


def test_apply_ratios_checks_every_ratio_before_pruning():
    net = mlp(0)
    with pytest.raises(ValueError, match=r"ratios\['2'\] must be in \[0, 1\); got nan"):
        sensitivity.apply_ratios(net, {"0": 0.5, "2": float("nan")})
    with pytest.raises(ValueError, match=r"ratios\['0'\] must be in \[0, 1\); got 1.0"):
        sensitivity.apply_ratios(net, {"0": 1.0})
    with pytest.raises(TypeError, match=r"ratios\['0'\] must be a number"):
        sensitivity.apply_ratios(net, {"0": True})
    with pytest.raises(TypeError, match="ratios must be a dict"):
        sensitivity.apply_ratios(net, [0.5])
    assert not any(k.endswith("_mask") for k in net.state_dict())  # layer 0 was not pruned first


@pytest.mark.parametrize("outside", [0.0, 1e-3])
def test_unstructured_scan_prunes_a_kernel_region_conv_inside_its_region(outside):
    """The ratio of a kernel_region conv is of its region's weights: torch's
    l1_unstructured over the whole tensor pruned the zeros (or small values)
    outside a 'cross' conv first, so its weights were never pruned at 0.5.
    The values outside are left as they are; sizes count the region."""
    from pointsparse.prune import adapters
    net = region_chain(0, outside)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    res = sensitivity.sensitivity_scan(net, lambda m: adapters.layer_sparsity(m)["0"], ratios=[0.0, 0.5, 0.01, 0.003],
                                       layers=["0"])
    assert res.curves["0"] == pytest.approx([0.0, 0.5, 1 / 126, 0.0], abs=1e-9)
    assert res.sizes == {"0": 7 * 3 * 6}
    after = net.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_a_group_scan_of_a_model_without_groups_is_refused():
    """A model whose channels cannot be cut (one Linear: its outputs are the
    model's) scanned by group gave an empty result, which choose_ratios
    turned into no ratios, silently, where the unstructured scan of a model
    without prunable layers is a ValueError. Now a ValueError too, before
    eval_fn runs."""
    calls = []
    with pytest.raises(ValueError, match="model has no coupled channel group that can be cut"):
        sensitivity.sensitivity_scan(torch.nn.Sequential(torch.nn.Linear(8, 3)), lambda m: calls.append(1) or 1.0,
                                     [0.0, 0.5], "group", example_input=torch.randn(4, 8))
    assert calls == []
    net = mlp(0)
    with pytest.raises(ValueError, match="layers is empty"):  # (no group picked: the same empty result)
        sensitivity.sensitivity_scan(net, lambda m: calls.append(1) or 1.0, [0.0, 0.5], "group",
                                     example_input=torch.randn(4, 8), layers=[])
    assert calls == []


@pytest.mark.parametrize("bad", [None, "0.5", torch.ones(3), True])
@pytest.mark.parametrize("first", [True, False])
def test_an_eval_fn_returning_no_number_is_a_type_error_naming_it(bad, first):
    """On the unpruned model (the baseline) or a pruned one; the model is left as it was."""
    net = mlp(0)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    calls = []

    def eval_fn(model):
        calls.append(1)
        return bad if first or len(calls) > 1 else 0.5

    with pytest.raises(TypeError, match="eval_fn must return a number"):
        sensitivity.sensitivity_scan(net, eval_fn, ratios=[0.0, 0.5])
    assert net.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


@pytest.mark.parametrize("path", [None, 3])
def test_plot_sensitivity_names_a_path_that_is_no_path(path, tmp_path):
    """plot_sensitivity(res, None) drew the whole figure, then failed in
    pathlib ("expected str, bytes or os.PathLike object, not NoneType"),
    naming no argument: a TypeError naming path now, before any drawing."""
    res = sensitivity.SensitivityResult([0.0, 0.5], {"0": [0.9, 0.8]}, 0.9, "unstructured")
    with pytest.raises(TypeError, match=rf"^path must be a str or Path \(the PNG file to write\); got "
                                        rf"{type(path).__name__}$"):
        sensitivity.plot_sensitivity(res, path)


@pytest.mark.parametrize("granularity", ["unstructured", "channel"])
def test_a_scanned_layer_keeps_its_parameter_order_and_hooks(granularity):
    # pruning and remove re-register the weight after the bias and leave a forward hook (and its flag) that
    # detaches masked values: an optimizer state saved before the scan no longer fitted model.parameters()
    # (momentum of a weight given to a bias) and torch.jit.script refused the hook
    net = mlp(0)
    names = [n for n, _ in net.named_parameters()]
    hooks = {n: (dict(m._forward_hooks), dict(m._forward_pre_hooks), sorted(vars(m))) for n, m in net.named_modules()}
    sensitivity.sensitivity_scan(net, _density(0), ratios=[0.0, 0.5], granularity=granularity)
    assert [n for n, _ in net.named_parameters()] == names
    assert {n: (dict(m._forward_hooks), dict(m._forward_pre_hooks), sorted(vars(m)))
            for n, m in net.named_modules()} == hooks
    torch.jit.script(net)


@pytest.mark.parametrize("granularity", ["unstructured", "channel", "group"])
def test_an_eval_fn_that_runs_batchnorm_or_switches_modes_leaves_the_model_as_it_was(granularity):
    # an eval_fn run on a model in train mode moved its BatchNorm statistics at every ratio, and one calling
    # model.eval() left a model about to be fine-tuned in eval mode (its BatchNorm frozen), silently
    trainer = Trainer()
    for switch in (False, True):
        net = mlp(0, bn=True).train()
        net[1].eval()  # (a BatchNorm frozen on its own stays frozen)
        before = {k: v.clone() for k, v in net.state_dict().items()}
        modes = [m.training for m in net.modules()]

        def eval_fn(model):
            if switch:
                model.eval()
            with torch.no_grad():
                return float(model(trainer.x[:64]).sum())

        sensitivity.sensitivity_scan(net, eval_fn, [0.0, 0.5], granularity, example_input=trainer.x[:8])
        after = net.state_dict()
        assert [k for k in before if not torch.equal(after[k], before[k])] == []
        assert [m.training for m in net.modules()] == modes


def test_choose_ratios_names_a_result_that_is_no_scan():
    with pytest.raises(TypeError, match="result must be a SensitivityResult"):  # (an AttributeError)
        sensitivity.choose_ratios("x", 0.1)
