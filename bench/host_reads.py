"""Host reads of tensor values (``item``, ``tolist``, ``bool``, ``int``,
``nonzero``: on a GPU each waits for every queued kernel) in one MinkUNet
forward on the torch path as a GPU runs it (``nn.reference.conv_gemm`` for
the convs; the maps' query is the CPU's too), counted on this CPU by wrapping
those Tensor methods: a repeatable stand-in for a GPU timing where no GPU is
at hand. Reads of CPU tensors the path keeps on the CPU anyway (a map's
``sizes``, the offsets) are counted too and listed apart.

    python bench/host_reads.py [--voxels 20000] [--cr 0.5] [--quick]

Prints the reads per call site, with the maps built in the call and with
them cached (the network alone). Explicit reads only: an op whose output
size depends on the values (unique, bincount) waits on a GPU too, uncounted."""

from __future__ import annotations

import argparse
import collections
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pointsparse as ps  # noqa: E402
from pointsparse.models import MinkUNet  # noqa: E402
from pointsparse.nn import reference  # noqa: E402
from _common import quick_defaults, street_scene  # noqa: E402

READS = ("item", "tolist", "__bool__", "__int__", "__index__", "__float__", "nonzero")
# Reads of CPU tensors on every device: a map's sizes, the kernel offsets (by the line's text).
CPU_READS = ("offsets.tolist()", "offsets.abs().amax(0).tolist()", "self.sizes.tolist()")


def count(fn) -> collections.Counter:
    sites: collections.Counter = collections.Counter()
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def wrap(name):
        original = originals[name]

        def read(self, *args, **kwargs):
            frame = traceback.extract_stack(limit=3)[-2]
            cpu = any(text in (frame.line or "") for text in CPU_READS)
            sites[(Path(frame.filename).name, frame.name, frame.lineno, name, cpu)] += 1
            return original(self, *args, **kwargs)
        return read

    try:
        for name in READS:
            setattr(torch.Tensor, name, wrap(name))
        fn()
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
    return sites


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--voxels", type=int, default=None, help="default 20000 (--quick: 5000)")
    parser.add_argument("--cr", type=float, default=None, help="default 0.5 (--quick: 0.25)")
    parser.add_argument("--quick", action="store_true", help="5k voxels, cr 0.25, where those are not given")
    args = parser.parse_args(argv)
    quick_defaults(args, voxels=(20_000, 5_000), cr=(0.5, 0.25))
    coords = street_scene(args.voxels)
    feats = torch.randn(len(coords), 4, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    net = MinkUNet(4, 19, cr=args.cr).eval()
    conv_torch = reference.conv_torch
    reference.conv_torch = reference.conv_gemm  # what runs on a GPU
    try:
        with ps.backend("torch"), torch.no_grad():
            cached = ps.SparseTensor(feats, coords)
            net(cached)
            for title, make in (("maps built in the call", lambda: ps.SparseTensor(feats, coords)),
                                ("maps cached", lambda: cached)):
                x = make()
                sites = count(lambda: net(x))
                device = {k: v for k, v in sites.items() if not k[4]}
                print(f"{len(coords)} voxels, MinkUNet cr {args.cr}, {title}: {sum(device.values())} host reads "
                      f"of values a GPU holds ({sum(sites.values()) - sum(device.values())} more of CPU tensors)")
                for (file, function, line, how, _), n in sorted(device.items(), key=lambda kv: -kv[1]):
                    print(f"  {n:4d}  {file}:{line} {function} ({how})")
    finally:
        reference.conv_torch = conv_torch
    return 0


if __name__ == "__main__":
    sys.exit(main())
