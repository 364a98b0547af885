"""The checks the benchmark scripts make before they time anything: each
must be able to fail (a check that compares a result with itself passes
whatever the code under test computed)."""

from __future__ import annotations

import importlib
import sys

import numpy as np
import pytest
import torch

from pointsparse.app import benchmark


def _bench_module(name: str):
    sys.path.insert(0, str(benchmark.BENCH_DIR))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(benchmark.BENCH_DIR))


def _recording_interleaved(asked: list, order=sorted):
    """A stand-in for _common.interleaved that records (the names of the calls, in ``order``, and the
    repeats) of each call in ``asked`` and times nothing."""
    def fake_interleaved(fns, repeats, warmup=True):
        asked.append((order(fns), repeats))
        return {k: 1.0 for k in fns}
    return fake_interleaved


def _into_kept_buffer():
    """Two jobs that write into buffers kept between calls and return them
    (as side_by_side.conv_jobs' do), their result depending on the thread
    count: the way run side by side (one thread each) computes other arrays
    than the 2-thread one."""
    bufs = [np.zeros(4, np.float32), np.zeros(4, np.float32)]

    def job(i):
        def run(nt):
            bufs[i][:] = nt
            return bufs[i]
        return run

    return job(0), job(1)


def test_side_by_side_check_fails_for_jobs_writing_a_kept_buffer(monkeypatch):
    """side_by_side.measure compared the 2-thread results with the
    side-by-side ones; the conv jobs return their one output array, so both
    were the same array and the check could not fail. Now the 2-thread
    results are copied first: jobs whose arrays differ are refused."""
    sbs = _bench_module("side_by_side")
    monkeypatch.setattr(sbs, "map_jobs", lambda coords: _into_kept_buffer())
    monkeypatch.setattr(sbs, "conv_jobs", lambda coords: _into_kept_buffer())
    coords = torch.zeros((1, 4), dtype=torch.int32)
    with pytest.raises(AssertionError, match="other arrays"):
        sbs.measure(coords, 1)


def test_prune_speed_times_fwd_bwd_with_the_repeats_it_states(monkeypatch):
    """bench/prune_speed.py's table says '{repeats} interleaved repeats
    (median)' for every column, but its fwd+bwd columns were timed with 2
    repeats whatever --repeats said (a median of 2: their mean). Both
    directions now take --repeats."""
    ps_bench = _bench_module("prune_speed")
    common = _bench_module("_common")
    asked = []

    def record(models, x, repeats, backward=False):
        asked.append((backward, repeats))
        return {k: 1.0 for k in models}

    monkeypatch.setattr(ps_bench, "_time_interleaved", record)
    monkeypatch.setattr(ps_bench, "_flops", lambda net, x: 1.0)
    table, _, _ = ps_bench.scene_table("scene", common.street_scene(300), 5, True, [(0.5, 8)], None)
    assert sorted(asked) == [(False, 5), (True, 5)]
    assert "5 interleaved repeats" in table


def test_spmm_sweep_says_how_many_runs_its_widest_products_took(monkeypatch):
    """bench/spmm.py's page said 'medians of {repeats} runs' for every time,
    but the sweep times products of more than 10240 columns with
    max(2, repeats - 4) runs (3 of the default 7): the sweep's table now
    says so, and the count is the one time_case was given."""
    spmm = _bench_module("spmm")
    given = {}

    def fake_case(M, K, N, sparsity, repeats, with_torch_sparse=True):
        given[N] = repeats
        return {k: 1.0 for k in ("dense torch.mm", "ours CSR", "ours BSR 4x4", "torch.sparse CSR",
                                 "torch.sparse BSR 4x4")}

    monkeypatch.setattr(spmm, "time_case", fake_case)
    monkeypatch.setattr(spmm, "sweep_grid", lambda quick: ([(64, 64)], [1024, 102400], [0.5, 0.9]))
    lines, _, _ = spmm.sweep_section(False, 7)
    assert given == {1024: 7, 102400: 3}
    text = "\n".join(lines)
    assert "medians of 7 runs" in text and "102400" in text and "medians of 3 runs" in text


def test_compile_refuses_a_compiled_model_that_disagrees_with_eager():
    """bench/compile.py printed the compiled and exported models' max abs
    diff against eager but timed and wrote the page whatever it was: a
    wrong result now raises, naming the cloud and the tolerance."""
    compile_bench = _bench_module("compile")
    x = torch.randn(5, 4)
    ways = {"eager": lambda x: x * 2, "torch.compile": lambda x: x * 2 + 1, "torch.export": lambda x: x * 2}
    with pytest.raises(RuntimeError, match=r"street, torch.compile against eager: max abs diff 1 is above the tolerance 0.0001"):
        compile_bench.errors_against_eager("street", x, ways)
    ways["torch.compile"] = lambda x: x * 2
    assert compile_bench.errors_against_eager("street", x, ways) == {"torch.compile": 0.0, "torch.export": 0.0}


def test_prune_speed_refuses_a_cut_model_that_differs_from_the_masked_one():
    """bench/prune_speed.py's 'cut vs masked' column was printed, never
    enforced: a cut model computing something else than the dense one with
    the same channels masked was timed and its speed-up published. Now the
    check raises, naming the model and the tolerance."""
    ps_bench = _bench_module("prune_speed")
    common = _bench_module("_common")
    x = ps_bench._input(common.street_scene(300))
    models, kept = ps_bench._variants(x, [(0.5, 8)])
    name = "keep 0.5 (x8)"
    assert ps_bench.cut_error(models["dense"], x, kept[name], models[name], name) <= ps_bench.TOLERANCE
    with pytest.raises(RuntimeError, match=r"keep 0.5 \(x8\): .* above the tolerance 0.0001"):
        # the uncut model in the cut one's place: other outputs than the masked model's
        ps_bench.cut_error(models["dense"], x, kept[name], models["dense"], name)


class _LayerCase:
    """spconv_compare.LayerCase's interface without spconv: ours in float32 /
    float64, and a 'spconv' that is ours scaled by ``scale[threads]``."""

    def __init__(self, scale):
        g = torch.Generator().manual_seed(0)
        self.feats, self.weight, self.scale = torch.randn(6, 3, generator=g), torch.randn(3, 3, generator=g), scale

    def ours(self, backward, dtype=torch.float32):
        feats = self.feats.detach().to(dtype).requires_grad_(backward)
        weight = self.weight.detach().to(dtype).requires_grad_(backward)
        out = feats @ weight
        out.backward(torch.ones_like(out))
        return out, feats.grad, weight.grad

    def spconv(self, backward):
        s = self.scale[torch.get_num_threads()]
        return tuple(t * s for t in self.ours(backward))


def test_spconv_compare_refuses_wrong_layer_outputs_before_timing():
    """bench/spconv_compare.py printed each side's error against our float64
    engine and timed whatever it was. Now ours and spconv at 1 thread (the
    targets' reference) must be within LAYER_TOLERANCE or the run stops,
    naming the case; spconv at 2 threads, wrong in the published run, is
    reported as wrong and its ratios are not counted. (spconv is not
    installed here: a stand-in case with LayerCase's interface.)"""
    sc = _bench_module("spconv_compare")
    threads = torch.get_num_threads()
    try:
        errors, wrong = sc.layer_check(_LayerCase({1: 1.0, 2: 1.0}), 2, "C=3")
        assert wrong == set() and max(max(e) for e in errors.values()) < sc.LAYER_TOLERANCE
        errors, wrong = sc.layer_check(_LayerCase({1: 1.0, 2: 1.3}), 2, "C=3")
        assert wrong == {"spconv 2t"}
        with pytest.raises(RuntimeError, match=r"C=3, spconv 1t: .* above the tolerance 0.0001"):
            sc.layer_check(_LayerCase({1: 1.01, 2: 1.0}), 2, "C=3")
        with pytest.raises(RuntimeError, match=r"C=3 logits, eval mode, ours: .* above the tolerance"):
            sc.checked("C=3 logits, eval mode", {"ours": (2e-3,), "spconv 2t": (0.3,)}, sc.LAYER_TOLERANCE)
    finally:
        torch.set_num_threads(threads)
    assert "outputs wrong" in sc.against_2t(1.5, {"spconv 2t"})
    assert sc.against_2t(1.5, set()) == "1.50x"


def _writers(out, values: dict) -> dict:
    """name -> a call writing ``values[name]`` into ``out`` (as the kernels
    write their one output buffer)."""
    def write(v):
        def run():
            out[:] = v
        return run
    return {name: write(v) for name, v in values.items()}


def test_bf16_vectors_checks_the_float32_vector_form():
    """bench/bf16_vectors.py checked the bf16 vector form (and AMX tiles)
    against bf16 dense, but timed the float32 vector kernel unchecked: it is
    now held against the float32 dense kernel, and a wrong one stops the run."""
    bf = _bench_module("bf16_vectors")
    out = torch.zeros(4, 3)
    good = torch.arange(12.0).reshape(4, 3)
    values = {"float32 dense": good, "float32 vector": good, "bf16 dense": good, "bf16 vector": good}
    bf.check(_writers(out, values), out)
    values["float32 vector"] = good + torch.tensor([0.0, 0.0, 0.5])
    with pytest.raises(RuntimeError, match="float32 vector form differs from the float32 dense form"):
        bf.check(_writers(out, values), out)


def test_sparse_isa_listed_line_checks_outputs_and_picks_a_vector_build(monkeypatch):
    """bench/sparse_isa.py's listed_line timed the vector kernel at each
    listed row count unchecked, on the build runnable_isas()[0] (a KeyError
    were that 'generic'): each vector output is now checked against the
    dense kernel on the same weight first, on the first vector build the
    CPU runs."""
    si = _bench_module("sparse_isa")
    assert si.vector_build(["generic", "avx2"]) == "avx2"
    assert si.vector_build(["avx512", "avx2", "generic"]) == "avx512"
    with pytest.raises(RuntimeError, match="no vector build"):
        si.vector_build(["generic"])
    common = _bench_module("_common")
    build = si.vector_build(si._ext.core.runnable_isas())

    def wrong_runs(plan, feats, weight, out):
        def write(v):
            def run():
                out[:] = v
            return run
        total = float(weight.abs().sum())
        return {f"{build} vector": write(total + (1.0 if (weight != 0).sum() < weight.numel() else 0.0)),
                f"{build} dense": write(total)}

    monkeypatch.setattr(si, "runs", wrong_runs)
    with pytest.raises(RuntimeError, match=f"{build} vector differs from the dense kernel"):
        si.listed_line(common.street_scene(300), 16, 1)


class _Core:
    """A plan core whose forward_bf16 writes into out_bf16 (int16 storage of
    bfloat16) a value depending on the form asked, recording the order."""

    def __init__(self, tiles_value: float):
        self.tiles_value, self.order = tiles_value, []

    def forward_bf16(self, feats, weight, bias, out, threads, relu=False, *, out_bf16=None, tiles_width=None,
                     add=None):
        self.order.append({0.0: "tiles", None: "engine's choice"}.get(tiles_width, "vdpbf16ps"))
        value = self.tiles_value if tiles_width == 0.0 else 1.0
        out_bf16[:] = torch.full((out_bf16.shape[0], out_bf16.shape[1]), value, dtype=torch.bfloat16
                                 ).view(torch.int16).numpy()
        return "tiles" if tiles_width == 0.0 else "vector"


def test_bf16_layers_checks_tiles_against_vdpbf16ps_and_varies_the_order():
    """bench/bf16_layers.py timed the AMX tiles and the vdpbf16ps form of
    each conv with no check that they agree, tiles always first. Each conv's
    tiles output is now checked against the vdpbf16ps one before timing
    (a bf16 rounding step of the largest output), and each round takes the
    two in a new order."""
    bl = _bench_module("bf16_layers")
    weight = torch.zeros(27, 4, 4)
    out = torch.zeros(3, 4, dtype=torch.int16).numpy()
    rows = []
    core = _Core(1.0)
    bl.Timed(core, weight, 6, rows).forward_bf16(None, None, None, None, 1, False, out_bf16=out)
    assert len(rows) == 1 and rows[0]["rows"] == 3
    assert core.order[-1] == "engine's choice"  # the output the network goes on with
    timed = core.order[2:-1]  # after one untimed call of each (the check)
    assert sorted(timed) == ["tiles"] * 6 + ["vdpbf16ps"] * 6
    firsts = {timed[2 * i] for i in range(6)}
    assert firsts == {"tiles", "vdpbf16ps"}
    with pytest.raises(RuntimeError, match=r"conv \(27, 4, 4\), tiles against vdpbf16ps: .* above the tolerance"):
        bl.Timed(_Core(1.5), weight, 1, rows).forward_bf16(None, None, None, None, 1, False, out_bf16=out)


def test_spmm_isa_builds_checks_each_builds_product_and_interleaves(monkeypatch):
    """bench/spmm.py --isa timed every SpMM build with no warm-up, in one
    fixed order, and never looked at the products: each build's product is
    now checked against the float64 product of the format's own weight
    before the timing, which goes through _common.interleaved (a warm-up,
    a new order each round)."""
    spmm = _bench_module("spmm")
    asked = {}

    def fake_interleaved(fns, repeats, warmup=True):
        asked.update(repeats=repeats, warmup=warmup, names=set(fns))
        return {k: 1.0 for k in fns}

    monkeypatch.setattr(spmm, "interleaved", fake_interleaved)
    rows = spmm.isa_builds(3)
    isas = spmm._ext.core.runnable_isas()
    assert asked["repeats"] == 3 and asked["warmup"] is True
    assert asked["names"] == {("dense", "torch.mm")} | {(f, i) for f in ("CSR", "BSR 4x4", "EIE 4 PEs", "2:4 (50%)")
                                                         for i in isas}
    assert any(r.startswith("| CSR |") for r in rows)
    real = spmm.F.CSR._kernel

    def wrong_generic(self, dense_np, isa=None):
        out = real(self, dense_np, isa)
        return out * 1.01 if isa == "generic" else out

    monkeypatch.setattr(spmm.F.CSR, "_kernel", wrong_generic)
    with pytest.raises(RuntimeError, match=r"CSR, generic build: .* above the tolerance 0.0001"):
        spmm.isa_builds(3)


def test_conv_isa_checks_the_builds_agree():
    """bench/conv.py --isa's page says every FMA build gives bit-identical
    results and generic differs by rounding, but timed the builds without
    looking at their outputs: check_builds now holds the FMA builds equal
    bit for bit, and generic, torch.mm and the bf16 form to their
    tolerances against the first build, before timing."""
    conv = _bench_module("conv")
    buf = np.zeros((4, 3), np.float32)
    good = np.arange(12, dtype=np.float32).reshape(4, 3) + 0.5
    values = {"avx512": good, "avx2": good, "generic": good + 1e-6, "torch.mm": good, "bf16": good * 1.001}
    conv.check_builds("k=1 forward, C=3", _writers(buf, values), buf, ["avx512", "avx2", "generic"])
    values["avx2"] = np.nextafter(good, np.float32(np.inf))
    with pytest.raises(RuntimeError, match=r"k=1 forward, C=3: the avx2 build differs from the avx512 build"):
        conv.check_builds("k=1 forward, C=3", _writers(buf, values), buf, ["avx512", "avx2", "generic"])
    values["avx2"], values["generic"] = good, good * 1.01
    with pytest.raises(RuntimeError, match=r"k=1 forward, C=3, generic against avx512: .* above the tolerance"):
        conv.check_builds("k=1 forward, C=3", _writers(buf, values), buf, ["avx512", "avx2", "generic"])


def test_voxel_prune_page_command_names_every_option_it_ran_with():
    """bench/voxel_prune.py's Command line left out --checkpoint, --batch,
    --lr, --voxel-size (the fine-tuning), --threads and --rounds (the
    timing): a page of a non-default run read as one of the defaults."""
    import shlex

    vp = _bench_module("voxel_prune")
    argv = ["--checkpoint", "runs/my ckpt.pt", "--steps", "30", "--batch", "3", "--lr", "0.002", "--scenes", "8",
            "--val-scenes", "2", "--voxel-size", "0.1", "--max-range", "20.5", "--keep", "0.4", "--rounds", "5",
            "--threads", "1", "--fused"]
    words = shlex.split(vp.command_line(vp.build_parser().parse_args(argv)))
    pairs = [tuple(argv[i:i + 2]) for i in range(0, len(argv) - 1, 2)]
    for option, value in pairs:
        assert option in words and words[words.index(option) + 1] == value, (option, words)
    assert "--fused" in words


def test_maps_ahead_quick_keeps_the_rounds_asked(monkeypatch):
    """bench/maps_ahead.py --quick set 3 rounds whatever --rounds said (the
    page's Command line then named a --rounds that did not run): --quick
    now only changes the default."""
    ma = _bench_module("maps_ahead")
    asked = []
    monkeypatch.setattr(ma, "measure", lambda points, rounds: (asked.append(rounds), ("table", 1))[1])
    monkeypatch.setattr(ma, "write_markdown", lambda *a, **k: None)
    monkeypatch.setattr(ma, "_street_with_intensity", lambda: None)
    threads = torch.get_num_threads()
    try:
        for argv, rounds in ((["--quick", "--rounds", "5"], 5), (["--quick"], 3)):
            monkeypatch.setattr(sys, "argv", ["maps_ahead.py", *argv])
            ma.main()
            assert asked[-1] == rounds
    finally:
        torch.set_num_threads(threads)


def test_compile_page_command_names_its_out():
    """bench/compile.py's Command line named --quick, --repeats and
    --threads but not --out: it now records the arguments as given."""
    import shlex

    compile_bench = _bench_module("compile")
    argv = ["--quick", "--repeats", "3", "--threads", "1", "--out", "/tmp/a page.md"]
    words = shlex.split(compile_bench.command(argv))
    assert words[-len(argv):] == argv and words[-len(argv) - 1] == "bench/compile.py"


def test_vector_threshold_median_ms_warms_each_call_first():
    """bench/vector_threshold.py's median_ms timed the first call of each
    kernel (cold caches, the plan's first use) as one of its rounds: each
    call now runs once untimed first (_common.interleaved)."""
    vt = _bench_module("vector_threshold")
    ran = {"a": 0, "b": 0}

    def call(name):
        def run():
            ran[name] += 1
        return run

    med = vt.median_ms({k: call(k) for k in ran}, 4)
    assert ran == {"a": 5, "b": 5} and set(med) == {"a", "b"}


def test_spmm_time_case_and_nm_section_interleave_their_methods(monkeypatch):
    """bench/spmm.py's time_case and nm_section timed each method in turn
    with timeit (all repeats of one, then the next): a busy spell slowed one
    method only; target_section timed 2:4 alone after the others. All now
    time their methods together through _common.interleaved."""
    spmm = _bench_module("spmm")
    asked = []

    monkeypatch.setattr(spmm, "interleaved", _recording_interleaved(asked))
    res = spmm.time_case(32, 32, 16, 0.5, 3)
    assert asked == [(sorted(res), 3)] and len(res) == 5
    spmm.nm_section(True, 2)
    assert asked[1:] == [(["dense", "ours 2:4"], 2)] * 2
    rows = spmm.target_section(2)  # the 2:4 row timed in the same rounds as the others
    assert "ours 2:4 (50%)" in asked[-1][0] and len(asked[-1][0]) == 6
    assert any(r.startswith("| ours 2:4 (50%) | 1000.0 | 1.00x") for r in rows)


def test_north_star_rounds_take_the_models_in_new_orders():
    """bench/north_star.py's rounds ran the models in one fixed order (each
    always after the same one, the first after the warm-up's last): each
    round now takes them in a new seeded order, every model once."""
    ns = _bench_module("north_star")
    names = ["a", "b", "c"]
    orders = list(ns.round_orders(names, 8))
    assert len(orders) == 8 and all(sorted(o) == names for o in orders)
    assert len({tuple(o) for o in orders}) > 1 and {o[0] for o in orders} == set(names)
    assert orders == list(ns.round_orders(names, 8))  # seeded


def test_kmap_times_the_methods_of_a_map_interleaved(monkeypatch):
    """bench/kmap.py timed each build method's repeats in turn (timeit), then
    the torch reference after them: the methods of one (cloud, map) are now
    timed together through _common.interleaved, the torch reference checked
    before."""
    kmap_bench = _bench_module("kmap")
    common = kmap_bench.c
    asked, written = [], []

    monkeypatch.setattr(common, "interleaved", _recording_interleaved(asked, list))
    monkeypatch.setattr(common, "timeit", lambda fn, repeats=7, warmup=1: pytest.fail("timed alone with timeit"))
    monkeypatch.setattr(kmap_bench, "clouds", lambda quick: {"street 300": common.street_scene(300)})
    monkeypatch.setattr(kmap_bench, "write_results", lambda rows, *a: written.extend(rows))
    monkeypatch.setattr(sys, "argv", ["kmap.py", "--quick", "--repeats", "2"])
    kmap_bench.main()
    methods = list(kmap_bench.METHODS) + ["default", "torch reference"]
    assert len(asked) == 2 and all(names[:len(methods)] == methods and r == 2 for names, r in asked)
    assert [r[4] for r in written][:len(methods)] == methods


def test_conv_layers_table_times_its_methods_interleaved(monkeypatch):
    """bench/conv.py's layers table timed ours, the naive loop and the
    grouped path one after the other (timeit, all repeats of each): they
    are now timed together through _common.interleaved."""
    conv = _bench_module("conv")
    asked = []

    monkeypatch.setattr(conv, "interleaved", _recording_interleaved(asked))
    monkeypatch.setattr(conv, "timeit", lambda fn, repeats=7, warmup=1: pytest.fail("timed alone with timeit"))
    monkeypatch.setattr(conv, "mm_rate", lambda m, c, repeats: 1.0)
    monkeypatch.setattr(conv, "scenes", lambda quick: [("street 300", _bench_module("_common").street_scene(300),
                                                          False)])
    rows = conv.bench(True, 2)
    want = sorted(["fwd ours", "fwd naive", "fwd+bwd ours", "fwd+bwd naive", "fwd grouped", "fwd+bwd grouped"])
    assert len(asked) == 3 and all(names == want and r == 2 for names, r in asked)  # spconv: not installed
    assert len(rows) == 5 and "| 1000.0 / 1000.0 |" in rows[-1]


def test_bf16_training_checks_that_the_engine_ran_the_float32_kernels(monkeypatch):
    """bench/bf16_training.py times the engine's 16-bit training path against the torch path only after
    checking it: with the engine sent down the torch path (sixteen_bit_on_float32 off) its output is no
    longer the float32 engine's rounded, and the script stops before timing."""
    import pointsparse as ps
    from pointsparse.nn import _engine
    from reference import random_coords

    bench = _bench_module("bf16_training")
    coords = random_coords(500, 10, seed=2)
    row = bench.table(coords, 8, torch.bfloat16, 1)
    assert row.startswith("| bfloat16 | 8 |") and row.endswith("x |")
    monkeypatch.setattr(_engine, "sixteen_bit_on_float32", lambda *args: False)
    with pytest.raises(RuntimeError, match="not the float32 engine's rounded"):
        bench.table(coords, 8, torch.bfloat16, 1)
    assert ps.get_backend() == "auto"
