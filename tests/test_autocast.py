"""torch.autocast on the CPU (bf16, fp16): a sparse conv's output in
autocast's precision however it runs (the C++ core, the torch path, a
torch.compile graph, a float32 torch.export program run under autocast, a
compressed layer's format), as torch's own convs give it, with values within
that precision of the float32 conv of the rounded inputs; the conv operators
follow autocast as an eager conv does, their fake implementations giving the
real dtypes."""

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
from reference import conv_operator_args

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


def _same(got: torch.Tensor, want: torch.Tensor, backend: str) -> None:
    """Eager's bits on the core; on the torch path (eager's products are autocast's, each rounded) within
    bf16."""
    if backend == "torch":
        _close(got, want)
    else:
        assert torch.equal(got, want)


# --- the operators ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_the_conv_operators_follow_autocast_as_an_eager_conv_does(backend):
    """conv and conv_inference called under autocast (an exported program's module, torch.compile's "eager"
    backend, a direct call) took their float32 inputs as given and gave float32, where aten's convs have an
    autocast rule and an eager Conv3d runs in autocast's precision. They now take eager's rule: the feats,
    weight and bias rounded to autocast's precision, bf16 inference on the bf16 kernels, anything else on the
    float32 kernels (or the torch loop) on the rounded values widened, rounded once; the residual added as
    torch adds. Their fake implementations give the real dtypes under autocast too; float64 stays float64
    (autocast casts float32 only); the gradient operators compute in the dtypes they are given."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = _cloud()
    args, g = conv_operator_args(x, 5, seed=1)
    _, weight, bias, _, *pairs, key = args
    pairs = tuple(pairs)
    grad = torch.randn(len(x), 5, generator=g)

    def grads():
        return [ops.conv_input_grad(grad, weight, x.coords, *pairs, key, len(x)),
                ops.conv_weight_grad(x.feats, grad, x.coords, *pairs, key)]

    def eager(add=None, relu=False):
        out = NF.conv3d(x, weight, 3, bias=bias, relu=relu, add=None if add is None else x.with_feats(add))
        return out.feats

    wide = [t.double() for t in args[:3]]
    with BACKENDS[backend]():
        want_grads, want64 = grads(), ops.conv(*wide, *args[3:])
        with torch.autocast("cpu", torch.bfloat16):
            assert all(a.dtype == torch.float32 and torch.equal(a, b) for a, b in zip(grads(), want_grads))
            for add in (None, grad.bfloat16(), grad):
                got, want = ops.conv_inference(*args, add, True), eager(add, True)
                assert got.dtype == want.dtype == (torch.bfloat16 if add is None else add.dtype)
                _same(got, want, backend)
            got, want = ops.conv(*args), eager()
            assert got.dtype == want.dtype == torch.bfloat16
            _same(got, want, backend)
            got = ops.conv(*wide, *args[3:])
            assert got.dtype == torch.float64 and torch.equal(got, want64)
            with FakeTensorMode(allow_non_fake_inputs=True) as mode:
                fake = [mode.from_tensor(t) for t in args[:3]]
                assert ops.conv(*fake, *args[3:]).dtype == torch.bfloat16
                assert ops.conv_inference(*fake, *args[3:], mode.from_tensor(grad), True).dtype == torch.float32
            # with gradients: eager's widened float32 sums, the gradients reaching the float32 leaves
            outs, leaves = [], []
            for call in (lambda f, w, b: ops.conv(f, w, b, *args[3:]),
                         lambda f, w, b: NF.conv3d(x.with_feats(f), w, 3, bias=b).feats):
                leaves.append([t.detach().clone().requires_grad_() for t in args[:3]])
                outs.append(call(*leaves[-1]))
                outs[-1].backward(grad.bfloat16())
    assert outs[0].dtype == outs[1].dtype == torch.bfloat16
    _same(outs[0].detach(), outs[1].detach(), backend)
    for a, b in zip(*leaves):
        assert a.grad.dtype == torch.float32
        _close(a.grad, b.grad)


# --- eager convs -----------------------------------------------------------------------------------------

def _weight(execution: str, c_in: int = 8, c_out: int = 32, seed: int = 0) -> torch.Tensor:
    """A ``(27, c_in, c_out)`` weight the engine runs in ``execution``: every
    offset (``"dense"``), every third offset zero (``"offsets"``: skipped),
    one input channel of each offset (``"vector"``: the vector-sparse
    kernels), in float32 and in the bf16 kernels alike."""
    w = torch.randn(27, c_in, c_out, generator=torch.Generator().manual_seed(seed)) / 4
    if execution == "offsets":
        w[::3] = 0
    elif execution == "vector":
        keep = torch.zeros(27, c_in, 1)
        keep[torch.arange(27), torch.arange(27) % c_in] = 1
        w = w * keep
    return w


def _rounded_conv(conv, x: ps.SparseTensor, low: torch.dtype, grad: torch.Tensor):
    """``[out, feats grad, weight grad, bias grad]`` of ``conv``'s float32 sum
    on its input, weight and bias rounded to ``low`` (what a conv in
    autocast's precision computes, up to the roundings of its sums), for the
    output gradient ``grad`` rounded alike; and the same of their absolute
    values: the bounds of those roundings."""

    def run(feats, weight, bias, grad):
        leaves = [t.detach().requires_grad_() for t in (feats, weight, bias)]
        out = NF.conv3d(x.with_feats(leaves[0]), leaves[1], conv.kernel_size, conv.stride, bias=leaves[2],
                        transposed=conv.transposed)
        out.feats.backward(grad)
        return [out.feats.detach()] + [t.grad for t in leaves]

    rounded = [t.detach().to(low).float() for t in (x.feats, conv.weight, conv.bias, grad)]
    return run(*rounded), run(*(t.abs() for t in rounded))


def _within(got: torch.Tensor, want: torch.Tensor, bound: torch.Tensor, low: torch.dtype, what: str) -> None:
    """``got`` is ``want`` but for roundings to ``low`` of sums bounded by
    ``bound`` (products rounded, the result rounded: two units of ``low``'s
    last place of the bound, at most)."""
    excess = (got.float() - want).abs() - 2 * torch.finfo(low).eps * bound
    assert float(excess.max()) <= 1e-6, f"{what}: off by {float(excess.max())} beyond {low}'s roundings"


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("execution", ["dense", "offsets", "vector"])
def test_a_conv_under_autocast_runs_in_autocasts_precision(low, backend, execution):
    """A float32 Conv3d under torch.autocast gives its output in autocast's precision, as torch's Conv3d does,
    in inference and in training, on the core (its bf16 kernels in bf16 inference, else the float32 kernels on
    the exactly widened values, rounded once) and on the torch path (autocast's products summed in float32):
    the core gave float32 (it ignored autocast) where the torch path gave bf16. Values and gradients within
    autocast's roundings of the float32 conv of the rounded inputs, for a dense weight, whole offsets zero
    and a vector-sparse one (the engine's three executions)."""
    torch.manual_seed(0)
    conv = spnn.Conv3d(8, 32, 3, bias=True)
    with torch.no_grad():
        conv.weight.copy_(_weight(execution))
    x = _cloud(channels=8)
    r = torch.randn(len(x), 32, generator=torch.Generator().manual_seed(5))
    want, bound = _rounded_conv(conv, x, low, r)
    for grad in (False, True):
        conv.zero_grad()
        feats = x.feats.clone().requires_grad_(grad)
        with BACKENDS[backend](), torch.autocast("cpu", low), torch.set_grad_enabled(grad):
            out = conv(x.with_feats(feats)).feats
        assert out.dtype == low, f"grad {grad}: {out.dtype}"
        _within(out, want[0], bound[0], low, f"grad {grad}: output")
        if grad:
            with BACKENDS[backend]():
                out.backward(r.to(low))
            for name, got, w, b in zip(("feats", "weight", "bias"), (feats.grad, conv.weight.grad, conv.bias.grad),
                                       want[1:], bound[1:]):
                assert got.dtype == torch.float32
                _within(got, w, b, low, f"{name} gradient")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grad", [False, True])
def test_a_residual_under_autocast_is_added_as_torch_adds(backend, grad):
    """``relu(conv(x) + add)`` (a residual block's second conv, ``relu`` set) under autocast: the conv in
    autocast's precision and the sum promoted as torch promotes, as torch's conv and add give it: a bf16
    shortcut (an autocast layer's output) a bf16 result, a float32 one (the block's float32 input) float32."""
    torch.manual_seed(1)
    conv = spnn.Conv3d(8, 32, 3, bias=True)
    conv.relu = True
    x = _cloud(channels=8, seed=2)
    y = torch.randn(len(x), 32, generator=torch.Generator().manual_seed(3))
    want, bound = _rounded_conv(conv, x, torch.bfloat16, torch.zeros(len(x), 32))
    for dtype in (torch.bfloat16, torch.float32):
        shortcut = y.to(dtype)
        with BACKENDS[backend](), torch.autocast("cpu", torch.bfloat16), torch.set_grad_enabled(grad):
            out = conv(x, add=x.with_feats(shortcut)).feats
        assert out.dtype == dtype and out.requires_grad == grad
        _within(out, torch.relu(want[0] + shortcut.float()), bound[0] + shortcut.float().abs(), torch.bfloat16,
                f"{dtype} shortcut")


# --- torch.compile ---------------------------------------------------------------------------------------

class _Convs(torch.nn.Module):
    """A submanifold conv with a bias and its ReLU, a strided conv, a
    transposed one back and a residual on the first conv's output."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = spnn.Conv3d(4, 8, 3, bias=True)
        self.stem.relu = True
        self.down = spnn.Conv3d(8, 16, 2, stride=2)
        self.up = spnn.Conv3d(16, 8, 2, stride=2, transposed=True)

    def forward(self, x):
        a = self.stem(x)
        return self.up(self.down(a), add=a)


@pytest.mark.parametrize("backend", [*BACKENDS, "core without AVX512-BF16"])
def test_a_compiled_conv_under_autocast_gives_eager_dtype_values_and_gradients(backend, monkeypatch):
    """Under torch.autocast a compiled conv (fullgraph, dynamic, aot_eager) gave float32: its operator took
    the float32 feats and weight, autocast having no rule for it. It now runs as eager does, in autocast's
    precision: bf16 inference on the bf16 kernels (or, without them, the float32 kernels on the widened
    values), training on the widened values, rounded once (bit for bit eager's on the core; on the torch
    path eager's products are autocast's, rounded each: within bf16), the gradients within bf16 of eager's."""
    if backend == "core without AVX512-BF16":
        backend = "core"
        monkeypatch.setattr(_engine, "bf16_kernels", lambda: False)
        monkeypatch.setattr(_engine, "bf16_forward", None)  # (never called)
    torch.manual_seed(2)
    eager = _Convs()
    twin = copy.deepcopy(eager)
    torch.compiler.reset()
    compiled = torch.compile(twin, fullgraph=True, dynamic=True, backend="aot_eager")
    x = _cloud(300, seed=4)
    for grad in (False, True):
        with BACKENDS[backend](), torch.autocast("cpu", torch.bfloat16), torch.set_grad_enabled(grad):
            got, want = compiled(x), eager(x)
        assert got.feats.dtype == want.feats.dtype == torch.bfloat16, f"grad {grad}"
        assert torch.equal(got.coords, want.coords) and got.stride == want.stride
        if backend == "core":
            assert torch.equal(got.feats, want.feats), f"grad {grad}"
        else:
            _close(got.feats, want.feats)
    r = torch.randn(want.feats.shape, generator=torch.Generator().manual_seed(6)).bfloat16()
    with BACKENDS[backend]():
        got.feats.backward(r)
        want.feats.backward(r)
    for (name, p), q in zip(twin.named_parameters(), eager.parameters()):
        assert p.grad.dtype == torch.float32
        _close(p.grad, q.grad)


@pytest.mark.skipif(not ps._ext.core.conv_bf16(), reason="the CPU has no AVX512-BF16")
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_a_compiled_conv_with_a_kernel_region_under_autocast_is_eagers(backend):
    """A compiled conv applies autocast's rule itself (eager's: bf16 inference of a conv with a kernel region
    on the float32 kernels, on the widened values) and calls its operators with autocast off: the operators'
    own rule, which sees the region only as zeros in the weight, would have rounded the widened values back
    and run the bf16 kernels (other bits), at run time under torch.compile's "eager" backend and while
    tracing under aot_eager."""
    torch.manual_seed(4)
    # (64 channels: with 8 both kernels gave the same bits here)
    conv = spnn.Conv3d(64, 64, 3, bias=True, kernel_region="cross").eval()
    torch.compiler.reset()
    compiled = torch.compile(copy.deepcopy(conv), fullgraph=True, dynamic=True, backend=backend)
    x = _cloud(3000, channels=64, seed=5)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        got, want = compiled(x).feats, conv(x).feats
    assert got.dtype == want.dtype == torch.bfloat16 and torch.equal(got, want)


def _conv_dtypes(model: torch.nn.Module, seen: list):
    """Forward hooks noting each Conv3d's output dtype in ``seen``."""
    return [m.register_forward_hook(lambda m, args, out: seen.append(out.feats.dtype))
            for m in model.modules() if isinstance(m, spnn.Conv3d)]


@pytest.mark.parametrize("name", ["minkunet", "spvcnn"])
def test_models_under_autocast_run_their_convs_in_its_precision_eager_and_compiled(name):
    """MinkUNet and SPVCNN under autocast, eager and compiled (fullgraph, dynamic): every conv's output in
    bf16 (the core's gave float32 in both, the classifier's Linear hiding it in the logits) and the logits
    of both within bf16 of each other."""
    from pointsparse.models import SPVCNN, MinkUNet

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(7)
    points = torch.rand(400, 3, generator=g) * 6
    feats = torch.randn(400, 4, generator=g)
    if name == "minkunet":
        model = MinkUNet(4, 3, cr=0.25, blocks=1).eval()

        def run(points, feats):
            x, _ = ps.voxelize(points, feats, voxel_size=0.5)
            return model(x).feats
    else:
        model = SPVCNN(4, 3, cr=0.125, blocks=1).eval()

        def run(points, feats):
            x, inverse = ps.voxelize(points, feats, voxel_size=0.5)
            return model(x, inverse, points * 2, torch.zeros(len(points), dtype=torch.long))

    torch.compiler.reset()
    compiled = torch.compile(run, fullgraph=True, dynamic=True, backend="eager")
    dtypes = {}
    for how, fn in (("eager", run), ("compiled", compiled)):
        seen = []
        hooks = _conv_dtypes(model, seen)
        try:
            with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
                dtypes[how] = (seen, fn(points, feats))
        finally:
            for hook in hooks:
                hook.remove()
    for how, (seen, logits) in dtypes.items():
        assert seen and set(seen) == {torch.bfloat16}, f"{how}: {seen}"
        assert logits.dtype == torch.bfloat16
    _close(dtypes["compiled"][1], dtypes["eager"][1])


# --- torch.export ----------------------------------------------------------------------------------------

def test_an_export_under_autocast_is_the_float32_program():
    """torch.export takes no ambient autocast into a program (torch's own convs and Linears stay float32 in
    it, autocast applying when the program runs): neither do the convs. Exported under autocast, a model's
    program is the float32 one; rounding its convs to bf16 while tracing (as a compiled graph does) fed
    bf16 feats to the program's float32 Linear, which refused them ("mat1 and mat2 must have the same
    dtype")."""
    from pointsparse import export

    torch.manual_seed(3)
    model = torch.nn.Sequential(spnn.Conv3d(4, 8, 3, bias=True), spnn.BatchNorm(8), spnn.ReLU(),
                                spnn.Linear(8, 3)).eval()
    x = _cloud(300, seed=8)
    want = export.export_model(model, x).module()(x.feats, x.coords)
    with torch.autocast("cpu", torch.bfloat16):
        program = export.export_model(model, x)
    got = program.module()(x.feats, x.coords)
    assert got.dtype == torch.float32 and torch.equal(got, want)


@pytest.fixture(scope="module")
def programs():
    """``{(name, dtype): (model, x, program)}``: :class:`_Convs` (its output a conv's) and a MinkUNet (batch
    norms, residual blocks, its classifier a Linear) in float32 and in float64, a cloud in that dtype and the
    model exported (outside autocast) as a :class:`export.ProgramModel`."""
    from pointsparse import export
    from pointsparse.models import MinkUNet

    out = {}
    for dtype in (torch.float32, torch.float64):
        for name in ("convs", "minkunet"):
            torch.manual_seed(0)
            model = (_Convs() if name == "convs" else MinkUNet(4, 3, cr=0.25, blocks=1)).eval().to(dtype)
            x = _cloud(400, seed=6)
            x = x.with_feats(x.feats.to(dtype))
            with torch.no_grad():
                out[name, dtype] = (model, x, export.ProgramModel(export.export_model(model, x)))
    return out


@pytest.mark.parametrize("name", ["convs", "minkunet"])
@pytest.mark.parametrize("low,backend", [(torch.bfloat16, "core"), (torch.bfloat16, "core without AVX512-BF16"),
                                         (torch.bfloat16, "torch"), (torch.float16, "core"),
                                         (torch.float16, "torch")],
                         ids=["bf16-core", "bf16-core without AVX512-BF16", "bf16-torch", "fp16-core", "fp16-torch"])
def test_an_exported_program_under_autocast_runs_its_convs_as_the_eager_model(programs, name, low, backend,
                                                                              monkeypatch):
    """A float32 program run under autocast ran its convs in float32 (their operators had no autocast rule)
    while torch's convs and Linears in a program follow autocast, and the eager model's convs run in
    autocast's precision: a conv's output was float32 where eager's is bf16, a MinkUNet's logits (bf16 from
    its Linear) other values. The operators now take eager's rule when the program runs: the output in
    autocast's precision and eager's bits on the core (bf16 inference on the bf16 kernels or, without them,
    the float32 kernels on the rounded values; fp16 on the float32 kernels), within autocast's precision on
    the torch path (eager's products are autocast's, each rounded; the program's summed in float32 on the
    rounded values, as a compiled graph's). Outside autocast the program is the float32 one, bit for bit."""
    if backend == "core without AVX512-BF16":
        backend = "core"
        monkeypatch.setattr(_engine, "bf16_kernels", lambda: False)
        monkeypatch.setattr(_engine, "bf16_forward", None)  # (never called)
    model, x, program = programs[name, torch.float32]
    with BACKENDS[backend](), torch.no_grad():
        plain = model(x).feats
        with torch.autocast("cpu", low):
            want, got = model(x).feats, program(x).feats
        again = program(x).feats
    assert got.dtype == want.dtype == low
    if backend == "core":
        assert torch.equal(got, want)
    else:
        _close(got, want, low)
    assert again.dtype == torch.float32 and torch.equal(again, plain)


def test_a_programs_conv_with_a_kernel_region_under_autocast_is_within_bf16_of_eager():
    """A program keeps a kernel region only as zeros in the weight: under autocast its conv runs bf16
    inference on the bf16 kernels, where eager runs a region on the float32 kernels on the widened values
    (the same sums, other roundings): eager's dtype, its values within bf16 (they were float32)."""
    from pointsparse import export

    torch.manual_seed(4)
    conv = spnn.Conv3d(64, 64, 3, bias=True, kernel_region="cross").eval()
    x = _cloud(3000, channels=64, seed=5)
    with torch.no_grad():
        program = export.ProgramModel(export.export_model(conv, x))
        with torch.autocast("cpu", torch.bfloat16):
            got, want = program(x).feats, conv(x).feats
    assert got.dtype == want.dtype == torch.bfloat16
    _close(got, want)


def test_autocast_leaves_a_float64_programs_convs_in_float64(programs):
    """autocast casts float32 only: in one autocast region a float32 program's convs run in bf16 (they ran
    in float32) and the float64 program is the float64 one bit for bit, as the eager float64 model."""
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        outs = {dtype: (programs["convs", dtype][0](programs["convs", dtype][1]).feats,
                        programs["convs", dtype][2](programs["convs", dtype][1]).feats)
                for dtype in (torch.float32, torch.float64)}
    assert outs[torch.float32][1].dtype == torch.bfloat16
    want, got = outs[torch.float64]
    model, x, program = programs["convs", torch.float64]
    with torch.no_grad():
        plain = program(x).feats
    assert got.dtype == want.dtype == torch.float64 and torch.equal(got, want) and torch.equal(got, plain)


# --- compressed layers -----------------------------------------------------------------------------------

FORMATS = [("coo", {}), ("csr", {}), ("csc", {}), ("bsr", {"blocksize": (2, 4)}),
           ("nm", {"n": 2, "m": 4, "prune": True}), ("eie", {"num_pe": 4}), ("fkw", {})]


def _pruned_conv(seed: int = 4) -> spnn.Conv3d:
    """A Conv3d(8, 12) with a bias, pruned 2:4 over the input channels of
    every ``W[o].T`` (then every format holds it, NM too)."""
    from torch.nn.utils import prune

    torch.manual_seed(seed)
    conv = spnn.Conv3d(8, 12, 3, bias=True)
    w = conv.weight.detach()
    mask = torch.stack([F.NM.from_dense(w[o].t(), prune=True).to_dense().t() != 0 for o in range(w.shape[0])])
    prune.custom_from_mask(conv, "weight", mask)
    return conv


@pytest.mark.parametrize("fmt,kwargs", FORMATS)
@pytest.mark.parametrize("execution", ["engine", "format"])
def test_a_compressed_conv_under_autocast_gives_the_dense_modules_dtype(fmt, kwargs, execution):
    """Under autocast a compressed conv gives what the pruned Conv3d gives (its output in bf16), whichever
    format and execution runs it: the format's product gave float32 for CSR (its fused C++ product) and FKW
    and bf16 for the others (their per-offset loop rounded the sum before the bias was added), and a bf16
    input (an autocast layer's output, which the Conv3d takes) was a TypeError. The format's product runs in
    float32 on the values it holds, the result rounded once; the engine execution as the Conv3d. Values
    within bf16 of the float32 sum of the rounded inputs; a residual added as torch adds."""
    conv = _pruned_conv()
    sparse = F.compress(conv, fmt, **kwargs)
    sparse.execution = execution
    x = _cloud(channels=8, seed=9)
    want, bound = _rounded_conv(conv, x, torch.bfloat16, torch.zeros(len(x), 12))
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        dense = conv(x)
        for feats in (x.feats, x.feats.bfloat16()):
            out = sparse(x.with_feats(feats))
            assert out.feats.dtype == dense.feats.dtype == torch.bfloat16, f"{feats.dtype} input"
            assert torch.equal(out.coords, dense.coords) and out.stride == dense.stride
            _within(out.feats, want[0], bound[0], torch.bfloat16, f"{feats.dtype} input")
        shortcut = torch.randn(dense.feats.shape, generator=torch.Generator().manual_seed(2))
        for add in (shortcut.bfloat16(), shortcut):
            got = sparse(x, add=dense.with_feats(add)).feats
            assert got.dtype == conv(x, add=dense.with_feats(add)).feats.dtype == add.dtype
            _within(got, want[0] + add.float(), bound[0] + add.float().abs(), torch.bfloat16, f"{add.dtype} add")


@pytest.mark.parametrize("fmt,kwargs", FORMATS)
def test_a_compressed_linear_under_autocast_gives_torchs_dtype(fmt, kwargs):
    """Under autocast torch's Linear gives bf16 and takes a bf16 input on its float32 weight; the compressed
    one gave float32 and refused a bf16 input (a TypeError), so a compressed model (a MinkUNet's classifier
    after its bf16 convs) failed under autocast. It now gives the Linear's dtype, the product in the format's
    float32, rounded once."""
    from torch.nn.utils import prune

    torch.manual_seed(5)
    lin = torch.nn.Linear(24, 8)
    prune.custom_from_mask(lin, "weight", F.NM.from_dense(lin.weight.detach(), prune=True).to_dense() != 0)
    sparse = F.compress(lin, fmt, **kwargs)
    x = torch.randn(3, 5, 24, generator=torch.Generator().manual_seed(1))
    rounded = [t.detach().bfloat16().float() for t in (x, lin.weight, lin.bias)]
    want = torch.nn.functional.linear(*rounded)
    bound = torch.nn.functional.linear(*(t.abs() for t in rounded))
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        for inp in (x, x.bfloat16()):
            got = sparse(inp)
            assert got.dtype == lin(inp).dtype == torch.bfloat16, f"{inp.dtype} input"
            _within(got, want, bound, torch.bfloat16, f"{inp.dtype} input")


def test_a_compressed_model_runs_under_autocast():
    """A compressed MinkUNet (CSR; its convs on the engine, its classifier the format's product) under
    autocast gives the model's bf16 logits (within bf16: the classifier's product sums in float32); its
    classifier refused the bf16 feats of the convs before it."""
    from pointsparse.models import MinkUNet

    torch.manual_seed(0)
    model = MinkUNet(4, 3, cr=0.25, blocks=1).eval()
    sparse = F.compress(model, "csr")
    x = _cloud(400, seed=6)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        want, got = model(x).feats, sparse(x).feats
    assert got.dtype == want.dtype == torch.bfloat16
    _close(got, want)


_FLOATS = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_cat_under_autocast_promotes_to_the_widest_dtype(low):
    """torch's cat under autocast casts to the widest of its inputs' dtypes, but refuses a 16-bit dtype that is
    not autocast's ("Unexpected floating ScalarType in at::autocast::prioritize"): a bf16 MinkUNet under fp16
    autocast failed at its first skip concatenation. spnn.cat gives the widest dtype (torch's type promotion)
    for every pair: torch's result where its cat takes them, bf16 + fp16 in float32 as torch promotes them
    outside autocast; gradients reach each input in its dtype."""
    x = _cloud(60, channels=3)
    for a in _FLOATS:
        for b in _FLOATS:
            fa = x.feats.to(a, copy=True).requires_grad_()
            fb = torch.randn(len(x), 2).to(b).requires_grad_()
            with torch.autocast("cpu", low):
                try:
                    want = torch.cat([fa, fb], 1)
                except RuntimeError as error:
                    assert "prioritize" in str(error) and {a, b} & ({torch.bfloat16, torch.float16} - {low})
                    want = None
                got = spnn.cat([x.with_feats(fa), x.with_feats(fb)]).feats
            if want is None:  # (torch's promotion outside autocast)
                want = torch.cat([fa, fb], 1)
            assert got.dtype == want.dtype == torch.promote_types(a, b), (a, b)
            assert torch.equal(got, want)
            got.sum().backward()
            assert fa.grad.dtype == a and fb.grad.dtype == b and bool((fa.grad == 1).all() and (fb.grad == 1).all())


def test_a_bf16_minkunet_runs_under_fp16_autocast():
    """A bf16 MinkUNet under fp16 autocast stopped in torch's cat at its first skip. It runs: its convs keep
    the model's bf16 (autocast casts float32 feats only), its skips concatenated in bf16, its classifier, a
    torch Linear, under autocast's rule (fp16 logits), within fp16 of the same model run without autocast."""
    from pointsparse.models import MinkUNet

    torch.manual_seed(0)
    model = MinkUNet(4, 3, cr=0.25, blocks=1).eval().to(torch.bfloat16)
    x = _cloud(400, seed=6)
    x = x.with_feats(x.feats.bfloat16())
    with torch.no_grad():
        want = model(x).feats
        with torch.autocast("cpu", torch.float16):
            got = model(x).feats
    assert want.dtype == torch.bfloat16 and got.dtype == torch.float16
    _close(got, want, torch.bfloat16)


@pytest.mark.parametrize("dtype,low", [(torch.bfloat16, torch.float16), (torch.float16, torch.bfloat16)])
def test_a_16_bit_minkunet_with_voxel_skips_runs_under_the_other_16_bit_autocast(dtype, low):
    """A bf16 MinkUNet whose residual branches are VoxelSkips (models.voxel_skips) under fp16 autocast (and
    an fp16 one under bf16) stopped in torch's index_copy, where VoxelSkip scatters its branch's rows back,
    with a bare "RuntimeError: Unexpected floating ScalarType in at::autocast::prioritize" (autocast's
    index_copy refuses a 16-bit dtype not its own, as its cat does). The scatter, of one dtype, runs as
    outside autocast: the model runs, its skips in its own dtype, its classifier (a torch Linear) under
    autocast's rule, within the model's precision of the same model without autocast."""
    from pointsparse.models import MinkUNet

    torch.manual_seed(0)
    model = MinkUNet(4, 3, cr=0.25, blocks=1).eval()
    for stage in model.fuse:
        for block in stage:
            block.main = spnn.VoxelSkip(block.main, 0.5)
    model = model.to(dtype)
    x = _cloud(400, seed=6)
    x = x.with_feats(x.feats.to(dtype))
    with torch.no_grad():
        want = model(x).feats
        with torch.autocast("cpu", low):
            got = model(x).feats
            skip = spnn.VoxelSkip(spnn.ReLU(), 0.5)
            skipped = skip(x).feats
        plain = skip(x).feats
    assert want.dtype == dtype and got.dtype == low and skipped.dtype == dtype and torch.equal(skipped, plain)
    _close(got, want, torch.bfloat16)


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("model", ["convs", "minkunet", "threshold"])
def test_an_exported_programs_empty_output_under_autocast_has_the_dtype_of_its_other_outputs(model, low):
    """An empty input gives an empty output without running the program (it is traced for two rows and
    up); that output took the dtype of the program's float32 trace, so under autocast a cloud gave bf16
    logits and an empty one float32. It now has the dtype the program gives under the autocast in force
    (and float32 again outside it), read off a run on fake tensors: a run on one row of zeros, as first
    written, let the program's data checks refuse it (a VoxelPrune threshold that keeps no voxel of that row
    raised 'kept no voxel of the 1 it scored' for an input with no voxels, where eager gives an empty
    output: the "threshold" model)."""
    from pointsparse import export
    from pointsparse.models import MinkUNet

    torch.manual_seed(0)
    net = {"convs": _Convs, "minkunet": lambda: MinkUNet(4, 3, cr=0.25, blocks=1),
           "threshold": lambda: torch.nn.Sequential(spnn.Conv3d(4, 8, 3), spnn.VoxelPrune(threshold=0.5),
                                                    spnn.Conv3d(8, 3, 3))}[model]().eval()
    x = _cloud(400, seed=6)
    empty = ps.SparseTensor(x.feats[:0], x.coords[:0])
    with torch.no_grad():
        program = export.ProgramModel(export.export_model(net, x))
        with torch.autocast("cpu", low):
            full, none = program(x), program(empty)
            assert none.feats.dtype == full.feats.dtype == net(x).feats.dtype == net(empty).feats.dtype == low
            assert program(empty).feats.dtype == low  # (the fake run's dtype, kept)
        assert none.feats.shape == (0, full.feats.shape[1]) and torch.equal(full.coords, net(x).coords)
        assert program(empty).feats.dtype == program(x).feats.dtype == torch.float32


def test_an_spvcnn_program_under_autocast_says_it_cannot_run_there():
    """SPVCNN's point branch casts its voxel features to the points' float32: torch.export keeps each
    such cast it traced as a check that the tensor is float32, which a conv output autocast gave in bf16
    fails (torch's bare "RuntimeError: Tensor dtype mismatch", also for an empty input's dtype probe).
    The program now says it cannot run under autocast and what to do; outside autocast it runs."""
    from pointsparse import export
    from pointsparse.models import SPVCNN

    torch.manual_seed(0)
    net = SPVCNN(4, 3, cr=0.25, blocks=1).eval()
    args = export.example_input(4, 0.4, points=True)
    voxels, inverse, points, point_batch = args
    empty = (ps.SparseTensor(voxels.feats[:0], voxels.coords[:0]), inverse[:0], points[:0], point_batch[:0])
    with torch.no_grad():
        program = export.ProgramModel(export.export_model(net, args))
        for call in (args, empty):
            with torch.autocast("cpu", torch.bfloat16), pytest.raises(
                    ValueError, match=r"cannot run under torch.autocast: it casts between dtypes inside .*"
                                      r"pointsparse export --inference bf16"):
                program(*call)
        assert torch.equal(program(*args), net(*args)) and program(*empty).shape == (0, 3)


@pytest.mark.parametrize("dtype,low", [(torch.bfloat16, torch.float16), (torch.float16, torch.bfloat16)])
def test_a_16_bit_program_under_the_other_16_bit_autocast_says_it_cannot_run_there(dtype, low):
    """A bf16 MinkUNet program (``pointsparse export --inference bf16``) run under fp16 autocast (and an
    fp16 one under bf16 autocast) stopped in torch's cat at its first skip with a bare "RuntimeError:
    Unexpected floating ScalarType in at::autocast::prioritize" (the eager model's ``nn.cat`` turns autocast
    off for its cat; the program holds torch's own), for an empty input's dtype probe too. It now says it
    cannot run under that autocast and what to do; outside autocast it runs as the eager model, and so under
    its own precision's autocast a bf16 program (an fp16 one casts inside, its convs widened to the float32
    kernels: refused there by name, as SPVCNN's programs are)."""
    from pointsparse import export
    from pointsparse.models import MinkUNet

    torch.manual_seed(0)
    net = MinkUNet(4, 3, cr=0.25, blocks=1).eval().to(dtype)
    x = _cloud(400, seed=6)
    x = x.with_feats(x.feats.to(dtype))
    empty = ps.SparseTensor(x.feats[:0], x.coords[:0])
    with torch.no_grad():
        program = export.ProgramModel(export.export_model(net, x))
        for call in (x, empty):
            with torch.autocast("cpu", low), pytest.raises(
                    ValueError, match=r"cannot run under torch.autocast.*outside autocast"):
                program(call)
        with torch.autocast("cpu", dtype):
            if dtype == torch.bfloat16:
                assert torch.equal(program(x).feats, net(x).feats)
            else:  # an fp16 conv runs the float32 kernels on its values widened: the program casts inside
                with pytest.raises(ValueError, match="cannot run under torch.autocast: it casts between dtypes"):
                    program(x)
        assert torch.equal(program(x).feats, net(x).feats) and program(empty).feats.shape == (0, 3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,low,scale", [(torch.bfloat16, torch.float16, 3e4), (torch.float16, torch.bfloat16, 1.0)])
def test_a_16_bit_conv_under_the_other_16_bit_autocast_runs_in_its_own_dtype(backend, dtype, low, scale):
    """A bf16 (fp16) conv under fp16 (bf16) autocast keeps its dtype, as its bf16 inference on the core does:
    where it ran on the torch path (training, an fp16 conv, backend "torch") autocast rounded its products'
    operands to its own 16-bit dtype behind the conv's back: a bf16 conv's feats past fp16's 65504 became
    inf (a training step's output inf where the same model under no_grad gave finite values), an fp16
    conv's products took bf16's rounding while its output said fp16. The conv's products now run in its
    dtype: output and gradients those of the conv without autocast, bit for bit."""
    torch.manual_seed(2)
    conv = spnn.Conv3d(8, 16, 3, bias=True).to(dtype)
    x = _cloud(channels=8, seed=3)
    feats = (x.feats * scale).to(dtype)
    r = torch.randn(len(x), 16, generator=torch.Generator().manual_seed(4)).to(dtype)
    outs = []
    for autocast in (False, True):
        conv.zero_grad()
        f = feats.clone().requires_grad_(True)
        with BACKENDS[backend]():
            with torch.autocast("cpu", low, enabled=autocast):
                out = conv(x.with_feats(f)).feats
            out.backward(r)  # (outside autocast, as torch.autocast asks)
        outs.append((out.detach(), f.grad, conv.weight.grad.clone()))
    assert outs[1][0].dtype == dtype and bool(torch.isfinite(outs[1][0]).all())
    for want, got in zip(*outs):
        assert torch.equal(got, want)


def test_a_float16_conv_in_inference_runs_the_float32_kernels_rounded_once():
    """A float16 model under no_grad ran every pair in torch ops (a
    Conv3d(64, 64, 3) 44.6 ms against 2.4 ms with a gradient wanted, a
    MinkUNet 367 ms against 17 ms in float32, AMD EPYC Zen 5), each offset's
    product rounded to float16: it runs the float32 kernels on its values
    widened, rounded once, as in training: the float32 conv's output rounded."""
    from pointsparse.nn import functional

    torch.manual_seed(0)
    conv = ps.nn.Conv3d(8, 16, 3).half()
    x = _cloud(400, seed=3)
    x = x.with_feats(torch.randn(len(x), 8).half())
    with torch.no_grad():
        got = conv(x).feats
        assert functional._conv_path(x.feats, conv.weight, conv.bias, 3) == "bf16 on float32"
        wide = ps.nn.Conv3d(8, 16, 3)
        wide.weight.copy_(conv.weight.float())
        want = wide(x.with_feats(x.feats.float())).feats.half()
    assert got.dtype == torch.float16 and torch.equal(got, want)
