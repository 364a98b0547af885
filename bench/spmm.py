"""Sparse weight x dense activation products: pointsparse.formats kernels
against dense ``torch.mm`` and ``torch.sparse`` (CSR, BSR).

Weights of real layer sizes (64 x 64 .. 1024 x 1024) times 1k .. 100k
activation columns at 50% .. 99% sparsity; the break-even sparsity of each
format against dense; 2:4 against dense; storage of every format against its
analytical count; ESE load balance. Correctness is checked before timing.
Writes bench/results/spmm.md and bench/results/spmm_speedup.png (``--quick``:
in a temporary folder unless ``--out`` says where).

    flock /tmp/ps-heavy.lock .venv/bin/python bench/spmm.py [--quick] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__))))
from _common import (enforce_error, environment, folder_arg, interleaved, positive_int,  # noqa: E402
                     results_path)

from pointsparse import _ext  # noqa: E402
from pointsparse import formats as F  # noqa: E402
from pointsparse.formats._storage import bits_for, index_width  # noqa: E402

warnings.filterwarnings("ignore", message=".*Sparse (CSR|BSR) tensor support is in beta.*")


def magnitude_sparse(M, K, sparsity, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(M, K, generator=g)
    k = int(round(sparsity * w.numel()))
    if k:
        thr = w.abs().reshape(-1).kthvalue(k).values
        w[w.abs() <= thr] = 0
    return w


def block_sparse(M, K, sparsity, block=(4, 4), seed=0):
    """Blocks pruned by their L2 norm (the weights a BSR layout is for)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(M, K, generator=g)
    br, bc = block
    norms = w.reshape(M // br, br, K // bc, bc).pow(2).sum((1, 3))
    k = int(round(sparsity * norms.numel()))
    if k:
        thr = norms.reshape(-1).kthvalue(k).values
        keep = (norms > thr).repeat_interleave(br, 0).repeat_interleave(bc, 1)
        w = w * keep
    return w


def analytical_nbytes(name, w, fmt):
    """Storage from the formulas in each format's docstring, counted here
    independently of the format code."""
    M, K = w.shape
    nz = w != 0
    nnz = int(nz.sum())
    item = w.element_size()
    rows, cols = nz.nonzero(as_tuple=True)
    wmax = lambda v: index_width(int(v))  # noqa: E731
    if name == "CSR":
        return nnz * item + nnz * wmax(cols.max() if nnz else 0) + (M + 1) * wmax(nnz)
    if name == "CSC":
        return nnz * item + nnz * wmax(rows.max() if nnz else 0) + (K + 1) * wmax(nnz)
    if name == "COO":
        return nnz * item + nnz * (wmax(rows.max() if nnz else 0) + wmax(cols.max() if nnz else 0))
    if name == "BSR":
        br, bc = fmt.blocksize
        blocks = nz.reshape(M // br, br, K // bc, bc).any(3).any(1)
        nb = int(blocks.sum())
        bcols = blocks.nonzero()[:, 1]
        return nb * br * bc * item + nb * wmax(bcols.max() if nb else 0) + (M // br + 1) * wmax(nb)
    if name == "NM":
        L = (K // fmt.m) * fmt.n + min(fmt.n, K % fmt.m)
        return M * L * item + (M * L * bits_for(fmt.m) + 7) // 8
    if name == "EIE":
        P = fmt.num_pe
        total, nibble_bytes, col_counts = 0, 0, []
        for p in range(P):
            local = nz[p::P]
            e_p = 0
            per_col = []
            for k in range(K):
                r = local[:, k].nonzero().reshape(-1).tolist()
                prev, count = -1, 0
                for x in r:
                    count += (x - prev - 1) // 16 + 1
                    prev = x
                per_col.append(count)
                e_p += count
            total += e_p
            nibble_bytes += (e_p + 1) // 2
            col_counts.append(e_p)
        return total * item + nibble_bytes + P * (K + 1) * wmax(max(col_counts))
    raise KeyError(name)


def storage_table(M, K, sparsity):
    w = magnitude_sparse(M, K, sparsity)
    wb = block_sparse(M, K, sparsity)
    w24 = F.NM.from_dense(magnitude_sparse(M, K, 0.0), n=2, m=4, prune=True).to_dense()
    rows = []
    cases = [("COO", w, F.COO.from_dense(w)), ("CSR", w, F.CSR.from_dense(w)),
             ("CSC", w, F.CSC.from_dense(w)), ("BSR", wb, F.BSR.from_dense(wb, blocksize=(4, 4))),
             ("NM", w24, F.NM.from_dense(w24, n=2, m=4)), ("EIE", w, F.EIE.from_dense(w, num_pe=8))]
    for name, weight, fmt in cases:
        analytical = analytical_nbytes(name, weight, fmt)
        rows.append((name, int((weight != 0).sum()), fmt.nbytes(), analytical, fmt.dense_nbytes()))
    fk = F.FKW.from_dense(w)
    rows.append(("FKW", int((w != 0).sum()), fk.nbytes(), None, fk.dense_nbytes()))
    return rows


def check_correct(w, x, fmt):
    ref = w.double() @ x.double()
    out = fmt.matmul(x).double()
    err = float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
    if err > 1e-4:
        raise SystemExit(f"{type(fmt).__name__} product differs from dense by {err:.2e}")


def time_case(M, K, N, sparsity, repeats, with_torch_sparse=True, extra=None):
    """Median seconds of each method on one weight size / sparsity, the
    methods interleaved (_common.interleaved); ``extra``: name -> a call of
    ``x`` (K, N) timed in the same rounds."""
    w = magnitude_sparse(M, K, sparsity)
    wb = block_sparse(M, K, sparsity)
    x = torch.randn(K, N)
    csr = F.CSR.from_dense(w)
    bsr = F.BSR.from_dense(wb, blocksize=(4, 4))
    check_correct(w, x[:, :64].contiguous(), csr)
    check_correct(wb, x[:, :64].contiguous(), bsr)
    fns = {"dense torch.mm": lambda: torch.mm(w, x), "ours CSR": lambda: csr.matmul(x),
           "ours BSR 4x4": lambda: bsr.matmul(x)}
    if with_torch_sparse:
        tcsr = w.to_sparse_csr()
        tbsr = wb.to_sparse_bsr((4, 4))
        fns["torch.sparse CSR"] = lambda: tcsr @ x
        fns["torch.sparse BSR 4x4"] = lambda: tbsr @ x
    for name, fn in (extra or {}).items():
        fns[name] = lambda fn=fn: fn(x)
    return interleaved(fns, repeats)


def break_even(sparsities, ours, dense):
    """Lowest sparsity from which ours is faster than dense (linear
    interpolation of the speedup between measured points)."""
    speed = [d / o for o, d in zip(ours, dense)]
    if speed[0] >= 1:
        return f"<= {sparsities[0]:.0%}"
    for i in range(1, len(speed)):
        if speed[i] >= 1:
            s0, s1, v0, v1 = sparsities[i - 1], sparsities[i], speed[i - 1], speed[i]
            return f"{s0 + (1 - v0) * (s1 - s0) / (v1 - v0):.0%}"
    return f"> {sparsities[-1]:.0%}"


def check_build(case: str, fmt, got, x, columns: int = 64) -> float:
    """max |got - ref| / max |ref| over the first ``columns`` columns of a
    build's product ``got`` (the kernel's output for ``x``), ``ref`` the
    float64 product of the format's weight; a RuntimeError naming ``case``
    above 1e-4 (check_correct's tolerance)."""
    ref = fmt.to_dense().double() @ x[:, :columns].double()
    out = torch.as_tensor(got)[:, :columns].double()
    err = float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
    return enforce_error(case, err, 1e-4, "max |product - float64| / max |float64|")


def isa_builds(repeats):
    """The target case (1024 x 1024 at 90% sparsity x 1024 x 4096; N:M 2:4)
    in each SpMM build this CPU runs, each build's product first checked
    against the float64 product of the format's weight (:func:`check_build`),
    then calls interleaved (_common.interleaved: a warm-up, a new order each
    round) against dense torch.mm in the same rounds: markdown rows."""
    w, x = magnitude_sparse(1024, 1024, 0.9), torch.randn(1024, 4096)
    xn = _ext.to_numpy(x)
    fmts = {"CSR": F.CSR.from_dense(w), "BSR 4x4": F.BSR.from_dense(block_sparse(1024, 1024, 0.9), blocksize=(4, 4)),
            "EIE 4 PEs": F.EIE.from_dense(w, num_pe=4),
            "2:4 (50%)": F.NM.from_dense(magnitude_sparse(1024, 1024, 0.0), n=2, m=4, prune=True)}
    isas = _ext.core.runnable_isas()
    fns = {("dense", "torch.mm"): lambda: torch.mm(w, x)}
    for name, fmt in fmts.items():
        for isa in isas:
            fns[(name, isa)] = lambda fmt=fmt, isa=isa: fmt._kernel(xn, isa)
            check_build(f"{name}, {isa} build", fmt, fns[(name, isa)](), x)
    med = interleaved(fns, repeats)
    dense = med[("dense", "torch.mm")]
    rows = [f"Dense torch.mm in the same rounds: {dense * 1e3:.1f} ms.\n",
            "| format | " + " | ".join(f"{i} ms (x dense)" for i in isas) + " |", "|---|" + "---:|" * len(isas)]
    for name in fmts:
        rows.append(f"| {name} | " + " | ".join(f"{med[(name, i)] * 1e3:.1f} ({dense / med[(name, i)]:.2f}x)"
                                                 for i in isas) + " |")
    return rows


def isa_page(args) -> None:
    """--isa: the target case in each kernel build, written to spmm_isa.md."""
    env = environment()
    env["loadavg"] = " ".join(f"{v:.1f}" for v in os.getloadavg())
    rounds = 2 if args.quick else 7
    rows = ["# SpMM kernel builds\n", f"Command: `{command()}`\n",
            "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()) + "\n",
            f"Medians of {rounds} interleaved rounds (a new order each round, after an untimed call of each), "
            "float32; each build forced through the kernels' `isa` argument, its product first checked against "
            "float64 (within 1e-4 of the largest).\n"] + isa_builds(rounds)
    os.makedirs(args.out, exist_ok=True)
    md = os.path.join(args.out, "spmm_isa.md")
    with open(md, "w") as f:
        f.write("\n".join(rows) + "\n")
    print("\n".join(rows))


def command() -> str:
    """The command line as typed (every option: --out says where the pages went)."""
    return ("flock /tmp/ps-heavy.lock .venv/bin/python bench/spmm.py " + shlex.join(sys.argv[1:])).strip()


def header(args, repeats) -> list[str]:
    env = environment()
    env["spmm_isa"] = F.spmm_isa()
    env["loadavg"] = " ".join(f"{v:.1f}" for v in os.getloadavg())
    return ["# SpMM: sparse weight (M, K) x dense activations (K, N)\n", f"Command: `{command()}`\n",
            "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()) + "\n",
            "Ratios within one run are the comparison; absolute times depend on the machine and its "
            "load (load average above). Times: medians of "
            f"{repeats} runs (each case's methods interleaved, after an untimed call of each), float32, {args.threads} threads.\n"]


def target_section(repeats) -> list[str]:
    """1. The target case: 1024 x 1024 at 90% by every method, and 2:4."""
    print("target case ...", flush=True)
    nm_w = F.NM.from_dense(magnitude_sparse(1024, 1024, 0.0), n=2, m=4, prune=True)
    check_correct(nm_w.to_dense(), torch.randn(1024, 64), nm_w)
    tgt = time_case(1024, 1024, 4096, 0.9, repeats, extra={"ours 2:4 (50%)": nm_w.matmul})
    tgt_nm = tgt.pop("ours 2:4 (50%)")
    d = tgt["dense torch.mm"]
    out = ["## Target: 1024 x 1024 weight at 90% sparsity times 1024 x 4096\n",
           "| method | time (ms) | speedup vs dense | vs torch.sparse CSR |", "|---|---:|---:|---:|"]
    for k, v in tgt.items():
        out.append(f"| {k} | {v * 1e3:.1f} | {d / v:.2f}x | {tgt['torch.sparse CSR'] / v:.2f}x |")
    out.append(f"| ours 2:4 (50%) | {tgt_nm * 1e3:.1f} | {d / tgt_nm:.2f}x | - |\n")
    out.append("BSR rows use block-pruned weights (4 x 4 blocks by L2 norm) at the same sparsity.\n")
    return out


def sweep_grid(quick) -> tuple[list, list, list]:
    """(shapes, columns, sparsities) of the sweep."""
    if quick:
        return [(256, 256), (1024, 1024)], [4096], [0.5, 0.9, 0.99]
    return [(64, 64), (256, 256), (1024, 1024)], [1024, 10240, 102400], [0.5, 0.7, 0.8, 0.9, 0.95, 0.99]


def sweep_repeats(N: int, repeats: int) -> int:
    """Runs a sweep product of ``N`` columns is timed with: fewer above 10240
    columns (the widest take seconds a run)."""
    return max(2, repeats - 4) if N > 10240 else repeats


def sweep_series(M, K, N, sparsities, repeats, out) -> dict:
    """method -> seconds per sparsity of one size; a table row per sparsity appended to ``out``."""
    series = {k: [] for k in ("dense torch.mm", "torch.sparse CSR", "ours CSR",
                              "torch.sparse BSR 4x4", "ours BSR 4x4")}
    for s in sparsities:
        r = time_case(M, K, N, s, sweep_repeats(N, repeats))
        for k in series:
            series[k].append(r[k])
        dd = r["dense torch.mm"]
        out.append(
            f"| {M} x {K} | {N} | {s:.0%} | {dd * 1e3:.2f} | {r['torch.sparse CSR'] * 1e3:.2f} | "
            f"{r['ours CSR'] * 1e3:.2f} ({dd / r['ours CSR']:.1f}x) | "
            f"{r['torch.sparse BSR 4x4'] * 1e3:.2f} | {r['ours BSR 4x4'] * 1e3:.2f} "
            f"({dd / r['ours BSR 4x4']:.1f}x) |")
    return series


def sweep_section(quick, repeats) -> tuple[list[str], dict, list]:
    """2. The sweep and each format's break-even sparsity: (lines, curves, sparsities)."""
    shapes, columns, sparsities = sweep_grid(quick)
    wide = sorted({N for N in columns if sweep_repeats(N, repeats) != repeats})
    out = ["## Sweep (ms; speedup of ours against dense in brackets)\n",
           f"Times: medians of {repeats} runs" + (f"; N = {', '.join(map(str, wide))}: medians of "
                                                  f"{sweep_repeats(wide[0], repeats)} runs" if wide else "") + ".\n",
           "| M x K | N | sparsity | dense | torch CSR | ours CSR | torch BSR | ours BSR |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
    curves = {}
    be_rows = []
    for M, K in shapes:
        for N in columns:
            if M * N > 1024 * 10240 * 2 and M >= 1024:
                continue  # 1024 x 100k: too long for a few-minute bench
            print(f"sweep {M}x{K} N={N} ...", flush=True)
            series = curves[(M, K, N)] = sweep_series(M, K, N, sparsities, repeats, out)
            be_rows.append((M, K, N, *(break_even(sparsities, series[k], series["dense torch.mm"])
                                      for k in ("ours CSR", "ours BSR 4x4", "torch.sparse CSR",
                                                "torch.sparse BSR 4x4"))))
    out += ["", "## Break-even sparsity (faster than dense torch.mm from)\n",
            "| M x K | N | ours CSR | ours BSR 4x4 | torch CSR | torch BSR 4x4 |", "|---|---:|---:|---:|---:|---:|"]
    for row in be_rows:
        out.append(f"| {row[0]} x {row[1]} | {row[2]} | " + " | ".join(row[3:]) + " |")
    out.append("")
    return out, curves, sparsities


def nm_section(quick, repeats) -> list[str]:
    """3. 2:4 against dense."""
    print("2:4 ...", flush=True)
    out = ["## 2:4 (N:M, 50%) against dense\n",
           "| M x K | N | dense (ms) | ours 2:4 (ms) | speedup | storage vs dense fp32 |", "|---|---:|---:|---:|---:|---:|"]
    for M, K, N in [(256, 256, 10240), (1024, 1024, 4096)] + ([] if quick else [(64, 64, 102400)]):
        w = F.NM.from_dense(torch.randn(M, K), prune=True)
        x = torch.randn(K, N)
        wd = w.to_dense()
        check_correct(wd, x[:, :64].contiguous(), w)
        med = interleaved({"dense": lambda: torch.mm(wd, x), "ours 2:4": lambda: w.matmul(x)}, repeats)
        td, tn = med["dense"], med["ours 2:4"]
        out.append(f"| {M} x {K} | {N} | {td * 1e3:.2f} | {tn * 1e3:.2f} | {td / tn:.2f}x | "
                   f"{w.nbytes() / w.dense_nbytes():.3f} |")
    out.append("")
    return out


def storage_section() -> list[str]:
    """4. Every format's nbytes() against its analytical count."""
    print("storage ...", flush=True)
    out = ["## Storage of a 1024 x 1024 float32 weight at 90% sparsity, NM at 2:4 (bytes)\n",
           "`nbytes()` against the count from each format's formula, computed independently "
           "in this script (BSR on a 4 x 4 block-pruned weight, NM on a dense weight pruned "
           "to 2:4 (50%), EIE with 8 PEs).\n", "| format | nonzeros | nbytes() | analytical | of dense |",
           "|---|---:|---:|---:|---:|"]
    for name, nnz, nb, an, dn in storage_table(1024, 1024, 0.9):
        ok = "" if an is None or an == nb else " MISMATCH"
        out.append(f"| {name} | {nnz} | {nb} | {'-' if an is None else an}{ok} | {nb / dn:.3f} |")
    out.append("\nFKW's count is checked by hand in tests/test_formats.py (pattern tables "
               "are not recomputed here).\n")
    return out


def balance_section() -> list[str]:
    """5. ESE load balance: magnitude against load-balanced pruning."""
    print("load balance ...", flush=True)
    out = ["## Load balance over P row-interleaved PEs (ESE), 1024 x 1024 at 90% sparsity\n",
           "Weights with a per-row scale (log-normal, sigma 0.5) as trained layers have; "
           "imbalance = max PE nonzeros / mean PE nonzeros.\n", "| P | magnitude pruning | load-balanced pruning |",
           "|---:|---:|---:|"]
    from torch.nn.utils import prune as tprune
    g = torch.Generator().manual_seed(3)
    base = torch.randn(1024, 1024, generator=g) * torch.exp(0.5 * torch.randn(1024, 1, generator=g))
    for P in (4, 16, 64):
        a, b = torch.nn.Linear(1024, 1024), torch.nn.Linear(1024, 1024)
        with torch.no_grad():
            a.weight.copy_(base)
            b.weight.copy_(base)
        tprune.l1_unstructured(a, "weight", amount=0.9)
        F.load_balanced_unstructured(b, "weight", amount=0.9, num_pe=P)
        out.append(f"| {P} | {F.imbalance(a.weight, P):.3f} | {F.imbalance(b.weight, P):.3f} |")
    out.append("")
    return out


def plot_speedup(curves, sparsities, png) -> str:
    """Speed-up against dense over sparsity, one panel per size: the page's line about it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "(matplotlib missing: no plot)\n"
    fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 3.5), squeeze=False)
    for ax, ((M, K, N), series) in zip(axes[0], curves.items()):
        dense = series["dense torch.mm"]
        for k, v in series.items():
            if k != "dense torch.mm":
                ax.plot([s * 100 for s in sparsities], [d / t for d, t in zip(dense, v)],
                        marker="o", label=k)
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_yscale("log")
        ax.set_title(f"{M}x{K} @ {K}x{N}")
        ax.set_xlabel("sparsity (%)")
        ax.set_ylabel("speedup vs dense torch.mm")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    return f"Plot: `{os.path.basename(png)}` (speedup against dense over sparsity).\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    ap.add_argument("--threads", type=positive_int, default=2)
    ap.add_argument("--out", type=folder_arg, default=None,
                    help="folder for the pages (default bench/results; --quick: a temporary one)")
    ap.add_argument("--isa", action="store_true",
                    help="only the target case in each kernel build (avx512 / avx2 / generic): spmm_isa.md")
    args = ap.parse_args()
    args.out = args.out or str(results_path("spmm.md", args.quick).parent)
    torch.set_num_threads(args.threads)
    if args.isa:
        isa_page(args)
        return
    repeats = 3 if args.quick else 7
    out = header(args, repeats) + target_section(repeats)
    sweep, curves, sparsities = sweep_section(args.quick, repeats)
    out += sweep + nm_section(args.quick, repeats) + storage_section() + balance_section()
    os.makedirs(args.out, exist_ok=True)
    md = os.path.join(args.out, "spmm.md")
    out.append(plot_speedup(curves, sparsities, os.path.join(args.out, "spmm_speedup.png")))
    with open(md, "w") as f:
        f.write("\n".join(out) + "\n")
    print("\n".join(out))
    print(f"wrote {md}")

if __name__ == "__main__":
    main()
