"""compress(): pruned Linear and sparse Conv3d -> inference modules holding a
sparse format, outputs equal to the masked dense module; load-balanced
pruning (ESE) and the imbalance measure."""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest
import torch
from torch.nn.utils import prune

import pointsparse
from pointsparse import formats as F
from pointsparse import nn as psnn
from reference import run_python

FORMATS = [("coo", {}), ("csr", {}), ("csc", {}), ("bsr", {"blocksize": (2, 4)}),
           ("nm", {"n": 2, "m": 4, "prune": True}), ("eie", {"num_pe": 4}), ("fkw", {})]


@pytest.mark.parametrize("fmt,kwargs", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear(fmt, kwargs, dtype):
    torch.manual_seed(0)
    lin = torch.nn.Linear(24, 10).to(dtype)
    prune.l1_unstructured(lin, "weight", amount=0.7)
    if fmt == "nm":
        prune.custom_from_mask(lin, "weight", F.NM.from_dense(lin.weight, prune=True).to_dense() != 0)
    sparse = F.compress(lin, fmt, **kwargs)
    assert isinstance(sparse, F.SparseLinear)
    x = torch.randn(3, 5, 24, dtype=dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(sparse(x), lin(x).detach(), atol=tol, rtol=tol)
    assert sparse.nbytes() == sparse.weight_format.nbytes() + 10 * lin.bias.element_size()
    assert prune.is_pruned(lin)  # the source module is untouched


def _sparse_input(n=60, channels=6, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    xyz = torch.randint(0, 8, (4 * n, 3), generator=g)
    coords = torch.unique(torch.cat([torch.zeros(len(xyz), 1, dtype=torch.int64), xyz], 1), dim=0)[:n]
    feats = torch.randn(len(coords), channels, generator=g, dtype=dtype)
    return pointsparse.SparseTensor(feats, coords.to(torch.int32))


@pytest.mark.parametrize("fmt,kwargs", FORMATS)
@pytest.mark.parametrize("stride", [1, 2])
def test_sparse_conv3d(fmt, kwargs, stride):
    torch.manual_seed(1)
    conv = psnn.Conv3d(8, 12, kernel_size=3, stride=stride, bias=True)
    prune.l1_unstructured(conv, "weight", amount=0.8)
    if fmt == "nm":  # 2:4 over the input channels of every W[o].T (C_out, C_in)
        w = conv.weight.detach()
        mask = torch.stack([F.NM.from_dense(w[o].t(), prune=True).to_dense().t() != 0
                            for o in range(w.shape[0])])
        prune.custom_from_mask(conv, "weight", mask)
    x = _sparse_input(channels=8)
    sparse = F.compress(conv, fmt, **kwargs)
    assert isinstance(sparse, F.SparseConv3d)
    ref = conv(x)
    out = sparse(x)
    assert torch.equal(out.coords, ref.coords) and out.stride == ref.stride
    torch.testing.assert_close(out.feats, ref.feats.detach(), atol=1e-5, rtol=1e-5)


def test_transposed_conv_and_model():
    torch.manual_seed(2)
    down = psnn.Conv3d(4, 4, kernel_size=2, stride=2)
    up = psnn.Conv3d(4, 3, kernel_size=2, stride=2, transposed=True)
    model = torch.nn.Sequential(down, up)
    for m in (down, up):
        prune.l1_unstructured(m, "weight", amount=0.5)
    x = _sparse_input(channels=4, seed=3)
    sparse_model = F.compress(model, "csr")
    assert all(isinstance(m, F.SparseConv3d) for m in sparse_model)
    torch.testing.assert_close(sparse_model(x).feats, model(x).feats.detach(), atol=1e-5,
                               rtol=1e-5)


@pytest.mark.parametrize("fmt,kwargs", [("csr", {}), ("bsr", {"blocksize": (2, 4)}), ("fkw", {})])
def test_fused_relu_and_add_are_kept(fmt, kwargs):
    """A conv whose ReLU nn.fuse_for_inference moved into it (``relu``) keeps
    it when compressed, and takes ``add`` (a residual summed before the ReLU)
    as Conv3d does, in both executions (the ReLU was dropped: negative
    outputs, and ``add`` was a TypeError)."""
    torch.manual_seed(6)
    model = torch.nn.Sequential(psnn.Conv3d(8, 8, kernel_size=3, bias=True), psnn.ReLU())
    prune.l1_unstructured(model[0], "weight", amount=0.6)
    fused = psnn.fuse_for_inference(model)
    assert fused[0].relu
    x = _sparse_input(channels=8)
    shortcut = x.with_feats(torch.randn(len(x), 8))
    with torch.no_grad():
        ref = model(x).feats
        ref_add = fused[0](x, add=shortcut).feats
    assert (ref_add != torch.relu(psnn.functional.add(model[0](x), shortcut).feats.detach())).sum() == 0
    sparse = F.compress(fused, fmt, **kwargs)
    for execution in ("engine", "format"):
        sparse[0].execution = execution
        with torch.no_grad():
            torch.testing.assert_close(sparse(x).feats, ref, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(sparse[0](x, add=shortcut).feats, ref_add, atol=1e-5, rtol=1e-5)


def test_compress_storage_counts():
    conv = psnn.Conv3d(4, 4, kernel_size=3)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[13, 0, 1] = 1.0  # one nonzero: offset 13, C_in 0 -> C_out 1
    sparse = F.compress(conv, "csr")
    # 27 offsets x row_ptr (5 x 1 B); one value (4 B) + one col index (1 B)
    assert sparse.nbytes() == 27 * 5 + 4 + 1


def test_compress_bad_arguments():
    with pytest.raises(ValueError, match="format"):
        F.compress(torch.nn.Linear(2, 2), "dia")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        F.compress("linear", "csr")
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        F.compress(torch.nn.Linear(8, 2), "nm")
    with pytest.raises(ValueError, match=r"\(\.\.\., 4\)"):
        F.compress(torch.nn.Linear(4, 2), "csr")(torch.ones(3, 5))


def test_compress_refuses_the_abstract_format_base_class():
    """format=F.SparseFormat (the base every format class derives from) passed
    the "or a format class" check and stopped in its abstract from_dense with
    a bare NotImplementedError (no message); it is a ValueError naming format
    and the formats, as any other format compress does not hold."""
    conv = psnn.Conv3d(4, 4, kernel_size=3)
    for module in (conv, torch.nn.Linear(4, 2), torch.nn.Sequential(conv)):
        with pytest.raises(ValueError, match=r"format must be one of \['bsr', 'coo'.*SparseFormat"):
            F.compress(module, F.SparseFormat)


class _ScaledLinear(torch.nn.Linear):
    def forward(self, input):
        return super().forward(input) * 2


class _ShiftedConv(psnn.Conv3d):
    def forward(self, input, add=None):
        out = super().forward(input, add)
        return out.with_feats(out.feats + 1)


class _NoteLinear(torch.nn.Linear):  # (a subclass that keeps Linear's forward: compressed as a Linear)
    pass


def test_compress_refuses_a_layer_subclass_with_its_own_forward():
    """A subclass of torch.nn.Linear or pointsparse.nn.Conv3d that overrides
    forward was compressed as the base layer: the SparseLinear /
    SparseConv3d ran the base's computation, silently dropping what the
    subclass's forward adds (here x2 and +1). It is a TypeError naming the
    class (and, in a model, the layer); a subclass keeping the base's
    forward (torch's parametrized Linear, say) is compressed as before."""
    torch.manual_seed(0)
    x = _sparse_input(channels=4)
    for layer in (_ScaledLinear(4, 3), _ShiftedConv(4, 4, kernel_size=3)):
        name = type(layer).__name__
        with pytest.raises(TypeError, match=rf"module is a {name}, .* overrides forward"):
            F.compress(layer, "csr")
        with pytest.raises(TypeError, match=rf"^1: module is a {name}"):
            F.compress(torch.nn.Sequential(torch.nn.Identity(), layer), "csr")
    parametrized = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(4, 3))
    assert type(parametrized) is not torch.nn.Linear
    for kept in (_NoteLinear(4, 3), parametrized):
        with torch.no_grad():
            torch.testing.assert_close(F.compress(kept, "csr")(x.feats), kept(x.feats))


class _Counting(torch.nn.Module):
    """Counts its forward calls and its deep copies in ``calls``."""

    def __init__(self, calls):
        super().__init__()
        self.calls = calls

    def forward(self, x):
        self.calls.append("forward")
        return x

    def __deepcopy__(self, memo):
        self.calls.append("copy")
        return _Counting(self.calls)


def test_compress_refuses_a_layer_subclass_before_it_copies_or_runs_the_model():
    """compress(model) refused a layer subclass with its own forward only when
    it reached that layer: after it had deep-copied the model and run
    ``example_input`` through it (the model's forward, the example's cost).
    The refusal comes first now: nothing ran, nothing was copied."""
    for layer, x in ((_ScaledLinear(4, 3), torch.randn(2, 4)), (_ShiftedConv(4, 4, kernel_size=3), _sparse_input(channels=4))):
        calls = []
        model = torch.nn.Sequential(_Counting(calls), torch.nn.Sequential(torch.nn.Identity(), layer))
        for example in (x, None):
            with pytest.raises(TypeError, match=rf"^1\.1: module is a {type(layer).__name__}, .* overrides forward"):
                F.compress(model, "csr", example_input=example)
            assert calls == []


def test_compress_keeps_a_layers_forward_hooks_on_its_output():
    """A forward hook on a layer's output (one that clamps it, one taking
    kwargs) was dropped by compress, which kept the forward pre-hooks only:
    the compressed layer, alone or in a model, gave the unclamped output
    silently. The hooks run on the compressed layer's output now, in their
    order; the pruning's own bookkeeping hook is not carried."""
    torch.manual_seed(0)
    x = _sparse_input(channels=4)
    conv = psnn.Conv3d(4, 5, kernel_size=3, bias=True)
    pointsparse.prune.panel_structured(conv, "weight", 0.5)
    lin = torch.nn.Linear(5, 3)
    rows = torch.randn(6, 5)
    conv.register_forward_hook(lambda module, args, out: out.with_feats(out.feats.clamp(-0.1, 0.1)))
    lin.register_forward_hook(lambda module, args, out: out.clamp(-0.1, 0.1))
    lin.register_forward_hook(lambda module, args, kwargs, out: out * 3, with_kwargs=True)
    model = torch.nn.Sequential(conv, psnn.Linear(5, 3))
    model[1].fn = lin
    with torch.no_grad():
        want_conv, want_lin, want = conv(x).feats, lin(rows), model(x).feats
        for fmt in ("csr", "fkw"):
            torch.testing.assert_close(F.compress(conv, fmt)(x).feats, want_conv)
            torch.testing.assert_close(F.compress(lin, fmt)(rows), want_lin)
            compressed = F.compress(model, fmt)
            torch.testing.assert_close(compressed(x).feats, want)
            assert len(compressed[0]._forward_hooks) == 1 and len(compressed[1].fn._forward_hooks) == 2


def test_compress_carries_a_layers_backward_hooks_and_runs_them_once():
    """A Conv3d's full backward hooks (on its SparseTensors' feats) were lost
    by compress, which copied the two forward hooks that run them but not
    the hooks: the compressed layer, whose engine gives input gradients,
    never called them. They are registered on the compressed layer now, as
    a Linear's torch hooks are on its SparseLinear, and fire once a
    backward."""
    torch.manual_seed(0)
    x = _sparse_input(channels=4)
    conv = psnn.Conv3d(4, 5, kernel_size=3, bias=True)
    lin = torch.nn.Linear(5, 3)
    seen = []
    conv.register_full_backward_pre_hook(lambda m, go: seen.append(("conv pre", m)))
    conv.register_full_backward_hook(lambda m, gi, go: seen.append(("conv", m, gi[0])))
    lin.register_full_backward_hook(lambda m, gi, go: seen.append(("lin", m, gi[0])))
    rows = torch.randn(6, 5)
    for fmt in ("csr", "fkw"):
        seen.clear()
        compressed = F.compress(conv, fmt)
        assert compressed.execution == "engine"
        assert len(compressed._forward_pre_hooks) == 1 and len(compressed._forward_hooks) == 1  # (its own runners)
        leaf = x.feats.clone().requires_grad_()
        compressed(x.with_feats(leaf)).feats.sum().backward()
        assert [s[:2] for s in seen] == [("conv pre", compressed), ("conv", compressed)]
        torch.testing.assert_close(seen[1][2], leaf.grad)
        seen.clear()
        sparse_lin = F.compress(lin, fmt)
        leaf = rows.clone().requires_grad_()
        sparse_lin(leaf).sum().backward()
        assert [s[:2] for s in seen] == [("lin", sparse_lin)]
        torch.testing.assert_close(seen[0][2], leaf.grad)


# ------------------------------------------------------------ load balance
def test_imbalance_hand_counts():
    mask = torch.tensor([[1, 1, 1], [0, 0, 1], [1, 1, 0], [0, 0, 0]])
    # PE 0: rows 0, 2 -> 5; PE 1: rows 1, 3 -> 1; mean 3, max 5
    assert F.pe_nnz(mask, 2).tolist() == [5, 1]
    assert F.imbalance(mask, 2) == pytest.approx(5 / 3)
    assert F.imbalance(torch.zeros(4, 4), 3) == 1.0
    assert F.imbalance(mask, 1) == 1.0


@pytest.mark.parametrize("bad", [1.0, True, "1", None])
def test_pe_nnz_and_imbalance_name_a_row_dim_that_is_no_int(bad):
    """row_dim is an int as LoadBalancedUnstructured takes it (numpy and 0-d
    tensor integers too): a float, bool, str or None was torch's bare
    'movedim() received an invalid combination of arguments'."""
    mask = torch.ones(4, 3)
    for measure in (F.pe_nnz, F.imbalance):
        with pytest.raises(TypeError, match="row_dim must be an int"):
            measure(mask, 2, row_dim=bad)
    # columns 0, 2 on PE 0 (8 entries), column 1 on PE 1 (4); rows 0, 2 and 1, 3 (6 each)
    assert F.pe_nnz(mask, 2, row_dim=np.int64(1)).tolist() == F.pe_nnz(mask, 2, row_dim=1).tolist() == [8, 4]
    assert F.pe_nnz(mask, 2, row_dim=torch.tensor(-2)).tolist() == [6, 6]


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_pe_nnz_imbalance_and_load_balancing_check_the_tensor():
    """A meta tensor was torch's bare NotImplementedError ('Cannot copy out
    of meta tensor', 'register_meta function for torch.nonzero()'), a torch
    sparse layout its RuntimeError ('reshape is not implemented for sparse
    tensors') and a tensor without rows (0, 4) a reshape error; now a
    ValueError / TypeError naming the tensor, and no rows hold no nonzeros."""
    for measure in (F.pe_nnz, F.imbalance):
        with pytest.raises(ValueError, match="mask_or_weight is a meta tensor"):
            measure(torch.ones(4, 4, device="meta"), 2)
        for sparse in (torch.eye(4).to_sparse(), torch.eye(4).to_sparse_csr()):
            with pytest.raises(TypeError, match=r"mask_or_weight must be a dense \(strided\) tensor"):
                measure(sparse, 2)
    assert F.pe_nnz(torch.empty(0, 4), 2).tolist() == [0, 0]
    assert F.pe_nnz(torch.ones(4, 0, 3), 2, row_dim=2).tolist() == [0, 0]
    assert F.imbalance(torch.empty(0, 4), 2) == 1.0
    with torch.device("meta"):
        lin = torch.nn.Linear(8, 8)
    with pytest.raises(ValueError, match="Linear.weight is a meta tensor"):
        F.load_balanced_unstructured(lin, "weight", 0.5, 2)
    with pytest.raises(ValueError, match="meta tensor"):
        F.LoadBalancedUnstructured.apply(lin, "weight", 0.5, 2)


def test_load_balanced_pruning_equalises_pes():
    torch.manual_seed(4)
    lin = torch.nn.Linear(64, 32)
    with torch.no_grad():
        lin.weight[::4] *= 10  # PE 0 of 4 holds the large rows
    plain = torch.nn.Linear(64, 32)
    plain.load_state_dict(lin.state_dict())
    prune.l1_unstructured(plain, "weight", amount=0.9)
    F.load_balanced_unstructured(lin, "weight", amount=0.9, num_pe=4)
    counts = F.pe_nnz(lin.weight_mask, 4)
    assert counts.tolist() == [counts[0].item()] * 4
    assert int(counts.sum()) == 2048 - round(0.9 * 2048) - (2048 - round(0.9 * 2048)) % 4
    assert F.imbalance(lin.weight, 4) == 1.0
    assert F.imbalance(plain.weight, 4) > 2.0
    # within a PE the largest magnitudes survive
    w, mask = lin.weight_orig.detach().abs(), lin.weight_mask.bool()
    for p in range(4):
        assert w[p::4][mask[p::4]].min() >= w[p::4][~mask[p::4]].max()
    # EIE entries per PE are then balanced too (up to padding zeros)
    assert len(set(F.EIE.from_module(lin, num_pe=4).entries_per_pe.tolist())) <= 2


def test_load_balanced_composes_and_never_unprunes():
    lin = torch.nn.Linear(10, 8)
    prune.random_unstructured(lin, "weight", amount=0.3)
    first = lin.weight_mask.clone()
    F.load_balanced_unstructured(lin, "weight", amount=0.5, num_pe=2)
    assert isinstance(lin._forward_pre_hooks[next(iter(lin._forward_pre_hooks))],
                      prune.PruningContainer)
    assert bool((lin.weight_mask <= first).all())
    counts = F.pe_nnz(lin.weight_mask, 2)
    assert counts[0] == counts[1]


def test_load_balanced_on_sparse_conv_uses_output_channels():
    conv = psnn.Conv3d(4, 6, kernel_size=3)
    F.load_balanced_unstructured(conv, "weight", amount=0.75, num_pe=3)
    assert F.imbalance(conv.weight, 3, row_dim=2) == 1.0
    method = F.LoadBalancedUnstructured(0.5, num_pe=2)
    assert method.PRUNING_TYPE == "global"
    with pytest.raises(ValueError, match="num_pe"):
        F.LoadBalancedUnstructured(0.5, num_pe=0)
    with pytest.raises(ValueError):
        F.LoadBalancedUnstructured(1.5, num_pe=2)
    with pytest.raises(TypeError, match="row_dim must be an int"):  # 1.5 pruned along dim 1 silently
        F.LoadBalancedUnstructured(0.5, num_pe=2, row_dim=1.5)
    with pytest.raises(TypeError, match="row_dim must be an int"):  # was int()'s 'invalid literal'
        F.load_balanced_unstructured(torch.nn.Linear(8, 6), "weight", 0.5, 2, row_dim="a")
    with pytest.raises(ValueError, match="name must name a tensor"):  # was torch's AttributeError
        F.load_balanced_unstructured(torch.nn.Linear(8, 6), "wieght", 0.5, 2)
    with pytest.raises(TypeError, match="module must be a torch.nn.Module"):
        F.load_balanced_unstructured("lin", "weight", 0.5, 2)


@pytest.mark.parametrize("make", [np.int64, np.int32, np.uint8])
def test_load_balanced_num_pe_takes_numpy_integers(make):
    """A numpy integer (what numpy arithmetic gives) is the int it holds
    (pe_nnz, imbalance and the pruning method refused it: isinstance int)."""
    w = _random_weight()
    assert torch.equal(F.pe_nnz(w, make(3)), F.pe_nnz(w, 3))
    assert F.imbalance(w, make(3)) == F.imbalance(w, 3)
    method = F.LoadBalancedUnstructured(0.5, num_pe=make(3))
    assert method.num_pe == 3 and type(method.num_pe) is int
    masks = []
    for num_pe in (make(3), 3):
        torch.manual_seed(0)
        lin = torch.nn.Linear(5, 6)
        F.load_balanced_unstructured(lin, "weight", 0.5, num_pe)
        masks.append(lin.weight_mask)
    assert torch.equal(*masks)


@pytest.mark.parametrize("bad", [True, np.bool_(True), 2.0, 1.5, np.float64(2.0), "2"])
def test_load_balanced_num_pe_refuses_bools_and_floats(bad):
    with pytest.raises(TypeError, match="num_pe must be a positive int"):
        F.pe_nnz(_random_weight(), bad)
    with pytest.raises(TypeError, match="num_pe must be a positive int"):
        F.LoadBalancedUnstructured(0.5, num_pe=bad)


def _random_weight():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(6, 5, generator=g)
    return w * (torch.rand(6, 5, generator=g) < 0.5)


# ------------------------------------------------- execution and state
def _pruned_conv(seed=4, amount=0.75, channels=8, stride=1):
    torch.manual_seed(seed)
    conv = psnn.Conv3d(channels, channels, kernel_size=3, stride=stride, bias=True)
    pointsparse.prune.panel_structured(conv, "weight", amount)
    return conv


@pytest.mark.parametrize("fmt,kwargs", [("csr", {}), ("bsr", {"blocksize": (2, 4)}), ("fkw", {})])
def test_state_dict_round_trip(fmt, kwargs):
    import io

    conv = _pruned_conv()
    x = _sparse_input(channels=8)
    sparse = F.compress(conv, fmt, **kwargs)
    ref = sparse(x).feats
    other = F.compress(_pruned_conv(seed=9, amount=0.3), fmt, **kwargs)
    assert not torch.equal(other(x).feats, ref)
    buffer = io.BytesIO()
    torch.save(sparse.state_dict(), buffer)
    buffer.seek(0)
    other.load_state_dict(torch.load(buffer, weights_only=False))
    assert other.execution == sparse.execution == "engine" and torch.equal(other(x).feats, ref)
    other.execution = "format"
    torch.testing.assert_close(other(x).feats, ref, atol=1e-5, rtol=1e-5)
    assert other.nbytes() == sparse.nbytes()


def test_a_corrupt_extra_state_is_refused_and_leaves_the_module_as_it_was():
    """load_state_dict with format arrays that make no weight (an index past
    the columns) or a weight of another shape, or an _extra_state that is not
    a state at all: a ValueError, and the module still computes what it did."""
    conv = _pruned_conv()
    x = _sparse_input(channels=8)
    sparse = F.compress(conv, "csr")
    ref = sparse(x).feats
    bad_index = sparse.state_dict()
    held = bad_index["_extra_state"]["offsets"][13]["attributes"]  # (the format's data: a copy of its attributes)
    held["col_idx"] = torch.full_like(held["col_idx"], 250)
    narrow = F.compress(_pruned_conv(seed=2, channels=4), "csr").state_dict()["_extra_state"]
    cases = [(bad_index, "do not make a weight"), ({**sparse.state_dict(), "_extra_state": [1]}, "_extra_state must"),
             ({**sparse.state_dict(), "_extra_state": narrow}, r"shape \(27, 4, 4\); this conv's is \(27, 8, 8\)")]
    for state, match in cases:
        with pytest.raises(ValueError, match=match):
            sparse.load_state_dict(state, strict=False)
        assert torch.equal(sparse(x).feats, ref)


def _pruned_model(fmt: str) -> torch.nn.Sequential:
    """BatchNorm, a pruned conv and a pruned per-site Linear (2:4 over their
    input channels for NM, whose from_dense would prune further)."""
    torch.manual_seed(6)
    model = torch.nn.Sequential(psnn.BatchNorm(8), psnn.Conv3d(8, 8, kernel_size=3, bias=True), psnn.Linear(8, 4))
    conv, linear = model[1], model[2].fn
    prune.l1_unstructured(conv, "weight", amount=0.6)
    prune.l1_unstructured(linear, "weight", amount=0.5)
    if fmt == "nm":
        w = conv.weight.detach()
        prune.custom_from_mask(conv, "weight", torch.stack([F.NM.from_dense(w[o].t(), prune=True).to_dense().t() != 0
                                                            for o in range(w.shape[0])]))
        prune.custom_from_mask(linear, "weight", F.NM.from_dense(linear.weight, prune=True).to_dense() != 0)
    with torch.no_grad():
        model[0].running_mean.uniform_(-0.5, 0.5)
        model[0].running_var.uniform_(0.5, 2)
    return model.eval()


_CONVERSIONS = [(torch.float64, lambda m: m.double()), (torch.float64, lambda m: m.to(torch.float64)),
                (torch.float16, lambda m: m.half()), (torch.bfloat16, lambda m: m.to(dtype=torch.bfloat16)),
                (torch.float32, lambda m: m.double().float())]


@pytest.mark.parametrize("fmt,kwargs", FORMATS)
@pytest.mark.parametrize("dtype,convert", _CONVERSIONS)
def test_compressed_modules_follow_dtype_conversions(fmt, kwargs, dtype, convert):
    """formats.compress(Sequential(BatchNorm, pruned conv)).double() raised
    in the compressed conv after torch's _apply had converted the BatchNorm:
    a half-converted model. The compressed layers follow .to(dtype),
    .double(), .float(), .half(), .bfloat16() as the dense layers do: each
    format's values (the index arrays kept), the bias and the engine's weight
    converted, so the converted compressed model computes what the model
    converted the same way and then compressed computes, in either execution."""
    model = _pruned_model(fmt)
    compressed = F.compress(model, fmt, **kwargs)
    assert convert(compressed) is compressed
    want = F.compress(convert(model), fmt, **kwargs)
    conv, linear = compressed[1], compressed[2].fn
    assert conv.format_dtype == linear.weight_format.dtype == dtype
    assert all(t.dtype == dtype for t in compressed.state_dict().values()
               if isinstance(t, torch.Tensor) and t.is_floating_point())
    assert conv.engine_weight.dtype == dtype
    formats = [conv.offsets] if isinstance(conv.offsets, F.FKW) else conv.offsets
    assert all(f.dtype == dtype and f.validate() is f for f in [*formats, linear.weight_format])
    x = _sparse_input(channels=8, dtype=dtype)
    for execution in ("engine", "format"):
        conv.execution = want[1].execution = execution
        with torch.no_grad():
            out, ref = compressed(x).feats, want(x).feats
        assert out.dtype == dtype
        torch.testing.assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.parametrize("left", ["model", "norm", "dropout"])
def test_compress_refuses_a_model_whose_norm_or_dropout_is_in_training_mode(left):
    """compress gave a training-mode model's copy in training mode: its
    BatchNorm normalised each input by that input's own statistics (and
    moved its running ones), not the inference copy its docstring promises,
    while export refuses such a model. compress refuses it too, naming the
    submodule and saying to call model.eval(); a model in eval mode, and a
    bare layer (whose forward has no mode), are compressed as before."""
    model = _pruned_model("csr")
    model.add_module("drop", psnn.Dropout(0.1))
    model.eval()
    if left == "model":
        model.train()
    else:
        (model[0] if left == "norm" else model.drop.fn).train()
    name, kind = ("0", "BatchNorm") if left != "dropout" else ("drop.fn", "Dropout")
    with pytest.raises(ValueError, match=rf"compress makes an inference copy: the model's submodule {name} "
                                         rf"\({kind}\) is in training mode.*call model.eval\(\)"):
        F.compress(model, "csr")
    model.eval()
    x = _sparse_input(channels=8)
    with torch.no_grad():
        torch.testing.assert_close(F.compress(model, "csr")(x).feats, model(x).feats, rtol=1e-5, atol=1e-6)
    assert isinstance(F.compress(torch.nn.Linear(4, 3), "csr"), F.SparseLinear)  # (training mode: none in its forward)


def test_compressed_modules_refuse_a_conversion_to_no_floating_dtype():
    """A format holds floating values: a conversion to another kind (complex,
    or an integer through .type) is a TypeError naming the layer."""
    sparse = F.compress(_pruned_conv(), "csr")
    with pytest.raises(TypeError, match=r"SparseConv3d holds its weight in a sparse format of float16, bfloat16, "
                                        r"float32 or float64 values \(torch.float32\) and cannot follow a conversion "
                                        r"to torch.complex64"):
        sparse.to(torch.complex64)
    with pytest.raises(TypeError, match="SparseLinear .* cannot follow a conversion to torch.int32"):
        F.compress(torch.nn.Linear(4, 2), "csr").type(torch.int32)


@pytest.mark.parametrize("fmt,kwargs", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_compressed_modules_refuse_a_conversion_to_float8(fmt, kwargs, dtype):
    """.to(float8) passed (float8 is floating) and left formats their own
    checks refuse: the layer's state_dict did not load into the layer
    converted alike, and SparseLinear's product on a float8 input was
    torch's bare NotImplementedError ('scatter_gather_tensor_cpu'). Now a
    TypeError naming the layer and the dtypes a format holds; the layer
    by the name the one it replaced had in the model (torch's conversion of
    a model named none), and what the conversion left converted."""
    model = _pruned_model(fmt)
    compressed = F.compress(model, fmt, **kwargs)
    for layer, name in ((compressed[1], "1"), (compressed[2].fn, "2.fn")):
        with pytest.raises(TypeError, match=f"{type(layer).__name__} \\(compressed from '{name}'\\) holds its weight in "
                                            f"a sparse format of float16, bfloat16, float32 or float64 values .* "
                                            f"conversion to {dtype}"):
            layer.to(dtype)
        formats = layer.offsets if isinstance(layer, F.SparseConv3d) else layer.weight_format
        assert all(f.dtype == torch.float32 for f in ([formats] if isinstance(formats, F.SparseFormat) else formats))
    with pytest.raises(TypeError, match="SparseConv3d \\(compressed from '1'\\) .* those before this one are "
                                        "converted by now"):
        compressed.to(dtype)
    with pytest.raises(TypeError, match="^SparseLinear holds"):  # (compressed alone: no model's name)
        F.compress(torch.nn.Linear(4, 2), fmt, **kwargs).to(dtype)


def test_compressed_modules_refuse_gradients_they_cannot_give():
    conv = _pruned_conv()
    sparse = F.compress(conv, "csr")
    assert sparse.to("cpu") is sparse
    x = _sparse_input(channels=8)
    feats = x.feats.clone().requires_grad_()
    sparse.execution = "format"
    with pytest.raises(RuntimeError, match="inference-only"):
        sparse(x.with_feats(feats))
    linear = F.compress(torch.nn.Linear(4, 2), "csr")
    linear.execution = "format"
    with pytest.raises(RuntimeError, match="inference-only"):
        linear(torch.ones(3, 4, requires_grad=True))
    linear.execution = "dense"  # torch's linear gives the input gradient, as the Linear does
    ones = torch.ones(3, 4, requires_grad=True)
    linear(ones).sum().backward()
    torch.testing.assert_close(ones.grad, linear.dense_weight.sum(0).expand(3, 4))
    with torch.no_grad():
        sparse(x.with_feats(feats))
    sparse.execution = "engine"  # the engine gives the input gradient, as the module does
    sparse(x.with_feats(feats)).feats.sum().backward()
    ref_feats = x.feats.clone().requires_grad_()
    conv(x.with_feats(ref_feats)).feats.sum().backward()
    torch.testing.assert_close(feats.grad, ref_feats.grad, atol=1e-5, rtol=1e-5)


def test_pruning_a_compressed_layer_says_to_prune_before_compressing():
    """torch's l1_unstructured on a compressed conv raised a bare
    "'SparseConv3d' object has no attribute 'weight'", and the toolkit's
    structured methods "SparseConv3d has no tensor named 'weight'": both
    now say the layer is compressed and to prune before compress. A
    compressed layer still has no weight attribute (hasattr False, getattr
    with a default the default)."""
    import pointsparse.prune as ps_prune

    sparse = F.compress(_pruned_conv(), "csr")
    linear = F.compress(torch.nn.Linear(4, 2), "csr")
    for layer, derived in ((sparse, "engine_weight"), (linear, "dense_weight")):
        hint = (rf"{type(layer).__name__} is compressed \(pointsparse.formats.compress\): its weight is held in its "
                rf"sparse format, no parameter \(.{derived} is the dense tensor it runs, derived\); prune the model "
                r"before compressing it")
        with pytest.raises(AttributeError, match=rf"has no attribute 'weight': {hint}"):
            prune.l1_unstructured(layer, "weight", 0.5)
        with pytest.raises(TypeError, match=rf"has no tensor named 'weight': {hint}"):
            ps_prune.kernel_structured(layer, "weight", 0.5) if layer is sparse else \
                ps_prune.channel_structured(layer, "weight", 0.5)
        assert not hasattr(layer, "weight") and getattr(layer, "weight_mask", None) is None
        with pytest.raises(AttributeError, match="has no attribute 'other'$"):
            layer.other


def test_compress_times_its_executions_interleaved_and_keeps_the_dense_one_near_parity(monkeypatch):
    """compress timed each execution's 3 calls one after the other: a slow phase of the machine (this VM's dense
    Linear read 1.20-1.35x of itself between runs) fell on one execution only, and in one run of three a (256,
    256) Linear at 90% kept its CSR product at 0.82x of torch's. The executions now take turns over CHOICE_ROUNDS
    rounds, and another than the dense computation is chosen only where its median is at most CHOICE_MARGIN of
    the dense one's."""
    from pointsparse import formats

    linear = torch.nn.Linear(32, 32)
    prune.l1_unstructured(linear, "weight", 0.9)
    x = torch.randn(64, 32)
    sparse = F.compress(linear, "csr")
    for costs, want in (({"dense": [1.0], "format": [0.96]}, "dense"),   # (4% faster: within the margin)
                        ({"dense": [1.0], "format": [0.90]}, "format"),
                        ({"dense": [1.0, 3.0, 1.0, 3.0, 1.0, 1.0, 1.0], "format": [1.2]}, "dense")):
        now, reads, timed = [0.0], [0], []

        def clock(costs=costs):  # (each timed call of an execution takes its next cost: read at its start and end)
            reads[0] += 1
            if reads[0] % 2 == 0:
                count = sum(e == sparse.execution for e in timed)
                now[0] += costs[sparse.execution][count % len(costs[sparse.execution])]
                timed.append(sparse.execution)
            return now[0]

        monkeypatch.setattr(formats, "_clock", clock)
        formats._choose(sparse, x, ("dense", "format"))
        assert sparse.execution == want, (costs, sparse.chosen)
        assert timed == ["dense", "format"] * formats.CHOICE_ROUNDS, timed  # (taking turns)
        torch.testing.assert_close(sparse(x), linear(x).detach())


def test_compress_measures_and_records_its_choice():
    conv = _pruned_conv(channels=16, stride=2)
    x = _sparse_input(n=300, channels=16)
    sparse = F.compress(conv, "coo", example_input=x)
    assert sparse.execution in ("engine", "format")
    assert sparse.chosen.startswith(sparse.execution) and "engine" in sparse.chosen and "format" in sparse.chosen
    assert sparse.execution in repr(sparse)
    torch.testing.assert_close(sparse(x).feats, conv(x).feats.detach(), atol=1e-5, rtol=1e-5)
    assert F.compress(conv, "coo").chosen == "engine (not measured)"
    model = torch.nn.Sequential(psnn.Conv3d(16, 16, 3), _pruned_conv(channels=16))
    compressed = F.compress(model, "csr", example_input=x)
    assert all("ms" in m.chosen for m in compressed)
    torch.testing.assert_close(compressed(x).feats, model(x).feats.detach(), atol=1e-5, rtol=1e-5)
    # Each conv is measured on the input it sees in the model (widths that change: the hook that records
    # them once replaced every conv's output with its input, and the next conv refused its channels).
    torch.manual_seed(1)
    model = torch.nn.Sequential(psnn.Conv3d(16, 8, 3), psnn.ReLU(), psnn.Conv3d(8, 12, 3, stride=2), psnn.ReLU(),
                                psnn.Conv3d(12, 6, 3)).eval()
    with torch.no_grad():
        want = model(x).feats
    compressed = F.compress(model, "csr", example_input=x)
    assert [m.chosen.count("ms") for m in compressed if hasattr(m, "chosen")] == [2, 2, 2]
    with torch.no_grad():
        torch.testing.assert_close(compressed(x).feats, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(x).feats, want, atol=0, rtol=0)  # the model itself untouched


def test_compress_zeroes_what_a_kernel_region_leaves_out():
    torch.manual_seed(0)
    conv = psnn.Conv3d(4, 4, 3, kernel_region="cross")
    with torch.no_grad():
        conv.weight.add_(1.0)  # nonzero outside the region too: ignored by the conv
    x = _sparse_input(channels=4)
    sparse = F.compress(conv, "csr")
    for execution in ("engine", "format"):
        sparse.execution = execution
        with torch.no_grad():
            torch.testing.assert_close(sparse(x).feats, conv(x).feats, atol=1e-5, rtol=1e-5)


def test_the_kernel_region_mask_goes_to_the_weights_device(monkeypatch):
    """``nn.functional.region_of`` gives its mask on the CPU (05d51bd);
    compress's masked weight (``formats._effective_conv_weight``) took it
    as it came, a (K, 1, 1) CPU tensor times the weight: a weight on
    another device failed in torch's "expected device" check. The mask
    goes to the weight's device now. (compress itself runs on the CPU and
    refuses a meta weight first: the weight is handed past that check, a
    meta one standing for a device this machine lacks.)"""
    from pointsparse import formats

    conv = psnn.Conv3d(4, 3, 3, kernel_region="cross")
    weight = torch.empty(27, 4, 3, device="meta")
    monkeypatch.setattr(formats, "module_weight", lambda module, name: weight)
    masked = formats._effective_conv_weight(conv)
    assert masked.is_meta and masked.shape == (27, 4, 3)
    monkeypatch.undo()
    masked = formats._effective_conv_weight(conv)  # (on the CPU: the weight zeroed outside the cross)
    keep = psnn.functional.region_of(3, "cross")
    assert torch.equal(masked[keep], conv.weight.detach()[keep]) and not masked[~keep].any()


def test_a_shared_layer_stays_shared():
    """A conv reached under two names (weight sharing) is compressed once:
    both names hold the same compressed module, as they held one conv."""
    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = _pruned_conv()
            self.b = self.a

        def forward(self, x):
            return self.b(self.a(x))

    model = Twice()
    x = _sparse_input(channels=8)
    out = F.compress(model, "csr")
    assert out.a is out.b and isinstance(out.a, F.SparseConv3d)
    torch.testing.assert_close(out(x).feats, model(x).feats, atol=1e-5, rtol=1e-5)


def _linear_state(fmt, **kwargs):
    torch.manual_seed(5)
    lin = torch.nn.Linear(6, 4)
    prune.l1_unstructured(lin, "weight", amount=0.5)
    return F.compress(lin, fmt, **kwargs)


def test_sparse_linear_checks_the_state_it_loads():
    """SparseLinear.set_extra_state took any object: a format with a bad
    reorder ran with uninitialised rows, one of another shape failed only at
    forward with torch's RuntimeError, ``_extra_state=5`` raised "'int' object
    is not subscriptable". Now each is refused and the layer is unchanged."""
    sparse = _linear_state("csr")
    x = torch.randn(3, 6)
    ref = sparse(x)
    bad_fkw = _linear_state("fkw").weight_format
    bad_fkw.reorder = torch.tensor([0, 0, 1, 2], dtype=torch.uint8)  # as an unpickled format holds it
    bad_csr = F.CSR.from_dense(torch.ones(4, 6))
    bad_csr.col_idx = bad_csr.col_idx.to(torch.int64)  # the kernels take unsigned indices only
    state = sparse.state_dict()
    cases = [
        (5, ValueError, "_extra_state must be the dict"),
        ({"format": sparse.weight_format}, ValueError, "_extra_state must be the dict"),
        ({"weight_format": "csr"}, TypeError, "weight_format must be a sparse format"),
        ({"weight_format": bad_fkw}, ValueError, "weight_format is not a valid FKW: .*reorder must be a permutation"),
        ({"weight_format": bad_csr}, TypeError, "CSR.col_idx must be stored as an unsigned integer tensor"),
        ({"weight_format": F.CSR.from_dense(torch.ones(3, 8))}, ValueError,
         r"shape \(3, 8\); this layer's weight is \(out_features, in_features\) = \(4, 6\)"),
        ({"weight_format": F.CSR.from_dense(torch.ones(4, 6, dtype=torch.float64))}, TypeError,
         "dtype torch.float64; this layer's is torch.float32"),
    ]
    for extra, error, match in cases:
        with pytest.raises(error, match=match):
            sparse.load_state_dict({**state, "_extra_state": extra})
        assert torch.equal(sparse(x), ref)
    other = _linear_state("bsr", blocksize=2)
    sparse.load_state_dict(other.state_dict())  # a valid state of another format loads
    assert torch.equal(sparse(x), other(x))
    with pytest.raises(TypeError, match="SparseLinear: weight must be a sparse format"):
        F.SparseLinear(torch.ones(4, 6))


def test_sparse_conv3d_checks_execution_chosen_and_dtype_it_loads():
    """SparseConv3d.set_extra_state accepted execution='bogus' and float64
    offsets into a float32 conv (both failed only at forward)."""
    sparse = F.compress(_pruned_conv(), "csr")
    x = _sparse_input(channels=8)
    ref = sparse(x).feats
    extra = sparse.state_dict()["_extra_state"]
    doubles = F.compress(_pruned_conv().double(), "csr").state_dict()["_extra_state"]["offsets"]
    mixed = list(extra["offsets"])
    mixed[3] = F.CSR.from_dense(torch.zeros(8, 8, dtype=torch.float64))
    cases = [
        ({**extra, "execution": "bogus"}, ValueError, "execution must be one of"),
        ({**extra, "chosen": 5}, TypeError, "chosen must be a str"),
        ({**extra, "offsets": doubles}, TypeError, "offsets have dtype torch.float64; this conv's are torch.float32"),
        ({**extra, "offsets": mixed}, TypeError, "offset 3 has dtype torch.float64"),
        ({**extra, "offsets": extra["offsets"][:26]}, ValueError, "list of K = 27 formats"),
        ({**extra, "offsets": [None] * 27}, TypeError, "offset 0 must be a sparse format"),
        ({**extra, "offsets": F.FKW.from_dense(torch.ones(8, 8, 8))}, ValueError,
         r"FKW holds a weight of shape \(8, 8, 8\)"),
    ]
    for state, error, match in cases:
        with pytest.raises(error, match=match):
            sparse.load_state_dict({**sparse.state_dict(), "_extra_state": state})
        assert sparse.execution == "engine" and torch.equal(sparse(x).feats, ref)
    with pytest.raises(ValueError, match=r"offset 0 holds W\[o\].T of shape \(8, 8\)"):
        F.SparseConv3d(extra["offsets"], (3, 3, 3), (1, 1, 1), (1, 1, 1), False, 4, 8)


def test_a_refused_state_leaves_the_bias_as_it_was_too():
    """A state whose format the layer refuses (here one of another dtype)
    left the layer half loaded: torch had copied the state's bias into it
    before set_extra_state refused the format, so the layer, still holding
    its own weight, computed with the other layer's bias. The format is
    checked before anything is loaded now; the layer computes what it did."""
    torch.manual_seed(0)
    conv, other_conv = F.compress(_pruned_conv(seed=1), "csr"), F.compress(_pruned_conv(seed=2), "csr").double()
    linear = F.compress(torch.nn.Linear(8, 4), "csr")
    other_linear = F.compress(torch.nn.Linear(8, 4), "csr").double()
    x = _sparse_input(channels=8)
    rows = torch.randn(3, 8)
    for layer, other, run in ((conv, other_conv, lambda: conv(x).feats), (linear, other_linear, lambda: linear(rows))):
        ref, bias = run(), layer.bias.clone()
        with pytest.raises(TypeError, match="dtype torch.float64"):
            layer.load_state_dict(other.state_dict())
        assert torch.equal(layer.bias, bias) and torch.equal(run(), ref)


@pytest.mark.parametrize("fmt,kwargs", [("csr", {}), ("bsr", {"blocksize": (2, 4)}), ("fkw", {})])
@pytest.mark.parametrize("bias", [True, False])
def test_a_meta_compressed_layer_loads_a_state_with_assign(fmt, kwargs, bias):
    """``layer.to("meta")`` then ``load_state_dict(state, assign=True)``
    (torch's way of loading without first filling the layer) gives the
    layer the state's tensors, as torch's Linear and Conv3d take them; the
    weight a compressed layer derives from its format (``dense_weight``,
    ``engine_weight``) stayed on the meta device: the SparseLinear's
    torch linear then gave garbage silently (torch runs a meta weight's fake
    kernel beside real tensors) and the SparseConv3d refused its CPU input.
    The derived weight goes where the state's tensors go now (the bias's
    device, the CPU of the formats without one)."""
    torch.manual_seed(0)
    conv = psnn.Conv3d(8, 8, kernel_size=3, bias=bias)
    linear = torch.nn.Linear(8, 4, bias=bias)
    for layer in (conv, linear):
        prune.l1_unstructured(layer, "weight", amount=0.6)
    x = _sparse_input(channels=8)
    rows = torch.randn(3, 8)
    for layer, run in ((F.compress(conv, fmt, **kwargs), lambda m: m(x).feats),
                       (F.compress(linear, fmt, **kwargs), lambda m: m(rows))):
        with torch.no_grad():
            ref = run(layer)
        empty = pickle.loads(pickle.dumps(layer)).to("meta")
        empty.load_state_dict(layer.state_dict(), assign=True)
        assert all(t.device.type == "cpu" for t in empty.buffers())
        with torch.no_grad():
            assert torch.equal(run(empty), ref)


@pytest.mark.parametrize("fmt", ["csr", "fkw"])
def test_compress_a_fused_minkunet(fmt):
    """fuse_for_inference moves each residual block's sum and ReLU into its
    last conv; the block refused to run once compress had replaced that conv
    ('which main no longer holds'), so a fused model could not be
    compressed. The compressed fused model gives the fused model's logits."""
    from pointsparse.models import MinkUNet

    torch.manual_seed(7)
    model = MinkUNet(4, 5, cr=0.125, blocks=1).eval()
    for m in model.modules():
        if isinstance(m, psnn.Conv3d):
            prune.l1_unstructured(m, "weight", amount=0.7)
    fused = psnn.fuse_for_inference(model)
    x = _sparse_input(channels=4)
    sparse = F.compress(fused, fmt)
    with torch.no_grad():
        ref = fused(x).feats
        got = sparse(x).feats
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fmt", ["csr", "bsr", "fkw"])
def test_compressed_conv_keeps_the_kernel_region(fmt):
    """compress zeroed the offsets outside a Conv3d's kernel_region but
    dropped the region: outputs stayed right (zero weights), but
    sparsity_report counted all 27 offsets for the compressed conv's dense
    FLOPs (the source's 7), so a compressed model's totals were not its
    source's. The compressed conv keeps the region (both executions run
    only its offsets), reports the source's rows, and carries it through
    state_dict into a compressed model built without one."""
    import io

    from pointsparse.prune import sparsity_report

    kwargs = {"blocksize": (2, 4)} if fmt == "bsr" else {}
    torch.manual_seed(3)
    model = torch.nn.Sequential(psnn.Conv3d(8, 8, 3, kernel_region="cross"), psnn.ReLU(),
                                psnn.Conv3d(8, 8, 3, kernel_region=[0, 4, 13, 20, 26], bias=True)).eval()
    pointsparse.prune.panel_structured(model[0], "weight", 0.5)
    x = _sparse_input(channels=8)
    compressed = F.compress(model, fmt, **kwargs)
    assert compressed[0].kernel_region == model[0].kernel_region and len(model[0].kernel_region) == 7
    assert compressed[2].kernel_region == (0, 4, 13, 20, 26)
    with torch.no_grad():
        want = model(x).feats
        for execution in ("engine", "format"):
            for m in (compressed[0], compressed[2]):
                m.execution = execution
            torch.testing.assert_close(compressed(x).feats, want, atol=1e-5, rtol=1e-5)
    for m in (compressed[0], compressed[2]):
        m.execution = "engine"
    before, after = sparsity_report(model, x), sparsity_report(compressed, x)
    for name in ("0", "2"):
        for key in ("flops", "dense_flops", "executed_flops", "execution"):
            assert after["layers"][name][key] == before["layers"][name][key], (name, key)
    for key in ("flops", "dense_flops", "executed_flops"):
        assert after["total"][key] == before["total"][key]
    # the region's 7 offsets only: 2 * pairs in the region * C_in * C_out
    counts = pointsparse.kmap.get_kmap(x, (3, 3, 3), (1, 1, 1), (1, 1, 1), False).sizes.to(torch.int64)
    assert after["layers"]["0"]["dense_flops"] == 2 * int(counts[list(model[0].kernel_region)].sum()) * 64
    assert "kernel_region=[4, 10, 12, 13, 14, 16, 22]" in repr(compressed[0])
    wide = F.compress(torch.nn.Sequential(psnn.Conv3d(8, 8, 3, stride=2, dilation=2, transposed=True)), fmt,
                      **kwargs)  # (its repr left dilation and transposed out)
    assert "dilation=(2, 2, 2), transposed=True" in repr(wide[0])
    # state_dict into a fresh compressed model whose convs have no region
    torch.manual_seed(5)
    fresh = F.compress(torch.nn.Sequential(psnn.Conv3d(8, 8, 3), psnn.ReLU(), psnn.Conv3d(8, 8, 3, bias=True)),
                       fmt, **kwargs)
    assert fresh[0].kernel_region is None
    buffer = io.BytesIO()
    torch.save(compressed.state_dict(), buffer)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer, weights_only=False))
    assert fresh[0].kernel_region == model[0].kernel_region and fresh[2].kernel_region == (0, 4, 13, 20, 26)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).feats, want, atol=1e-5, rtol=1e-5)
    reloaded = sparsity_report(fresh, x)
    assert {k: reloaded["total"][k] for k in ("flops", "dense_flops")} == \
        {k: before["total"][k] for k in ("flops", "dense_flops")}


def test_compressed_conv_checks_the_kernel_region_it_is_given():
    """A region that is none for the kernel, or that leaves out an offset
    holding nonzero weights (the conv would ignore them), is refused, in
    the constructor and in a loaded state (which leaves the module as it
    was); a state saved without a region loads as every offset."""
    sparse = F.compress(psnn.Conv3d(4, 4, 3, kernel_region="cross"), "csr")
    extra = sparse.state_dict()["_extra_state"]
    args = ((3, 3, 3), (1, 1, 1), (1, 1, 1), False, 4, 4)
    with pytest.raises(ValueError, match=r"SparseConv3d: kernel_region must list offset indices in \[0, 27\)"):
        F.SparseConv3d(extra["offsets"], *args, kernel_region=[27])
    with pytest.raises(ValueError, match=r"SparseConv3d: kernel_region \[4, 10\] leaves out offset 12, which holds "
                                         "nonzero weights"):
        F.SparseConv3d(extra["offsets"], *args, kernel_region=[4, 10])
    with pytest.raises(ValueError, match=r"SparseConv3d: _extra_state's kernel_region \[13\] leaves out offset 4"):
        sparse.load_state_dict({**sparse.state_dict(), "_extra_state": {**extra, "kernel_region": [13]}})
    assert sparse.kernel_region == (4, 10, 12, 13, 14, 16, 22)
    old = {k: v for k, v in extra.items() if k != "kernel_region"}
    sparse.load_state_dict({**sparse.state_dict(), "_extra_state": old})
    assert sparse.kernel_region is None


@pytest.mark.parametrize("fmt,kwargs", [("csr", {}), ("bsr", {"blocksize": (2, 4)}), ("fkw", {})])
def test_format_product_under_torch_compile(fmt, kwargs):
    """A layer that runs its format's product (the C++ core on numpy views,
    no torch operator) runs between the graphs of plain torch.compile, as
    eager gives, on inputs of other sizes without recompiling (dynamo traced
    into it: a graph break at each core call, and the map's ``pairs`` and the
    core's calls recompiled for every offset, past dynamo's limit); under fullgraph=True it
    is refused naming the layer and what compiles (dynamo's message was
    about ``get_num_threads`` or ``tensor.is_inference()``)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(psnn.Conv3d(6, 8, 3), psnn.Conv3d(8, 8, 2, 2), psnn.Conv3d(8, 8, 3),
                                psnn.Conv3d(8, 6, 2, 2, transposed=True), psnn.Linear(6, 3))
    for m in model.modules():
        if isinstance(m, (psnn.Conv3d, torch.nn.Linear)):
            prune.l1_unstructured(m, "weight", amount=0.6)
    sparse = F.compress(model.eval(), fmt, **kwargs)
    for i in (0, 2, 3):
        sparse[i].execution = "format"
    sparse[4].fn.execution = "format"
    clouds = [_sparse_input(n, channels=6, seed=seed) for n, seed in ((120, 1), (200, 2), (160, 3))]
    torch.compiler.reset()
    compiled = torch.compile(sparse, dynamic=True, backend="eager")
    with torch.no_grad():
        for i, x in enumerate(clouds):
            # (the first call compiles each layer's frames; other sizes then run them as they are)
            with torch._dynamo.config.patch(error_on_recompile=i > 0):
                got, want = compiled(x), sparse(x)
            assert torch.equal(got.coords, want.coords) and torch.equal(got.feats, want.feats)
    for layer, name in ((sparse[0], "SparseConv3d"), (sparse[4].fn, "SparseLinear")):
        torch.compiler.reset()
        x = clouds[0] if name == "SparseConv3d" else clouds[0].feats
        with torch.no_grad(), pytest.raises(torch._dynamo.exc.Unsupported,
                                            match=f"formats.{name} .*format's product.*fullgraph"):
            torch.compile(layer, fullgraph=True, backend="eager")(x)


def test_the_formats_import_no_compiler_and_an_unpickled_layer_still_runs_outside_graphs(tmp_path):
    """``import pointsparse.formats`` (and so a process's first
    ``prune.sparsity_report``) imported torch's compiler for the two
    ``torch.compiler.disable`` decorators, a second of CPU. They are made
    with the process's first layer now, or its first unpickled one: a fresh
    process that loads a compressed model refuses it under fullgraph=True as
    before, naming the layer, and runs it eagerly as the parent did."""
    torch.manual_seed(0)
    x = _sparse_input(channels=4)
    model = torch.nn.Sequential(psnn.Conv3d(4, 5, 3), psnn.Linear(5, 3))
    prune.l1_unstructured(model[0], "weight", amount=0.6)
    sparse = F.compress(model.eval(), "csr")
    sparse[0].execution = "format"
    sparse[1].fn.execution = "format"
    with torch.no_grad():
        want = sparse(x).feats
    (tmp_path / "m.pkl").write_bytes(pickle.dumps((sparse, x, want)))
    code = ("import pickle, sys, torch\n"
            "import pointsparse.formats, pointsparse.prune as prune\n"
            "prune.sparsity_report(torch.nn.Sequential(pointsparse.nn.Conv3d(2, 3, 3)))\n"
            "assert 'torch._dynamo' not in sys.modules\n"
            f"sparse, x, want = pickle.loads(open({str(tmp_path / 'm.pkl')!r}, 'rb').read())\n"
            "with torch.no_grad():\n"
            "    assert torch.equal(sparse(x).feats, want)\n"
            "    for layer, arg in ((sparse[0], x), (sparse[1].fn, torch.randn(7, 5))):\n"
            "        try:\n"
            "            torch.compile(layer, fullgraph=True, backend='eager')(arg)\n"
            "        except torch._dynamo.exc.Unsupported as error:\n"
            "            assert \"format's product\" in str(error), error\n"
            "        else:\n"
            "            raise AssertionError('compiled in one graph')\n"
            "print('ok')\n")
    run = run_python(code, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]


class _FeatsAndCoords(torch.nn.Module):
    """A conv called on plain tensors, as torch.export takes them."""

    def __init__(self, conv):
        super().__init__()
        self.conv = conv

    def forward(self, feats, coords):
        return self.conv(pointsparse.SparseTensor(feats, coords, validate=False)).feats


@pytest.mark.parametrize("fmt,kwargs", [("csr", {}), ("bsr", {"blocksize": (2, 4)}), ("fkw", {})])
def test_format_product_under_torch_export_is_refused_by_name(fmt, kwargs):
    """torch.export (non-strict, torch's default) of a layer running its
    format's product failed deep in the product with torch's ".numpy() is not
    supported for tensor subclasses"; now a RuntimeError naming the layer
    and what exports (its engine / dense execution, which export and give
    the layer's output)."""
    torch.manual_seed(0)
    conv = psnn.Conv3d(8, 8, kernel_size=3, bias=True)
    linear = torch.nn.Linear(8, 4)
    for layer in (conv, linear):
        prune.l1_unstructured(layer, "weight", amount=0.6)
    x = _sparse_input(channels=8)
    rows = torch.randn(3, 8)
    cases = [(F.compress(conv, fmt, **kwargs), _FeatsAndCoords, (x.feats, x.coords), "engine"),
             (F.compress(linear, fmt, **kwargs), lambda layer: layer, (rows,), "dense")]
    for layer, wrap, args, exported in cases:
        name = type(layer).__name__
        layer.execution = "format"
        with pytest.raises(RuntimeError, match=f"formats.{name} runs its format's product .* torch.export cannot "
                                               f"take it into a graph; set its execution to '{exported}'"):
            torch.export.export(wrap(layer), args)
        layer.execution = exported
        program = torch.export.export(wrap(layer), args)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(*args), wrap(layer)(*args), rtol=0, atol=0)


@pytest.mark.parametrize("execution", ["format", "engine"])
def test_compressed_layers_name_an_input_of_another_dtype(execution):
    """Feats of another dtype than the compressed weight are a TypeError
    naming the layer, the input and the weight's format and dtype (the
    format's product said 'dense must have dtype torch.float32 like the
    weight', naming its own argument; the engine 'weight dtype ... differs')."""
    sparse = F.compress(_pruned_conv(), "csr")
    sparse.execution = execution
    x = _sparse_input(channels=8)
    for dtype in (torch.float64, torch.bfloat16):
        with torch.no_grad(), pytest.raises(TypeError, match=rf"SparseConv3d: the input's feats are {dtype} but its "
                                                             r"weight \(format CSR\) is torch.float32"):
            sparse(pointsparse.SparseTensor(x.feats.to(dtype), x.coords))
    lin = torch.nn.Linear(8, 3)
    prune.l1_unstructured(lin, "weight", amount=0.5)
    linear = F.compress(lin, "csr")
    for dtype in (torch.float64, torch.int64):
        with pytest.raises(TypeError, match=rf"SparseLinear: the input is {dtype} but its weight \(format CSR\) is "
                                            "torch.float32"):
            linear(torch.ones(2, 8, dtype=dtype))


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("fmt,kwargs", FORMATS)
def test_sparse_linear_refuses_sparse_layout_and_meta_inputs(fmt, kwargs):
    """A torch sparse-layout input was torch's bare RuntimeError ('reshape is
    not implemented for sparse tensors') and a meta input autocast's
    ('unknown device type for autocast'); now a TypeError (sparse layout)
    or ValueError (meta) naming the layer and its input."""
    lin = torch.nn.Linear(8, 3)
    prune.l1_unstructured(lin, "weight", amount=0.5)
    linear = F.compress(lin, fmt, **kwargs)
    for bad, error, match in ((torch.ones(2, 8).to_sparse(), TypeError, r"dense \(strided\)"),
                              (torch.ones(2, 8).to_sparse_csr(), TypeError, r"dense \(strided\)"),
                              (torch.empty(2, 8, device="meta"), ValueError, "meta tensor")):
        with torch.no_grad(), pytest.raises(error, match="SparseLinear: input .*" + match):
            linear(bad)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")
@pytest.mark.parametrize("fmt,kwargs", FORMATS)
def test_sparse_linear_without_input_features_gives_the_bias(fmt, kwargs):
    """A Linear(0, out) (every input channel cut) gives its bias for each
    row, as torch's does; compressed it failed with torch's bare 'cannot
    reshape tensor of 0 elements into shape [-1, 0]'."""
    lin = torch.nn.Linear(0, 3)
    with torch.no_grad():
        lin.bias.copy_(torch.tensor([1.0, -2.0, 3.0]))
    linear = F.compress(lin, fmt, **kwargs)
    x = torch.ones(2, 5, 0)
    with torch.no_grad():
        torch.testing.assert_close(linear(x), lin(x))
    assert linear(x).shape == (2, 5, 3)


def test_compressed_constructors_check_their_arguments():
    """SparseConv3d takes kernel_size, stride and dilation as Conv3d does (an
    int was "'int' object is not iterable", a 2-tuple an IndexError, stride 0
    was kept), its flags as bools (transposed="False" and relu="False" were
    True) and channels as positive ints; SparseConv3d and SparseLinear take a
    bias of their output's shape (a (1,) bias was broadcast over every channel
    by the format's product, a list was "'list' object has no attribute
    'detach'")."""
    offsets = F.compress(_pruned_conv(), "csr").offsets
    sparse = F.SparseConv3d(offsets, 3, 1, 1, False, 8, 8)
    assert (sparse.kernel_size, sparse.stride, sparse.dilation) == ((3, 3, 3), (1, 1, 1), (1, 1, 1))
    args = ((3, 3, 3), (1, 1, 1), (1, 1, 1), False, 8, 8)
    cases = [({"kernel_size": (3, 3)}, TypeError, "kernel_size must be an int or a 3-tuple"),
             ({"stride": 0}, ValueError, "stride must be >= 1"),
             ({"dilation": 1.5}, TypeError, "dilation must be an int"),
             ({"transposed": "False"}, TypeError, "transposed must be True or False"),
             ({"relu": "False"}, TypeError, "relu must be True or False"),
             ({"in_channels": 8.0}, TypeError, "in_channels must be"),
             ({"out_channels": 0}, ValueError, "out_channels must be"),
             ({"bias": torch.zeros(1)}, ValueError, r"bias must be \(out_channels,\) = \(8,\); got \(1,\)"),
             ({"bias": [0.0] * 8}, TypeError, "bias must be a torch.Tensor or None; got list")]
    names = ("kernel_size", "stride", "dilation", "transposed", "in_channels", "out_channels")
    for change, error, match in cases:
        kwargs = {**dict(zip(names, args)), **change}
        with pytest.raises(error, match=match):
            F.SparseConv3d(offsets, **kwargs)
    weight = F.CSR.from_dense(torch.randn(3, 4))
    assert F.SparseLinear(weight, torch.zeros(3)).bias.shape == (3,)
    with pytest.raises(ValueError, match=r"bias must be \(out_features,\) = \(3,\); got \(1,\)"):
        F.SparseLinear(weight, torch.zeros(1))
    with pytest.raises(TypeError, match="bias must be a torch.Tensor or None; got list"):
        F.SparseLinear(weight, [0.0] * 3)
    # A bias of another dtype than the format's values: the engine refused it at the first
    # forward ('bias (torch.float64, cpu) must match the weight'), the format's product cast it
    # without a word (an int64 bias too); now both constructors name it.
    for bad in (torch.float64, torch.int64):
        with pytest.raises(TypeError, match=rf"bias must have the format's dtype torch.float32; got {bad}"):
            F.SparseLinear(weight, torch.zeros(3, dtype=bad))
        with pytest.raises(TypeError, match=rf"bias must have the format's dtype torch.float32; got {bad}"):
            F.SparseConv3d(offsets, *args, bias=torch.zeros(8, dtype=bad))


def test_compressed_spvcnn_runs_as_the_model_it_replaces():
    """SPVCNN read its classifier's weight dtype from ``classifier.weight``,
    which a compressed classifier (formats.SparseLinear) does not have: a
    compressed SPVCNN failed with an AttributeError. It runs now, giving the
    pruned model's logits."""
    from pointsparse import export
    from pointsparse.models import SPVCNN

    torch.manual_seed(0)
    model = SPVCNN(4, 5, cr=0.25, blocks=1).eval()
    for m in model.modules():
        if isinstance(m, (psnn.Conv3d, torch.nn.Linear)):
            prune.l1_unstructured(m, "weight", 0.6)
            prune.remove(m, "weight")
    args = export.example_input(4, 0.5, points=True)
    with torch.no_grad():
        want = model(*args)
        got = F.compress(model, "csr")(*args)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_execution_set_on_a_layer_is_checked_when_it_runs():
    """execution is checked by the constructor and load_state_dict; set on a
    layer afterwards, a typo ("engnie") ran the format's product silently.
    The forward refuses it, naming the choices."""
    conv = _pruned_conv()
    x = _sparse_input(channels=8)
    sparse = F.compress(conv, "csr")
    sparse.execution = "engnie"
    with torch.no_grad(), pytest.raises(ValueError, match=r"execution must be one of .*got 'engnie'"):
        sparse(x)
    sparse.execution = "engine"
    with torch.no_grad():
        torch.testing.assert_close(sparse(x).feats, conv(x).feats, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fmt,kwargs", [("csr", {}), ("bsr", {"blocksize": (2, 4)}), ("fkw", {}), ("eie", {})])
def test_compressed_state_dict_loads_as_weights_only_data(tmp_path, fmt, kwargs):
    """A compressed model's state_dict held format objects in _extra_state:
    torch.load (weights_only=True, torch's default) refused the saved file,
    and so did checkpoint.save. Its formats are plain data now: both read it
    back, and a fresh compressed model loading it computes the same."""
    from pointsparse import checkpoint

    model = torch.nn.Sequential(_pruned_conv(), psnn.ReLU())
    linear = torch.nn.Linear(8, 3)
    prune.l1_unstructured(linear, "weight", 0.5)
    prune.remove(linear, "weight")
    compressed = F.compress(torch.nn.ModuleDict({"conv": model, "head": linear}), fmt, **kwargs)
    x = _sparse_input(channels=8)
    with torch.no_grad():
        want = compressed["head"](compressed["conv"](x).feats)
    torch.save(compressed.state_dict(), tmp_path / "m.pt")
    checkpoint.save(tmp_path / "c.pt", {"model": compressed.state_dict()})
    for state in (torch.load(tmp_path / "m.pt", weights_only=True), checkpoint.load(tmp_path / "c.pt")["model"]):
        fresh = F.compress(torch.nn.ModuleDict({"conv": torch.nn.Sequential(_pruned_conv(seed=9), psnn.ReLU()),
                                                "head": torch.nn.Linear(8, 3)}), fmt, **kwargs)
        fresh.load_state_dict(state)
        with torch.no_grad():
            torch.testing.assert_close(fresh["head"](fresh["conv"](x).feats), want)


@pytest.mark.parametrize("fmt,kwargs", [("csr", {}), ("fkw", {})])
def test_malformed_format_data_in_a_state_is_named(fmt, kwargs):
    """A state's format data (``{'format': name, 'attributes': dict}``,
    plain data since checkpoints are read weights-only) whose name is no
    string, or whose attributes' ``_pickled_unsigned`` (the widened index
    arrays' dtypes) is malformed, was torch's or Python's own error from
    inside (``unhashable type: 'list'``, ``'int' object has no attribute
    'items'``, ``KeyError: 'nowhere'``). It is a ValueError / TypeError
    naming the layer's _extra_state, and the layer is left as it was."""
    import copy

    linear = torch.nn.Linear(300, 4)
    prune.l1_unstructured(linear, "weight", 0.9)
    model = torch.nn.ModuleDict({"head": linear, "conv": _pruned_conv()})
    compressed = F.compress(model, "csr" if fmt == "csr" else "fkw", **kwargs)
    good = copy.deepcopy(compressed.state_dict())

    def data_of(state, key):
        extra = state[key]
        return extra["weight_format"] if "weight_format" in extra else \
            (extra["offsets"] if isinstance(extra["offsets"], dict) else extra["offsets"][0])

    for key, layer in (("conv._extra_state", "SparseConv3d"), ("head._extra_state", "SparseLinear")):
        if fmt == "fkw" and key == "head._extra_state":
            continue
        for mutate, error in ((lambda d: d.__setitem__("format", ["CSR"]), TypeError),
                              (lambda d: d["attributes"].__setitem__("_pickled_unsigned", 5), ValueError),
                              (lambda d: d["attributes"].__setitem__("_pickled_unsigned", {"nowhere": torch.int32}),
                               ValueError),
                              (lambda d: d["attributes"].__setitem__("_pickled_unsigned", {"shape": torch.int32}),
                               ValueError)):
            bad = copy.deepcopy(good)
            mutate(data_of(bad, key))
            with pytest.raises(error, match=f"{layer} '{key.split('.')[0]}': _extra_state's"):
                compressed.load_state_dict(bad)
            now = compressed.state_dict()
            assert all(torch.equal(now[k], good[k]) for k in good if isinstance(good[k], torch.Tensor))
    compressed.load_state_dict(good)


def test_a_layer_its_format_refuses_is_named_in_a_model():
    """compress of a model whose conv is not 2:4 sparse said 'tensor is not
    2:4 sparse: row 3, columns 0..3' without the layer or the offset."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(psnn.Conv3d(4, 8, 3), psnn.ReLU(), torch.nn.Sequential(psnn.Conv3d(8, 8, 3)))
    prune.l1_unstructured(model[0], "weight", 0.5)
    prune.remove(model[0], "weight")
    with pytest.raises(ValueError, match=r"^0: kernel offset \d+ \(its W\[\d+\]\.T, C_out x C_in\): tensor is not "
                                         r"2:4 sparse: row \d+, columns"):
        F.compress(model, "nm", n=2, m=4)
    pointsparse.prune.nm_structured(model[0], "weight", 2, 4)  # (now it passes; the next conv is named by its path)
    prune.remove(model[0], "weight")
    with pytest.raises(ValueError, match=r"^2\.0: kernel offset 0 "):
        F.compress(model, "nm", n=2, m=4)
    with pytest.raises(ValueError, match=r"^kernel offset 0 .* prune it first \(prune.nm_structured\), or pass "
                                         r"prune=True, which keeps the n largest magnitudes per group: the weight, "
                                         r"and so the outputs, change"):
        F.compress(model[2][0], "nm", n=2, m=4)


@pytest.mark.parametrize("fmt", ["csr", "fkw"])
def test_compress_keeps_an_attached_filter_skeleton(fmt):
    """A conv with a filter skeleton (pointsparse.prune.attach_filter_skeleton:
    the forward computes weight_orig * weight_mask * weight_skeleton): the
    compressed conv holds that weight. The skeleton was once left out, and
    the compressed model computed other values with no error."""
    from pointsparse import prune as psprune

    torch.manual_seed(0)
    conv = psnn.Conv3d(4, 8, kernel_region="cross", bias=True)
    psprune.panel_structured(conv, "weight", 0.5)
    skeleton = psprune.attach_filter_skeleton(conv)
    with torch.no_grad():
        skeleton.uniform_(0.2, 2.0)
    coords = torch.unique(torch.cat([torch.zeros(200, 1, dtype=torch.int64), torch.randint(0, 10, (200, 3))], 1),
                          dim=0).int()
    x = pointsparse.SparseTensor(torch.randn(len(coords), 4), coords)
    sparse = F.compress(conv, fmt)
    with torch.no_grad():
        ref = conv(x).feats
        out = sparse(x).feats
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


class _ConvsAndHead(torch.nn.Module):
    """Two sparse convs (the second pruned) and a per-site Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second, self.head = psnn.Conv3d(6, 8, 3), psnn.Conv3d(8, 8, 3, bias=True), psnn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.second(self.first(x)))


@pytest.mark.parametrize("name", ["second", "first"])
def test_compress_keeps_a_voxel_prune_on_a_layers_input(name):
    """A VoxelPrune that models.add_voxel_prune put on the input of a conv (a
    forward pre-hook on it): compress replaced the conv and dropped the hook,
    so the compressed model ran unpruned without a word. The compressed conv
    runs the conv's own forward pre-hooks; its pruning's (the mask), whose
    weight it holds, stay behind."""
    from pointsparse.models import add_voxel_prune

    torch.manual_seed(0)
    model = _ConvsAndHead().eval()
    prune.l1_unstructured(model.second, "weight", amount=0.5)
    add_voxel_prune(model, name, 0.5)
    x = _sparse_input(n=80, channels=6)
    for fmt, kwargs in FORMATS[:2]:
        sparse = F.compress(model, fmt, **kwargs)
        layer = getattr(sparse, name)
        assert isinstance(layer, F.SparseConv3d) and len(layer._forward_pre_hooks) == 1
        with torch.no_grad():
            ref, out = model(x), sparse(x)
        assert len(ref) < len(x) and torch.equal(out.coords, ref.coords)
        torch.testing.assert_close(out.feats, ref.feats, rtol=1e-5, atol=1e-5)


def _conv_and_linear(pruned: bool) -> torch.nn.Sequential:
    torch.manual_seed(5)
    model = torch.nn.Sequential(psnn.Conv3d(8, 8, kernel_size=3, bias=True), psnn.ReLU(), psnn.Linear(8, 3))
    if pruned:
        prune.l1_unstructured(model[0], "weight", amount=0.5)
        prune.l1_unstructured(model[2].fn, "weight", amount=0.5)
    return model


@pytest.mark.parametrize("fmt,kwargs", [("csr", {}), ("fkw", {})])
@pytest.mark.parametrize("pruned_target", [False, True])
@pytest.mark.parametrize("strict", [True, False])
def test_a_compressed_state_dict_is_named_where_an_uncompressed_model_loads_it(fmt, kwargs, pruned_target, strict):
    """A compressed model's state_dict (its layers' formats in _extra_state,
    no weight) loaded into the uncompressed model gave torch's bare
    "Missing key(s) ... Unexpected key(s)" (or, with strict=False, nothing:
    the weights stayed as initialised). The first layer that cannot read its
    entry names itself, says the entry is a compressed layer's, and what to
    do; the other way round too. Nothing of the layer is loaded."""
    state = F.compress(_conv_and_linear(pruned=True), fmt, **kwargs).state_dict()
    target = _conv_and_linear(pruned=pruned_target)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match=rf"Conv3d '0': the state_dict holds a compressed layer \(formats.SparseConv3d, "
                                         rf"format {fmt.upper()}\).*formats.compress"):
        target.load_state_dict(state, strict=strict)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())
    del state["0._extra_state"], state["0.bias"]  # the Linear inside psnn.Linear names itself too
    with pytest.raises(ValueError, match=r"Linear '2': the state_dict holds a compressed layer \(formats.SparseLinear, "
                                         rf"format {'CSR' if fmt == 'csr' else 'FKW'}\)"):
        target.load_state_dict(state, strict=False)
    compressed = F.compress(_conv_and_linear(pruned=True), fmt, **kwargs)
    with pytest.raises(ValueError, match=r"SparseConv3d '0': the state_dict holds an uncompressed layer"):
        compressed.load_state_dict(target.state_dict(), strict=strict)
    mixed = {k: v for k, v in compressed.state_dict().items() if k.startswith("0.")}
    mixed.update((k, v) for k, v in target.state_dict().items() if k.startswith("2."))
    with pytest.raises(ValueError, match=r"SparseLinear '2.fn': the state_dict holds an uncompressed layer"):
        compressed.load_state_dict(mixed, strict=strict)


@pytest.mark.parametrize("fmt,kwargs", [(f, k) for f, k in FORMATS if f != "nm"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("transposed", [False, True])
def test_a_non_finite_weight_propagates_as_in_the_uncompressed_conv(fmt, kwargs, bad, transposed):
    """A NaN / inf weight reaches the output sites that have a pair at its
    offset, as in the conv it replaces: FKW's im2col product multiplied it
    by the zeros standing for absent neighbours, a NaN at every output site
    (60 where the conv had 11), in both float32 and float64."""
    for dtype in (torch.float32, torch.float64):
        x = _sparse_input(channels=4, dtype=dtype)
        if transposed:
            with torch.no_grad():
                x = psnn.Conv3d(4, 4, kernel_size=2, stride=2).to(dtype)(x)
        conv = psnn.Conv3d(4, 6, kernel_size=2 if transposed else 3, stride=2 if transposed else 1,
                           transposed=transposed).to(dtype)
        with torch.no_grad():
            conv.weight.mul_(torch.rand(conv.weight.shape, generator=torch.Generator().manual_seed(0)) < 0.3)
            conv.weight[0, 1, 2] = bad
            conv.weight[-1, 0, 0] = -bad
            ref = conv(x).feats
        assert (~ref.isfinite()).any() and ref.isfinite().any()
        sparse = F.compress(conv, fmt, **kwargs)
        for execution in ("engine", "format"):
            sparse.execution = execution
            with torch.no_grad():
                got = sparse(x).feats
            assert torch.equal(got.isnan(), ref.isnan()) and torch.equal(got.isinf(), ref.isinf()), (execution, dtype)
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5, equal_nan=True)


def test_compressed_linear_is_never_the_slower_choice_unmeasured():
    """compress(Linear) ran every format's product (4-6x torch's Linear on
    this CPU, even unpruned: a compressed MinkUNet's classifier the slowest
    layer); it now runs torch's linear on the weight its format holds unless
    an example input measured the format faster: same values as the
    masked Linear, the format in state_dict with the execution and choice,
    the execution restored on load (a state without one runs the format),
    and the dense execution following .double()."""
    torch.manual_seed(0)
    fc = torch.nn.Linear(16, 8)
    prune.l1_unstructured(fc, "weight", amount=0.5)
    x = torch.randn(40, 16)
    with torch.no_grad():
        want = fc(x)
    for fmt in ("csr", "bsr", "coo", "csc", "eie", "fkw"):
        sparse = F.compress(fc, fmt)
        assert sparse.execution == "dense" and sparse.chosen == "dense (not measured)"
        with torch.no_grad():
            torch.testing.assert_close(sparse(x), want, atol=1e-6, rtol=1e-6)
            sparse.execution = "format"
            torch.testing.assert_close(sparse(x), want, atol=1e-5, rtol=1e-5)
    timed = F.compress(fc, "csr", example_input=x)
    assert timed.execution in ("dense", "format") and timed.chosen.startswith(timed.execution + " (dense ")
    state = timed.state_dict()
    assert "dense_weight" not in state and state["_extra_state"]["execution"] == timed.execution
    other = F.compress(fc, "csr")
    other.execution = "format" if timed.execution == "dense" else "dense"
    other.load_state_dict(state)
    assert (other.execution, other.chosen) == (timed.execution, timed.chosen)
    old = dict(state, _extra_state={"weight_format": state["_extra_state"]["weight_format"]})
    other.load_state_dict(old)
    assert other.execution == "format"
    with pytest.raises(ValueError, match="SparseLinear: _extra_state's execution must be one of"):
        other.load_state_dict(dict(state, _extra_state=dict(state["_extra_state"], execution="engine")))
    assert other.execution == "format"
    double = F.compress(fc, "csr").double()
    assert double.dense_weight.dtype == torch.float64
    with torch.no_grad():
        torch.testing.assert_close(double(x.double()), want.double(), atol=1e-6, rtol=1e-6)
    clone = pickle.loads(pickle.dumps(F.compress(fc, "csr")))
    with torch.no_grad():
        torch.testing.assert_close(clone(x), want, atol=1e-6, rtol=1e-6)


def test_a_compressed_model_times_its_linear_layers_on_the_example():
    """compress(model, example_input=x) times each Linear on the input it sees
    in the model (as each Conv3d), and the compressed model gives the
    model's output; a dense SparseLinear compiles with fullgraph=True."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(psnn.Conv3d(6, 8, 3), psnn.Linear(8, 3)).eval()
    prune.l1_unstructured(model[0], "weight", amount=0.6)
    x = _sparse_input(150, channels=6, seed=1)
    sparse = F.compress(model, "csr", example_input=x)
    assert "ms" in sparse[1].fn.chosen and "ms" in sparse[0].chosen
    with torch.no_grad():
        torch.testing.assert_close(sparse(x).feats, model(x).feats, atol=1e-5, rtol=1e-5)
    layer = F.compress(torch.nn.Linear(8, 3), "csr")
    torch.compiler.reset()
    rows = torch.randn(20, 8)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(layer, fullgraph=True, backend="eager")(rows), layer(rows))


class _KeywordCalls(torch.nn.Module):
    """Calls its layers with the input as a keyword argument (``input=``)."""

    def __init__(self):
        super().__init__()
        self.conv = psnn.Conv3d(6, 8, 3)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x):
        y = self.conv(input=x)
        return self.head(input=y.feats)


def test_a_model_calling_its_layers_with_keyword_inputs_is_timed_on_them():
    """compress(model, example_input=x) recorded each layer's input as the
    first positional argument of its call: a model calling ``conv(input=x)``
    or ``linear(input=feats)`` stopped with a bare IndexError ("tuple index
    out of range") from compress's own hook. The keyword input is the
    layer's input too: it is timed on it, and the model's output kept."""
    torch.manual_seed(0)
    model = _KeywordCalls().eval()
    prune.l1_unstructured(model.conv, "weight", amount=0.6)
    x = _sparse_input(150, channels=6, seed=1)
    sparse = F.compress(model, "csr", example_input=x)
    assert "ms" in sparse.conv.chosen and "ms" in sparse.head.chosen
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), model(x), atol=1e-5, rtol=1e-5)


def test_a_compressed_model_called_with_gradients_on_says_why_its_input_needs_one():
    """A compressed MinkUNet called as a model is (grad mode on, an input without a gradient) reached its
    compressed classifier with feats that require grad (the BatchNorms' parameters before it do) and said
    to "detach the input", an input the user never gave it. The error now says where the gradient comes
    from and to run the model under torch.no_grad() / torch.inference_mode(), which runs it."""
    from pointsparse.models import MinkUNet

    torch.manual_seed(0)
    model = MinkUNet(3, 5, cr=0.25, blocks=1).eval()
    prune.l1_unstructured(model.classifier.fn, "weight", amount=0.7)
    compressed = F.compress(model, "csr")
    x = _sparse_input(n=200, channels=3)
    compressed(x)  # (compress's default: the classifier runs torch's linear, which takes the gradient)
    compressed.classifier.fn.execution = "format"
    with pytest.raises(RuntimeError, match=r"SparseLinear \(CSR\) is inference-only .* its input requires grad "
                                           r"\(the model's input does, or parameters of layers before it.*\); "
                                           r"run it under torch.no_grad\(\) or torch.inference_mode\(\)"):
        compressed(x)
    with torch.inference_mode():
        assert torch.allclose(compressed(x).feats, model(x).feats, rtol=1e-5, atol=1e-6)


def test_compress_takes_a_pruned_bias_as_its_hook_computes_it():
    """A pruned bias (``prune.l1_unstructured(layer, "bias")``) is
    ``bias_orig * bias_mask``; the attribute ``bias`` is what the hook last
    computed, stale after an optimiser step on ``bias_orig`` until the next
    forward. compress took that stale copy (the weight it recomputed): the
    compressed layer's outputs were off by the last step. It takes the bias
    as the hook computes it now, as it does the weight."""
    torch.manual_seed(0)
    lin, conv = torch.nn.Linear(6, 4), psnn.Conv3d(6, 4, kernel_size=3, bias=True)
    x_lin, x_conv = torch.randn(3, 6), _sparse_input(channels=6)
    for layer in (lin, conv):
        prune.l1_unstructured(layer, "weight", amount=0.5)
        prune.l1_unstructured(layer, "bias", amount=0.5)
        with torch.no_grad():  # (a fine-tuning step after the last forward)
            layer.weight_orig.add_(0.5)
            layer.bias_orig.add_(1.0)
    for layer, x in ((lin, x_lin), (conv, x_conv)):
        sparse = F.compress(layer, "csr")
        with torch.no_grad():
            want, got = layer(x), sparse(x)
        if isinstance(x, pointsparse.SparseTensor):
            want, got = want.feats, got.feats
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fmt,kwargs", [("bsr", {"blocksize": (2, 2)}), ("fkw", {}), ("csr", {})])
def test_compressing_a_compressed_model_again_holds_the_format_asked_for(fmt, kwargs):
    """compress of an already compressed model (or layer) returned a deep
    copy of it: its layers kept the format they held (CSR) whatever format
    was asked for, without a word (nbytes, the product and the report were
    the first format's). Each compressed layer is re-encoded in the format
    asked for now, from the weight it holds: the model's outputs are the
    same, its report the new choice."""
    model = _pruned_model("csr")
    x = _sparse_input(channels=8)
    first = F.compress(model, "csr")
    again = F.compress(first, fmt, example_input=x, **kwargs)
    layers = [m for m in again.modules() if isinstance(m, (F.SparseConv3d, F.SparseLinear))]
    assert len(layers) == 2
    conv, linear = layers
    want = {"bsr": "BSR", "fkw": "FKW", "csr": "CSR"}[fmt]
    assert conv.format_name == want and type(linear.weight_format).__name__ == want
    assert "ms" in conv.chosen and "ms" in linear.chosen  # (measured on the example)
    with torch.no_grad():
        torch.testing.assert_close(again(x).feats, model(x).feats, atol=1e-5, rtol=1e-5)
    layer = F.compress(first[1], fmt, **kwargs)  # one compressed layer alone
    assert isinstance(layer, F.SparseConv3d) and layer.format_name == want
    assert torch.equal(layer.engine_weight, first[1].engine_weight)
    assert type(F.compress(first[2].fn, fmt, **kwargs).weight_format).__name__ == want


def test_an_example_input_the_module_cannot_run_is_named():
    """compress(..., example_input=x) with an x the layer or model cannot
    run gave the layer's own words ("expected a SparseTensor; got Tensor",
    "input has 3 channels", "MinkUNet takes a SparseTensor") with nothing
    saying they were about example_input. The error keeps its type and
    those words, after "example_input does not fit"."""
    from pointsparse.models import MinkUNet

    conv = _pruned_conv(channels=4)
    cases = [(conv, torch.randn(3, 4), TypeError, "expected a SparseTensor"),
             (conv, _sparse_input(channels=3), ValueError, "input has 3 channels"),
             (conv, _sparse_input(channels=4, dtype=torch.float64), TypeError, "float64"),
             (torch.nn.Linear(4, 2), torch.randn(3, 5), ValueError, r"input must be \(\.\.\., 4\)"),
             (MinkUNet(4, 5, cr=0.125, blocks=1).eval(), torch.randn(3, 4), TypeError, "MinkUNet takes a SparseTensor")]
    for module, example, error, words in cases:
        with pytest.raises(error, match=rf"^example_input does not fit the (layer|model) \(.*\): .*{words}"):
            F.compress(module, "csr", example_input=example)


@pytest.mark.parametrize("dtype,low", [(torch.bfloat16, torch.float16), (torch.float16, torch.bfloat16)])
def test_formats_built_under_the_other_16_bit_autocast_are_the_ones_built_outside_it(dtype, low):
    """A bf16 model compressed inside an fp16 autocast region (or an fp16 one under bf16) stopped in the
    stack of a conv's per-offset weights, and ``EIE.from_dense`` of a bf16 matrix there in the cat of its
    PEs' values, with a bare "RuntimeError: Unexpected floating ScalarType in at::autocast::prioritize"
    (autocast's cat and stack refuse a 16-bit dtype not their own). Both now build what they build outside
    autocast."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(psnn.Conv3d(4, 8, 3, bias=True), psnn.ReLU(), psnn.Linear(8, 3)).to(dtype)
    g = torch.Generator().manual_seed(1)
    x, _ = pointsparse.voxelize(torch.rand(200, 3, generator=g) * 4, voxel_size=0.5)
    x = pointsparse.SparseTensor(torch.randn(len(x), 4, generator=g).to(dtype), x.coords)
    dense = torch.randn(12, 20, generator=g)
    dense[dense.abs() < 0.7] = 0
    for fmt in ("csr", "eie", "fkw"):
        want = F.compress(net, fmt)
        with torch.autocast("cpu", low):
            got = F.compress(net, fmt)
        with torch.no_grad():
            assert torch.equal(got(x).feats, want(x).feats), fmt
    want = F.EIE.from_dense(dense.to(dtype), num_pe=4)
    with torch.autocast("cpu", low):
        got = F.EIE.from_dense(dense.to(dtype), num_pe=4)
    assert all(torch.equal(a, b) for a, b in zip(got.arrays().values(), want.arrays().values()))
    assert torch.equal(got.to_dense(), dense.to(dtype))


def test_compress_keeps_the_linears_torchs_transformer_reads_directly_dense():
    """torch's MultiheadAttention reads ``out_proj.weight`` itself (in
    F.multi_head_attention_forward, never calling out_proj), and a
    TransformerEncoderLayer's (and TransformerEncoder's) fast path reads
    ``linear1.weight`` and ``linear2.weight``: compress replaced them with
    SparseLinears, which hold no ``weight``, and the compressed model failed
    with an AttributeError when called. Those Linears stay dense, with
    ``chosen`` saying why; every other Linear is compressed, linear1 and
    linear2 too where the layer is not batch_first (torch takes its fast
    path only for a batch_first layer: the others call them as modules);
    the output is the original's, on the fast path (eval, batch_first) and
    off it."""
    torch.manual_seed(0)
    for batch_first in (True, False):
        layer = torch.nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=batch_first)
        model = torch.nn.Sequential(torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False),
                                    torch.nn.Linear(8, 3)).eval()
        for inner in model[0].layers:
            for lin in (inner.self_attn.out_proj, inner.linear1, inner.linear2):
                prune.l1_unstructured(lin, "weight", amount=0.5)
        x = torch.randn(2, 5, 8)
        with torch.no_grad():
            want = model(x)
        for example in (None, x):
            compressed = F.compress(model, "csr", example_input=example)
            assert isinstance(compressed[1], F.SparseLinear)
            for inner in compressed[0].layers:
                kept = [(inner.self_attn.out_proj, "MultiheadAttention reads out_proj.weight")]
                if batch_first:
                    kept += [(inner.linear1, "TransformerEncoderLayer reads linear1.weight"),
                             (inner.linear2, "TransformerEncoderLayer reads linear2.weight")]
                else:  # (no fast path: compressed as every other Linear)
                    assert isinstance(inner.linear1, F.SparseLinear) and isinstance(inner.linear2, F.SparseLinear)
                for lin, read in kept:
                    assert isinstance(lin, torch.nn.Linear) and read in lin.chosen and lin.chosen.startswith("dense")
            with torch.no_grad():
                torch.testing.assert_close(compressed(x), want, atol=1e-5, rtol=1e-5)
        attention = torch.nn.MultiheadAttention(8, 2, batch_first=batch_first).eval()
        with torch.no_grad():
            torch.testing.assert_close(F.compress(attention, "coo")(x, x, x)[0], attention(x, x, x)[0])


def test_a_refused_state_names_the_models_layer_and_training_warns():
    """A model's compressed layer refused a state of another dtype with its
    class alone ("SparseConv3d: _extra_state's offsets have dtype ..."), where
    the refusal of an uncompressed state named the layer; now both do.
    ``model.train()`` warns (once) that a compressed layer's weight, no
    parameter, stays as it is; the layers around it train and its input
    gradient is given."""
    model = F.compress(_pruned_model("csr"), "csr")
    doubled = F.compress(_pruned_model("csr"), "csr").double()
    with pytest.raises(TypeError, match=r"^SparseConv3d '1': _extra_state's offsets have dtype torch.float32; "
                                        r"this conv's are torch.float64"):
        doubled.load_state_dict(model.state_dict())
    with pytest.raises(TypeError, match=r"^SparseLinear '2.fn': _extra_state's weight_format"):
        doubled.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("1.")},
                                strict=False)
    layer = F.compress(_pruned_conv(), "csr")  # (alone: its class, as before)
    with pytest.raises(TypeError, match=r"^SparseConv3d: _extra_state's offsets have dtype"):
        layer.load_state_dict(F.compress(_pruned_conv().double(), "csr").state_dict())

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        model.train()
        model.train()
        model.eval()
    assert len(caught) == 1 and "inference copy: its weight is no parameter" in str(caught[0].message)
    x = _sparse_input(channels=8)
    feats = x.feats.clone().requires_grad_()
    model[1](x.with_feats(feats)).feats.sum().backward()  # (the engine's input gradient)
    assert feats.grad is not None and not list(model[1].parameters())


def test_compressed_linear_on_another_device_than_its_input_is_named():
    """A compressed Linear moved to the meta device (as skip_init and
    ``with torch.device("meta")`` make them) took a CPU input into torch's
    bare "Tensor on device meta is not on the expected device cpu!"."""
    linear = F.compress(torch.nn.Linear(4, 2), "csr").to("meta")
    with pytest.raises(ValueError, match=r"SparseLinear: its weight is on meta but the input on cpu"):
        linear(torch.ones(3, 4))


def test_a_torch_conv_is_refused_alone_and_named_where_a_model_holds_it():
    """compress of a torch Conv1d/2d/3d returned the conv's copy, still
    pruned, with no word (a formats review: torch.nn.Conv3d is easily taken
    for pointsparse.nn.Conv3d). Alone it is a TypeError naming what
    compress converts; in a model, a warning names the convs left dense;
    a model with nothing to convert warns so."""
    import warnings

    import pointsparse.prune as prune
    from pointsparse import formats

    for conv in (torch.nn.Conv1d(4, 8, 3), torch.nn.Conv2d(4, 8, 3), torch.nn.Conv3d(4, 8, 3)):
        prune.l1_unstructured(conv, "weight", 0.5)
        with pytest.raises(TypeError, match=rf"torch.nn.{type(conv).__name__}, a dense conv .* pointsparse.nn.Conv3d"):
            formats.compress(conv)
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8, 2))
    with pytest.warns(UserWarning, match=r"left 1 torch conv layer of the model dense \(0\)"):
        fast = formats.compress(model)
    assert isinstance(fast[2], formats.SparseLinear)  # (the Linear is converted all the same)
    with pytest.warns(UserWarning, match="found no torch.nn.Linear or pointsparse.nn.Conv3d in the Sequential"):
        formats.compress(torch.nn.Sequential(torch.nn.ReLU()))
    sparse = psnn.Conv3d(4, 8, 3)
    prune.l1_unstructured(sparse, "weight", 0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (a model of sparse convs: no word)
        formats.compress(torch.nn.Sequential(sparse))


def test_a_format_assigned_to_a_compressed_layer_runs_on_every_execution():
    """A compressed layer keeps a dense copy of its format's weight (the
    dense / engine execution's): a format assigned after it was made ran in
    the format's product only, and the copy was made anew from it at a
    state_dict round trip, changing the outputs then (a formats review).
    An assigned format is checked and the copy made anew at once."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(8, 6)
    prune.l1_unstructured(linear, "weight", 0.5)
    fast = F.compress(linear, "csr")
    x = torch.randn(5, 8)
    doubled = F.CSR.from_dense(2 * fast.weight_format.to_dense())
    fast.weight_format = doubled
    want = x @ doubled.to_dense().T + fast.bias
    for execution in ("dense", "format"):
        fast.execution = execution
        assert torch.allclose(fast(x), want, atol=1e-5), execution
    with pytest.raises(ValueError, match=r"weight_format has shape \(6, 7\)"):
        fast.weight_format = F.CSR.from_dense(torch.ones(6, 7))
    with pytest.raises(TypeError, match="weight_format has dtype torch.float64"):
        fast.weight_format = F.CSR.from_dense(torch.ones(6, 8, dtype=torch.float64))
    assert fast.weight_format is doubled

    conv = psnn.Conv3d(4, 8, 3)
    prune.l1_unstructured(conv, "weight", 0.7)
    coords = torch.unique(torch.randint(0, 6, (150, 3)), dim=0)
    inp = pointsparse.SparseTensor(torch.randn(len(coords), 4),
                                   torch.cat([torch.zeros(len(coords), 1, dtype=torch.long), coords], 1).int())
    compressed = F.compress(conv, "csr")
    compressed.offsets = [F.CSR.from_dense(2 * f.to_dense()) for f in compressed.offsets]
    reference = psnn.Conv3d(4, 8, 3)
    with torch.no_grad():
        reference.weight.copy_(2 * conv.weight)
    for execution in ("engine", "format"):
        compressed.execution = execution
        assert torch.allclose(compressed(inp).feats, reference(inp).feats, atol=1e-5), execution
    with pytest.raises(ValueError):
        compressed.offsets = compressed.offsets[:-1]
    copy = F.compress(conv, "csr")
    copy.load_state_dict(compressed.state_dict())  # (the round trip gives what the conv ran)
    assert torch.allclose(copy(inp).feats, compressed(inp).feats, atol=1e-6)


def test_compress_execution_pins_every_layer_without_measuring(monkeypatch):
    """Whether a compressed model gives input gradients hung on the
    machine's timings (a layer whose format was measured faster is
    inference-only: a formats review). ``execution=`` pins every layer,
    measuring nothing: "dense" (or "engine") the layer's own computation,
    "format" the format's product."""
    from pointsparse import formats

    torch.manual_seed(0)
    model = torch.nn.Sequential(psnn.Conv3d(4, 8, 3), psnn.ReLU(), psnn.Linear(8, 3)).eval()
    for module in (model[0], model[2].fn):
        prune.l1_unstructured(module, "weight", 0.9)
    coords = torch.unique(torch.randint(0, 6, (150, 3)), dim=0)
    x = pointsparse.SparseTensor(torch.randn(len(coords), 4),
                                 torch.cat([torch.zeros(len(coords), 1, dtype=torch.long), coords], 1).int())
    monkeypatch.setattr(formats, "_interleaved_times", lambda *a, **k: pytest.fail("measured"))
    for given, conv, linear in (("dense", "engine", "dense"), ("engine", "engine", "dense"),
                                ("format", "format", "format")):
        fast = formats.compress(model, "csr", example_input=x, execution=given)
        assert (fast[0].execution, fast[2].fn.execution) == (conv, linear), given
        assert fast[0].chosen == f"{conv} (given)"
        assert torch.allclose(fast(x).feats, model(x).feats, atol=1e-5)
    pinned = formats.compress(model, "csr", example_input=x, execution="dense")
    feats = x.feats.clone().requires_grad_()
    pinned(x.with_feats(feats)).feats.sum().backward()  # (the engine gives input gradients)
    assert feats.grad is not None
    with pytest.raises(ValueError, match="execution must be 'dense'"):
        formats.compress(model, "csr", execution="fast")


def test_compress_warns_where_the_format_takes_more_bytes_than_the_dense_weight():
    """A weight too dense for its format (CSR of an unpruned layer: values
    and column indices) was compressed without a word, the "smaller" model
    bigger than the dense one (a formats review). compress names those
    layers and their bytes; a pruned layer whose format is smaller, none."""
    import pointsparse.prune as prune
    from pointsparse import formats

    torch.manual_seed(0)
    dense = torch.nn.Linear(16, 8)
    with pytest.warns(UserWarning, match=r"in CSR the weight takes more bytes than dense in the layer \((\d+) bytes "
                                         r"against 512\)"):
        fast = formats.compress(dense, "csr")
    stored = fast.weight_format.nbytes()
    assert stored > 512 == dense.weight.numel() * 4
    conv = psnn.Conv3d(4, 8, 3)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), conv, torch.nn.Linear(8, 2))
    prune.l1_unstructured(model[0], "weight", 0.95)
    with pytest.warns(UserWarning, match=r"in CSR .* than dense in 1 \(\d+ bytes against 3456\), 2 \(\d+ bytes "
                                         r"against 64\): it is too dense") as caught:
        formats.compress(model, "csr")
    assert "0 (" not in str(caught[0].message)  # the pruned Linear's CSR is smaller
    prune.l1_unstructured(conv, "weight", 0.9)
    prune.l1_unstructured(model[2], "weight", 0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fast = formats.compress(model, "csr")
    for layer in fast:
        stored, plain = formats._format_bytes(layer)
        assert stored < plain


def test_a_compressed_layers_weight_bytes_leave_its_bias_out():
    """``weight_nbytes()``: the weight's storage alone, ``nbytes()`` that plus the bias (compress's warning
    compared ``nbytes()`` less the bias, which any other state nbytes() came to hold would have thrown off)."""
    for module in (_pruned_conv(), torch.nn.Linear(16, 8)):
        if isinstance(module, torch.nn.Linear):
            prune.l1_unstructured(module, "weight", 0.8)
        layer = F.compress(module, "csr")
        bias = layer.bias.numel() * layer.bias.element_size()
        fmt = layer.weight_format if hasattr(layer, "weight_format") else layer.offsets
        stored = fmt.nbytes() if hasattr(fmt, "nbytes") else sum(f.nbytes() for f in fmt)
        assert layer.weight_nbytes() == stored and layer.nbytes() == stored + bias
