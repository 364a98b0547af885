"""AMC: the FLOPs model, budget-respecting ratios, the export, sparse chains."""

from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import pytest
import torch

from pointsparse.models import MinkUNet
from pointsparse.prune import amc, surgery
from prune_procedures_support import Trainer, mlp, region_chain, sparse_chain, sparse_input  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def test_flops_model_matches_the_report_after_surgery():
    net = mlp(0, widths=(8, 16, 12, 3)).eval()
    x = torch.randn(5, 8)
    infos = amc.layer_infos(net, x)
    assert [(i.name, i.producer, i.input_from) for i in infos] == [("0", True, None), ("2", True, "0"),
                                                                     ("4", False, "2")]
    assert infos[0].flops == 2 * 5 * 8 * 16
    ratios = {"0": 0.5, "2": 0.25}
    predicted = amc.flops_for(infos, ratios)
    surgery.apply_channel_ratios(net, ratios)
    assert predicted == sum(i.flops for i in amc.layer_infos(net, x))
    assert predicted == 2 * 5 * (8 * 8 + 8 * 9 + 9 * 3)


def test_resource_constrained_search_meets_the_budget(tmp_path):
    tr = Trainer()
    net = mlp(0, widths=(8, 32, 32, 3))
    tr(net, 60)
    x = tr.x[:32]
    res = amc.amc_search(net, tr.accuracy, x, episodes=12, warmup=4, reward="error", target_flops=0.4,
                         agent_kwargs={"batch_size": 8, "hidden": 32})
    assert len(res.history) == 12
    for h in res.history:
        assert h["flops"] <= 0.4 * res.dense_flops * (1 + 1e-9)
        assert all(0.0 <= r <= 0.8 for r in h["ratios"].values())
    assert res.flops <= 0.4 * res.dense_flops * (1 + 1e-9)
    assert res.reward == max(h["reward"] for h in res.history)
    assert res.reward == pytest.approx(-(1 - res.metric))
    data = json.loads(res.export(tmp_path / "r.json").read_text())
    assert data["ratios"] == res.ratios
    assert sum(p.numel() for p in net.parameters()) == 8 * 32 + 32 + 32 * 32 + 32 + 32 * 3 + 3  # untouched


def test_flops_reward_and_uniform_baseline():
    tr = Trainer()
    net = mlp(0, widths=(8, 32, 32, 3))
    tr(net, 30)
    res = amc.amc_search(net, tr.accuracy, tr.x[:16], episodes=6, warmup=6, reward="flops")
    for h in res.history:
        assert h["reward"] == pytest.approx(-(1 - h["metric"]) * torch.log(torch.tensor(h["flops"])).item(), rel=1e-5)
    infos = amc.layer_infos(net, tr.x[:16])
    u = amc.uniform_ratio_for_flops(infos, 0.5 * res.dense_flops)
    assert amc.flops_for(infos, {"0": u, "2": u}) <= 0.5 * res.dense_flops
    assert amc.flops_for(infos, {"0": u - 0.05, "2": u - 0.05}) > 0.5 * res.dense_flops


@pytest.mark.parametrize("ratio", [-1.0, 1.5, float("nan")])
def test_ratios_and_targets_outside_their_range_are_named(ratio):
    """flops_for took a ratio of -3 (four times the dense FLOPs) or 5, and a
    name of no group (ignored); uniform_ratio_for_flops a target of nan or
    -1 (a ratio back); surgery.kept_count(8, -1) kept 16 of 8 channels.
    Each is refused naming the argument."""
    from pointsparse.prune import surgery

    net = mlp(0, widths=(8, 16, 16, 3))
    infos = amc.layer_infos(net, torch.randn(4, 8))
    with pytest.raises(ValueError, match=rf"ratios\['0'\]: ratio must be in \[0, 1\]; got {ratio}"):
        amc.flops_for(infos, {"0": ratio})
    with pytest.raises(ValueError, match=rf"ratio must be in \[0, 1\]; got {ratio}"):
        surgery.kept_count(8, ratio)
    with pytest.raises(ValueError, match="target_flops must be a finite number >= 0"):
        amc.uniform_ratio_for_flops(infos, ratio if ratio != 1.5 else -5.0)
    with pytest.raises(ValueError, match="ratios names 'nope', no channel group of these layers"):
        amc.flops_for(infos, {"nope": 0.5})
    with pytest.raises(ValueError, match="max_ratio must be a number in"):
        amc.uniform_ratio_for_flops(infos, 10.0, max_ratio=1.0)
    with pytest.raises(ValueError, match="channels must be an int >= 1"):
        surgery.kept_count(0, 0.5)
    assert surgery.kept_count(8, 1.0) == 1 and surgery.kept_count(5, 0.5) == 3


def test_sparse_chain_with_reconstruction():
    net = sparse_chain(width=8)
    x = sparse_input(n=120)
    with torch.no_grad():
        y = net(x).feats.argmax(1)

    def agree(m):
        with torch.no_grad():
            return float((m(x).feats.argmax(1) == y).float().mean())

    infos = amc.layer_infos(net, x)
    assert infos[1].flops > 0
    res = amc.amc_search(net, agree, x, episodes=4, warmup=4, reward="error", target_flops=0.6, reconstruct=True,
                         calibration_input=x)
    assert res.flops <= 0.6 * res.dense_flops * (1 + 1e-9)
    pruned = sparse_chain(width=8)
    surgery.apply_channel_ratios(pruned, res.ratios)
    assert pruned(x).feats.shape == (len(x), 4)


def test_bad_inputs():
    net = mlp(0)
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="reward"):
        amc.amc_search(net, lambda m: 1.0, x, reward="latency")
    with pytest.raises(ValueError, match="target_flops"):
        amc.amc_search(net, lambda m: 1.0, x, reward="error")
    with pytest.raises(ValueError, match="below what max_ratio"):
        amc.amc_search(net, lambda m: 1.0, x, reward="error", target_flops=0.01)
    with pytest.raises(ValueError, match="max_ratio"):
        amc.amc_search(net, lambda m: 1.0, x, max_ratio=1.0)
    bad = [({"reward": "error", "target_flops": float("nan")}, ValueError, "target_flops"),  # NaN: no budget met
           ({"target_flops": -0.5}, ValueError, "target_flops"),
           ({"target_flops": "0.5"}, TypeError, "target_flops"),
           ({"max_ratio": float("nan")}, ValueError, "max_ratio"),
           ({"noise": float("nan")}, ValueError, "noise must be"),
           ({"noise": -1.0}, ValueError, "noise must be"),
           ({"noise_decay": 0.0}, ValueError, "noise_decay"),
           ({"noise_decay": float("inf")}, ValueError, "noise_decay"),
           ({"seed": 1.5}, TypeError, "seed"),
           ({"episodes": True}, TypeError, "episodes"),
           ({"coupled": "no", "episodes": 1, "warmup": 1}, TypeError, "coupled must be True or False"),
           ({"reconstruct": "no", "episodes": 1, "warmup": 1}, TypeError, "reconstruct must be True or False"),
           ({"log": "run.log", "episodes": 1, "warmup": 1}, TypeError, "log must be callable"),
           ({"agent_kwargs": [("hidden", 8)], "episodes": 1, "warmup": 1}, TypeError, "agent_kwargs must be a dict")]
    for kwargs, error, match in bad:
        with pytest.raises(error, match=match):
            amc.amc_search(net, lambda m: 1.0, x, **kwargs)


def test_layer_infos_coupled_must_be_a_bool():
    with pytest.raises(TypeError, match="coupled must be True or False"):
        amc.layer_infos(mlp(0), torch.randn(2, 8), coupled="no")


def test_residual_network_search_and_netadapt_layout():
    from prune_procedures_support import ResidualNet
    from pointsparse.prune import netadapt
    net = ResidualNet().eval()
    x = sparse_input(n=100)
    infos = {i.name: i for i in amc.layer_infos(net, x)}
    assert [n for n, i in infos.items() if i.producer] == ["stem.0", "block.main.0"]
    assert infos["block.main.3"].input_from == "block.main.0" and infos["head.fn"].input_from is None
    with torch.no_grad():
        y = net(x).feats.argmax(1)
    res = amc.amc_search(net, lambda m: float((m(x).feats.argmax(1) == y).float().mean()), x, episodes=3, warmup=3,
                         reward="error", target_flops=0.7)
    assert res.flops <= 0.7 * res.dense_flops * (1 + 1e-9)
    table = netadapt.build_latency_table(net, x, num_candidates=2, repeats=1)
    assert set(table.entries) == {"stem.0", "stem.3", "block.main.0", "block.main.3"}
    assert set(table.entries["block.main.3"]) == {(12, 8), (6, 8)}


# ------------------------------------------------------------ the benchmark's AMC path
def test_bench_amc_cut_meets_the_flops_of_keep_half_and_equals_the_masked_model():
    """bench/prune_speed.py's AMC rows: a search over every coupled group of
    MinkUNet within the keep-0.5 model's FLOPs, cut as chosen: the cut model
    runs, stays within the budget and computes what the masked dense model
    computes."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import prune_speed as bench
    from pointsparse.prune import graph as G

    torch.manual_seed(0)
    dense = MinkUNet(4, 19, cr=0.25).eval()
    x = sparse_input(n=600, channels=4, extent=16)
    half = copy.deepcopy(dense)
    graph = G.DependencyGraph(half, x)
    graph.cut(G.plan(graph, 0.5), retrace=False)
    target = bench._flops(half, x) / bench._flops(dense, x)
    score = bench.fidelity(dense, x)
    assert score(dense) == 1.0
    net, keep, res, ratios = bench.amc_cut(dense, x, target, episodes=3, warmup=1, eval_fn=score)
    assert len(keep) == 33 and all(ratios[n] <= r for n, r in res.ratios.items())
    flops = bench._flops(net, x)
    assert res.flops <= flops <= target * bench._flops(dense, x) * (1 + 1e-9)
    assert flops >= 0.97 * target * bench._flops(dense, x)  # the budget is spent
    assert 0 < score(net) < 1
    assert sum(p.numel() for p in net.parameters()) < sum(p.numel() for p in dense.parameters())
    assert net(x).feats.shape == (len(x), 19)
    assert bench.cut_error(dense, x, keep, net) < 1e-5


def test_layer_infos_of_a_compressed_model_is_refused_by_name():
    """sparsity_report now lists compressed layers, which have no weight
    whose channels AMC could cut (their rows reached in_channels: a
    TypeError 'no tensor named weight')."""
    from pointsparse import formats

    net = formats.compress(mlp(0), "csr")
    with pytest.raises(ValueError, match=r"layer '0' is a compressed layer .* before compressing it"):
        amc.layer_infos(net, torch.randn(2, 8))


@pytest.mark.parametrize("make", [np.int64, np.int32])
def test_search_counts_take_numpy_integers(make):
    """episodes, warmup and seed may be numpy integers (they were refused:
    isinstance int), with the search the ints give."""
    tr = Trainer()
    net = mlp(0, widths=(8, 16, 16, 3))
    runs = [amc.amc_search(net, tr.accuracy, tr.x[:16], episodes=cast(3), warmup=cast(1), reward="flops",
                           seed=cast(5)) for cast in (int, make)]
    assert runs[1].ratios == runs[0].ratios and runs[1].history == runs[0].history


@pytest.mark.parametrize("bad", [True, np.bool_(True), 2.0, 1.5])
def test_search_counts_refuse_bools_and_floats(bad):
    net, x = mlp(0), torch.randn(4, 8)
    for kwargs, match in (({"episodes": bad}, "^episodes must be a positive int; got"),  # each by its name
                          ({"warmup": bad}, "^warmup must be an int >= 0; got"),
                          ({"seed": bad}, "seed must be an int >= 0")):
        with pytest.raises(TypeError, match=match):
            amc.amc_search(net, lambda m: 0.5, x, **kwargs)


@pytest.mark.parametrize("coupled", [False, True])
def test_layer_infos_kernel_volume_of_a_kernel_region_conv_is_its_region(coupled):
    """The agent's state gives each layer its kernel volume: a 'cross'
    conv runs 7 offsets, not the 27 its weight has."""
    net = region_chain(0).eval()
    infos = {i.name: i for i in amc.layer_infos(net, sparse_input(), coupled=coupled)}
    assert (infos["0"].kernel_volume, infos["2"].kernel_volume) == (7, 27)


def test_search_under_a_float64_default_dtype():
    """With ``torch.set_default_dtype(torch.float64)`` (a float64 model) the
    agent's networks were built float64 while its states are float32: the
    first episode after the warmup failed with torch's "mat1 and mat2 must
    have the same dtype". The agent computes in float32 whatever the
    default, and the search runs past its warmup and its updates."""
    was = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        tr = Trainer()
        net = mlp(0, widths=(8, 16, 12, 3)).eval()
        tr.x = tr.x.double()
        res = amc.amc_search(net, tr.accuracy, tr.x[:16], episodes=6, warmup=2, reward="error", target_flops=0.6,
                             agent_kwargs={"batch_size": 2, "hidden": 16})
    finally:
        torch.set_default_dtype(was)
    assert len(res.history) == 6 and res.flops <= 0.6 * res.dense_flops + 1e-6


@pytest.mark.parametrize("bad, error, match", [
    (float("nan"), ValueError, r"eval_fn returned nan for episode 2's pruned copy; AMC needs a metric in \[0, 1\]"),
    (87.5, ValueError, r"eval_fn returned 87.5 for episode 2's pruned copy; AMC needs a metric in \[0, 1\]"),
    ("0.9", TypeError, r"eval_fn must return a number \(the metric in \[0, 1\]\); got str"),
])
def test_a_metric_outside_0_1_is_named(bad, error, match):
    """The error of a pruned copy is 1 - metric: a NaN metric made that
    episode's reward and the running baseline NaN, so every later advantage
    was NaN (and the agent's networks NaN once it learned), silently; a
    percentage (87.5) gave a negative error, a reward that grows with the
    FLOPs kept; a str gave Python's 'could not convert string to float'.
    Each is named now, with the episode."""
    net, x = mlp(0), torch.randn(4, 8)
    calls = []

    def eval_fn(m):
        calls.append(1)
        return bad if len(calls) == 3 else 0.5
    with pytest.raises(error, match=match):
        amc.amc_search(net, eval_fn, x, episodes=5, warmup=2)


def test_a_one_element_numpy_metric_is_taken_as_the_other_procedures_take_it():
    """eval_fn returning np.array(0.5) (a metric computed in numpy) ran the
    other procedures (procedure.metric_value) but AMC refused it as no
    number ('got ndarray'); it is read as its value."""
    net, x = mlp(0), torch.randn(4, 8)
    res = amc.amc_search(net, lambda m: np.array([0.5]), x, episodes=3, warmup=2)
    assert len(res.history) == 3 and all(h["metric"] == 0.5 for h in res.history)


def test_search_leaves_torch_global_random_state_alone():
    """amc_search reseeded torch's global generator with its own seed (to
    build the agent's networks): whatever seed a user had set, the training
    after a search drew the same numbers (two experiments seeded 1 and 2
    fine-tuned alike). The agent is built under a forked generator; the
    search itself still repeats exactly for a seed."""
    tr = Trainer()
    net = mlp(0, widths=(8, 32, 32, 3))
    tr(net, 30)
    draws, searches = [], []
    for user_seed in (1, 2):
        torch.manual_seed(user_seed)
        expected = torch.rand(3)
        torch.manual_seed(user_seed)
        res = amc.amc_search(net, tr.accuracy, tr.x[:16], episodes=3, warmup=1, reward="flops",
                             agent_kwargs={"batch_size": 2, "hidden": 8})
        draws.append(torch.rand(3))
        assert torch.equal(draws[-1], expected)
        searches.append([h["ratios"] for h in res.history])
    assert not torch.equal(draws[0], draws[1])
    assert searches[0] == searches[1]


@pytest.mark.parametrize("bad, got", [("model", "str"), (None, "NoneType"), ([mlp(0)], "list")])
def test_a_model_that_is_no_module_is_a_type_error(bad, got):
    """amc_search / layer_infos of no nn.Module: AttributeError "'str'
    object has no attribute 'named_modules'" where the other procedures
    say what model must be."""
    with pytest.raises(TypeError, match=f"model must be a torch.nn.Module; got {got}"):
        amc.amc_search(bad, lambda m: 1.0, torch.randn(2, 8), episodes=1, warmup=0)
    with pytest.raises(TypeError, match=f"model must be a torch.nn.Module; got {got}"):
        amc.layer_infos(bad, torch.randn(2, 8))


def test_a_search_that_never_learned_says_so(tmp_path):
    """A search whose episodes all ran before the agent trained (the
    warm-up acts at random; the agent trains once its buffer holds a batch)
    returned its best random episode as AMC's answer, without a word
    (`prune amc --episodes 30` ran 30 warm-up episodes). It warns now,
    naming why and how many episodes would learn, and the result and its
    export count the episodes a trained agent acted in."""
    tr = Trainer()
    net = mlp(0, widths=(8, 16, 12, 3)).eval()  # two producers: two transitions an episode
    with pytest.warns(RuntimeWarning, match=r"^AMC ran no learned episode: of its 6 episodes, 6 were random warm-up "
                                            r"and the agent trains only once it holds batch_size=64 transitions \(2 "
                                            r"per episode\), so the ratios found are a random search's best, not the "
                                            r"agent's \(give episodes > 32\)$") as record:
        res = amc.amc_search(net, tr.accuracy, tr.x[:16], episodes=6, warmup=30, reward="error", target_flops=0.6)
    assert [w.filename for w in record if w.category is RuntimeWarning] == [__file__]
    assert res.learned_episodes == 0
    data = json.loads(res.export(tmp_path / "r.json").read_text())
    assert (data["episodes"], data["learned_episodes"]) == (6, 0)
    with pytest.warns(RuntimeWarning, match=r"of its 5 episodes, 2 were random warm-up .* \(give episodes > 32\)"):
        amc.amc_search(net, tr.accuracy, tr.x[:16], episodes=5, warmup=2, reward="error", target_flops=0.6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # trains after episode 2 (6 transitions, batch 4): episodes 3, 4, 5 learned
        res = amc.amc_search(net, tr.accuracy, tr.x[:16], episodes=6, warmup=2, reward="error", target_flops=0.6,
                             agent_kwargs={"batch_size": 4, "hidden": 16})
    assert res.learned_episodes == 3


def test_target_flops_of_1_is_the_dense_flops_as_documented():
    """target_flops is a fraction of the dense FLOPs when <= 1 (the check
    and its message said so) while the docstring said "when < 1", so 1 read
    as one FLOP there: the docstring says <= 1 now, and 1 is the dense model."""
    assert "fraction of the dense FLOPs when <= 1)" in " ".join(amc.amc_search.__doc__.split())
    net = mlp(0, widths=(8, 16, 12, 3)).eval()
    res = amc.amc_search(net, lambda m: 0.5, torch.randn(4, 8), episodes=2, warmup=2, reward="error", target_flops=1)
    assert all(h["flops"] <= res.dense_flops for h in res.history)
    with pytest.raises(ValueError, match=r"a fraction of the dense FLOPs when <= 1\)"):
        amc.amc_search(net, lambda m: 0.5, torch.randn(4, 8), episodes=1, reward="error", target_flops=0)


@pytest.mark.parametrize("path", [None, 3])
def test_export_names_a_path_that_is_no_path(path):
    """AMCResult.export(None) was pathlib's bare "expected str, bytes or
    os.PathLike object, not NoneType": a TypeError naming path now."""
    res = amc.AMCResult({"0": 0.5}, 0.5, 1.0, 2.0, -0.5)
    with pytest.raises(TypeError, match=rf"^path must be a str or Path \(the JSON file to write\); got "
                                        rf"{type(path).__name__}$"):
        res.export(path)


def test_a_budget_below_the_largest_cut_names_the_fraction():
    """A target_flops fraction below what max_ratio reaches was refused in
    absolute FLOPs only ("target_flops 5.797e+05 is below what max_ratio=0.8
    reaches (2.243e+06)" for a target_flops of 0.01): it names the value
    given and the least fraction of the dense FLOPs the search can reach."""
    net = mlp(0, widths=(8, 16, 12, 3))
    x = torch.randn(4, 8)
    dense = amc.flops_for(amc.layer_infos(net, x), {})
    floor = amc.flops_for(amc.layer_infos(net, x), {"0": 0.8, "2": 0.8}) / dense
    with pytest.raises(ValueError, match=rf"^target_flops 0.01 \(0.01 of the dense FLOPs, {0.01 * dense:.4g}\) is "
                                         rf"below what max_ratio=0.8 reaches: {floor:.4f} of the dense FLOPs "
                                         rf"\({floor * dense:.4g}\)$"):
        amc.amc_search(net, lambda m: 1.0, x, reward="error", target_flops=0.01)
    with pytest.raises(ValueError, match=rf"^target_flops 12 \({12 / dense:.4f} of the dense FLOPs\) is below"):
        amc.amc_search(net, lambda m: 1.0, x, reward="error", target_flops=12)


def test_a_budget_at_the_largest_cut_is_searched():
    """target_flops equal to the fraction of the dense FLOPs the largest cut
    leaves (the least `prune amc --flops` accepts) was refused where that
    fraction times the dense FLOPs rounds below the cut's FLOPs (widths 5, 8,
    7: by one unit in the last place): the floor is one fraction now, and the
    search compares the budget with it times the dense FLOPs, as it does the
    budget it searches under."""
    net = mlp(0, widths=(5, 8, 7, 3))
    x = torch.randn(4, 5)
    infos = amc.layer_infos(net, x)
    dense = amc.flops_for(infos, {})
    floor = amc.flops_for(infos, {"0": 0.8, "2": 0.8}) / dense
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # (one warm-up episode: no learned one)
        res = amc.amc_search(net, lambda m: 0.5, x, episodes=1, warmup=1, reward="error", target_flops=floor)
    assert res.ratios == {"0": 0.8, "2": 0.8}
    assert res.flops <= floor * dense * (1 + 1e-9)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"batch_size": 0}, ValueError, r"^agent_kwargs: batch_size must be an int >= 1; got 0$"),
    ({"batch_size": 2.5}, TypeError, r"^agent_kwargs: batch_size must be an int >= 1; got 2.5$"),
    ({"buffer_size": 0}, ValueError, r"^agent_kwargs: buffer_size must be an int >= 1; got 0$"),
    ({"batch_size": 8, "buffer_size": 4}, ValueError, r"^agent_kwargs: buffer_size 4 holds fewer transitions than "
                                                      r"a batch \(batch_size 8\): the agent would never train$"),
    ({"hidden": 0}, ValueError, r"^agent_kwargs: hidden must be an int >= 1; got 0$"),
    ({"tau": float("nan")}, ValueError, r"^agent_kwargs: tau must be a number in \(0, 1\]; got nan$"),
    ({"discount": 2.0}, ValueError, r"^agent_kwargs: discount must be a number in \[0, 1\]; got 2.0$"),
    ({"actor_lr": -1}, ValueError, r"^agent_kwargs: actor_lr must be a finite number > 0; got -1$"),
    ({"critic_lr": "a"}, TypeError, r"^agent_kwargs: critic_lr must be a finite number > 0; got 'a'$"),
    ({"seed": 1}, TypeError, r"^agent_kwargs must not hold 'seed': amc_search's own seed seeds the agent$"),
    ({"nope": 1}, TypeError, r"^agent_kwargs: .*unexpected keyword argument 'nope'$"),
])
def test_agent_kwargs_are_checked_before_any_episode(kwargs, error, match):
    """amc_search's agent_kwargs went to DDPG unchecked: batch_size 0 was
    torch's "stack expects a non-empty TensorList", 2.5 Python's "can't
    multiply sequence by non-int", -1 random's "Sample larger than
    population" (each after the warm-up's episodes had run), a buffer_size
    under batch_size or 0 never trained, tau NaN made the agent NaN, and
    'seed' was "got multiple values for keyword argument": each is named
    now, before any episode."""
    net = mlp(0, widths=(8, 16, 12, 3)).eval()
    evaluated = []
    with pytest.raises(error, match=match):
        amc.amc_search(net, lambda m: evaluated.append(1) or 0.5, torch.randn(4, 8), episodes=4, warmup=1,
                       reward="error", target_flops=0.6, agent_kwargs=kwargs)
    assert evaluated == []
