"""nn.weight_from: MinkowskiEngine's, TorchSparse's and spconv's conv weights
put in pointsparse's offset order, checked against a brute-force conv that
walks each library's offsets in that library's order (written from their
kernel region code: MinkowskiEngine's region iterator steps x first;
TorchSparse's get_kernel_offsets lists x fastest for an odd kernel volume;
spconv's, below, from its source and checked against spconv 2.3.8 itself).
No test here needs spconv."""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch

import pointsparse as ps
from pointsparse.nn import weight_from
from reference import dense_conv_transpose


def _offsets(k: int, source: str) -> list[int]:
    """One axis's offsets, in units of the input stride times dilation."""
    if source == "minkowski" and k % 2 == 0:
        return list(range(k))
    return list(range(-((k - 1) // 2), k // 2 + 1)) if k % 2 else list(range(-k // 2 + 1, k // 2 + 1))


def _order(k, source: str) -> list[tuple[int, int, int]]:
    """Each library's offsets (x, y, z) in its weight's order."""
    ox, oy, oz = (_offsets(n, source) for n in k)
    x_fastest = source == "minkowski" or (k[0] * k[1] * k[2]) % 2 == 1
    if x_fastest:
        return [(x, y, z) for z in oz for y in oy for x in ox]
    return [(x, y, z) for x in ox for y in oy for z in oz]


def _brute(coords, feats, weight, k, source, out_coords):
    """Output at out_coords: sum over the source's offsets (in its order) of
    the input at out + offset (inputs at tensor stride 1, dilation 1; a
    strided conv's outputs at the input coords floored to its stride)."""
    at = {tuple(c): i for i, c in enumerate(coords.tolist())}
    out = torch.zeros(len(out_coords), weight.shape[2], dtype=weight.dtype)
    for r, (b, x, y, z) in enumerate(out_coords.tolist()):
        for j, (dx, dy, dz) in enumerate(_order(k, source)):
            i = at.get((b, x + dx, y + dy, z + dz))
            if i is not None:
                out[r] += feats[i] @ weight[j]
    return out


def _cloud(seed=0, n=150, extent=7):
    g = torch.Generator().manual_seed(seed)
    c = torch.unique(torch.randint(0, extent, (n, 3), generator=g), dim=0)
    coords = torch.cat([torch.randint(0, 2, (len(c), 1), generator=g), c], 1).int()
    coords = torch.unique(coords, dim=0)
    return coords, torch.randn(len(coords), 3, generator=g, dtype=torch.float64)


_KERNELS = [(3, 3, 3), (1, 1, 1), (3, 1, 5), (2, 2, 2), (2, 3, 1)]


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("source,k", [("minkowski", k) for k in _KERNELS]
                         + [("torchsparse", k) for k in _KERNELS + [(4, 4, 4), (4, 3, 2)]])
def test_a_converted_weight_gives_the_other_librarys_conv(source, k, stride):
    coords, feats = _cloud()
    volume = k[0] * k[1] * k[2]
    theirs = torch.randn(volume, 3, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = ps.SparseTensor(feats, coords)
    conv = ps.nn.Conv3d(3, 5, k, stride, bias=False).double()
    with torch.no_grad():
        conv.weight.copy_(weight_from(theirs, k, source))
    y = conv(x)
    assert stride == 1 or len(y.coords) < len(coords)
    want = _brute(coords, feats, theirs, k, source, y.coords)
    torch.testing.assert_close(y.feats, want, rtol=1e-12, atol=1e-12)
    if _order(k, source) != _order_ours(k):
        # the reorder matters here: the source's weight taken as ours is another conv
        with torch.no_grad():
            conv.weight.copy_(theirs)
        assert not torch.allclose(conv(x).feats, want)


def _order_ours(k):
    """API.md's numbering: offsets (i - (k - 1) // 2) along each axis, z fastest."""
    return [(x, y, z) for x, y, z in itertools.product(*[range(-((n - 1) // 2), n // 2 + 1) for n in k])]


def test_torchsparse_even_volumes_are_already_in_our_order():
    w = torch.randn(8, 2, 3)
    assert torch.equal(weight_from(w, 2, "torchsparse"), w)
    assert weight_from(w, 2, "torchsparse") is not w
    assert torch.equal(weight_from(w, 2, "minkowski"), w.reshape(2, 2, 2, 2, 3).permute(2, 1, 0, 3, 4).reshape(8, 2, 3))


def test_torchsparse_kernel_of_one_stored_two_dimensional():
    w = torch.randn(4, 6)
    assert torch.equal(weight_from(w, 1, "torchsparse"), w[None])


def test_minkowski_kernel_of_one_at_stride_one_stored_two_dimensional():
    """MinkowskiEngine keeps a kernel-1 stride-1 conv's kernel as (C_in,
    C_out) (it runs it as a matrix product: the 1x1x1 shortcuts of its
    residual blocks); weight_from refused it ("weight must be (K, C_in,
    C_out)") where TorchSparse's was taken. Both are taken, and a 2-D
    weight of a larger kernel is still refused."""
    w = torch.randn(4, 6)
    assert torch.equal(weight_from(w, 1, "minkowski"), w[None])
    assert torch.equal(weight_from(w, (1, 1, 1), "minkowski"), w[None])
    with pytest.raises(ValueError, match=r"weight must be \(K, C_in, C_out\)"):
        weight_from(w, 3, "minkowski")


def test_minkowski_even_sizes_above_2_are_refused():
    with pytest.raises(ValueError, match=r"MinkowskiEngine places the offsets of an even size above 2 at 0\.\.k-1"):
        weight_from(torch.zeros(64, 2, 2), 4, "minkowski")


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="source must be one of"):
        weight_from(torch.zeros(27, 2, 2), 3, "spconv1")
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        weight_from([[0.0]], 1)
    with pytest.raises(ValueError, match=r"weight holds 8 offsets but kernel_size \(3, 3, 3\) has 27"):
        weight_from(torch.zeros(8, 2, 2), 3)
    with pytest.raises(ValueError, match=r"weight must be \(K, C_in, C_out\)"):
        weight_from(torch.zeros(27, 2), 3)
    with pytest.raises(ValueError, match="kernel_size"):
        weight_from(torch.zeros(27, 2, 2), 0)


@pytest.mark.parametrize("source,k", [("minkowski", k) for k in _KERNELS]
                         + [("torchsparse", k) for k in _KERNELS + [(4, 4, 4), (4, 3, 2)]])
def test_a_converted_transposed_weight_gives_the_other_librarys_transposed_conv(source, k):
    """A transposed conv's weight is numbered as the strided conv's it
    mirrors in both libraries (MinkowskiEngine's transposed kernel map is the
    strided one's with in and out swapped; TorchSparse's takes the strided
    conv's map from its cache): ``out[q + o_j] += in[q] @ W[j]``, ``o_j`` the
    j-th offset in the source's order. The converted weight gives that
    conv, here as F.conv_transpose3d on the dense grid with the source's
    weight put at each offset's place (dict lookups, not weight_from)."""
    coords, _ = _cloud()
    volume = k[0] * k[1] * k[2]
    fine = ps.SparseTensor(torch.zeros(len(coords), 3, dtype=torch.float64), coords)
    down = ps.nn.Conv3d(3, 3, k, 2).double()(fine)
    y = down.with_feats(torch.randn(len(down.coords), 3, generator=torch.Generator().manual_seed(2),
                                    dtype=torch.float64))
    theirs = torch.randn(volume, 3, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    up = ps.nn.Conv3d(3, 5, k, 2, transposed=True).double()
    with torch.no_grad():
        up.weight.copy_(weight_from(theirs, k, source))
    out = up(y)
    assert torch.equal(out.coords, coords)
    place = {offset: i for i, offset in enumerate(_order_ours(k))}
    at_ours = torch.empty_like(theirs)
    for j, offset in enumerate(_order(k, source)):
        at_ours[place[offset]] = theirs[j]
    want = dense_conv_transpose(y, at_ours, coords, k, 2)
    torch.testing.assert_close(out.feats, want, rtol=1e-12, atol=1e-12)


def _minkowski_cross_order(k) -> list[tuple[int, int, int]]:
    """MinkowskiEngine's HYPER_CROSS region in its weight's order (from its
    kernel region code): the centre, then along x, y and z in turn the
    offsets 1..r, then -r..-1 (r = (k - 1) // 2 on that axis)."""
    order = [(0, 0, 0)]
    for axis, n in enumerate(k):
        r = (n - 1) // 2
        for step in [*range(1, r + 1), *range(-r, 0)]:
            order.append(tuple(step if a == axis else 0 for a in range(3)))
    return order


@pytest.mark.parametrize("k", [(3, 3, 3), (5, 5, 5), (3, 1, 5), (1, 1, 1)])
def test_a_minkowski_hyper_cross_weight_gives_its_conv_on_a_cross_region_conv(k):
    """A MinkowskiEngine conv of region_type HYPER_CROSS stores one matrix
    per offset of the cross (7 for a 3x3x3 kernel): weight_from refused it
    ('weight holds 7 offsets but kernel_size (3, 3, 3) has 27'), leaving
    no way to port it. kernel_region="cross" places each at its offset of
    a Conv3d(kernel_region="cross") weight (zeros elsewhere), which then
    computes MinkowskiEngine's conv."""
    coords, feats = _cloud()
    order = _minkowski_cross_order(k)
    theirs = torch.randn(len(order), 3, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    conv = ps.nn.Conv3d(3, 5, k, kernel_region="cross").double()
    with torch.no_grad():
        conv.weight.copy_(weight_from(theirs, k, "minkowski", kernel_region="cross"))
    x = ps.SparseTensor(feats, coords)
    at = {tuple(c): i for i, c in enumerate(coords.tolist())}
    want = torch.zeros(len(coords), 5, dtype=torch.float64)
    for r, (b, cx, cy, cz) in enumerate(coords.tolist()):
        for j, (dx, dy, dz) in enumerate(order):
            i = at.get((b, cx + dx, cy + dy, cz + dz))
            if i is not None:
                want[r] += feats[i] @ theirs[j]
    torch.testing.assert_close(conv(x).feats, want, rtol=1e-12, atol=1e-12)
    ours = weight_from(theirs, k, "minkowski", kernel_region="cross")
    outside = torch.ones(ours.shape[0], dtype=torch.bool)
    outside[list(conv.kernel_region)] = False
    assert not ours[outside].any()


def test_a_cross_region_conversion_names_what_it_cannot_take():
    with pytest.raises(ValueError, match=r"weight holds 27 offsets but a HYPER_CROSS region of kernel_size "
                                         r"\(3, 3, 3\) has 7"):
        weight_from(torch.zeros(27, 2, 2), 3, "minkowski", kernel_region="cross")
    with pytest.raises(ValueError, match=r"kernel_region='cross' converts MinkowskiEngine's HYPER_CROSS kernels "
                                         r"\(source='minkowski'\)"):
        weight_from(torch.zeros(7, 2, 2), 3, "torchsparse", kernel_region="cross")
    with pytest.raises(ValueError, match=r"kernel_region must be None or 'cross'"):
        weight_from(torch.zeros(7, 2, 2), 3, "minkowski", kernel_region=[0, 1])
    with pytest.raises(ValueError, match=r"a HYPER_CROSS kernel has odd sizes; got kernel_size \(2, 3, 3\)"):
        weight_from(torch.zeros(6, 2, 2), (2, 3, 3), "minkowski", kernel_region="cross")


def test_a_minkowski_or_torchsparse_state_dicts_kernel_keys_name_weight_from():
    """A state_dict saved from MinkowskiEngine or TorchSparse keeps each conv's
    (K, C_in, C_out) weight under 'kernel': loaded into Conv3d layers it was
    torch's bare "Missing key(s): 0.weight ... Unexpected key(s): 0.kernel"
    (load_model / model_from_state: "tensors 33 missing ... 33 unexpected"),
    with no word that the offsets need reordering. Loading now warns what the
    key is and names nn.weight_from (torch's error stays, and strict=False
    still returns the keys: torch tells a layer nothing of strict);
    model_from_state's ValueError says so; converted, it loads."""
    from pointsparse.models import MinkUNet, model_from_state

    net = torch.nn.Sequential(ps.nn.Conv3d(3, 8, (3, 3, 1)), ps.nn.BatchNorm(8))
    theirs = {("0.kernel" if k == "0.weight" else k): v.clone() for k, v in net.state_dict().items()}
    hint = (r"'kernel' in place of a pointsparse Conv3d's 'weight': a MinkowskiEngine or TorchSparse conv's, whose "
            r"offsets are in another order; .*pointsparse.nn.weight_from\(state_dict.pop\(name \+ '.kernel'\)")
    with pytest.warns(UserWarning, match=hint), pytest.raises(RuntimeError, match="Unexpected key.*0.kernel"):
        net.load_state_dict(theirs)
    with pytest.warns(UserWarning, match=hint):
        assert net.load_state_dict(theirs, strict=False).unexpected_keys == ["0.kernel"]
    theirs["0.weight"] = weight_from(theirs.pop("0.kernel"), (3, 3, 1), "minkowski")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        net.load_state_dict(theirs)
    assert torch.equal(net[0].weight, theirs["0.weight"])
    model = MinkUNet(4, 3, cr=0.25, blocks=1)
    renamed = {(k[:-len("weight")] + "kernel" if k.endswith(".weight") and v.dim() == 3 else k): v
               for k, v in model.state_dict().items()}
    config = {"model": "minkunet", "in_channels": 4, "classes": ["a", "b", "c"], "cr": 0.25, "blocks": 1}
    with pytest.raises(ValueError, match=r"33 tensors named 'kernel' \(stem.0.0.kernel, .* and 28 more\) in place "
                                         r"of a Conv3d's 'weight'.*pointsparse.nn.weight_from"), \
            pytest.warns(UserWarning, match=hint):
        model_from_state({"config": config, "model": renamed})


@pytest.mark.parametrize("dtype,low", [(torch.bfloat16, torch.float16), (torch.float16, torch.bfloat16)])
def test_weight_from_a_16_bit_cross_kernel_under_the_other_16_bit_autocast(dtype, low):
    """A bf16 HYPER_CROSS weight converted inside an fp16 autocast region (or an fp16 one under bf16)
    stopped in torch's index_copy that places each matrix at its offset, with a bare "RuntimeError:
    Unexpected floating ScalarType in at::autocast::prioritize"; it now gives the weight it gives outside
    autocast."""
    weight = torch.randn(7, 3, 5, generator=torch.Generator().manual_seed(0)).to(dtype)
    want = weight_from(weight, 3, kernel_region="cross")
    with torch.autocast("cpu", low):
        got = weight_from(weight, 3, kernel_region="cross")
    assert got.dtype == dtype and torch.equal(got, want)


def test_a_minkowski_bias_of_one_row_loads():
    """MinkowskiEngine keeps a conv's bias as (1, C_out) (Parameter(Tensor(1, out_channels))) and an
    InstanceNorm's weight and bias as (1, C): a state_dict converted with weight_from as the loading hint says
    still failed on them with torch's bare "size mismatch for 0.bias: copying a param with shape [1, 8] ...
    [8]", no word of why. Conv3d and InstanceNorm now load such a row as their (C,) parameter; any other shape
    is torch's size mismatch still. (TorchSparse's bias is (C_out,) already.)"""
    torch.manual_seed(0)
    net = torch.nn.Sequential(ps.nn.Conv3d(3, 8, 3, bias=True), ps.nn.InstanceNorm(8))
    coords, feats = _cloud()
    x = ps.SparseTensor(feats.float(), coords)
    kernel, bias = torch.randn(27, 3, 8), torch.randn(1, 8)
    norm_weight, norm_bias = torch.rand(1, 8) + 0.5, torch.randn(1, 8)
    theirs = {"0.weight": weight_from(kernel, 3, "minkowski"), "0.bias": bias, "1.weight": norm_weight,
              "1.bias": norm_bias}
    net.load_state_dict(theirs)
    assert net[0].bias.shape == (8,) and torch.equal(net[0].bias, bias[0])
    assert torch.equal(net[1].weight, norm_weight[0]) and torch.equal(net[1].bias, norm_bias[0])
    ours = torch.nn.Sequential(ps.nn.Conv3d(3, 8, 3, bias=True), ps.nn.InstanceNorm(8))
    ours.load_state_dict({k: v.reshape(-1) if v.dim() == 2 else v for k, v in theirs.items()})
    assert torch.equal(net(x).feats, ours(x).feats)
    assert theirs["0.bias"].shape == (1, 8)  # (the caller's dict untouched)
    for key, bad in (("0.bias", torch.zeros(2, 4)), ("0.bias", torch.zeros(1, 7)), ("1.weight", torch.zeros(8, 1))):
        with pytest.raises(RuntimeError, match=f"size mismatch for {key}"):
            net.load_state_dict(dict(theirs, **{key: bad}))


# --- spconv ---------------------------------------------------------------------------------------------------
# A brute-force spconv, written from spconv 2.3.8's source (spconv/pytorch/conv.py and the CPU pair generation in
# spconv/csrc/sparse/indices.py), independent of weight_from: it reads the stored weight as spconv does and walks
# spconv's offsets in spconv's frame (its indices' columns: ours in the order ``axes``). Checked against spconv
# 2.3.8 itself (CPU build, float64, one thread: SubMConv3d k 3, (3,1,5) d (1,2,1), (5,3,1) d (2,1,1);
# SparseConv3d k = s (2,2,2), (2,1,2), (1,2,2), (1,1,1) and its SparseInverseConv3d, each for columns xyz and
# zyx; SparseConv3d k3 s2 p1, k3 s1 p1, k1 s2, k2 s2 p1, k2 s2 d2, k4 s4): the same output voxels, values
# within 2e-15.
# bench/spconv_weights.py re-checks weight_from against spconv wherever it is installed.

def _spconv_matrix(stored, layout, idx, one_by_one=False):
    """The (C_in, C_out) matrix spconv multiplies by at kernel index ``idx`` (in its frame) of a stored
    weight: KRSC (C_out, k0, k1, k2, C_in), RSKC (k0, k1, k2, C_out, C_in), RSCK (k0, k1, k2, C_in, C_out).
    Its 1x1 path (``one_by_one``: a kernel of volume 1 in a SubMConv3d or a conv of stride 1,
    torch.mm(features, weight.view(C_in, C_out))) reads the weight's memory as (C_in, C_out), whatever its
    shape says, C_in its last size (RSCK: its fourth)."""
    if one_by_one:
        return stored.reshape(stored.shape[3] if layout == "RSCK" else stored.shape[4], -1)
    if layout == "KRSC":
        return stored[(slice(None), *idx, slice(None))].T
    return stored[idx].T if layout == "RSKC" else stored[idx]


def _frame(coords, axes):
    """Our coords (b, x, y, z) as spconv's indices (b, then the columns named by ``axes``)."""
    return [(b, *[dict(zip("xyz", p))[a] for a in axes]) for b, *p in coords.tolist()]


def _spconv_ref(coords, feats, stored, layout, k, axes="xyz", stride=(1, 1, 1), padding=(0, 0, 0),
                dilation=(1, 1, 1), subm=False):
    """spconv's SubMConv3d (``subm``: outputs on the inputs, padding (k // 2) * dilation, stride 1) or
    SparseConv3d: input p reaches output q = (p + padding - i * dilation) / stride where that divides and
    q >= 0, through kernel index i (row-major, the last fastest); an output is every q reached.
    {(b, q...) in spconv's frame: output row}."""
    one_by_one = math.prod(k) == 1 and (subm or tuple(stride) == (1, 1, 1))
    if subm:
        padding, stride = tuple((n // 2) * d for n, d in zip(k, dilation)), (1, 1, 1)
    rows = _frame(coords, axes)
    at = set(rows)
    out = {}
    for r, (b, *p) in enumerate(rows):
        for idx in itertools.product(*[range(n) for n in k]):
            num = [pi + pa - i * d for pi, pa, i, d in zip(p, padding, idx, dilation)]
            if any(n % s for n, s in zip(num, stride)) or min(num) < 0:
                continue
            q = (b, *[n // s for n, s in zip(num, stride)])
            if subm and q not in at:
                continue
            out[q] = out.get(q, 0) + feats[r] @ _spconv_matrix(stored, layout, idx, one_by_one)
    return out


def _spconv_inverse_ref(fine, coarse_frame, coarse_feats, stored, layout, k, axes="xyz", stride=(2, 2, 2)):
    """spconv's SparseInverseConv3d of a SparseConv3d (kernel k, stride, padding 0) that took ``fine`` to
    ``coarse_frame``: the outputs are that conv's inputs; p gets in[q] @ W[i] for each pair (p, q, i) of it."""
    at = {q: r for r, q in enumerate(coarse_frame)}
    out = {}
    for b, *p in _frame(fine, axes):
        acc = 0
        for idx in itertools.product(*[range(n) for n in k]):
            num = [pi - i for pi, i in zip(p, idx)]
            if any(n % s for n, s in zip(num, stride)):
                continue
            q = (b, *[n // s for n, s in zip(num, stride)])
            if q in at:
                acc = acc + coarse_feats[at[q]] @ _spconv_matrix(stored, layout, idx)
        out[(b, *p)] = acc
    return out


def _store(w, layout):
    """A (C_out, k0, k1, k2, C_in) kernel as spconv keeps it in ``layout``."""
    return {"KRSC": w, "RSKC": w.permute(1, 2, 3, 0, 4), "RSCK": w.permute(1, 2, 3, 4, 0)}[layout].contiguous()


def _ours_in_frame(y, axes, stride=(1, 1, 1)):
    """Our output {(b, q...) in spconv's frame, in units of its grid: coords / stride: row}."""
    return {(b, *[c // s for c, s in zip(q, stride)]): f for (b, *q), f in zip(_frame(y.coords, axes), y.feats)}


def _assert_same_rows(got, want):
    assert set(got) == set(want)
    for key, row in want.items():
        torch.testing.assert_close(got[key], row if torch.is_tensor(row) else torch.zeros_like(got[key]),
                                   rtol=1e-12, atol=1e-12)


_SPCONV_SUBM = [((3, 3, 3), (1, 1, 1)), ((3, 1, 5), (1, 2, 1)), ((5, 3, 1), (2, 1, 1)), ((1, 1, 1), (1, 1, 1))]


@pytest.mark.parametrize("axes", ["xyz", "zyx"])
@pytest.mark.parametrize("layout", ["KRSC", "RSKC", "RSCK"])
@pytest.mark.parametrize("k,dilation", _SPCONV_SUBM)
def test_a_converted_spconv_subm_weight_gives_spconvs_subm_conv(k, dilation, layout, axes):
    """spconv stores a SubMConv3d's weight (C_out, kx, ky, kz, C_in) (KRSC: spconv 2.2 on, every algo),
    (kx, ky, kz, C_out, C_in) (RSKC: 2.0 / 2.1 ConvAlgo.Native) or (kx, ky, kz, C_in, C_out) (RSCK: 1.x), its
    axes those of its indices' columns (axes="zyx": OpenPCDet's (batch, z, y, x)); its 1x1 path reads a
    kernel of volume 1 as the memory of a (C_in, C_out) matrix. weight_from(source="spconv") refused them all
    ('source must be one of'); converted, Conv3d(kernel_size in our x, y, z, dilation) computes spconv's conv."""
    coords, feats = _cloud()
    true = torch.randn(5, *k, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    stored = _store(true, layout)
    perm = [axes.index(a) for a in "xyz"]  # our axis a is spconv's column perm[a]
    conv = ps.nn.Conv3d(3, 5, tuple(k[j] for j in perm), dilation=tuple(dilation[j] for j in perm),
                        bias=False).double()
    with torch.no_grad():
        conv.weight.copy_(weight_from(stored, k, "spconv", conv="SubMConv3d", layout=layout, axes=axes,
                                      dilation=dilation))
    y = conv(ps.SparseTensor(feats, coords))
    _assert_same_rows(_ours_in_frame(y, axes), _spconv_ref(coords, feats, stored, layout, k, axes,
                                                           dilation=dilation, subm=True))
    if layout == "KRSC":  # the only layout a spconv 2.2+ weight comes in: found from its shape
        torch.testing.assert_close(weight_from(stored, k, "spconv", conv="SubMConv3d", axes=axes),
                                   conv.weight.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("axes", ["xyz", "zyx"])
@pytest.mark.parametrize("layout", ["KRSC", "RSCK"])
@pytest.mark.parametrize("k", [(2, 2, 2), (2, 1, 2), (1, 2, 2), (1, 1, 1)])
def test_a_converted_spconv_strided_weight_and_its_inverse_give_spconvs_convs(k, layout, axes):
    """spconv's SparseConv3d of kernel_size == stride (2 or 1 along each axis, padding 0: MinkUNet's
    downsampling; k 1 s 1 its 1x1 path) and the SparseInverseConv3d that shares its indice_key map onto a
    Conv3d(k, stride=k) and the Conv3d(k, stride=k, transposed=True) that mirrors it."""
    coords, feats = _cloud()
    perm = [axes.index(a) for a in "xyz"]
    ours_k = tuple(k[j] for j in perm)
    g = torch.Generator().manual_seed(1)
    stored = _store(torch.randn(4, *k, 3, generator=g, dtype=torch.float64), layout)
    down = ps.nn.Conv3d(3, 4, ours_k, stride=ours_k, bias=False).double()
    with torch.no_grad():
        down.weight.copy_(weight_from(stored, k, "spconv", conv="SparseConv3d", stride=k, layout=layout,
                                      axes=axes))
    x = ps.SparseTensor(feats, coords)
    y = down(x)
    got = _ours_in_frame(y, axes, k)
    _assert_same_rows(got, _spconv_ref(coords, feats, stored, layout, k, axes, stride=k))
    stored_up = _store(torch.randn(5, *k, 4, generator=g, dtype=torch.float64), layout)
    up = ps.nn.Conv3d(4, 5, ours_k, stride=ours_k, transposed=True, bias=False).double()
    with torch.no_grad():
        up.weight.copy_(weight_from(stored_up, k, "spconv", conv="SparseInverseConv3d", stride=k, layout=layout,
                                    axes=axes))
    yf = y.with_feats(torch.randn(len(y.coords), 4, generator=g, dtype=torch.float64))
    z = up(yf)
    coarse = list(_ours_in_frame(y, axes, k))
    if math.prod(k) == 1:  # (an inverse of a 1x1 conv is spconv's 1x1 path again)
        want = _spconv_ref(y.coords, yf.feats, stored_up, layout, k, axes)
    else:
        want = _spconv_inverse_ref(coords, coarse, yf.feats, stored_up, layout, k, axes, stride=k)
    _assert_same_rows(_ours_in_frame(z, axes), want)


@pytest.mark.parametrize("conv,k,stride,padding,dilation", [
    ("SparseConv3d", 3, 2, 1, 1),   # SECOND / VoxelNet's downsampling: outputs where the padded kernel reaches
    ("SparseConv3d", 3, 1, 1, 1),   # grows the voxel set
    ("SparseConv3d", 1, 2, 0, 1),   # outputs only where an input sits on the stride's grid
    ("SparseConv3d", 2, 2, 1, 1),
    ("SparseConv3d", 2, 2, 0, 2),
    ("SparseConv3d", 4, 4, 0, 1),   # offsets 0..3, ours -1..2
    ("SparseInverseConv3d", 3, 2, 1, 1),
])
def test_spconv_convs_that_no_pointsparse_conv_computes_are_refused(conv, k, stride, padding, dilation):
    """A SparseConv3d other than kernel_size == stride of 2 (or 1) along each axis with padding 0 and
    dilation 1 puts its outputs at other voxels than a pointsparse strided conv (the inputs floored to the
    stride, the kernel's offsets centred): converting its weight would give another conv, so it is refused,
    naming what was given; so is the SparseInverseConv3d of one (stride / padding: its pair's)."""
    kk = (k,) * 3
    with pytest.raises(ValueError, match=rf"spconv's {conv}\(kernel_size=\({k}, {k}, {k}\), "
                                         rf"stride=\({stride}, {stride}, {stride}\), "
                                         rf"padding=\({padding}, {padding}, {padding}\), "
                                         rf"dilation=\({dilation}, {dilation}, {dilation}\)\).*no pointsparse conv"):
        weight_from(torch.zeros(2, *kk, 3), k, "spconv", conv=conv, stride=stride, padding=padding,
                    dilation=dilation)
    if conv == "SparseConv3d" and k != 4:  # (the outputs differ indeed; k 4 s 4: offsets 0..3, ours -1..2)
        coords, feats = _cloud()
        w = torch.randn(2, *kk, 3, dtype=torch.float64)
        theirs = _spconv_ref(coords, feats, w, "KRSC", kk, stride=(stride,) * 3, padding=(padding,) * 3,
                             dilation=(dilation,) * 3)
        assert len(theirs) != len(ps.nn.Conv3d(3, 2, k, stride).double()(ps.SparseTensor(feats, coords)).coords)


def test_spconv_conversions_name_what_they_cannot_take():
    w = torch.zeros(4, 3, 3, 3, 2)
    with pytest.raises(ValueError, match=r"conv must name the spconv module the weight is from: 'SubMConv3d'"):
        weight_from(w, 3, "spconv")
    with pytest.raises(ValueError, match=r"conv must name the spconv module .*got 'Conv3d'"):
        weight_from(w, 3, "spconv", conv="Conv3d")
    with pytest.raises(ValueError, match=r"SparseConvTranspose3d.*every voxel its kernel reaches.*SparseInverseConv3d"):
        weight_from(torch.zeros(4, 2, 2, 2, 2), 2, "spconv", conv="SparseConvTranspose3d", stride=2)
    with pytest.raises(ValueError, match=r"spconv's SubMConv3d takes odd kernel sizes; got kernel_size \(2, 3, 3\)"):
        weight_from(torch.zeros(4, 2, 3, 3, 2), (2, 3, 3), "spconv", conv="SubMConv3d")
    with pytest.raises(ValueError, match=r"layout must be one of \('KRSC', 'RSKC', 'RSCK'\) or None \(found from the "
                                         r"shape\); got 'KCRS'"):
        weight_from(w, 3, "spconv", conv="SubMConv3d", layout="KCRS")
    with pytest.raises(ValueError, match=r"axes must be 'xyz', 'zyx' or another order of x, y, z .*; got 'xyy'"):
        weight_from(w, 3, "spconv", conv="SubMConv3d", axes="xyy")
    # shape against layout and kernel
    with pytest.raises(ValueError, match=r"weight of shape \(4, 3, 3, 3, 2\) is no spconv weight of kernel_size "
                                         r"\(5, 5, 5\)"):
        weight_from(w, 5, "spconv", conv="SubMConv3d")
    with pytest.raises(ValueError, match=r"weight of shape \(3, 3, 3, 2, 4\) is no layout='KRSC' weight .*"
                                         r"layout='RSKC' or 'RSCK'"):
        weight_from(torch.zeros(3, 3, 3, 2, 4), 3, "spconv", conv="SubMConv3d", layout="KRSC")
    with pytest.raises(ValueError, match=r"shape \(3, 3, 3, 2, 4\) .*\(kx, ky, kz, \.\.\.\): pass layout='RSCK' "
                                         r"\(spconv 1\.x\) or 'RSKC' \(spconv 2\.0 / 2\.1"):
        weight_from(torch.zeros(3, 3, 3, 2, 4), 3, "spconv", conv="SubMConv3d")
    with pytest.raises(ValueError, match=r"shape \(3, 3, 3, 3, 4\) fits both .*pass layout="):
        weight_from(torch.zeros(3, 3, 3, 3, 4), 3, "spconv", conv="SubMConv3d")
    with pytest.raises(ValueError, match=r"spconv keeps a conv's weight 5-d .*got shape \(27, 3, 4\)"):
        weight_from(torch.zeros(27, 3, 4), 3, "spconv", conv="SubMConv3d")
    # spconv's arguments given for another library
    with pytest.raises(ValueError, match=r"conv, layout, stride, padding, dilation and axes describe a spconv "
                                         r"conv \(source='spconv'\); got conv='SubMConv3d' with source='minkowski'"):
        weight_from(torch.zeros(27, 3, 4), 3, "minkowski", conv="SubMConv3d")
    with pytest.raises(ValueError, match=r"got stride=2 with source='torchsparse'"):
        weight_from(torch.zeros(27, 3, 4), 3, "torchsparse", stride=2)
    with pytest.raises(ValueError, match=r"got stride=\(2, 1, 1\) with source='minkowski'"):
        weight_from(torch.zeros(27, 3, 4), 3, "minkowski", stride=(2, 1, 1))


def test_spconvs_arguments_at_their_defaults_as_triples_are_accepted_for_the_other_libraries():
    """stride=(1, 1, 1), padding=(0, 0, 0), dilation=[1, 1, 1] say what the defaults say (a conv of stride
    1, MinkowskiEngine's and TorchSparse's own way of writing it): the same weight as without them, not a
    refusal naming a spconv argument."""
    w = torch.randn(27, 3, 4)
    for source in ("minkowski", "torchsparse"):
        want = weight_from(w, 3, source)
        got = weight_from(w, 3, source, stride=(1, 1, 1), padding=(0, 0, 0), dilation=[1, 1, 1])
        assert torch.equal(got, want)


def test_a_converted_spconv_weight_is_a_new_tensor_with_its_dtype_and_history():
    w = torch.randn(4, 3, 3, 3, 2, dtype=torch.float64, requires_grad=True)
    got = weight_from(w, 3, "spconv", conv="SubMConv3d")
    assert got.shape == (27, 2, 4) and got.dtype == torch.float64 and got.is_contiguous()
    got.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))
    one = torch.randn(4, 1, 1, 1, 2)
    assert weight_from(one, 1, "spconv", conv="SubMConv3d").data_ptr() != one.data_ptr()


def test_a_spconv_state_dicts_5d_weight_names_weight_from():
    """A spconv conv keeps its weight under 'weight', 5-d ((C_out, kx, ky, kz, C_in)): loaded into a Conv3d it
    was torch's bare "size mismatch for 0.weight: copying a param with shape [8, 3, 3, 3, 3] ... [27, 3, 8]",
    no word of the layout. Loading now warns what the tensor is and names weight_from(source='spconv') (torch's
    error, which names the key, stays); converted, it loads."""
    net = torch.nn.Sequential(ps.nn.Conv3d(3, 8, 3), ps.nn.BatchNorm(8))
    theirs = {k: v.clone() for k, v in net.state_dict().items()}
    theirs["0.weight"] = torch.randn(8, 3, 3, 3, 3)
    hint = (r"a state_dict holds a 5-d 'weight' for a pointsparse Conv3d: a spconv conv's .* "
            r"pointsparse.nn.weight_from\(w, kernel_size, 'spconv', conv='SubMConv3d'")
    with pytest.warns(UserWarning, match=hint), pytest.raises(RuntimeError, match="size mismatch for 0.weight"):
        net.load_state_dict(theirs)
    theirs["0.weight"] = weight_from(theirs["0.weight"], 3, "spconv", conv="SubMConv3d")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        net.load_state_dict(theirs)


def test_a_minkowski_batchnorm_and_linear_state_dict_loads():
    """MinkowskiBatchNorm keeps its torch BatchNorm1d under 'bn' (bn.weight, bn.bias, bn.running_mean,
    bn.running_var, bn.num_batches_tracked) and MinkowskiLinear its torch Linear under 'linear'
    (linear.weight, linear.bias), where BatchNorm keeps them at its top and Linear under 'fn': loading such
    a state_dict failed with torch's bare "Missing key(s) ... weight ... Unexpected key(s) ... bn.weight"
    (strict=False left the layers as initialised). The renaming is one to one: they now load, in memory
    and strictly; a key given in both forms loads ours and the other is unexpected."""
    torch.manual_seed(0)
    norm = ps.nn.BatchNorm(8)
    stats = {"bn.weight": torch.rand(8) + 0.5, "bn.bias": torch.randn(8), "bn.running_mean": torch.randn(8),
             "bn.running_var": torch.rand(8) + 0.5}
    norm.load_state_dict(stats)  # (no num_batches_tracked: torch's default for a dict with no version)
    for key, value in stats.items():
        assert torch.equal(getattr(norm, key[3:]), value)
    assert set(stats) == {"bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"}  # (the caller's dict)
    net = torch.nn.Sequential(ps.nn.Conv3d(3, 8, 3), ps.nn.BatchNorm(8), ps.nn.Linear(8, 4))
    ours = net.state_dict()
    theirs = {k.replace("1.", "1.bn.", 1).replace("2.fn.", "2.linear.", 1): torch.randn_like(v.float()).to(v.dtype)
              for k, v in ours.items()}
    theirs["1.bn.running_var"] = torch.rand(8) + 0.5  # (a variance)
    assert "1.bn.num_batches_tracked" in theirs and "2.linear.weight" in theirs
    net.load_state_dict(theirs)
    assert torch.equal(net[1].running_var, theirs["1.bn.running_var"])
    assert torch.equal(net[1].num_batches_tracked, theirs["1.bn.num_batches_tracked"])
    assert torch.equal(net[2].fn.weight, theirs["2.linear.weight"]) and torch.equal(net[2].fn.bias,
                                                                                   theirs["2.linear.bias"])
    coords, feats = _cloud()
    x = ps.SparseTensor(feats.float(), coords)
    same = torch.nn.Sequential(ps.nn.Conv3d(3, 8, 3), ps.nn.BatchNorm(8), ps.nn.Linear(8, 4)).eval()
    same.load_state_dict(net.state_dict())
    assert torch.equal(net.eval()(x).feats, same(x).feats)
    # both forms: ours loads, theirs is unexpected (strict refuses it, strict=False names it)
    both = dict(ours, **{"1.bn.weight": torch.zeros(8)})
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\) in state_dict: \"1.bn.weight\""):
        net.load_state_dict(both)
    assert net.load_state_dict(both, strict=False).unexpected_keys == ["1.bn.weight"]
    assert torch.equal(net[1].weight, ours["1.weight"])
    # a plain torch Linear's keys at the same name (TorchSparse's heads, a ported nn.Linear on x.F) load too
    plain = {k.replace("2.linear.", "2.", 1): v for k, v in theirs.items()}
    assert "2.weight" in plain and "2.bias" in plain
    head = torch.nn.Sequential(ps.nn.Conv3d(3, 8, 3), ps.nn.BatchNorm(8), ps.nn.Linear(8, 4))
    head.load_state_dict(plain)
    assert torch.equal(head[2].fn.weight, theirs["2.linear.weight"]) and torch.equal(head[2].fn.bias,
                                                                                    theirs["2.linear.bias"])
    # a missing one is still missing, under our name
    short = {k: v for k, v in theirs.items() if k != "1.bn.bias"}
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: \"1.bias\""):
        net.load_state_dict(short)


@pytest.mark.parametrize("make, name, says", [
    (lambda f, c: ps.SparseTensor(features=f, coordinates=c), "features", "first argument"),
    (lambda f, c: ps.SparseTensor(f, coordinates=c), "coordinates", "second argument"),
    (lambda f, c: ps.SparseTensor(f, c, tensor_stride=2), "tensor_stride", "stride="),
    (lambda f, c: ps.SparseTensor(f, c, quantization_mode=0), "quantization_mode", "pointsparse.voxelize"),
    (lambda f, c: ps.nn.Conv3d(1, 2, 3, dimension=3), "dimension", "3-D"),
    (lambda f, c: ps.nn.Conv3d(1, 2, 3, indice_key="subm1"), "indice_key", "share kernel maps"),
    (lambda f, c: ps.nn.Conv3d(1, 2, 3, padding=1), "padding", "submanifold"),
    (lambda f, c: ps.nn.Conv3d(1, 2, 2, 2, transposed=True, generative=True), "generative", "no generative"),
    (lambda f, c: ps.nn.Conv3d(1, 2, 3, has_bias=True), "has_bias", "bias="),
    (lambda f, c: ps.nn.MaxPool3d(2, 2, dimension=3), "dimension", "3-D"),
])
def test_another_librarys_keyword_says_what_to_write_here(make, name, says):
    # MinkowskiEngine's SparseTensor(features=, coordinates=) and
    # MinkowskiConvolution(dimension=), spconv's indice_key= / padding=: a port
    # met Python's bare "unexpected keyword argument" (review 76 left item).
    feats, coords = torch.ones(2, 1), torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.int32)
    with pytest.raises(TypeError, match=rf"takes no {name}= argument: .*{says}"):
        make(feats, coords)


def test_a_keyword_no_library_takes_is_pythons_error_and_the_signature_stays():
    import inspect
    with pytest.raises(TypeError, match="unexpected keyword argument 'featurez'"):
        ps.SparseTensor(torch.ones(1, 1), torch.zeros(1, 4, dtype=torch.int32), featurez=1)
    assert list(inspect.signature(ps.nn.Conv3d).parameters)[:3] == ["in_channels", "out_channels", "kernel_size"]
    assert "feats" in inspect.signature(ps.SparseTensor).parameters
