"""The library's naive conv sum (pointsparse.nn.reference) against dense
torch convolutions, its per-offset form and its column (im2col) form."""

from __future__ import annotations

import pytest
import torch

import pointsparse as ps
from reference import conv_sum, dense_conv, im2col, random_coords


def _input(n=200, c=3, extent=6, seed=0):
    coords = random_coords(n, extent, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    return ps.SparseTensor(torch.randn(len(coords), c, generator=g, dtype=torch.float64), coords)


@pytest.mark.parametrize("k,t", [(3, 1), (2, 2), (1, 1)])
def test_conv_sum_equals_dense(k, t):
    x = _input()
    w = torch.randn(k**3, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    kmap = ps.kmap.get_kmap(x, k, t)
    ref = dense_conv(x, w, kmap.out_coords, k, t)
    torch.testing.assert_close(conv_sum(x.feats, w, kmap), ref, rtol=1e-12, atol=1e-12)


def test_per_offset_products_equal_the_weight_form_bit_for_bit():
    x = _input()
    w = torch.randn(27, 3, 4, dtype=torch.float64)
    w[5] = 0
    kmap = ps.kmap.get_kmap(x, 3)
    products = [None if o == 5 else (lambda rows, o=o: rows @ w[o]) for o in range(27)]
    assert torch.equal(conv_sum(x.feats, products, kmap, 4), conv_sum(x.feats, w, kmap))
    with pytest.raises(ValueError, match="out_channels"):
        conv_sum(x.feats, products, kmap)


def test_im2col_columns_times_weight_equal_the_sum_and_chunks_equal_the_whole():
    x = _input()
    w = torch.randn(27, 3, 4, dtype=torch.float64)
    kmap = ps.kmap.get_kmap(x, 3)
    cols = im2col(x.feats, kmap)
    assert cols.shape == (kmap.num_out, 27, 3)
    torch.testing.assert_close(cols.reshape(kmap.num_out, -1) @ w.reshape(-1, 4), conv_sum(x.feats, w, kmap))
    pieces = [im2col(x.feats, kmap, s, min(s + 37, kmap.num_out)) for s in range(0, kmap.num_out, 37)]
    assert torch.equal(torch.cat(pieces), cols)


def test_the_columns_of_a_map_first_used_under_inference_mode_then_trained_on():
    """The offset of every pair the columns index with is kept on the map:
    one made under torch.inference_mode is not taken into autograd after
    ('Inference tensors cannot be saved for backward'); the columns and
    gradients are those of a map used fresh."""
    x = _input()
    kmap = ps.kmap.get_kmap(x, 3)
    with torch.inference_mode():
        im2col(x.feats, kmap)
    feats = x.feats.clone().requires_grad_()
    cols = im2col(feats, kmap)
    cols.square().sum().backward()
    fresh = x.feats.clone().requires_grad_()
    ref = im2col(fresh, ps.kmap.build(x.coords, 3))
    ref.square().sum().backward()
    assert torch.equal(cols, ref) and torch.equal(feats.grad, fresh.grad)


def test_empty_map():
    x = ps.SparseTensor(torch.zeros(0, 3), torch.zeros(0, 4, dtype=torch.int32))
    kmap = ps.kmap.get_kmap(x, 3)
    assert conv_sum(x.feats, torch.ones(27, 3, 2), kmap).shape == (0, 2)
    assert im2col(x.feats, kmap).shape == (0, 27, 3)
