"""Kernel maps and plans built ahead (nn.map_schedule, nn.build_maps,
nn.MapsAhead): the maps the network would build, built before it runs, two
at a time on worker threads of one core thread each; the network then
builds nothing and computes the same outputs bit for bit."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import pointsparse as ps
from pointsparse import _ext
from pointsparse import kmap as _kmap
from pointsparse import nn as spnn
from pointsparse.models import MinkUNet
from reference import random_cloud


def _net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return MinkUNet(4, 5, cr=0.25).eval()


def _counting_builds(monkeypatch) -> list:
    """Every map build from here on: (key's kernel, stride, core threads, Python thread)."""
    seen = []
    real = _kmap._build

    def build(coords, k, t, d, s, method, out_coords=None, trusted=False):
        seen.append((k, t, s, _ext.num_threads(), threading.get_ident()))
        return real(coords, k, t, d, s, method, out_coords=out_coords, trusted=trusted)

    monkeypatch.setattr(_kmap, "_build", build)
    return seen


def test_map_schedule_records_the_maps_and_plans_a_network_builds():
    net = _net()
    x = random_cloud(n=3000, extent=30)
    schedule = spnn.map_schedule(net, x)
    keys = schedule.maps
    assert len(keys) == len(set(keys)) > 10
    assert any(k.transposed for k in keys) and any(k.stride == (2, 2, 2) and not k.transposed for k in keys)
    assert schedule.plans <= set(keys) and len(schedule.plans) == len(keys)  # every map is a CPU conv's here
    # the network's own cache, built lazily, holds the same keys
    y = ps.SparseTensor(x.feats, x.coords)
    with torch.no_grad():
        net(y)
    assert set(y.cache.kmaps) == set(keys) and set(y.cache.plans) == schedule.plans
    # a transposed map comes after the downsampling map it transposes
    for i, key in enumerate(keys):
        if key.transposed:
            down = _kmap.KernelMapKey(key.tensor_stride, key.kernel_size, key.stride, key.dilation)
            assert keys.index(down) < i


@pytest.mark.parametrize("workers", [1, 2, 3, np.int64(2)])  # (a numpy integer was refused)
def test_build_maps_gives_the_network_every_map_and_the_same_outputs(monkeypatch, workers):
    net = _net(1)
    x = random_cloud(n=4000, extent=32, seed=2)
    schedule = spnn.map_schedule(net, x)
    lazy = ps.SparseTensor(x.feats, x.coords)
    with torch.no_grad():
        want = net(lazy).feats
    ahead = ps.SparseTensor(x.feats, x.coords)
    seen = _counting_builds(monkeypatch)
    spnn.build_maps(ahead, schedule, workers=workers)
    built = len(seen)
    assert built == sum(not k.transposed for k in schedule.maps)  # each map once (a transposed one transposes)
    assert set(ahead.cache.kmaps) == set(schedule.maps) and set(ahead.cache.plans) == schedule.plans
    with torch.no_grad():
        got = net(ahead).feats
    assert len(seen) == built  # the network found every map
    assert torch.equal(got, want)
    for key, kmap in lazy.cache.kmaps.items():
        other = ahead.cache.kmaps[key]
        assert torch.equal(kmap.out_coords, other.out_coords)
        assert torch.equal(kmap.in_idx, other.in_idx) and torch.equal(kmap.out_idx, other.out_idx)
        assert list(kmap.ptr) == list(other.ptr)
    assert set(ahead.cache.plans) == set(lazy.cache.plans)
    if workers > 1:  # tasks of one core thread each, on the worker threads
        assert {nt for *_, nt, _ in seen} == {1}
        assert threading.get_ident() not in {tid for *_, tid in seen}
    else:  # in order, in the calling thread, on the core's threads
        assert {nt for *_, nt, _ in seen} == {_ext.num_threads()}
        assert {tid for *_, tid in seen} == {threading.get_ident()}
    spnn.build_maps(ahead, schedule, workers=workers)  # everything there: nothing built
    assert len(seen) == built


def test_build_maps_in_bf16_and_with_voxel_prune(monkeypatch):
    """A bf16 model (the same plans as float32) and a network with a
    VoxelPrune before its first upsampling (the maps after it are on the
    pruner's own cache: not in the schedule, built by the network): the same
    outputs as without maps built ahead."""
    x = random_cloud(n=3000, extent=30, seed=3)
    bf16 = spnn.fuse_for_inference(_net(3)).to(torch.bfloat16)
    pruned = _net(4)
    pruned.up[0] = torch.nn.Sequential(spnn.VoxelPrune(0.5), pruned.up[0])
    for model, feats in ((bf16, x.feats.bfloat16()), (pruned, x.feats)):
        schedule = spnn.map_schedule(model, ps.SparseTensor(feats, x.coords))
        with torch.no_grad():
            want = model(ps.SparseTensor(feats, x.coords)).feats
            ahead = ps.SparseTensor(feats, x.coords)
            spnn.build_maps(ahead, schedule, workers=2)
            seen = _counting_builds(monkeypatch)
            got = model(ahead).feats
            monkeypatch.undo()
        assert got.dtype == feats.dtype and torch.equal(got.float(), want.float())
        assert set(ahead.cache.kmaps) == set(schedule.maps)
        assert (len(seen) > 0) == (model is pruned)  # only the pruner's cache's maps


def test_a_transposed_map_waits_for_its_downsampling_map_and_plan(monkeypatch):
    """A transposed map's plan transposes its downsampling map's plan: the
    task waits for that map's whole task (its map and plan) even where its
    coords are there already, so no plan is built twice (the last
    downsampling plan slowed down here: the other maps are done before it,
    and its transposed map's coords are there)."""
    import time

    from pointsparse.nn import _engine

    net = _net(10)
    x = random_cloud(n=3000, extent=30, seed=10)
    schedule = spnn.map_schedule(net, x)
    made = []
    real = _engine.make_fused_plan

    def slow(kmap):
        made.append(kmap.key)
        if kmap.key.stride != (1, 1, 1) and kmap.key.tensor_stride == (8, 8, 8):  # the last downsampling
            time.sleep(0.3)
        return real(kmap)

    monkeypatch.setattr(_engine, "make_fused_plan", slow)
    spnn.build_maps(ps.SparseTensor(x.feats, x.coords), schedule, workers=2)
    assert sorted(map(repr, made)) == sorted(repr(k) for k in schedule.plans if not k.transposed)


class _TwoDown(torch.nn.Module):
    """Two strided convs onto one stride (a k2 s2 and a k3 s2)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = spnn.Conv3d(4, 4, 2, stride=2)
        self.b = spnn.Conv3d(4, 4, 3, stride=2)

    def forward(self, x):
        return self.a(x), self.b(x)


def test_two_strided_maps_onto_one_stride_share_its_coords():
    """The later of two strided maps onto one stride takes the coords the
    earlier one put in the cache (as the network's order gives them): never
    both built at once, each making coords of its own."""
    net = _TwoDown()
    x = random_cloud(n=60000, extent=80, seed=9)  # the first map long enough for the second to start meanwhile
    schedule = spnn.map_schedule(net, x)
    for workers in (1, 2):
        ahead = ps.SparseTensor(x.feats, x.coords)
        spnn.build_maps(ahead, schedule, workers=workers)
        first, second = (ahead.cache.kmaps[k] for k in schedule.maps)
        assert first.out_coords is ahead.cache.coords[(2, 2, 2)] and second.out_coords is first.out_coords


class _UpOfItsOwn(torch.nn.Module):
    """A k3 s2 downsampling and a k2 s2 transposed conv: the transposed conv
    builds its own k2 s2 downsampling map (inside its map's build, so the
    schedule records that map after it)."""

    def __init__(self) -> None:
        super().__init__()
        self.down = spnn.Conv3d(4, 8, 3, stride=2)
        self.up = spnn.Conv3d(8, 4, 2, stride=2, transposed=True)

    def forward(self, x):
        return self.up(self.down(x))


def test_a_transposed_map_recorded_before_its_downsampling_map():
    """In order (one worker, or workers=None below PARALLEL_MIN_ROWS), a
    transposed map waits for a downsampling map recorded after it (it was
    a ValueError: 'coords that this tensor's cache never holds'); the same
    outputs, bit for bit."""
    torch.manual_seed(0)
    net = _UpOfItsOwn().eval()
    x = random_cloud(n=1500, extent=20, seed=12)
    schedule = spnn.map_schedule(net, x)
    up = next(i for i, k in enumerate(schedule.maps) if k.transposed)
    assert _kmap.KernelMapKey((1, 1, 1), (2, 2, 2), (2, 2, 2), (1, 1, 1)) in schedule.maps[up + 1:]
    with torch.no_grad():
        want = net(ps.SparseTensor(x.feats, x.coords)).feats
        for workers in (1, 2, None):
            ahead = ps.SparseTensor(x.feats, x.coords)
            spnn.build_maps(ahead, schedule, workers=workers)
            assert set(ahead.cache.kmaps) == set(schedule.maps)
            assert torch.equal(net(ahead).feats, want)
        assert torch.equal(spnn.MapsAhead(net)(ps.SparseTensor(x.feats, x.coords)).feats, want)


def test_map_schedule_keeps_training_mode_and_statistics():
    net = _net(5).train()
    before = {n: b.clone() for n, b in net.named_buffers()}
    spnn.map_schedule(net, random_cloud(n=2000, extent=25))
    assert net.training and all(m.training for m in net.modules())
    assert all(torch.equal(before[n], b) for n, b in net.named_buffers())
    net.eval().stem.train()
    spnn.map_schedule(net, random_cloud(n=2000, extent=25))
    assert not net.training and net.stem.training and not net.up.training


def test_maps_ahead_module(monkeypatch):
    net = _net(6)
    ahead = spnn.MapsAhead(net, workers=2)
    assert ahead.schedule is None
    outs = []
    for seed in (7, 8):
        x = random_cloud(n=3000, extent=30, seed=seed)
        with torch.no_grad():
            want = net(ps.SparseTensor(x.feats, x.coords)).feats
            first = ahead.schedule
            y = ps.SparseTensor(x.feats, x.coords)
            outs.append(torch.equal(ahead(y).feats, want))
        if first is not None:
            assert ahead.schedule is first  # recorded once
        assert set(y.cache.kmaps) == set(ahead.schedule.maps)
    assert outs == [True, True]
    assert all(k.startswith("model.") for k in ahead.state_dict())
    with pytest.raises(TypeError, match="first argument must be a SparseTensor"):
        ahead(torch.zeros(3, 4))
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        spnn.MapsAhead("net")
    with pytest.raises(ValueError, match="workers must be >= 1"):
        spnn.MapsAhead(net, workers=0)


def test_maps_ahead_takes_inputs_of_another_stride():
    """MapsAhead kept the schedule of its first input: an input at another
    tensor stride (which the network runs) was refused by build_maps (its
    maps read coords the cache never holds). Each stride records its own
    schedule; the first is used again for its stride."""
    torch.manual_seed(6)
    net = torch.nn.Sequential(spnn.Conv3d(4, 8, 3), spnn.Conv3d(8, 8, 2, stride=2), spnn.Conv3d(8, 8, 3),
                              spnn.Conv3d(8, 4, 2, stride=2, transposed=True)).eval()
    ahead = spnn.MapsAhead(net)
    x = random_cloud(n=2000, extent=30, seed=3)
    coarse = ps.SparseTensor(x.feats, x.coords * torch.tensor([1, 2, 2, 2], dtype=torch.int32), stride=2)
    with torch.no_grad():
        for t in (x, coarse, x):
            y = ps.SparseTensor(t.feats, t.coords, t.stride)
            want = net(ps.SparseTensor(t.feats, t.coords, t.stride)).feats
            assert torch.equal(ahead(y).feats, want)
            assert set(y.cache.kmaps) == set(ahead.schedule.maps)
    assert len(ahead._schedules) == 2


def test_map_schedule_of_an_input_that_carries_finer_coords():
    """An input a strided conv made (stride 2, its cache holding the stride-1
    coords it came down from and that map), given to a decoder whose
    transposed conv upsamples back to them: the network runs it, but
    map_schedule ran the decoder on a fresh cache holding only the input's
    own coords, so map_schedule and MapsAhead failed with "transposed conv:
    no coords at stride (1, 1, 1)". The schedule is recorded on a copy of
    the input's cache (the example's cache is left as it was); MapsAhead
    gives the decoder's output."""
    torch.manual_seed(3)
    down = spnn.Conv3d(4, 8, 2, stride=2)
    decoder = torch.nn.Sequential(spnn.Conv3d(8, 8, 3), spnn.Conv3d(8, 4, 2, stride=2, transposed=True),
                                  spnn.Conv3d(4, 3, 3)).eval()
    x = random_cloud(n=2000, extent=20, seed=4)
    with torch.no_grad():
        want = decoder(down(ps.SparseTensor(x.feats, x.coords))).feats
        example = down(ps.SparseTensor(x.feats, x.coords))
        held = dict(example.cache.kmaps)
        schedule = spnn.map_schedule(decoder, example)
        assert example.cache.kmaps == held  # (recorded on a copy)
        assert any(k.transposed for k in schedule.maps)
        y = down(ps.SparseTensor(x.feats, x.coords))
        assert torch.equal(spnn.MapsAhead(decoder, workers=2)(y).feats, want)
        assert set(schedule.maps) <= set(y.cache.kmaps)


def test_build_maps_checks_its_arguments(monkeypatch):
    net = _net()
    x = random_cloud(n=1500, extent=20)
    schedule = spnn.map_schedule(net, x)
    with pytest.raises(TypeError, match="tensor must be a SparseTensor"):
        spnn.build_maps(x.coords, schedule)
    with pytest.raises(TypeError, match="schedule must be a MapSchedule"):
        spnn.build_maps(x, list(schedule.maps))
    for bad in (True, 1.5, "2", np.float64(2.0), np.True_):
        with pytest.raises(TypeError, match="workers must be an int"):
            spnn.build_maps(x, schedule, workers=bad)
    for bad in (0, np.int64(0)):
        with pytest.raises(ValueError, match="workers must be >= 1"):
            spnn.build_maps(x, schedule, workers=bad)
    with pytest.raises(TypeError, match="MapSchedule.maps"):
        spnn.MapSchedule(list(schedule.maps), schedule.plans)
    with pytest.raises(TypeError, match="MapSchedule.plans"):
        spnn.MapSchedule(schedule.maps, frozenset([_kmap.KernelMapKey((9, 9, 9), (3, 3, 3), (1, 1, 1), (1, 1, 1))]))
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        spnn.map_schedule(lambda t: t, x)
    with pytest.raises(TypeError, match="example must be a SparseTensor"):
        spnn.map_schedule(net, x.feats)
    # a schedule recorded at stride 1 on a tensor at stride 2: its coords never come
    coarse = ps.SparseTensor(x.feats, x.coords * 2, stride=2)
    for workers in (1, 2):
        with pytest.raises(ValueError, match="never holds"):
            spnn.build_maps(coarse, schedule, workers=workers)
    # a task's error reaches the caller (after the other tasks finish)
    real = _kmap._build

    def failing(coords, k, t, d, s, method, out_coords=None, trusted=False):
        if s == (4, 4, 4):
            raise RuntimeError("a build failed")
        return real(coords, k, t, d, s, method, out_coords=out_coords, trusted=trusted)

    monkeypatch.setattr(_kmap, "_build", failing)
    with pytest.raises(RuntimeError, match="a build failed"):
        spnn.build_maps(ps.SparseTensor(x.feats, x.coords), schedule, workers=2)


@pytest.mark.usefixtures("two_threads")  # (make test's workers run one thread each: the threaded branch)
def test_build_maps_chooses_its_workers_by_the_input_size(monkeypatch):
    """workers=None: in order in the calling thread below PARALLEL_MIN_ROWS
    input rows, the core's thread count of workers from there on."""
    from pointsparse.nn import maps

    net = _net(11)
    x = random_cloud(n=2000, extent=24, seed=11)
    schedule = spnn.map_schedule(net, x)
    for threshold, threaded in ((len(x) + 1, False), (len(x), _ext.num_threads() > 1)):
        monkeypatch.setattr(maps, "PARALLEL_MIN_ROWS", threshold)
        seen = _counting_builds(monkeypatch)
        spnn.build_maps(ps.SparseTensor(x.feats, x.coords), schedule)
        assert (threading.get_ident() not in {tid for *_, tid in seen}) == threaded
        monkeypatch.undo()


def test_build_maps_keeps_worker_threads_of_its_largest_count_only():
    """The worker threads are kept for the process, but not one set per
    worker count asked: a long run asking for many counts (workers=None
    follows torch.set_num_threads) kept every set, their threads idle (and
    their scratch memory held) until the process ended. Threads of the
    largest count asked are kept; a larger count replaces them."""
    import time

    net = _net(12)
    x = random_cloud(n=3000, extent=30, seed=12)
    schedule = spnn.map_schedule(net, x)
    counts = range(2, 10)
    for workers in counts:
        spnn.build_maps(ps.SparseTensor(x.feats, x.coords), schedule, workers=workers)

    def ours() -> int:
        return sum(t.name.startswith("pointsparse-maps") for t in threading.enumerate())

    deadline = time.monotonic() + 10  # (a replaced set's threads end once they find their pool shut down)
    while ours() > max(counts) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ours() <= max(counts)
    with torch.no_grad():  # and the maps the last set built are the network's own
        want = net(ps.SparseTensor(x.feats, x.coords)).feats
        ahead = ps.SparseTensor(x.feats, x.coords)
        spnn.build_maps(ahead, schedule, workers=3)
        assert torch.equal(net(ahead).feats, want)
    assert ours() <= max(counts)


@pytest.mark.usefixtures("two_threads")  # (outside 1, a leak of threads_here(1) would go unseen)
def test_threads_here_is_per_thread():
    outside = _ext.num_threads()
    assert outside > 1 or _ext.max_threads() == 1
    seen = []
    with _ext.threads_here(1):
        assert _ext.num_threads() == 1
        t = threading.Thread(target=lambda: seen.append(_ext.num_threads()))
        t.start()
        t.join()
        with _ext.threads_here(10 ** 6):
            assert _ext.num_threads() == _ext.max_threads()  # clamped as always
        assert _ext.num_threads() == 1
    assert seen == [outside] and _ext.num_threads() == outside


def test_maps_ahead_starts_in_its_models_mode():
    """MapsAhead took nn.Module's default, training mode, whatever its
    model's: export of a MapsAhead of an eval model said "call model.eval()
    first" though the model was in eval. It now takes its model's mode
    (the flag only: the model's own modules keep theirs), and eval() /
    train() on it reach the model as before."""
    from pointsparse import export

    net = _net(3)  # eval
    ahead = spnn.MapsAhead(net)
    assert not ahead.training and not net.training
    x = random_cloud(n=400, extent=12, seed=1)
    program = export.export_model(ahead, ps.SparseTensor(x.feats, x.coords))
    with torch.no_grad():
        want = net(ps.SparseTensor(x.feats, x.coords)).feats
        assert torch.equal(program.module()(x.feats, x.coords), want)
    training = MinkUNet(4, 5, cr=0.25)
    training.stem[1].eval()  # a mixed model: its own modules keep their modes
    assert spnn.MapsAhead(training).training and not training.stem[1].training
    ahead.train()
    assert ahead.training and net.training


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_schedule_recorded_on_the_cpu_builds_a_cuda_inputs_maps():
    """A MapsAhead that recorded its schedule on a CPU input then took a
    CUDA one: the schedule's engine plans were built for the CUDA maps
    through the C++ core, which takes CPU tensors only ("the C++ core takes
    CPU tensors"). Off the CPU the maps are built, the plans not (the
    network makes none there)."""
    net = _net(6)
    ahead = spnn.MapsAhead(net)
    x = random_cloud(n=2000, extent=30, seed=7)
    with torch.no_grad():
        ahead(ps.SparseTensor(x.feats, x.coords))
        assert ahead.schedule.plans
        ahead.cuda()
        y = ps.SparseTensor(x.feats.cuda(), x.coords.cuda())
        got = ahead(y).feats
        want = net(ps.SparseTensor(x.feats.cuda(), x.coords.cuda())).feats
    assert set(y.cache.kmaps) == set(ahead.schedule.maps) and not y.cache.plans
    torch.testing.assert_close(got, want)


def test_map_schedule_takes_spvcnns_arguments_as_one_tuple():
    """``map_schedule(spvcnn, (voxels, inverse, points, point_batch))`` was
    a TypeError ("example must be a SparseTensor; got tuple") where
    export_model, DependencyGraph and sparsity_report take the tuple (an
    SPVCNN review): it gives the schedule of the arguments unpacked."""
    from pointsparse import data
    from pointsparse.models import SPVCNN

    batch = data.Batch.of([data.voxelize_sample(data.outdoor_scene(70, beams=16, azimuth_steps=256), 0.2, 255)])
    args = (batch.input, batch.inverse, batch.points, batch.point_batch)
    model = SPVCNN(7, 9, cr=0.25).eval()
    packed, unpacked = spnn.map_schedule(model, args), spnn.map_schedule(model, *args)
    assert packed == unpacked and packed.maps
