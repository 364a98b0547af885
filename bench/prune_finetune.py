"""mIoU of a channel-pruned MinkUNet against the unpruned one after the same
fine-tuning budget.

    make demo   # writes runs/demo/checkpoint.pt (MinkUNet cr=0.5 on generated streets)
    python bench/prune_finetune.py --checkpoint runs/demo/checkpoint.pt [--ratio 0.5] [--epochs 5] [--quick]

The unpruned model and a pruned copy (every coupled channel group of the
dependency graph kept at ``--ratio``, ranked by ``--criterion``) are both
trained ``--epochs`` more epochs with the run's own options (data, schedule,
held-out validation scenes); the table gives parameters and validation mIoU
after the same budget, and writes bench/results/prune_finetune.md. ``--quick``:
one epoch each, runs in ``--out``-quick, the page in a temporary folder. Without
the checkpoint the script says so and measures nothing."""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from _common import environment, results_path, write_markdown

from pointsparse.models import load_model
from pointsparse.app.channels import finetune, load_state, prune_checkpoint


def _params(path: Path) -> int:
    return sum(p.numel() for p in load_model(path).parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=Path("runs/demo/checkpoint.pt"))
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--criterion", default="l1")
    parser.add_argument("--epochs", type=int, default=None, help="more epochs for each model (default 5, --quick 1)")
    parser.add_argument("--out", type=Path, default=Path("runs/prune-finetune"))
    parser.add_argument("--quick", action="store_true", help="a smoke run: one epoch each, in OUT-quick")
    args = parser.parse_args()
    if not args.checkpoint.is_file():
        print(f"prune_finetune: {args.checkpoint} does not exist (run `make demo` first, or pass --checkpoint); "
              "nothing measured")
        return
    args.epochs = args.epochs or (1 if args.quick else 5)
    if args.quick:
        args.out = args.out.with_name(args.out.name + "-quick")
    state = load_state(args.checkpoint)
    start = state["history"]["val_miou"][-1] if state["history"].get("val_miou") else float("nan")
    rows = []
    for name in ("unpruned", f"keep {args.ratio}"):
        out = args.out / name.replace(" ", "-")
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        if name == "unpruned":
            shutil.copy(args.checkpoint, out / "checkpoint.pt")
            path = out / "checkpoint.pt"
        else:
            path = prune_checkpoint(args.checkpoint, out, args.ratio, criterion=args.criterion)
        t0 = time.perf_counter()
        finetune(path, args.epochs)
        report = json.loads((out / "metrics.json").read_text())
        rows.append((name, _params(path), report["miou"], time.perf_counter() - t0))
        print(f"{name}: mIoU {100 * report['miou']:.1f}% after {args.epochs} more epochs", flush=True)
    base = rows[0][2]
    table = "\n".join(f"| {n} | {p / 1e6:.2f} M | {100 * m:.1f}% | {100 * (m - base):+.1f} | {t:.0f} s |"
                      for n, p, m, t in rows)
    header = "| model | params | val mIoU | vs unpruned (points) | fine-tuning time |\n|---|---|---|---|---|\n"
    summary = (f"Starting point: {args.checkpoint} (epoch {state['epoch']}, validation mIoU {100 * start:.1f}%); "
               f"both models trained {args.epochs} more epochs with the run's options.")
    command = (f"python bench/prune_finetune.py --checkpoint {args.checkpoint} --ratio {args.ratio} "
               f"--criterion {args.criterion} --epochs {args.epochs}" + (" --quick" if args.quick else ""))
    output = results_path("prune_finetune.md", args.quick)
    write_markdown(output, "Pruned vs unpruned MinkUNet after the same fine-tuning budget",
                   command, environment(), [summary, header + table])
    print(header + table)
    print(f"written {output}")


if __name__ == "__main__":
    main()
