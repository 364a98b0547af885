"""A compressed ``Linear`` against the ``Linear`` it replaces: every
``formats.SparseLinear`` ran its format's product until stop 55, so that
``formats.compress(model)`` made an unpruned classifier (MinkUNet's) several
times slower; it now runs torch's linear on the weight its format holds
unless ``example_input`` measured the format faster.

    flock /work/cpu.lock .venv/bin/python bench/compress_linear.py [--rounds 15] [--threads 2]
        [--parts layers model] [--quick]

Table 1 (``layers``): ``Linear(in, out)`` on one row per voxel of the KITTI
sweep (raw 000049 at 0.05 m; a generated street where absent), the weight
unpruned or with the smallest entries pruned (``l1_unstructured``, made
permanent): torch's Linear, the compressed layer's two executions (CSR and
BSR 4 x 4 products), and what ``compress(..., example_input=rows)`` chose;
times relative to torch's Linear in the same rounds, every output checked
against it first. Table 2 (``model``): a MinkUNet (cr 0.5, 19 classes)
with its convs' vectors 75% pruned, eval, maps cached, on the same sweep:
the model, ``compress(model, "csr")`` as it now runs (its classifier dense),
and the same with the classifier set to its format's product (the old
default); outputs compared first. Medians of interleaved rounds.
"""

from __future__ import annotations

import argparse
import shlex
import sys

import torch

from _common import (environment, interleaved, kitti_or_street, page_arg, page_path, positive_int, quick_defaults,
                     write_markdown)

import pointsparse as ps
from pointsparse import formats, prune

SHAPES = ((96, 19), (256, 256), (64, 64))
AMOUNTS = (0.0, 0.5, 0.9)


def _linear(cin: int, cout: int, amount: float) -> torch.nn.Linear:
    torch.manual_seed(0)
    layer = torch.nn.Linear(cin, cout).eval()
    if amount > 0:
        prune.l1_unstructured(layer, "weight", amount)
        prune.remove(layer, "weight")
    return layer


def _close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    if not torch.allclose(got, want, atol=1e-4, rtol=1e-4):
        raise SystemExit(f"{what}: output differs from torch's Linear by {float((got - want).abs().max()):.3g}")


def layers(rows: int, rounds: int, quick: bool) -> str:
    lines = ["| Linear | pruned | torch's Linear (ms) | dense execution | CSR product | BSR 4x4 product "
             "| compress's choice |", "|---|---|---|---|---|---|---|"]
    for cin, cout in SHAPES[:1] if quick else SHAPES:
        x = torch.randn(rows, cin)
        for amount in AMOUNTS[:2] if quick else AMOUNTS:
            layer = _linear(cin, cout, amount)
            runs = {"torch": layer}
            for fmt, kwargs in (("csr", {}), ("bsr", {"blocksize": (4, 4)})):
                for execution in ("dense", "format"):
                    sparse = formats.compress(layer, fmt, **kwargs)
                    sparse.execution = execution
                    runs[(fmt, execution)] = sparse
            chosen = formats.compress(layer, "csr", example_input=x)
            with torch.no_grad():
                want = layer(x)
                for name, module in runs.items():
                    _close(module(x), want, f"Linear({cin}, {cout}) {amount:.0%} {name}")
            fns = {name: (lambda m=module: m(x)) for name, module in runs.items()}
            with torch.no_grad():
                t = interleaved(fns, rounds)
            base = t["torch"]

            def cell(name):
                return f"{1e3 * t[name]:.2f} ms ({base / t[name]:.2f}x)"

            lines.append(f"| ({cin}, {cout}) | {amount:.0%} | {1e3 * base:.2f} | {cell(('csr', 'dense'))} | "
                         f"{cell(('csr', 'format'))} | {cell(('bsr', 'format'))} | {chosen.execution} |")
    return (f"### Compressed Linear layers on {rows} rows\n\nRatios: torch's Linear time / this time (above 1: "
            "faster). The dense execution with BSR alike (the same torch linear).\n\n" + "\n".join(lines))


def model(coords: torch.Tensor, rounds: int) -> str:
    from pointsparse.models import MinkUNet

    torch.manual_seed(0)
    net = MinkUNet(4, 19, cr=0.5).eval()
    for m in net.modules():
        if isinstance(m, ps.nn.Conv3d) and m.kernel_volume > 1 and min(m.in_channels, m.out_channels) >= 16:
            prune.panel_structured(m, "weight", 0.75)
    x = ps.SparseTensor(torch.randn(len(coords), 4), coords)
    compressed = formats.compress(net, "csr")
    old = formats.compress(net, "csr")
    heads = [m for m in old.modules() if isinstance(m, formats.SparseLinear)]
    for head in heads:
        head.execution = "format"
    with torch.no_grad():
        want = net(x).feats
        for name, m in (("compressed", compressed), ("classifier's format", old)):
            got = m(x).feats
            if not torch.allclose(got, want, atol=1e-3, rtol=1e-3):
                raise SystemExit(f"{name}: output differs from the model's by {float((got - want).abs().max()):.3g}")
        t = interleaved({"model": lambda: net(x), "new": lambda: compressed(x), "old": lambda: old(x)}, rounds)
    base = t["model"]
    return ("### A compressed MinkUNet (cr 0.5, convs' vectors 75%), maps cached\n\n"
            f"{len(heads)} Linear layer(s) in the model.\n\n| run | ms | model's time / this |\n|---|---|---|\n"
            f"| the pruned model | {1e3 * base:.1f} | 1.00x |\n"
            f"| `compress(model, 'csr')`, the classifier dense (now) | {1e3 * t['new']:.1f} | "
            f"{base / t['new']:.2f}x |\n"
            f"| the same, the classifier's CSR product (before) | {1e3 * t['old']:.1f} | {base / t['old']:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=positive_int, default=None, help="default 15 (--quick: 1)")
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--parts", nargs="+", choices=("layers", "model"), default=("layers", "model"))
    parser.add_argument("--quick", action="store_true",
                        help="a generated street, fewer layers, 1 round unless --rounds is given")
    parser.add_argument("--out", type=page_arg, default=None,
                        help="the page (default bench/results/compress_linear.md)")
    args = parser.parse_args()
    quick_defaults(args, rounds=(15, 1))
    torch.set_num_threads(args.threads)
    rounds = args.rounds
    coords, name = kitti_or_street(args.quick)
    tables = [f"Input: {name}, {len(coords)} voxels."]
    if "layers" in args.parts:
        tables.append(layers(len(coords), rounds, args.quick))
    if "model" in args.parts:
        tables.append(model(coords, rounds))
    path = page_path(args.out, "compress_linear.md", args.quick)
    command = "python bench/compress_linear.py " + shlex.join(sys.argv[1:])
    write_markdown(path, "Compressed Linear layers against torch's Linear", command.strip(), environment(), tables)
    print(path.read_text())


if __name__ == "__main__":
    main()
