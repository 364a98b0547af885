"""Memory over a long MinkUNet training loop: the resident set size (RSS)
must stay flat (within 5%) from step 50 to the last step.

    python bench/memory.py [--steps 1000] [--threads 1] [--out PAGE.md] [--quick]

Each step trains on a freshly generated street scene (new coordinates, so new
kernel maps and plans every step, as in real training) with AdamW and the
cross-entropy loss; RSS is read from /proc/self/status every 50 steps and
written to bench/results/memory.md (``--out``: that page; ``--quick``: a
temporary folder)."""

from __future__ import annotations

import argparse
import shlex
import sys
import time

import numpy as np
import torch

from _common import environment, page_arg, page_path, positive_int, write_markdown

import pointsparse as ps
from pointsparse.data import OUTDOOR_CLASSES, outdoor_scene
from pointsparse.models import MinkUNet


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmRSS in /proc/self/status")


def scenes(count: int, voxel_size: float):
    """``count`` generated scenes (cycled through by the loop), voxelised."""
    out = []
    for seed in range(count):
        s = outdoor_scene(seed, beams=32, azimuth_steps=512, max_range=30.0)
        feats = np.concatenate([s.xyz - s.xyz.mean(0), s.intensity], 1).astype(np.float32)
        x, inverse = ps.voxelize(torch.from_numpy(s.xyz), torch.from_numpy(feats), voxel_size=voxel_size)
        labels = torch.from_numpy(s.labels)
        voxel_labels = torch.zeros(len(x), dtype=torch.int64).index_put_((inverse,), labels)
        out.append((x.feats, x.coords, voxel_labels))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps, at least 50: the RSS at step 50 is the baseline "
                             "(default 1000, --quick 120)")
    parser.add_argument("--threads", type=positive_int, default=1)
    parser.add_argument("--cr", type=float, default=0.5)
    parser.add_argument("--voxel-size", type=float, default=0.1)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=page_arg, default=None, help="the page (default bench/results/memory.md)")
    args = parser.parse_args()
    if args.steps is not None and args.steps < 50:
        parser.error(f"--steps: at least 50 (the RSS at step 50 is the baseline the growth is measured from); "
                     f"got {args.steps}")
    steps = args.steps or (120 if args.quick else 1000)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = scenes(8, args.voxel_size)
    model = MinkUNet(4, len(OUTDOOR_CLASSES), cr=args.cr)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    samples, t0 = [], time.perf_counter()
    for step in range(1, steps + 1):
        feats, coords, labels = data[step % len(data)]
        # A new SparseTensor each step: its coordinate cache (maps, plans) is new too.
        out = model(ps.SparseTensor(feats, coords))
        loss = torch.nn.functional.cross_entropy(out.feats, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == 1:
            samples.append((step, rss_mb(), float(loss.detach())))
            print(f"step {step}: RSS {samples[-1][1]:.1f} MB, loss {samples[-1][2]:.3f}", flush=True)
    at50 = next(r for s, r, _ in samples if s >= 50)
    last = samples[-1][1]
    growth = last / at50 - 1.0
    rows = "\n".join(f"| {s} | {r:.1f} | {loss:.3f} |" for s, r, loss in samples)
    voxels = [len(c) for _, c, _ in data]
    summary = (f"MinkUNet cr={args.cr}, generated streets at {args.voxel_size} m, {min(voxels)}-{max(voxels)} "
               f"voxels, AdamW; {time.perf_counter() - t0:.0f} s. RSS at step 50: {at50:.1f} MB; at step "
               f"{samples[-1][0]}: {last:.1f} MB; growth {100 * growth:+.2f}% (target: within 5%)")
    write_markdown(page_path(args.out, "memory.md", args.quick), "Memory over a MinkUNet training loop",
                   "python bench/memory.py " + shlex.join(sys.argv[1:]), environment(),
                   [summary, "| step | RSS (MB) | loss |\n|---|---|---|\n" + rows])
    print(f"RSS {at50:.1f} MB at step 50 -> {last:.1f} MB at step {samples[-1][0]} ({100 * growth:+.2f}%)")


if __name__ == "__main__":
    main()
