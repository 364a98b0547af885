"""nn.weight_from(source="spconv") against spconv itself.

spconv is never installed by this project. Run this script with a Python
that has spconv 2.x and the torch pointsparse was built for (see
bench/spconv_compare.py), at one thread (spconv's CPU build gives wrong
results at two), e.g.

    flock /work/cpu.lock env PYTHONPATH=$PWD /work/spconv-venv/bin/python bench/spconv_weights.py

Each case gives a spconv module random float64 weights (its own layout,
KRSC), runs it on a random cloud (spconv's indices: ours with the columns in
the order ``axes``), converts the module's weight with weight_from and runs
the pointsparse conv it maps to: the output voxels must be the same and the
values agree (max abs error printed): SubMConv3d (odd kernels, dilation, the
1x1 path), SparseConv3d of kernel_size == stride and its SparseInverseConv3d,
each for axes "xyz" and "zyx". Then: the RSKC / RSCK layouts (spconv 2.0 /
2.1 Native, 1.x), made from the module's weight as spconv defines them,
convert to the same weight; the convs weight_from refuses put their outputs
at other voxels than ours (counts shown) and are refused; and a MinkUNet
written with spconv modules (bench/spconv_compare.py, whose outputs agree
with ours) converts back to its weights exactly. Last, the brute-force
spconv in tests/test_convert.py (the tests' reference, which needs no
spconv) against spconv itself (needs pytest; skipped without). Writes
bench/results/spconv_weights.md (or ``--out``; ``--quick``: a temporary folder). Exits 1
on a mismatch; without spconv it says so and exits 0.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

from _common import environment, page_arg, page_path, write_markdown

import pointsparse as ps  # noqa: E402  (after _common puts the repo on the path)
from pointsparse.nn import weight_from  # noqa: E402

try:
    import spconv.pytorch as spconv  # type: ignore
    from spconv.pytorch import ops as spconv_ops  # type: ignore
    spconv_ops.get_current_stream = lambda: 0  # its CPU backward asks for a CUDA stream otherwise
except Exception:  # noqa: BLE001 - any import failure means "not available"
    spconv = None

TOL = 1e-12


def cloud(seed: int = 0, n: int = 400, extent: int = 12):
    g = torch.Generator().manual_seed(seed)
    c = torch.randint(0, extent, (n, 3), generator=g)
    coords = torch.unique(torch.cat([torch.randint(0, 2, (n, 1), generator=g), c], 1), dim=0).int()
    return coords, torch.randn(len(coords), 3, generator=g, dtype=torch.float64)


def in_frame(coords: torch.Tensor, axes: str) -> torch.Tensor:
    """Our coords (b, x, y, z) as spconv's indices: the batch, then our columns in the order ``axes``."""
    return coords[:, [0] + [1 + "xyz".index(a) for a in axes]].contiguous()


def ours_k(k, axes: str) -> tuple:
    """A triple in spconv's frame put in our x, y, z order."""
    return tuple(k[axes.index(a)] for a in "xyz")


def rows(indices: torch.Tensor, feats: torch.Tensor, scale=(1, 1, 1)) -> dict:
    return {(b, *[v // s for v, s in zip(p, scale)]): f for (b, *p), f in zip(indices.tolist(), feats.detach())}


def compare(theirs: dict, ours: dict) -> tuple[bool, str]:
    if set(theirs) != set(ours):
        return False, f"voxels differ: spconv {len(theirs)}, ours {len(ours)}, shared {len(set(theirs) & set(ours))}"
    err = max(float((theirs[key] - ours[key]).abs().max()) for key in theirs)
    return err <= TOL, f"{len(theirs)} voxels, max abs error {err:.1e}"


def sp_tensor(feats, indices):
    shape = [int(-(-(int(m) + 1) // 16) * 16) for m in indices[:, 1:].max(0).values]
    return spconv.SparseConvTensor(feats, indices, shape, int(indices[:, 0].max()) + 1)


def random_weight(module, seed: int):
    module.weight.data = torch.randn(module.weight.shape, generator=torch.Generator().manual_seed(seed),
                                     dtype=torch.float64)
    return module.double()


def subm_cases(axes_list) -> list[tuple]:
    coords, feats = cloud()
    out = []
    for axes in axes_list:
        idx = in_frame(coords, axes)
        for k, d in (((3, 3, 3), (1, 1, 1)), ((3, 1, 5), (1, 2, 1)), ((5, 3, 1), (2, 1, 1)), ((1, 1, 1), (1, 1, 1))):
            m = random_weight(spconv.SubMConv3d(3, 5, k, dilation=d, bias=False), 1)
            theirs = rows(idx, m(sp_tensor(feats, idx)).features)
            conv = ps.nn.Conv3d(3, 5, ours_k(k, axes), dilation=ours_k(d, axes)).double()
            conv.weight.data = weight_from(m.weight.detach(), k, "spconv", conv="SubMConv3d", dilation=d, axes=axes)
            y = conv(ps.SparseTensor(feats, coords))
            ok, text = compare(theirs, rows(in_frame(y.coords, axes), y.feats))
            out.append((f"SubMConv3d(3, 5, {k}, dilation={d})", axes, ok, text))
    return out


def strided_cases(axes_list) -> list[tuple]:
    coords, feats = cloud(1)
    out = []
    for axes in axes_list:
        idx = in_frame(coords, axes)
        for k in ((2, 2, 2), (2, 1, 2), (1, 2, 2), (1, 1, 1)):
            down = random_weight(spconv.SparseConv3d(3, 4, k, k, bias=False, indice_key="down"), 2)
            y_sp = down(sp_tensor(feats, idx))
            conv = ps.nn.Conv3d(3, 4, ours_k(k, axes), stride=ours_k(k, axes)).double()
            conv.weight.data = weight_from(down.weight.detach(), k, "spconv", conv="SparseConv3d", stride=k, axes=axes)
            y = conv(ps.SparseTensor(feats, coords))
            ok, text = compare(rows(y_sp.indices, y_sp.features), rows(in_frame(y.coords, axes), y.feats, k))
            out.append((f"SparseConv3d(3, 4, {k}, stride={k})", axes, ok, text))
            # the inverse, on new coarse features matched by voxel
            g = torch.Generator().manual_seed(3)
            coarse = torch.randn(len(y_sp.indices), 4, generator=g, dtype=torch.float64)
            at = {key: i for i, key in enumerate(rows(y_sp.indices, coarse))}
            ours_rows = [at[key] for key in rows(in_frame(y.coords, axes), y.feats, k)]
            up = random_weight(spconv.SparseInverseConv3d(4, 5, k, indice_key="down", bias=False), 4)
            z_sp = up(y_sp.replace_feature(coarse))
            t = ps.nn.Conv3d(4, 5, ours_k(k, axes), stride=ours_k(k, axes), transposed=True).double()
            t.weight.data = weight_from(up.weight.detach(), k, "spconv", conv="SparseInverseConv3d", stride=k,
                                        axes=axes)
            z = t(y.with_feats(coarse[ours_rows]))
            ok, text = compare(rows(z_sp.indices, z_sp.features), rows(in_frame(z.coords, axes), z.feats))
            out.append((f"SparseInverseConv3d(4, 5, {k}) of it", axes, ok, text))
    return out


def layout_cases() -> list[tuple]:
    """RSKC (kx, ky, kz, C_out, C_in) and RSCK (kx, ky, kz, C_in, C_out): the
    module's KRSC weight in them (spconv 2.1's ops read filters[i].T /
    filters[i]; 1.x's RSCK filters[i]) converts to what KRSC gives."""
    out = []
    for k in ((3, 3, 3), (3, 1, 5), (2, 2, 2)):
        m = random_weight(spconv.SubMConv3d(3, 5, k, bias=False) if k[0] % 2 else
                          spconv.SparseConv3d(3, 5, k, k, bias=False), 5)
        conv = "SubMConv3d" if k[0] % 2 else "SparseConv3d"
        w = m.weight.detach()
        want = weight_from(w, k, "spconv", conv=conv, stride=1 if k[0] % 2 else k)
        for layout, stored in (("RSKC", w.permute(1, 2, 3, 0, 4)), ("RSCK", w.permute(1, 2, 3, 4, 0))):
            got = weight_from(stored.contiguous(), k, "spconv", conv=conv, stride=1 if k[0] % 2 else k, layout=layout)
            ok = torch.equal(got, want)
            out.append((f"{conv} {k} stored {layout}", "xyz", ok, "equal" if ok else "differs"))
    return out


def refused_cases() -> list[tuple]:
    """spconv's outputs of the convs weight_from refuses, against a pointsparse strided conv's."""
    coords, feats = cloud(2)
    out = []
    for name, k, s, p in (("SparseConv3d", 3, 2, 1), ("SparseConv3d", 3, 1, 1), ("SparseConv3d", 1, 2, 0),
                          ("SparseConvTranspose3d", 2, 2, 0)):
        cls = getattr(spconv, name)
        m = random_weight(cls(3, 4, k, s, p, bias=False), 6)
        theirs = len(m(sp_tensor(feats, coords)).indices)
        x = ps.SparseTensor(feats, coords)
        if name == "SparseConvTranspose3d":  # against ours on the coarse voxels a k2 s2 conv makes
            x = ps.nn.Conv3d(3, 3, 2, 2).double()(x)
            theirs = len(m(sp_tensor(torch.zeros(len(x.coords), 3, dtype=torch.float64),
                                      (x.coords // torch.tensor([1, 2, 2, 2])).int())).indices)
            ours = len(coords)
        else:
            ours = len(ps.nn.Conv3d(3, 4, k, s).double()(x).coords)
        try:
            weight_from(m.weight.detach(), k, "spconv", conv=name, stride=s, padding=p)
            refused = "converted"
        except ValueError:
            refused = "refused"
        ok = refused == "refused" and theirs != ours
        out.append((f"{name}(3, 4, {k}, stride={s}, padding={p})", "xyz", ok,
                    f"spconv {theirs} voxels, a pointsparse conv {ours}: {refused}"))
    return out


def minkunet_case() -> list[tuple]:
    """SpconvMinkUNet carries our MinkUNet's weights in spconv's layout (spconv_compare's spconv_weight, whose
    outputs --part net holds against ours): weight_from of each gives ours back."""
    from spconv_compare import SpconvMinkUNet
    from pointsparse.models.minkunet import MinkUNet

    torch.manual_seed(0)
    model = MinkUNet(4, 5, cr=0.5)
    theirs = SpconvMinkUNet(model)
    ours = [m for m in model.modules() if isinstance(m, ps.nn.Conv3d)]
    sp_convs = [m for m in theirs.modules() if isinstance(m, spconv.conv.SparseConvolution)]
    bad = 0
    for a, b in zip(ours, sp_convs, strict=True):
        conv = type(b).__name__
        got = weight_from(b.weight.detach(), tuple(b.kernel_size), "spconv", conv=conv,
                          stride=tuple(b.kernel_size) if conv != "SubMConv3d" else 1)
        bad += not torch.equal(got, a.weight.detach())
    return [(f"MinkUNet cr=0.5 in spconv modules: {len(ours)} convs", "xyz", bad == 0,
             "all equal to ours" if bad == 0 else f"{bad} differ")]


def reference_cases() -> list[tuple]:
    """tests/test_convert.py's brute-force spconv (which the tests hold weight_from against, without spconv)
    against spconv: the same output voxels and values. Needs pytest (the test module imports it)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    try:
        import test_convert as t
    except ImportError as e:
        return [("tests/test_convert.py's reference", "-", None, f"skipped: {e}")]
    coords, feats = t._cloud()
    out = []
    for axes in ("xyz", "zyx"):
        idx = in_frame(coords, axes)
        for k, d in t._SPCONV_SUBM:
            m = random_weight(spconv.SubMConv3d(3, 5, k, dilation=d, bias=False), 7)
            ok, text = compare(rows(idx, m(sp_tensor(feats, idx)).features),
                               t._spconv_ref(coords, feats, m.weight.detach(), "KRSC", k, axes, dilation=d, subm=True))
            out.append((f"reference: SubMConv3d {k} dilation {d}", axes, ok, text))
        for k in ((2, 2, 2), (2, 1, 2), (1, 2, 2)):
            down = random_weight(spconv.SparseConv3d(3, 4, k, k, bias=False, indice_key="down"), 8)
            y = down(sp_tensor(feats, idx))
            ok, text = compare(rows(y.indices, y.features),
                               t._spconv_ref(coords, feats, down.weight.detach(), "KRSC", k, axes, stride=k))
            out.append((f"reference: SparseConv3d {k} stride {k}", axes, ok, text))
            up = random_weight(spconv.SparseInverseConv3d(4, 5, k, indice_key="down", bias=False), 9)
            coarse = torch.randn(len(y.indices), 4, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
            z = up(y.replace_feature(coarse))
            ok, text = compare(rows(z.indices, z.features),
                               t._spconv_inverse_ref(coords, [tuple(r) for r in y.indices.tolist()], coarse,
                                                     up.weight.detach(), "KRSC", k, axes, stride=k))
            out.append((f"reference: SparseInverseConv3d {k} of it", axes, ok, text))
    idx = in_frame(coords, "xyz")
    for k, s, p, d in ((3, 2, 1, 1), (3, 1, 1, 1), (1, 2, 0, 1), (1, 1, 0, 1), (2, 2, 1, 1), (2, 2, 0, 2),
                       (4, 4, 0, 1)):
        m = random_weight(spconv.SparseConv3d(3, 2, k, s, p, d, bias=False), 11)
        y = m(sp_tensor(feats, idx))
        ok, text = compare(rows(y.indices, y.features),
                           t._spconv_ref(coords, feats, m.weight.detach(), "KRSC", (k,) * 3, stride=(s,) * 3,
                                         padding=(p,) * 3, dilation=(d,) * 3))
        out.append((f"reference: SparseConv3d k{k} s{s} p{p} d{d}", "xyz", ok, text))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="axes 'xyz' only; the page in a temporary folder")
    p.add_argument("--out", type=page_arg, default=None, help="the page (default bench/results/spconv_weights.md)")
    args = p.parse_args(argv)
    if spconv is None:
        print("skipped: spconv is not installed")
        return 0
    torch.set_num_threads(1)  # (spconv's CPU build is wrong at 2 threads)
    axes = ["xyz"] if args.quick else ["xyz", "zyx"]
    results = (subm_cases(axes) + strided_cases(axes) + layout_cases() + refused_cases() + minkunet_case()
               + reference_cases())
    table = ["| case | axes | result | ok |", "|---|---|---|---|"]
    for name, ax, ok, text in results:
        table.append(f"| {name} | {ax} | {text} | {'-' if ok is None else 'yes' if ok else 'NO'} |")
        print(table[-1], flush=True)
    env = environment() | {"spconv": getattr(sys.modules.get("spconv"), "__version__", "?"), "threads": 1}
    cmd = "env PYTHONPATH=$PWD /work/spconv-venv/bin/python " + shlex.join(["bench/spconv_weights.py"] + sys.argv[1:])
    output = page_path(args.out, "spconv_weights.md", args.quick)
    write_markdown(output, "weight_from(source='spconv') against spconv", cmd, env, ["\n".join(table)])
    print(f"written {output}")
    failed = [r[0] for r in results if r[2] is False]
    if failed:
        print("MISMATCH: " + "; ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
