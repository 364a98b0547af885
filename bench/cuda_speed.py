"""The path for any device (torch ops) on a CUDA GPU: MinkUNet(4, 19, cr)
on a generated street of about 85k voxels at 0.05 m (the north star's size),
timed on the GPU against the same model on this machine's CPU cores (the C++
core), with the GPU's logits checked against the CPU's.

    python bench/cuda_speed.py [--rounds 7] [--cr 1.0 0.5] [--voxels 85000] [--out FILE.md] [--quick]

Without a CUDA device it says so and exits 0 (skipped), unless ``--device
cpu`` (the torch path timed on this CPU). ``--quick``: 20k voxels, cr 0.25,
2 rounds (1 on the CPU), where those options are not given.

Rows, each from the voxels' coords and feats (every kernel map built inside
the call, no gradients unless named): the float32 forward, the same with the
maps cached (the network alone), the forward under
``torch.autocast("cuda", torch.bfloat16)``, a float32 training step (forward,
loss, backward), and one submanifold k3 kernel map alone; "per-offset loop":
the torch path's conv as ``nn.reference.conv_sum`` (a gather, product and
scatter per offset) instead of one product of scattered columns
(``conv_gemm``, what runs on a GPU where the columns fit). GPU times are wall
times around ``torch.cuda.synchronize()``; medians of interleaved rounds.
The CPU columns run at ``--threads`` threads. Seeded random weights; the
difference column is the largest logit difference over the largest logit,
float32 GPU against float32 CPU (core), and the share of voxels whose argmax
agrees."""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pointsparse as ps  # noqa: E402
from pointsparse import kmap as km  # noqa: E402
from pointsparse.models import MinkUNet  # noqa: E402
from pointsparse.nn import reference  # noqa: E402
from _common import environment, page_arg, positive_int, quick_defaults, street_scene, write_markdown  # noqa: E402


def _timed(fns: dict, rounds: int, sync) -> dict:
    for fn in fns.values():
        fn()
    sync()
    times = {name: [] for name in fns}
    order = np.random.default_rng(0)
    names = list(fns)
    for _ in range(rounds):
        for i in order.permutation(len(names)):
            sync()
            t0 = time.perf_counter()
            fns[names[i]]()
            sync()
            times[names[i]].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in times.items()}


def _jobs(net, coords, feats, labels, policy="auto"):
    """The timed calls; ``policy`` the backend they run under ("torch": the
    path for any device, on the CPU too)."""
    def tensor():
        return ps.SparseTensor(feats, coords)  # a fresh cache: every map built in the call

    cached = tensor()

    def forward():
        with torch.no_grad():
            return net(tensor()).feats

    def forward_cached():  # the network alone: every map in the tensor's cache since the warm-up
        with torch.no_grad():
            return net(cached).feats

    def per_offset(fn):  # the torch path's per-offset loop instead of one product of columns
        def run():
            limit = reference.GEMM_COLUMN_BYTES
            reference.GEMM_COLUMN_BYTES = -1
            try:
                return fn()
            finally:
                reference.GEMM_COLUMN_BYTES = limit
        return run

    def autocast():
        with torch.no_grad(), torch.autocast(coords.device.type, torch.bfloat16):
            return net(tensor()).feats

    def step():
        net.zero_grad(set_to_none=True)
        out = net(tensor()).feats
        torch.nn.functional.cross_entropy(out, labels).backward()

    def kmap():
        return km.build(coords, 3)

    def under(fn):
        def run():
            with ps.backend(policy):
                return fn()
        return run

    return {name: under(fn) for name, fn in (
        ("forward float32", forward), ("forward float32, maps cached", forward_cached),
        ("forward float32, per-offset loop", per_offset(forward)), ("forward bf16 autocast", autocast),
        ("train step float32", step), ("train step float32, per-offset loop", per_offset(step)),
        ("kernel map k3", kmap))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=positive_int, default=None, help="default 7 (--quick: 2)")
    parser.add_argument("--cr", type=float, nargs="+", default=None, help="default 1.0 0.5 (--quick: 0.25)")
    parser.add_argument("--voxels", type=int, default=None, help="default 85000 (--quick: 20000)")
    parser.add_argument("--threads", type=positive_int, default=2, help="CPU threads for the CPU columns (default 2)")
    parser.add_argument("--cpu-rounds", type=positive_int, default=None, help="default 3 (--quick: 1)")
    parser.add_argument("--out", type=page_arg, default=None, help="markdown file for the table")
    parser.add_argument("--device", default="cuda",
                        help="the device timed (default cuda; cpu times the torch path on this CPU)")
    parser.add_argument("--quick", action="store_true",
                        help="20k voxels, cr 0.25, 2 rounds (1 on the CPU) unless given: a check that it runs")
    args = parser.parse_args(argv)
    quick_defaults(args, voxels=(85_000, 20_000), cr=([1.0, 0.5], [0.25]), rounds=(7, 2), cpu_rounds=(3, 1))
    gpu = torch.device(args.device)
    if gpu.type == "cuda" and not torch.cuda.is_available():
        print("skipped: no CUDA device (--device cpu times the torch path on this CPU)")
        return 0
    torch.set_num_threads(args.threads)
    coords = street_scene(args.voxels)
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(len(coords), 4, generator=g)
    labels = torch.randint(0, 19, (len(coords),), generator=g)
    rows = []
    for cr in args.cr:
        torch.manual_seed(0)
        net = MinkUNet(4, 19, cr=cr, blocks=2)
        for m in net.modules():  # statistics that are not the identity
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2)
        net.eval()
        net_gpu = MinkUNet(4, 19, cr=cr, blocks=2)
        net_gpu.load_state_dict(net.state_dict())
        net_gpu = net_gpu.to(gpu).eval()
        cpu_jobs = _jobs(net, coords, feats, labels)
        gpu_jobs = _jobs(net_gpu, coords.to(gpu), feats.to(gpu), labels.to(gpu), "torch")
        t_gpu = _timed(gpu_jobs, args.rounds, torch.cuda.synchronize if gpu.type == "cuda" else lambda: None)
        t_cpu = _timed({k: cpu_jobs[k] for k in ("forward float32", "forward float32, maps cached", "kernel map k3")},
                       args.cpu_rounds, lambda: None)
        want = cpu_jobs["forward float32"]()
        got = gpu_jobs["forward float32"]().cpu()
        diff = float((got - want).abs().max() / want.abs().max())
        agree = float((got.argmax(1) == want.argmax(1)).double().mean())
        half = gpu_jobs["forward bf16 autocast"]().float().cpu()
        diff_bf16 = float((half - want).abs().max() / want.abs().max())
        agree_bf16 = float((half.argmax(1) == want.argmax(1)).double().mean())
        for name, t in t_gpu.items():
            cpu = t_cpu.get(name)
            extra = ""
            if name == "forward float32":
                extra = f"{diff:.1e}, {agree:.4f}"
            elif name == "forward bf16 autocast":
                extra = f"{diff_bf16:.1e}, {agree_bf16:.4f}"
            rows.append(f"| {cr} | {name} | {t * 1e3:.1f} | " + (f"{cpu * 1e3:.0f}" if cpu else "-") + f" | {extra} |")
        print("\n".join(rows[-len(t_gpu):]), flush=True)
    table = (f"{len(coords)} voxels, MinkUNet(4, 19, cr, blocks=2)\n\n"
             "| cr | job | GPU ms | CPU ms (core) | logits vs CPU float32: max diff / max, argmax agree |\n"
             "| --- | --- | --- | --- | --- |\n" + "\n".join(rows))
    print(table)
    if args.out:
        env = environment()
        env["device"] = torch.cuda.get_device_name() if gpu.type == "cuda" else "this CPU, torch path"
        env["torch"] = torch.__version__
        write_markdown(Path(args.out), "MinkUNet on a CUDA GPU (the torch path)",
                       "python bench/cuda_speed.py " + shlex.join(argv if argv is not None else sys.argv[1:]), env,
                       [table])
    return 0


if __name__ == "__main__":
    sys.exit(main())
