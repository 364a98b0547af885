"""torch.compile and torch.export of MinkUNet against eager (CPU inference).

Eager forward, ``torch.compile(model, fullgraph=True, dynamic=True)``
(inductor) and the ``torch.export`` program (``pointsparse.export``), each
checked against eager first, timed interleaved (median of the repeats), on a
real scan when present and a generated street of another size (the compiled
model must not recompile for it).

``--count-steps``: instead, the bytecode instructions dynamo steps through
to trace a small MinkUNet (``MinkUNet(3, 4, cr=0.25, blocks=1)``, eval,
``fullgraph=True, dynamic=True, backend="eager"``, a 200-row cloud), in all
and by the function that holds them: a count that does not move with the
machine's load (what tracing costs the package's Python; the compile tests
and a user's first call pay it), checked against eager's output."""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

import _common as c
import pointsparse as ps
from pointsparse import export
from pointsparse.models import MinkUNet


def clouds(quick: bool) -> dict[str, ps.SparseTensor]:
    out = {}
    sweeps = c.real_sweeps()
    if "semantickitti/000000" in sweeps:
        out["semantickitti/000000 @ 0.1 m"] = c.real_scene(sweeps["semantickitti/000000"], 0.1)
    out["street @ 0.05 m"] = c.street_scene(8_000 if quick else 30_000)
    g = torch.Generator().manual_seed(0)
    return {k: ps.SparseTensor(torch.randn(len(v), 4, generator=g), v) for k, v in out.items()}


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


TOLERANCE = 1e-4  # max abs diff of the logits against eager


def errors_against_eager(name: str, x, ways: dict) -> dict:
    """Max abs diff of each way's output (but eager's) against eager's on
    ``x``; a RuntimeError naming the cloud and the way where one is above
    TOLERANCE."""
    want = ways["eager"](x)
    return {k: c.enforce_error(f"{name}, {k} against eager", float((f(x) - want).abs().max()), TOLERANCE)
            for k, f in ways.items() if k != "eager"}


def command(argv: list) -> str:
    """The page's Command line: the arguments as given (quoted for a shell)."""
    return "flock /work/bench.lock .venv/bin/python bench/compile.py " + shlex.join(argv)


def count_steps(top: int) -> tuple[int, list[tuple[str, int]]]:
    """Dynamo's bytecode steps to compile the small MinkUNet of the module's
    docstring: the total, and the ``top`` functions holding the most
    (``file:function``, the file relative to the package or torch)."""
    from torch._dynamo import symbolic_convert

    torch.manual_seed(0)
    model = MinkUNet(3, 4, cr=0.25, blocks=1).eval()
    coords = torch.unique(torch.randint(0, 12, (260, 3), generator=torch.Generator().manual_seed(1)), dim=0)[:200]
    coords = torch.cat([torch.zeros(len(coords), 1, dtype=torch.int32), coords.int()], 1)
    x = ps.SparseTensor(torch.randn(len(coords), 3, generator=torch.Generator().manual_seed(2)), coords)
    counts: dict[str, int] = {}
    step = symbolic_convert.InstructionTranslatorBase.step

    def counted(self):
        code = self.f_code
        name = code.co_filename
        for root in (Path(torch.__file__).parent.parent, Path(ps.__file__).parent.parent):
            if name.startswith(str(root)):
                name = name[len(str(root)) + 1:]
                break
        key = f"{name}:{code.co_name}"
        counts[key] = counts.get(key, 0) + 1
        return step(self)

    torch._dynamo.reset()
    symbolic_convert.InstructionTranslatorBase.step = counted
    try:
        with torch.no_grad():
            want = model(x).feats
            got = torch.compile(model, fullgraph=True, dynamic=True, backend="eager")(x).feats
    finally:
        symbolic_convert.InstructionTranslatorBase.step = step
        torch._dynamo.reset()
    c.enforce_error("the compiled small MinkUNet against eager", float((got - want).abs().max()), TOLERANCE)
    return sum(counts.values()), sorted(counts.items(), key=lambda kv: -kv[1])[:top]


def steps_page(args, argv: list) -> None:
    total, top = count_steps(args.top)
    table = ("| function (file:name) | steps | share |\n|---|---|---|\n"
             + "\n".join(f"| `{k}` | {n:,} | {100 * n / total:.1f}% |" for k, n in top)
             + f"\n| **all** | **{total:,}** | 100% |")
    notes = ("Dynamo's `InstructionTranslatorBase.step` calls (one a bytecode instruction traced, inlined functions "
             "included) while `torch.compile(MinkUNet(3, 4, cr=0.25, blocks=1).eval(), fullgraph=True, "
             "dynamic=True, backend=\"eager\")` compiles its first call on a 200-row cloud; the output checked "
             f"against eager (max abs diff <= {TOLERANCE:g}). The count follows the package's Python and torch's "
             "version, not the machine's load.")
    c.write_markdown(Path(args.out), "Dynamo's bytecode steps to compile a small MinkUNet", command(argv),
                     c.environment(), [table], notes)
    print(table)
    print(notes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count-steps", action="store_true",
                    help="count dynamo's bytecode steps to compile a small MinkUNet instead of timing")
    ap.add_argument("--top", type=c.positive_int, default=25, help="--count-steps: functions listed (default 25)")
    ap.add_argument("--quick", action="store_true", help="a smaller street, fewer repeats")
    ap.add_argument("--repeats", type=c.positive_int, default=None)
    ap.add_argument("--threads", type=c.positive_int, default=None, help="torch (and core) threads (default: torch's)")
    ap.add_argument("--out", type=c.page_arg, default=None,
                    help="default bench/results/compile.md (--quick: a temporary folder)")
    args = ap.parse_args()
    args.out = str(c.page_path(args.out, "compile_steps.md" if args.count_steps else "compile.md", args.quick))
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.count_steps:
        steps_page(args, sys.argv[1:])
        return
    repeats = args.repeats or (2 if args.quick else 5)
    torch.manual_seed(0)
    model = MinkUNet(4, 19, cr=0.5).eval()
    inputs = clouds(args.quick)
    first = next(iter(inputs.values()))
    with torch.no_grad():
        compiled = torch.compile(model, fullgraph=True, dynamic=True)
        compile_s, _ = timed(lambda: compiled(first))
        export_s, program = timed(lambda: export.export_model(model, first))
        runner = program.module()
        ways = {"eager": lambda x: model(x).feats, "torch.compile": lambda x: compiled(x).feats,
                "torch.export": lambda x: runner(x.feats, x.coords)}
        rows = []
        with torch._dynamo.config.patch(error_on_recompile=True):
            errors = {name: errors_against_eager(name, x, ways) for name, x in inputs.items()}  # all before timing
            for name, x in inputs.items():
                err = errors[name]
                times = {k: [] for k in ways}
                for _ in range(repeats):  # interleaved
                    for k, f in ways.items():
                        times[k].append(timed(lambda: f(x))[0])
                med = {k: statistics.median(v) for k, v in times.items()}
                rows.append(f"| {name} | {len(x)} | {1e3 * med['eager']:.0f} | {1e3 * med['torch.compile']:.0f} "
                            f"({med['eager'] / med['torch.compile']:.2f}x) | {1e3 * med['torch.export']:.0f} "
                            f"({med['eager'] / med['torch.export']:.2f}x) | {err['torch.compile']:.1e} / "
                            f"{err['torch.export']:.1e} |")
    table = ("| cloud | voxels | eager ms | torch.compile ms (speed-up) | torch.export ms (speed-up) | "
             "max abs diff vs eager (compile / export) |\n|---|---|---|---|---|---|\n" + "\n".join(rows))
    notes = (f"MinkUNet(4, 19, cr=0.5), eval, float32, forward only; median of {repeats} interleaved repeats. "
             f"First call of the compiled model (tracing + inductor): {compile_s:.1f} s; torch.export: "
             f"{export_s:.1f} s. Every output checked against eager before timing (max abs diff <= {TOLERANCE:g}). "
             f"No recompilation for the second cloud (`error_on_recompile`).")
    c.write_markdown(Path(args.out), "torch.compile and torch.export of MinkUNet", command(sys.argv[1:]),
                     c.environment(), [table], notes)
    print(table)
    print(notes)


if __name__ == "__main__":
    main()
