"""torch.autocast on the CPU (bf16, fp16): a sparse conv's output in
autocast's precision however it runs (the C++ core, the torch path, a
torch.compile graph, a compressed layer's format), as torch's own convs
give it, with values within that precision of the float32 conv of the
rounded inputs; the operators' real implementations keep the dtype of
their fake ones."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

import pointsparse as ps
from pointsparse import kmap, ops
from pointsparse import formats as F
from pointsparse import nn as spnn
from pointsparse.nn import _engine
from pointsparse.nn import functional as NF

pytestmark = pytest.mark.usefixtures("one_thread")

BACKENDS = {"core": contextlib.nullcontext, "torch": ps._ext.torch_path}


def _cloud(n: int = 150, channels: int = 4, seed: int = 0) -> ps.SparseTensor:
    g = torch.Generator().manual_seed(seed)
    x, _ = ps.voxelize(torch.rand(n, 3, generator=g) * 5, voxel_size=0.5)
    return ps.SparseTensor(torch.randn(len(x), channels, generator=g), x.coords)


def _close(got: torch.Tensor, want: torch.Tensor, low: torch.dtype = torch.bfloat16) -> None:
    """Within ``low``'s rounding of the largest value (a sum of rounded
    products, or products rounded once: a few units of the last place)."""
    scale = float(want.abs().max()) if want.numel() else 1.0
    tol = 8 * torch.finfo(low).eps * max(scale, 1.0)
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=tol)


# --- the operators ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_the_conv_operators_give_the_dtype_of_their_fake_under_autocast(backend):
    """Where the core serves no call (backend "torch") the conv operators' real implementations ran
    autocast's matmuls: under autocast, called outside an aot graph (an exported program's module,
    torch.compile's "eager" backend, a direct call) they gave bf16 where their fake implementations say
    float32 (aot graphs run them with autocast off, so a program's dtypes depended on how it ran). They now
    compute in the dtypes they are given, as the core does: autocast's casts are the caller's."""
    x = _cloud()
    key = ops.key_to_list(kmap.KernelMapKey((1, 1, 1), (3, 3, 3), (1, 1, 1), (1, 1, 1)))
    pairs = ops.kmap_build(x.coords, None, key)
    g = torch.Generator().manual_seed(1)
    weight, bias = torch.randn(27, 4, 5, generator=g), torch.randn(5, generator=g)
    grad = torch.randn(len(x), 5, generator=g)
    args = (x.feats, weight, bias, x.coords, *pairs, key)

    def calls():
        return [ops.conv(*args), ops.conv_inference(*args, grad, True),
                ops.conv_input_grad(grad, weight, x.coords, *pairs, key, len(x)),
                ops.conv_weight_grad(x.feats, grad, x.coords, *pairs, key)]

    with BACKENDS[backend]():
        want = calls()
        with torch.autocast("cpu", torch.bfloat16):
            got = calls()
    for a, b in zip(got, want):
        assert a.dtype == torch.float32 and torch.equal(a, b)
