"""The engine's pool of output memory (``pointsparse.output_pool``,
``cpp/runtime/pool.h``): conv outputs and input gradients of at least
``_ext.POOL_MIN_BYTES`` (32 MiB) come from blocks that earlier outputs freed;
the tests lower that to 1 MiB to keep their clouds small. The values must not depend on
where the memory came from, a block must never serve two live tensors, and
the pool must keep no more than its limit."""

from __future__ import annotations

import gc
import io
import threading

import numpy as np
import pytest
import torch

import pointsparse as ps
from pointsparse import _ext
from reference import conv_sum, random_coords

ROWS_C = 64  # 4,000+ rows x 64 float32 channels: over the tests' 1 MiB
SMALL = 1 << 20  # the tests' POOL_MIN_BYTES


@pytest.fixture(autouse=True)
def _pool_restored(monkeypatch):
    monkeypatch.setattr(_ext, "POOL_MIN_BYTES", SMALL)
    before = ps.output_pool()["max_bytes"]
    yield
    ps.output_pool(before)


def test_by_default_only_outputs_over_glibcs_largest_mmap_threshold_are_pooled(monkeypatch):
    monkeypatch.undo()
    assert _ext.POOL_MIN_BYTES == 32 << 20
    x, m = cloud(), conv()  # a 1-2 MiB output: glibc's heap keeps such blocks itself
    before = ps.output_pool()
    with torch.no_grad():
        m(x)
    after = ps.output_pool()
    assert (after["hits"], after["misses"]) == (before["hits"], before["misses"])
    out = _ext.new_output(((32 << 20) // 4,), torch.float32)  # one at the threshold
    assert ps.output_pool()["hits"] + ps.output_pool()["misses"] == before["hits"] + before["misses"] + 1
    del out


def cloud(c=ROWS_C, seed=0, dtype=torch.float32):
    coords = random_coords(6000, extent=24, batch=1, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    return ps.SparseTensor(torch.randn(len(coords), c, generator=g, dtype=dtype), coords)


def conv(c_in=ROWS_C, c_out=ROWS_C, dtype=torch.float32, seed=3):
    torch.manual_seed(seed)
    return ps.nn.Conv3d(c_in, c_out, 3).to(dtype)


def test_a_freed_output_serves_the_next_one_and_the_values_stay_right():
    x, m = cloud(), conv()
    kmap = ps.kmap.get_kmap(x, 3)
    assert kmap.num_out * ROWS_C * 4 >= _ext.POOL_MIN_BYTES
    ref = conv_sum(x.feats.double(), m.weight.detach().double(), kmap)
    with torch.no_grad():
        first = m(x).feats
        ptr = first.data_ptr()
        torch.testing.assert_close(first.double(), ref, rtol=1e-5, atol=1e-5)
        expected = first.clone()
        before = ps.output_pool()
        del first
        gc.collect()
        kept = ps.output_pool()
        assert kept["kept_blocks"] == before["kept_blocks"] + 1 and kept["kept_bytes"] > before["kept_bytes"]
        second = m(x).feats
    after = ps.output_pool()
    assert second.data_ptr() == ptr and after["hits"] == kept["hits"] + 1
    assert torch.equal(second, expected)


def test_two_live_outputs_never_share_a_block():
    x, m = cloud(), conv()
    with torch.no_grad():
        outs = [m(x).feats for _ in range(4)]
    assert len({o.data_ptr() for o in outs}) == 4
    for o in outs[1:]:
        assert torch.equal(o, outs[0])
    # a view keeps the block: the next output may not take it
    view = outs[0][10:20]
    ptr = outs[0].data_ptr()
    expected = view.clone()
    del outs
    gc.collect()
    with torch.no_grad():
        fresh = [m(x).feats for _ in range(3)]
    assert all(f.data_ptr() != ptr for f in fresh)
    assert torch.equal(view, expected)


def test_forward_and_backward_equal_with_the_pool_off():
    x, m = cloud(dtype=torch.float64), conv(dtype=torch.float64)

    def run():
        feats = x.feats.detach().clone().requires_grad_()
        out = m(x.with_feats(feats)).feats
        out.pow(2).sum().backward()
        grads = feats.grad.clone(), m.weight.grad.clone()
        m.weight.grad = None
        return out.detach().clone(), grads

    on = [run() for _ in range(2)]  # the second from kept blocks
    ps.output_pool(0)
    off = run()
    for got in on:
        assert torch.equal(got[0], off[0])
        assert torch.equal(got[1][0], off[1][0]) and torch.equal(got[1][1], off[1][1])


def test_off_keeps_nothing_and_takes_nothing():
    x, m = cloud(), conv()
    with torch.no_grad():
        m(x)
    state = ps.output_pool(0)
    assert state == {**state, "max_bytes": 0, "kept_bytes": 0, "kept_blocks": 0}
    with torch.no_grad():
        out = m(x).feats
    del out
    gc.collect()
    after = ps.output_pool()
    assert after["misses"] == state["misses"] and after["hits"] == state["hits"] and after["kept_bytes"] == 0


def test_the_limit_holds_and_the_oldest_block_goes_first():
    x, m = cloud(), conv()
    size = ps.kmap.get_kmap(x, 3).num_out * ROWS_C * 4
    ps.output_pool(0)  # emptied
    limit = ps.output_pool(2 * size + size // 2)["max_bytes"]  # room for two blocks (each a size rounded up to 64 bytes)
    with torch.no_grad():
        outs = [m(x).feats for _ in range(3)]
    ptrs = [o.data_ptr() for o in outs]
    while outs:  # freed first to last
        del outs[0]
    gc.collect()
    state = ps.output_pool()
    assert state["kept_bytes"] <= limit and state["kept_blocks"] == 2
    with torch.no_grad():
        again = [m(x).feats for _ in range(2)]
    assert {a.data_ptr() for a in again} == set(ptrs[1:])  # the first freed, the oldest, was let go
    ps.output_pool(0)
    assert ps.output_pool()["kept_bytes"] == 0


def test_a_live_output_outlasts_the_pool_switched_off():
    x, m = cloud(), conv()
    with torch.no_grad():
        out = m(x).feats
    expected = out.clone()
    ps.output_pool(0)
    ps.output_pool(1 << 28)
    with torch.no_grad():
        other = m(x.with_feats(-x.feats)).feats
    assert m.bias is None and torch.equal(out, expected) and torch.equal(other, -expected)


def test_a_pooled_output_saves_and_shares_as_any_tensor():
    x, m = cloud(), conv()
    with torch.no_grad():
        out = m(x).feats
    buffer = io.BytesIO()
    torch.save(out, buffer)
    buffer.seek(0)
    assert torch.equal(torch.load(buffer), out)
    shared = out.clone()
    assert torch.equal(out.share_memory_(), shared)


def test_threads_each_get_their_own_blocks():
    x, m = cloud(), conv()
    with torch.no_grad():
        expected = m(x).feats.clone()
    errors = []

    def work():
        try:
            for _ in range(5):
                with torch.no_grad():
                    got = m(x).feats
                if not torch.equal(got, expected):
                    errors.append("differs")
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(repr(error))

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


@pytest.mark.skipif(not _ext.core.conv_bf16(), reason="the CPU has no AVX512-BF16")
def test_bf16_outputs_from_the_pool_equal_those_without():
    x, m = cloud(dtype=torch.bfloat16), conv(dtype=torch.bfloat16)
    with torch.inference_mode():
        on = [m(x).feats.clone() for _ in range(2)]
        ps.output_pool(0)
        off = m(x).feats
    assert on[0].dtype == torch.bfloat16 and torch.equal(on[0], off) and torch.equal(on[1], off)


def test_small_outputs_do_not_use_the_pool():
    x, m = cloud(c=4), conv(c_in=4, c_out=4)
    before = ps.output_pool()
    with torch.no_grad():
        m(x)
    after = ps.output_pool()
    assert after["hits"] == before["hits"] and after["misses"] == before["misses"]


@pytest.mark.parametrize("bad,error", [(-1, ValueError), (1 << 63, ValueError), ("1", TypeError), (True, TypeError),
                                       (1.5, TypeError)])
def test_bad_limits_are_refused(bad, error):
    with pytest.raises(error, match="max_bytes"):
        ps.output_pool(bad)


@pytest.mark.parametrize("shape", [[-1, 4], [0, 4], [1 << 40, 1 << 40]])
def test_the_core_refuses_shapes_it_cannot_pool(shape):
    with pytest.raises(ValueError, match="shape"):
        _ext.core.pooled_empty(shape, np.dtype(np.float32))


# dtypes whose items are no plain numbers: uninitialised memory read as
# Python object pointers (an object field anywhere in the dtype) crashed the
# process when the array was printed or freed, and as unicode code points
# raised SystemError. Each call in a child process, which a crash would kill.
UNPOOLED_DTYPES = {
    "object": "np.dtype(object)",
    "struct_with_object": "np.dtype([('a', 'f4'), ('b', 'O')])",
    "unicode": "np.dtype('U4')",
}


def test_the_core_refuses_dtypes_that_are_no_numbers():
    from reference import CORE_ONLY, run_in_children

    cases = {name: f"a = core.pooled_empty([4096], {dtype})\nrepr(a)\ndel a\nimport gc\ngc.collect()\n"
             for name, dtype in UNPOOLED_DTYPES.items()}
    results = run_in_children(cases, setup=CORE_ONLY + "import numpy as np\n")
    for name in UNPOOLED_DTYPES:
        r = results[name]
        assert r["status"] == 0, f"{name}: the process crashed (status {r['status']})"
        assert r["exc"] == "ValueError" and "dtype" in r["msg"], (name, r)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int16, np.uint8, np.complex64, np.bool_])
def test_the_core_pools_numbers_and_bools(dtype):
    a = _ext.core.pooled_empty([3, 5], np.dtype(dtype))
    assert a.shape == (3, 5) and a.dtype == dtype and a.flags.c_contiguous
    a[...] = 1
    assert (a == 1).all()


def test_a_forked_child_takes_and_gives_blocks():
    """A child forked with blocks kept (and from a process whose threads use
    the pool) runs its convs from its own copy of the pool and exits."""
    from reference import run_python

    code = (
        "import os, signal, torch, pointsparse as ps\n"
        "ps._ext.POOL_MIN_BYTES = 1 << 20\n"
        "torch.manual_seed(0)\n"
        "coords = torch.unique(torch.cat([torch.zeros(6000, 1, dtype=torch.int32),\n"
        "    torch.randint(0, 24, (6000, 3), dtype=torch.int32)], 1), dim=0)\n"
        "x = ps.SparseTensor(torch.randn(len(coords), 64), coords)\n"
        "m = ps.nn.Conv3d(64, 64, 3)\n"
        "with torch.no_grad():\n"
        "    want = m(x).feats.clone()\n"
        "    m(x)\n"
        "assert ps.output_pool()['kept_blocks'] >= 1\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    signal.alarm(30)\n"
        "    torch.set_num_threads(1)\n"
        "    with torch.no_grad():\n"
        "        ok = all(torch.equal(m(x).feats, want) for _ in range(3))\n"
        "    os._exit(0 if ok and ps.output_pool()['hits'] >= 1 else 3)\n"
        "_, status = os.waitpid(pid, 0)\n"
        "print('child', os.waitstatus_to_exitcode(status))\n"
    )
    proc = run_python(code)
    assert proc.returncode == 0 and "child 0" in proc.stdout, (proc.stdout, proc.stderr[-2000:])


@pytest.mark.parametrize("c", [4, ROWS_C], ids=["unpooled", "pooled"])
def test_outputs_stay_on_the_cpu_under_a_default_device(c):
    """Engine outputs are CPU tensors whatever torch's default device (a
    ``torch.device(...)`` context, ``torch.set_default_device``): outputs
    under POOL_MIN_BYTES (by default every one under 32 MiB) came from
    ``torch.empty`` on the default device (``meta`` here, CUDA in a GPU
    script), which the core cannot write ('can't convert meta device type
    tensor to numpy'); before the pool they came from ``feats.new_empty``,
    on the feats' device."""
    x, m = cloud(c=c, dtype=torch.float64), conv(c_in=c, c_out=c, dtype=torch.float64)
    feats = x.feats.clone().requires_grad_()
    want = m(x.with_feats(feats)).feats  # (the map built outside the context)
    want.pow(2).sum().backward()
    want_grad, feats.grad = feats.grad, None
    before = ps.output_pool()["misses"] + ps.output_pool()["hits"]
    with torch.device("meta"):
        out = m(x.with_feats(feats)).feats
        out.pow(2).sum().backward()
    assert (ps.output_pool()["misses"] + ps.output_pool()["hits"] > before) == (c == ROWS_C)
    assert out.device.type == "cpu" and torch.equal(out, want) and torch.equal(feats.grad, want_grad)


@pytest.mark.skipif(not _ext.core.conv_bf16(), reason="the CPU has no AVX512-BF16")
@pytest.mark.parametrize("c", [16, 2 * ROWS_C], ids=["unpooled", "pooled"])
def test_bf16_outputs_stay_on_the_cpu_under_a_default_device(c):
    """As above for the bf16 kernels' outputs (which came from ``torch.empty``
    before the pool too)."""
    x, m = cloud(c=c, dtype=torch.bfloat16), conv(c_in=c, c_out=c, dtype=torch.bfloat16)
    with torch.inference_mode():
        want = m(x).feats
        before = ps.output_pool()["misses"] + ps.output_pool()["hits"]
        with torch.device("meta"):
            out = m(x).feats
    pooled = ps.output_pool()["misses"] + ps.output_pool()["hits"] > before
    assert pooled == (c == 2 * ROWS_C)
    assert out.device.type == "cpu" and torch.equal(out, want)


def test_limits_set_from_threads_at_once_leave_the_pool_as_the_last_one_said():
    def work(limit):
        for _ in range(200):
            ps.output_pool(limit)

    threads = [threading.Thread(target=work, args=(limit,)) for limit in (0, 1 << 28, 0, 1 << 27)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    last = ps.output_pool(1 << 26)
    assert last["max_bytes"] == 1 << 26 and _ext._pool_on
    assert ps.output_pool(0)["max_bytes"] == 0 and not _ext._pool_on


@pytest.mark.parametrize("bad", [-5, (1 << 62) + 1])
def test_both_ends_of_the_range_say_the_range(bad):
    with pytest.raises(ValueError, match=r"max_bytes must be an int in \[0, 2\*\*62\]"):
        ps.output_pool(bad)
