"""NetAdapt: the latency table (kernel-map keyed for sparse convs) agrees with
re-measurement, the loop meets its budget on the table and shrinks the net."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from pointsparse.kmap import get_kmap
from pointsparse.prune import netadapt
from prune_procedures_support import Trainer, mlp, sparse_chain, sparse_input  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def test_candidates():
    assert netadapt.candidate_counts(16, 4) == [16, 12, 8, 4]
    assert netadapt.candidate_counts(3, 8) == [3, 2, 1]


def test_sparse_table_keys_and_remeasurement(tmp_path):
    net = sparse_chain(width=16)
    x = sparse_input(n=400, extent=10)
    table = netadapt.build_latency_table(net, x, num_candidates=2, repeats=5)
    kmap = get_kmap(x, (3, 3, 3))
    assert table.keys["0"]["kernel_map_sizes"] == [int(v) for v in kmap.sizes]
    assert table.keys["0"]["num_in"] == len(x)
    assert set(table.entries["3"]) == {(16, 32), (16, 16), (8, 32), (8, 16)}
    # re-measure the full-width block of layer 3 (conv + BN + ReLU on the same coords)
    from pointsparse.nn import BatchNorm, Conv3d, ReLU
    block = nn.Sequential(Conv3d(16, 32, 3), BatchNorm(32), ReLU()).eval()
    xi = x.with_feats(torch.randn(len(x), 16))
    with torch.no_grad():
        again = netadapt._best_time(lambda: block(xi), 5)
    assert 1 / 3 < again / table.entries["3"][(16, 32)] < 3
    loaded = netadapt.LatencyTable.load(table.save(tmp_path / "t.json"))
    assert loaded.entries == table.entries and loaded.candidates == table.candidates
    assert loaded.layout == table.layout and loaded.latency({"0": 8, "3": 16}) == table.latency({"0": 8, "3": 16})


def test_estimate_of_full_network_matches_measurement():
    net = mlp(0, widths=(64, 256, 256, 10)).eval()
    x = torch.randn(256, 64)
    table = netadapt.build_latency_table(net, x, num_candidates=2, repeats=7)
    layout, _ = netadapt._channel_layout(net)
    est = table.latency({"0": 256, "2": 256})
    assert est == table.latency({"0": 256, "2": 256}, layout)
    measured = netadapt.measure_latency(net, x, 7)
    assert 1 / 3 < est / measured < 3


def test_loop_meets_the_table_budget_and_shrinks():
    tr = Trainer()
    net = mlp(0, widths=(8, 64, 64, 3))
    tr(net, 40)
    x = torch.randn(512, 8)
    table = netadapt.build_latency_table(net, x, num_candidates=8, repeats=3)
    res = netadapt.netadapt(net, table, tr, tr.accuracy, x, budget=0.7, short_steps=3, long_steps=5, lr=0.1)
    layout, _ = netadapt._channel_layout(res.model)
    assert res.estimated_latency == pytest.approx(table.latency(res.channels, layout))
    if res.estimated_latency > res.budget:  # it stopped only because no smaller width lowers the estimate
        # (on a measured table, noisy on a busy machine, a narrower width may not estimate faster)
        for n in res.channels:
            for c in table.candidates[n]:
                if c < res.channels[n]:
                    assert table.latency(dict(res.channels, **{n: c}), layout) >= res.estimated_latency, (n, c)
    assert res.channels["0"] < 64 or res.channels["2"] < 64
    assert res.model[0].out_features == res.channels["0"] and res.model[2].out_features == res.channels["2"]
    assert res.model(x).shape == (512, 3) and res.measured_latency > 0
    assert [h["estimated_latency"] for h in res.history] == sorted((h["estimated_latency"] for h in res.history),
                                                                  reverse=True)
    assert tr.calls[-1] == (5, pytest.approx(0.01))  # the long fine-tune at 1/10 of the training lr


def test_bad_inputs():
    tr = Trainer()
    net = mlp(0)
    x = torch.randn(4, 8)
    table = netadapt.build_latency_table(net, x, num_candidates=2, repeats=1)
    with pytest.raises(ValueError, match="not built for this model"):
        netadapt.netadapt(mlp(0, widths=(8, 20, 12, 3)), table, tr, tr.accuracy, x, 0.5)
    with pytest.raises(ValueError, match="initial_reduction"):
        netadapt.netadapt(net, table, tr, tr.accuracy, x, 0.5, initial_reduction=0)
    bad = [({"budget": "0.5"}, TypeError, "budget"),
           ({"budget_seconds": float("inf")}, ValueError, "budget_seconds"),  # was accepted: nothing pruned
           ({"initial_reduction": "0.1"}, TypeError, "initial_reduction"),
           ({"short_steps": -1}, ValueError, "short_steps"),  # was skipped fine-tuning silently
           ({"long_steps": 1.5}, TypeError, "long_steps"),
           ({"max_iterations": 0}, ValueError, "max_iterations"),
           ({"lr": float("nan")}, ValueError, "lr must be"),
           ({"finetune_lr_factor": float("nan")}, ValueError, "finetune_lr_factor"),
           ({"finetune_lr_factor": 0}, ValueError, "finetune_lr_factor"),
           ({"log": "run.log"}, TypeError, "log must be callable")]  # was called after the first fine-tuning
    for kwargs, error, match in bad:
        args = {"budget": 0.5, **kwargs}
        with pytest.raises(error, match=match):
            netadapt.netadapt(net, table, tr, tr.accuracy, x, **args)
    assert tr.calls == []
    with pytest.raises(ValueError, match="num_candidates"):
        netadapt.candidate_counts(16, 0)  # was a ZeroDivisionError
    with pytest.raises(ValueError, match="channels"):
        netadapt.candidate_counts(0)
    with pytest.raises(ValueError, match="repeats"):
        netadapt.build_latency_table(net, x, num_candidates=2, repeats=0)  # min() of no times
    with pytest.raises(TypeError, match="num_candidates"):
        netadapt.build_latency_table(net, x, num_candidates=2.0, repeats=1)


def test_budget_is_a_fraction_or_explicit_seconds():
    net = mlp(0, widths=(8, 16, 16, 3))
    x = torch.randn(32, 8)
    table = netadapt.build_latency_table(net, x, num_candidates=2, repeats=2)
    tr = Trainer()
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="budget"):
            netadapt.netadapt(net, table, tr, tr.accuracy, x, budget=bad, short_steps=1, long_steps=1)
    with pytest.raises(ValueError, match="budget_seconds"):
        netadapt.netadapt(net, table, tr, tr.accuracy, x, budget=0.5, budget_seconds=0.0)


def test_latency_of_a_width_the_table_lacks_is_a_value_error():
    net = mlp(0, widths=(8, 16, 16, 3))
    table = netadapt.build_latency_table(net, torch.randn(32, 8), num_candidates=2, repeats=2)
    with pytest.raises(ValueError, match="no entry"):
        table.latency({"0": 5, "2": 16})


def test_table_layer_keeps_a_sparse_conv_s_settings():
    """The table times a fresh layer like the model's (its adapter's
    ``like``): a sparse conv's kernel_region was dropped (a "cross" conv
    timed as all its offsets), and its fused ReLU; every setting is kept."""
    from pointsparse.nn import Conv3d

    conv = Conv3d(4, 6, (3, 3, 1), stride=2, dilation=(1, 2, 1), bias=True, transposed=True, kernel_region="cross")
    conv.relu = True
    like = netadapt._layer_like(conv, 8, 5)
    assert type(like) is Conv3d and (like.in_channels, like.out_channels) == (8, 5)
    assert like.weight.shape == (9, 8, 5) and like.bias is not None and like.bias.shape == (5,)
    for setting in ("kernel_size", "stride", "dilation", "transposed", "relu", "kernel_region"):
        assert getattr(like, setting) == getattr(conv, setting), setting
    assert like.kernel_region == (1, 3, 4, 5, 7)
    assert "kernel_region=[1, 3, 4, 5, 7]" in repr(like)


def test_table_key_describes_a_sparse_conv_s_settings():
    """A table's key of a sparse conv names what its time depends on beyond
    the map: its kernel region (a cross times 7 of 27 offsets), dilation,
    transposition and fused ReLU."""
    from pointsparse.nn import Conv3d

    x = sparse_input(n=200, extent=8)
    cross = Conv3d(x.feats.shape[1], 6, 3, kernel_region="cross")
    full = Conv3d(x.feats.shape[1], 6, 3)
    a, b = netadapt._structural_key(cross, x), netadapt._structural_key(full, x)
    assert a != b
    assert a["kernel_region"] == [4, 10, 12, 13, 14, 16, 22] and b["kernel_region"] is None
    assert a["dilation"] == [1, 1, 1] and a["transposed"] is False and a["relu"] is False


def test_table_times_layers_and_inputs_in_the_model_s_dtype():
    """The table's fresh layers and random inputs were float32 whatever the
    model's dtype (a float64 model timed in float32; on another device the
    layers stayed on the CPU); they follow the layer and its input now."""
    net = sparse_chain(width=4).double()
    x = sparse_input(n=40)
    x = x.with_feats(x.feats.double())
    gen = torch.Generator().manual_seed(0)
    assert netadapt._layer_like(net[3], 3, 5).weight.dtype == torch.float64
    assert netadapt._follower_like(net[4], 5).running_var.dtype == torch.float64
    assert netadapt._input_like(x, 3, 1, gen).feats.dtype == torch.float64
    linear = mlp(0).double()
    assert netadapt._layer_like(linear[0], 8, 4).weight.dtype == torch.float64
    assert netadapt._input_like(torch.randn(5, 8, dtype=torch.float64), 8, 1, gen).dtype == torch.float64
    table = netadapt.build_latency_table(net, x, num_candidates=2, repeats=1)
    assert set(table.entries["3"]) == {(4, 8), (4, 4), (2, 8), (2, 4)}


@pytest.mark.parametrize("with_table", [True, False])
def test_a_model_pruned_with_torch_is_copied(with_table):
    """NetAdapt shrinks a copy of the model; a layer pruned with
    torch.nn.utils.prune holds a computed weight that copy.deepcopy refuses
    (torch's RuntimeError 'Only Tensors created explicitly by the user (graph
    leaves) support the deepcopy protocol'). The copy is taken now, and the
    model is left as it was."""
    net = mlp(0, widths=(8, 16, 16, 3))
    x = torch.randn(64, 8)
    table = netadapt.build_latency_table(net, x, num_candidates=4, repeats=1) if with_table else None
    torch.nn.utils.prune.l1_unstructured(net[0], "weight", 0.3)
    res = netadapt.netadapt(net, table, lambda m, s: None, lambda m: 1.0, x, budget=0.9, short_steps=0,
                            long_steps=0, max_iterations=1)
    assert res.model is not net and res.model(x).shape == (64, 3)
    assert net[0].weight.shape == (16, 8) and hasattr(net[0], "weight_mask")


def test_an_iterations_log_line_names_the_layer_as_a_name():
    """'iteration 0: 6 -> 8 channels' (a Sequential's layer "6") read as a
    channel count cut from 6 to 8."""
    lines, history = [], []
    netadapt._record(history, lines.append, 0, "6", 8, 0.5, 0.00125, 3, "estimate")
    assert re.match(r"iteration 0: layer '6' cut to 8 channels, metric 0.5000, estimate 1.25 ms", lines[0]), lines


def test_a_nan_metric_is_never_the_best_proposal():
    """Each iteration keeps the proposal of the best metric by max(): a NaN
    metric (a diverged short fine-tune) first in the list compared false
    with every number and was kept, silently, over a proposal scoring 0.5.
    A NaN ranks below every number now."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))
    x = torch.randn(256, 8)
    table = netadapt.build_latency_table(net, x, num_candidates=4, repeats=1)
    # (times that follow the layers' sizes: the measured ones, of one repeat on a busy machine, could make no
    # narrower width of layer 2 estimate faster, and layer 0's NaN proposal the only one, as a CI run saw)
    table.entries = {name: {key: key[0] * key[1] * 1e-6 for key in row} for name, row in table.entries.items()}
    table.rest = 0.0
    res = netadapt.netadapt(net, table, lambda m, s: None, lambda m: float("nan") if m[0].out_features < 32 else 0.5,
                            x, budget=0.9, short_steps=0, long_steps=0, max_iterations=1)
    assert res.history[0]["layer"] == "2" and res.history[0]["metric"] == 0.5


@pytest.mark.parametrize("bad", [None, "0.5", torch.ones(3), True])
@pytest.mark.parametrize("with_table", [True, False])
def test_an_eval_fn_returning_no_number_is_a_type_error_naming_it(bad, with_table):
    net = mlp(0, widths=(8, 16, 16, 3))
    x = torch.randn(64, 8)
    table = netadapt.build_latency_table(net, x, num_candidates=4, repeats=1) if with_table else None
    with pytest.raises(TypeError, match="eval_fn must return a number"):
        netadapt.netadapt(net, table, lambda m, s: None, lambda m: bad, x, budget=0.9, short_steps=0,
                          long_steps=0, max_iterations=1)


def test_measuring_leaves_each_module_in_its_own_mode():
    """measure_latency runs the model in eval mode; model.train(was) after
    it put every module in the model's mode (a BatchNorm frozen in eval
    mode while the rest trains was left training)."""
    net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 3)).train()
    net[1].eval()
    netadapt.measure_latency(net, torch.randn(4, 8), 1)
    assert [m.training for m in net] == [True, False, True] and net.training


def test_a_table_that_is_no_latency_table_is_a_type_error():
    """netadapt(model, table, ...) took anything as the table: a dict (the
    JSON of table.save read back by hand) or the path of a saved table gave
    AttributeError "'dict' object has no attribute 'candidates'"."""
    tr = Trainer()
    net = mlp(0)
    x = torch.randn(4, 8)
    for bad in ({"entries": {}}, "latency_table.json"):
        with pytest.raises(TypeError, match=r"table must be a LatencyTable .*or None .*; got (dict|str)"):
            netadapt.netadapt(net, bad, tr, tr.accuracy, x, 0.5)
    assert tr.calls == []


@pytest.mark.parametrize("text", ["not json", "{}", '{"entries": [1, 2]}', "[]", "\x80\x81"])
def test_loading_a_file_that_is_no_saved_table_names_it(tmp_path, text):
    """LatencyTable.load of a file LatencyTable.save did not write: the bare
    JSONDecodeError ('Expecting value: line 1 column 1'), KeyError 'entries'
    or a TypeError from inside, none naming the file; now a ValueError
    naming it."""
    path = tmp_path / "table.json"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(ValueError, match=f"{path}.*not a latency table saved by LatencyTable.save"):
        netadapt.LatencyTable.load(path)


def _table_text(**change) -> str:
    import json

    table = {"entries": {"0": [[3, 8, 0.5], [3, 4, 0.25]]}, "keys": {"0": {"type": "Linear"}},
             "candidates": {"0": [8, 4]}, "rest": 0.1, "repeats": 7, "layout": [["0", None, True]]}
    return json.dumps({**table, **change})


@pytest.mark.parametrize("text", [
    "[" * 100_000 + "]" * 100_000,  # (json's RecursionError)
    _table_text(entries={"0": [[3, 8, float("nan")]]}), _table_text(entries={"0": [[3, 8, -1.0]]}),
    _table_text(entries={"0": [["3", 8.7, 0.5]]}),
    _table_text(candidates={"0": "x"}), _table_text(candidates={"0": []}), _table_text(candidates={"0": [0]}),
    _table_text(keys={"0": 3}), _table_text(rest=float("inf")), _table_text(rest=-2), _table_text(repeats=0),
    _table_text(repeats=2.5), _table_text(layout=[[1]]), _table_text(layout=[["0", None, "yes"]]),
    _table_text(layout=[[0, None, True]])])
def test_loading_a_table_of_the_wrong_kind_of_values_names_the_file(tmp_path, text):
    """LatencyTable.load took any JSON of the right keys: values of another
    kind (a NaN or negative latency, a str of candidates, a layout row of
    one item, a repeat count of 0) loaded into a table whose estimates were
    NaN or failed later inside netadapt ("not enough values to unpack",
    a comparison of str and int), a nesting too deep was json's bare
    RecursionError; each is a ValueError naming the file."""
    path = tmp_path / "table.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"{path}.*not a latency table saved by LatencyTable.save"):
        netadapt.LatencyTable.load(path)


def test_loading_a_folder_or_a_pipe_as_the_table_names_it(tmp_path):
    """LatencyTable.load of a folder was the OSError "Is a directory", and of
    a named pipe read until a writer came (a hang); both are a ValueError
    naming the path, as checkpoint.load's; a file of the table's values
    written as save writes them loads."""
    import os

    (tmp_path / "table.json").write_text(_table_text())
    table = netadapt.LatencyTable.load(tmp_path / "table.json")
    assert table.entries == {"0": {(3, 8): 0.5, (3, 4): 0.25}} and table.layout == [("0", None, True)]
    with pytest.raises(ValueError, match=f"{tmp_path} is a folder"):
        netadapt.LatencyTable.load(tmp_path)
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(ValueError, match=f"{tmp_path / 'pipe'} is not a regular file"):
        netadapt.LatencyTable.load(tmp_path / "pipe")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        netadapt.LatencyTable.load(tmp_path / "missing.json")


def test_a_saved_table_loads_back_equal(tmp_path):
    table = netadapt.build_latency_table(mlp(0), torch.randn(4, 8), num_candidates=2, repeats=1)
    back = netadapt.LatencyTable.load(table.save(tmp_path / "t.json"))
    assert (back.entries, back.keys, back.candidates, back.rest, back.repeats, back.layout) == \
        (table.entries, table.keys, table.candidates, table.rest, table.repeats, table.layout)


@pytest.mark.parametrize("with_table", [True, False])
def test_a_missed_budget_warns_at_the_callers_line(with_table):
    """The RuntimeWarning of a missed budget named a line inside
    netadapt.py (printed under it: 'return _finish(net, channels, ...'), on
    both paths; it names the line that called netadapt now, as warnings do."""
    tr = Trainer()
    net = mlp(0, widths=(8, 4, 4, 3))
    x = torch.randn(8, 8)
    table = netadapt.build_latency_table(net, x, num_candidates=2, repeats=1) if with_table else None
    with pytest.warns(RuntimeWarning, match="could not meet the latency budget") as record:
        netadapt.netadapt(net, table, tr, tr.accuracy, x, 1.0, budget_seconds=1e-12, short_steps=0, long_steps=0,
                          max_iterations=1)
    assert [w.filename for w in record if w.category is RuntimeWarning] == [__file__]


@pytest.mark.parametrize("path", [None, 3])
def test_latency_table_save_and_load_name_a_path_that_is_no_path(path):
    """LatencyTable.save(None) / load(None) were pathlib's bare "expected
    str, bytes or os.PathLike object, not NoneType": a TypeError naming
    path now."""
    table = netadapt.LatencyTable({}, {}, {})
    for call, what in ((table.save, "the JSON file to write"), (netadapt.LatencyTable.load, "a file LatencyTable.save "
                                                                                           "wrote")):
        with pytest.raises(TypeError, match=rf"^path must be a str or Path \({what}\); got {type(path).__name__}$"):
            call(path)


def test_least_latency_is_rest_plus_each_layer_s_fastest_entry():
    """The least estimate any widths of the table can give (what ``prune
    netadapt`` refuses a --latency below): ``rest`` plus each layer's fastest
    entry, which is no more than the estimate of any widths it holds."""
    layout = [("0", None, True), ("2", "0", True), ("4", "2", False)]
    entries = {"0": {(3, 8): 4.0, (3, 4): 3.0, (3, 2): 3.5},  # (a narrower width need not time faster)
               "2": {(8, 8): 6.0, (8, 4): 5.0, (4, 8): 4.0, (4, 4): 2.0, (2, 8): 3.0, (2, 4): 2.5},
               "4": {(8, 3): 2.0, (4, 3): 1.0, (2, 3): 1.5}}
    table = netadapt.LatencyTable(entries, {}, {"0": [8, 4, 2], "2": [8, 4]}, rest=0.5, layout=layout)
    assert table.least_latency() == 0.5 + 3.0 + 2.0 + 1.0
    every = [table.latency({"0": a, "2": b}) for a in (8, 4, 2) for b in (8, 4)]
    assert min(every) == table.least_latency() and table.latency({"0": 8, "2": 8}) == 12.5
    assert table.initial_latency() == 12.5  # (the built widths: each producer's first candidate)
    net = sparse_chain(width=8)
    built = netadapt.build_latency_table(net, sparse_input(n=200, extent=8), num_candidates=2, repeats=1)
    assert 0 < built.least_latency() <= min(built.latency({"0": a, "3": b}) for a in (8, 4) for b in (16, 8))


@pytest.mark.parametrize("repeats, error", [(0, ValueError), (-3, ValueError), (1.5, TypeError)])
def test_measure_latency_names_repeats(repeats, error):
    with pytest.raises(error, match="repeats must be an int >= 1"):  # (0: min()'s empty sequence)
        netadapt.measure_latency(mlp(0), torch.randn(2, 8), repeats=repeats)
