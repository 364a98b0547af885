"""What a bf16 service's per-site Linear costs in memory and time (the
README's note beside the output pool): torch runs a bf16 ``nn.Linear`` on
the CPU in oneDNN, which keeps memory for each row count it meets, so a
process calling it on sweeps of different sizes grows call after call.

Two parts, both on a ``Linear(C_in, 19)`` (MinkUNet's classifier on the
scene task's classes) in bf16 under ``no_grad``:

- **Memory:** each way in a fresh child process (oneDNN's state is per
  process), ``--calls`` calls on 20k-90k random rows (seeded), its resident
  set size before the first call and after the last: the plain bf16 Linear,
  the same with ``ONEDNN_PRIMITIVE_CACHE_CAPACITY=16`` in the environment,
  the float32 product of the widened values rounded once, and the rows in
  fixed chunks of ``CHUNK`` rows (the last one padded to it: two row counts
  in all).
- **Time:** the same ways interleaved round by round in this process on
  ``--rows`` rows (medians of ``--rounds``), after checking that the chunks
  give the plain Linear's bits and the float32 product its values within
  one bf16 rounding.

    flock /work/cpu.lock .venv/bin/python bench/bf16_linear_memory.py [--channels 24 96] [--rows 90000]
        [--rounds 21] [--calls 1500] [--quick]

``--quick``: C_in 24, 20k rows, 3 rounds, 100 calls, the page in a
temporary folder (where those are not given)."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys

import torch

from _common import (enforce_error, environment, interleaved, page_arg, page_path, positive_int, quick_defaults,
                     write_markdown)

CHUNK = 16384
CLASSES = 19
WAYS = ("bf16", "bf16, cache 16", "float32", "chunks")


def linear_way(way: str):
    """The function ``(linear, x) -> y`` of one way (``"bf16, cache 16"``
    runs as ``"bf16"``: its difference is the child's environment)."""
    def plain(linear, x):
        return linear(x)

    def wide(linear, x):
        return torch.nn.functional.linear(x.float(), linear.weight.float(), linear.bias.float()).to(x.dtype)

    def chunks(linear, x):
        n, outs = x.shape[0], []
        for start in range(0, n, CHUNK):
            part = x[start:start + CHUNK]
            if part.shape[0] < CHUNK:  # (the last chunk padded: one more row count, not one per sweep)
                outs.append(linear(torch.nn.functional.pad(part, (0, 0, 0, CHUNK - part.shape[0])))[:n - start])
            else:
                outs.append(linear(part))
        return torch.cat(outs)

    return {"float32": wide, "chunks": chunks}.get(way, plain)


def resident_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(way: str, channels: int, calls: int) -> dict:
    """One way's memory over ``calls`` calls on 20k-90k rows (run in a child)."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(channels, CLASSES).bfloat16()
    run = linear_way(way)
    sizes = torch.randint(20_000, 90_001, (calls,), generator=torch.Generator().manual_seed(1)).tolist()
    before = resident_mb()
    with torch.no_grad():
        for n in sizes:
            run(linear, torch.randn(n, channels).bfloat16())
    return {"before": before, "after": resident_mb()}


def memory_row(way: str, channels: int, calls: int) -> dict:
    env = dict(os.environ)
    if way == "bf16, cache 16":
        env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = "16"
    proc = subprocess.run([sys.executable, __file__, "--child", way, "--channels", str(channels),
                           "--calls", str(calls)], capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"the child of {way!r} failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def times(channels: int, rows: int, rounds: int) -> dict:
    torch.manual_seed(0)
    linear = torch.nn.Linear(channels, CLASSES).bfloat16()
    x = torch.randn(rows, channels).bfloat16()
    with torch.no_grad():
        ref = linear(x)
        chunked = linear_way("chunks")(linear, x)
        enforce_error(f"chunks, C_in {channels}", (chunked.float() - ref.float()).abs().max().item(), 0.0)
        wide = linear_way("float32")(linear, x)
        # one bf16 rounding apart at most (2**-8 of the larger magnitude), either side's
        bound = float(ref.float().abs().max()) * 2.0 ** -7
        enforce_error(f"float32, C_in {channels}", (wide.float() - ref.float()).abs().max().item(), bound)
        fns = {way: (lambda run=linear_way(way): run(linear, x)) for way in ("bf16", "float32", "chunks")}
        return interleaved(fns, rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=positive_int, nargs="+", default=None,
                        help="the Linear's input channels (default 24 96; --quick: 24)")
    parser.add_argument("--rows", type=positive_int, default=None, help="rows of the timed calls (default 90000; "
                        "--quick: 20000)")
    parser.add_argument("--rounds", type=positive_int, default=None, help="timed rounds (default 21; --quick: 3)")
    parser.add_argument("--calls", type=positive_int, default=None,
                        help="calls of each memory child (default 1500; --quick: 100)")
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--out", type=page_arg, default=None, help="the page (default bench/results/"
                        "bf16_linear_memory.md)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", choices=WAYS, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    quick_defaults(args, channels=([24, 96], [24]), rows=(90_000, 20_000), rounds=(21, 3), calls=(1500, 100))
    torch.set_num_threads(args.threads)
    if args.child is not None:
        print(json.dumps(child(args.child, args.channels[0], args.calls)))
        return
    tables = []
    for channels in args.channels:
        t = times(channels, args.rows, args.rounds)
        mem = {way: memory_row(way, channels, args.calls) for way in WAYS}
        lines = [f"### Linear({channels}, {CLASSES}) in bf16, {args.threads} threads",
                 "",
                 f"| way | ms per call ({args.rows} rows, median of {args.rounds}) | over bf16 | MB before | "
                 f"MB after {args.calls} calls |",
                 "|---|---|---|---|---|"]
        for way in WAYS:
            ms = t.get("bf16" if way == "bf16, cache 16" else way)
            lines.append(f"| {way} | {ms * 1e3:.2f} | {ms / t['bf16']:.2f}x | {mem[way]['before']:.0f} | "
                         f"{mem[way]['after']:.0f} |")
        tables.append("\n".join(lines))
        print(tables[-1])
    out = page_path(args.out, "bf16_linear_memory.md", args.quick)
    write_markdown(out, "A bf16 Linear's memory and time by way of running it",
                   "python bench/bf16_linear_memory.py " + shlex.join(sys.argv[1:]), environment(), tables,
                   "Chunks give the plain bf16 Linear's bits; float32 is within one bf16 rounding of it. "
                   "The 'bf16, cache 16' row's time is the plain row's (the same call; only its child's "
                   "environment differs).")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
