"""Instructions per kernel-map build, counted by valgrind's callgrind (a
figure that repeats to the instruction where these machines' timings move
by a quarter), for one or more builds of the extension module.

    python bench/kmap_instructions.py [MODULE.so ...] [--calls 2] [--out PAGE.md] [--quick]

The maps of the north star's first level on the KITTI sweep (000049, 0.05 m;
a generated street of 20k voxels where the dataset is absent): submanifold
k3 (``_core.kmap_mergesort`` and ``kmap_hash``, out coords None) and k2 s2
(``kmap_downsample`` then ``kmap_mergesort`` with those out coords; the
same map as a coordinate cache builds it, ``kmap_parents`` where the module
has it, else the mergesort way as before; and ``kmap_downsample`` alone), and the voxelisation that makes the coords
(``_core.voxelize`` of the sweep's points, mean of 4 features; the
street's voxel centres), one thread. Each case runs in a child under ``valgrind --tool=callgrind`` that
loads the module by its path (numpy alone); a child making no call gives
the set-up's count, and the difference over ``--calls`` is one build's
instructions. Every module's maps must equal this tree's (``pointsparse.kmap``
on the same coords) before they count. With no module: this tree's.
``--time ROUNDS``: the same builds also timed (no valgrind), each in a child
pinned to one CPU (``--cpu``), the children in lockstep round by round.
``--quick``: the generated street, one call (``--calls`` and ``--time`` as
given), this tree's module, the page in a temporary folder. A build of an earlier commit: see bench/ab_builds.py.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from _common import (LOAD_CORE, callgrind_instructions, environment, kitti_or_street, page_arg, page_path,
                     positive_int, quick_defaults, write_markdown)

import pointsparse as ps
from pointsparse import kmap as K

CASES = ("subm k3 mergesort", "subm k3 hash", "k2 s2 mergesort", "k2 s2 cached", "downsample s2", "voxelize")

# One build of a case (the module as `core`, the coords and offsets from the
# .npz at argv[2]), shared by both children.
RUN_CASE = r"""
d = np.load(sys.argv[2])
coords, sub, down = d["coords"], d["offsets_k3"], d["offsets_k2"]


def run(case):
    if case == "subm k3 mergesort":
        return core.kmap_mergesort(coords, None, sub, 1)
    if case == "subm k3 hash":
        return core.kmap_hash(coords, None, sub, 1)
    if case == "downsample s2":
        return (core.kmap_downsample(coords, [2, 2, 2], 1),)
    if case == "voxelize":
        return core.voxelize(d["points"], d["feats"], [0.05] * 3, None, 1, 1)
    if case == "k2 s2 cached" and hasattr(core, "kmap_parents"):
        return core.kmap_parents(coords, [2, 2, 2], [2, 2, 2], None, 1)
    out = core.kmap_downsample(coords, [2, 2, 2], 1)
    return (out,) + tuple(core.kmap_mergesort(coords, out, down, 1))
"""

# The child: `calls` builds of one case on one thread; the last map saved
# for the check.
CHILD = LOAD_CORE + RUN_CASE + r"""
case, calls, out_path = sys.argv[3], int(sys.argv[4]), sys.argv[5]
for _ in range(calls):
    got = run(case)
if calls:
    np.savez(out_path, *got)
"""

# The timed child (--time): pinned to CPU argv[3]; per case name read, one
# build timed; the first build of each case saved (argv[4] + case) for the check.
TIMED_CHILD = LOAD_CORE + RUN_CASE + r"""
import os, time
os.sched_setaffinity(0, {int(sys.argv[3])})
saved = set()
for line in sys.stdin:
    case = line.strip()
    t = time.perf_counter()
    got = run(case)
    t = time.perf_counter() - t
    if case not in saved:
        np.savez(sys.argv[4] + case.replace(" ", "_") + ".npz", *got)
        saved.add(case)
    print(t, flush=True)
"""


def sweep_points(coords, kitti: bool) -> tuple[np.ndarray, np.ndarray]:
    """(points (N, 3), feats (N, 4)) float32 of the voxelize case: the KITTI
    sweep's points and the north star's features (x, y, z / 50, intensity),
    or the generated street's voxel centres at 0.05 m and 4 features."""
    from _common import kitti_path, real_sweeps

    if kitti:
        xyz = real_sweeps()["kitti-raw/000049"]
        intensity = np.fromfile(kitti_path(), dtype=np.float32).reshape(-1, 4)[:, 3:4]
    else:
        xyz = (coords[:, 1:].numpy().astype(np.float32) + 0.5) * 0.05
        intensity = np.linspace(0, 1, len(xyz), dtype=np.float32)[:, None]
    xyz = np.ascontiguousarray(xyz, dtype=np.float32)
    return xyz, np.ascontiguousarray(np.concatenate([xyz / 50, intensity], 1), dtype=np.float32)


def expected(coords, points, feats) -> dict:
    """Each case's arrays from this tree's package (one thread)."""
    sub = K._build(coords, (3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1), method="mergesort")
    down = K._build(coords, (2, 2, 2), (2, 2, 2), (1, 1, 1), (1, 1, 1), method="mergesort")
    m = (sub.in_idx.numpy(), sub.out_idx.numpy(), sub.sizes.numpy())
    return {"subm k3 mergesort": m, "subm k3 hash": m,
            "k2 s2 mergesort": (down.out_coords.numpy(), down.in_idx.numpy(), down.out_idx.numpy(),
                                down.sizes.numpy()),
            "k2 s2 cached": (down.out_coords.numpy(), down.in_idx.numpy(), down.out_idx.numpy(),
                             down.sizes.numpy()),
            "downsample s2": (down.out_coords.numpy(),),
            "voxelize": ps._core.voxelize(points, feats, [0.05] * 3, None, 1, 1)}


def check(so: str, case: str, path: Path, want) -> None:
    with np.load(path) as got:
        arrays = [got[f"arr_{i}"] for i in range(len(got.files))]
    if len(arrays) != len(want) or not all(np.array_equal(a, b) for a, b in zip(arrays, want)):
        raise RuntimeError(f"{so}: {case}: the child's map differs from this tree's")


def count(so: str, data: Path, case: str, calls: int, folder: Path, want) -> int:
    out_path = folder / "out.npz"
    instructions = callgrind_instructions(CHILD, [so, data, case, calls, out_path])
    if calls:
        check(so, case, out_path, want)
    return instructions


def timed(modules: list[str], data: Path, folder: Path, want: dict, rounds: int, cpu: int) -> list[str]:
    """Median ms of each case per module: the modules' children run in
    lockstep (one build each in turn, the order reversed every round), all
    pinned to one CPU, their first maps checked against this tree's."""
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    children = [subprocess.Popen([sys.executable, "-c", TIMED_CHILD, so, str(data), str(cpu), str(folder / f"t{i}_")],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
                for i, so in enumerate(modules)]
    times = {(i, c): [] for i in range(len(modules)) for c in CASES}
    try:
        for r in range(rounds + 1):  # round 0 warms up and checks
            for i in (range(len(modules)) if r % 2 == 0 else reversed(range(len(modules)))):
                for case in CASES:
                    children[i].stdin.write(case + "\n")
                    children[i].stdin.flush()
                    line = children[i].stdout.readline()
                    if not line:
                        raise RuntimeError(f"{modules[i]} stopped (exit {children[i].wait()})")
                    if r == 0:
                        check(modules[i], case, folder / f"t{i}_{case.replace(' ', '_')}.npz", want[case])
                    else:
                        times[i, case].append(float(line))
    finally:
        for child in children:
            child.stdin.close()
            child.wait()
    lines = [f"### The same builds timed in lockstep, one thread on CPU {cpu}, medians of {rounds} rounds: ms "
             "(time / the first module's)", "", "| module | " + " | ".join(CASES) + " |", "|---|" + "---|" * len(CASES)]
    for i, so in enumerate(modules):
        cells = []
        for case in CASES:
            med, base = np.median(times[i, case]) * 1e3, np.median(times[0, case]) * 1e3
            cells.append(f"{med:.2f} ({med / base:.3f})")
        lines.append(f"| {so} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("modules", nargs="*", help="builds of _core (default: this tree's)")
    parser.add_argument("--calls", type=positive_int, default=None, help="default 2 (--quick: 1)")
    parser.add_argument("--out", type=page_arg, default=None, help="default bench/results/kmap_instructions.md")
    parser.add_argument("--time", type=int, default=None, metavar="ROUNDS",
                        help="also time the builds in lockstep over ROUNDS rounds (no valgrind; default 0: not "
                             "timed, --quick too)")
    parser.add_argument("--cpu", type=int, default=max(os.sched_getaffinity(0)),
                        help="the CPU the timed children run on (default: the last this process may use)")
    parser.add_argument("--quick", action="store_true", help="the generated street, 1 call unless --calls is given")
    args = parser.parse_args()
    quick_defaults(args, calls=(2, 1), time=(0, 0))
    if shutil.which("valgrind") is None:
        print("kmap_instructions: valgrind is not installed; nothing measured")
        return
    modules = [str(Path(m).resolve()) for m in args.modules] or [ps._core.__file__]
    calls = args.calls
    coords, where = kitti_or_street(args.quick)
    import torch

    torch.set_num_threads(1)
    points, feats = sweep_points(coords, where.startswith("KITTI"))
    want = expected(coords, points, feats)
    offsets = {"offsets_k3": K._offsets((3, 3, 3), (1, 1, 1), (1, 1, 1)).numpy(),
               "offsets_k2": K._offsets((2, 2, 2), (1, 1, 1), (1, 1, 1)).numpy()}
    lines = [f"### {where} ({len(coords):,} voxels), one thread; instructions per build = (child with {calls} "
             f"calls - child with none) / {calls}", "",
             "| module | " + " | ".join(CASES) + " |", "|---|" + "---|" * len(CASES)]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        data = folder / "case.npz"
        np.savez(data, coords=np.ascontiguousarray(coords.numpy()), points=points, feats=feats, **offsets)
        for so in modules:
            base = count(so, data, CASES[0], 0, folder, None)
            cells = [(count(so, data, case, calls, folder, want[case]) - base) / calls for case in CASES]
            lines.append(f"| {so} | " + " | ".join(f"{c / 1e6:.2f} M" for c in cells) + " |")
            print(lines[-1], flush=True)
        tables = ["\n".join(lines)]
        if args.time > 0:
            tables.append("\n".join(timed(modules, data, folder, want, args.time, args.cpu)))
            print(tables[-1], flush=True)
    path = page_path(args.out, "kmap_instructions.md", args.quick)
    write_markdown(path, "Instructions per kernel-map build (callgrind)",
                   "python bench/kmap_instructions.py " + shlex.join(sys.argv[1:]), environment(), tables)
    print(path.read_text())


if __name__ == "__main__":
    main()
