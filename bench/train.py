"""Segmentation training results: mIoU and training step time of MinkUNet on
generated scenes and on real scans (IGN LiDAR HD tiles, SemanticKITTI).

    flock /tmp/ps-heavy.lock .venv/bin/python bench/train.py [--quick] [--only NAME ...] [--threads N]

Each experiment is one ``pointsparse train`` command (printed and recorded);
results go to bench/results/train.md, the PNGs to bench/results/train-*.png
(``--out PAGE.md``: the page there, PAGE.json and the PNGs beside it),
the runs to runs/bench-train/. Real-data experiments are skipped when
../shared/datasets is absent."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
import subprocess
import sys
import time

from _common import ROOT, datasets_dir, environment, page_arg, page_path, positive_int

RUNS = ROOT / "runs" / "bench-train"
#: What the table says for runs recorded before the engine was (the earlier pure-torch path).
PRE_FUSED = "earlier (pure torch)"


def experiments(quick: bool, data) -> list[dict]:
    minutes = (lambda m: 0.5) if quick else (lambda m: m)
    out = [{
        "name": "generated",
        "what": "generated 64-beam street scenes (35 m range): 32 training, 8 held-out scenes",
        "argv": ["--data", "generated", "--scenes", "32", "--val-scenes", "8", "--max-range", "35", "--cr", "0.5",
                 "--voxel-size", "0.2", "--batch-size", "2", "--lr", "4e-3", "--epochs", "200",
                 "--time-budget", str(minutes(10)), "--time-limit", str(minutes(10))],
    }]
    out.append({
        "name": "generated-weighted",
        "what": "the same generated-scene run with the loss weighted by 1/sqrt(class share) "
                "(--class-weights sqrt-inverse)",
        "argv": out[0]["argv"] + ["--class-weights", "sqrt-inverse"],
    })
    if data is None:
        return out
    tiles = data / "ign-lidarhd" / "tiles50m"
    if tiles.is_dir():
        out.append({
            "name": "ign",
            "what": "IGN LiDAR HD: train on the 4 tiles of 77050 and 77055, evaluate on the 2 tiles of 77060 "
                    "(ground, low vegetation, high vegetation, building)",
            "argv": ["--data", str(tiles / "*77050*.npz"), str(tiles / "*77055*.npz"),
                     "--val-data", str(tiles / "*77060*.npz"), "--label-map", "ign-lidarhd", "--cr", "0.5",
                     "--voxel-size", "0.5", "--batch-size", "1", "--lr", "4e-3", "--epochs", "200", "--eval-every", "2",
                     "--time-budget", str(minutes(6)), "--time-limit", str(minutes(6))],
        })
    kitti = data / "semantickitti"
    scan = kitti / "full-scan" / "velodyne" / "000000.bin"
    other = kitti / "open3d-ml-demo" / "points" / "000700.npy"
    if scan.is_file() and other.is_file():
        common = ["--data", str(scan), "--label-map", "semantic-kitti", "--val-data", str(other),
                  "--val-label-map", "semantic-kitti-learning", "--cr", "0.5", "--voxel-size", "0.2",
                  "--batch-size", "1", "--epochs", "300", "--eval-every", "10", "--time-budget", str(minutes(4)),
                  "--time-limit", str(minutes(4))]
        out.append({
            "name": "kitti-finetune",
            "what": "SemanticKITTI: the generated-scene model fine-tuned on one scan (00/000000, raw labels), "
                    "evaluated on another (Open3D-ML demo scan 000700)",
            "argv": common + ["--lr", "2e-3", "--init", str(RUNS / "generated" / "checkpoint.pt")],
            "needs": "generated",
        })
        out.append({
            "name": "kitti-scratch",
            "what": "SemanticKITTI: the same fine-tuning run from random weights (baseline)",
            "argv": common + ["--lr", "4e-3"],
        })
    return out


def run(exp: dict, threads: int | None, folder: Path, collect: bool = False, quick: bool = False) -> dict:
    """Run one experiment (or, with ``collect``, read the run already in
    runs/bench-train) and copy its PNGs to ``folder``, the page's (``quick``:
    the run in runs/bench-train-quick)."""
    out = (RUNS.with_name(RUNS.name + "-quick") if quick else RUNS) / exp["name"]
    argv = [sys.executable, "-m", "pointsparse", "train", *exp["argv"], "--out", str(out), "--no-progress"]
    if threads:
        argv += ["--threads", str(threads)]
    shown = " ".join(a if not a.startswith(str(ROOT)) else a[len(str(ROOT)) + 1:] for a in argv[1:])
    t0 = time.perf_counter()
    if not collect:
        if out.exists():
            shutil.rmtree(out)
        print(f"$ python {shown}", flush=True)
        subprocess.run(argv, check=True, cwd=ROOT)
    report = json.loads((out / "metrics.json").read_text())
    report["command"] = f"python {shown}"
    report["wall_s"] = time.perf_counter() - t0 if not collect else report.get("wall_time_s")
    for name, path in report["pictures"].items():
        dest = folder / f"train-{exp['name']}-{name}.png"
        if Path(path).is_file():
            shutil.copyfile(path, dest)
        elif not (collect and dest.is_file()):  # collecting a run made elsewhere: keep the copy we have
            raise FileNotFoundError(f"{exp['name']}: picture {path} is missing")
        report["pictures"][name] = dest.name
    return report


def write_markdown(results: list[tuple[dict, dict]], env: dict, quick: bool, threads) -> str:
    lines = ["# Segmentation training results (pointsparse train)", "",
             "MinkUNet (cr=0.5, 2 residual blocks per stage) trained with `pointsparse train`; mIoU on points "
             "of held-out clouds (classes absent from a cloud's labels are left out of its mean). "
             "Step time = one optimiser step (forward, backward, update) including voxelisation and "
             "augmentation, median over the run.", "",
             f"Environment: {env}; torch threads per process: {threads or 'default'}."
             + (" **--quick run (tiny budgets): not the results.**" if quick else ""), "",
             "Rows accumulate across `--only` runs: each row's numbers are from the run that produced it "
             "(its metrics.json under runs/bench-train); step times depend on the machine's load.", "",
             "| experiment | mIoU | accuracy | epochs | steps | s/step | scans/step | s/scan | training min | "
             "conv engine | run (UTC) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for exp, r in results:
        lines.append(f"| {exp['name']} | {100 * r['miou']:.1f}% | {100 * r['accuracy']:.1f}% | {r['epochs']} | "
                     f"{r['steps']} | {r['step_time_s_median']:.2f} | {r['scans_per_step']} | "
                     f"{r['step_time_per_scan_s']:.2f} | {r['train_time_s'] / 60:.1f} | "
                     f"{r.get('conv_engine') or PRE_FUSED} | {r.get('environment', {}).get('date', '-')} |")
    got = {exp["name"]: r for exp, r in results}
    lines += ["", "## Notes", ""]
    for name in ("generated", "generated-weighted"):
        if name in got:
            r = got[name]
            verdict = "meets" if r["miou"] >= 0.70 else "falls short of"
            lines.append(f"- `{name}`: {100 * r['miou']:.1f}% mIoU after {r['train_time_s'] / 60:.1f} min of "
                         f"training ({r['steps']} steps of {r['scans_per_step']} scans, "
                         f"{r['threads_per_process']} thread(s)) {verdict} the target of 70% within 10 minutes "
                         "on 2 cores.")
    if "kitti-finetune" in got and "kitti-scratch" in got:
        a, b = got["kitti-finetune"], got["kitti-scratch"]
        lines.append(f"- SemanticKITTI, one training scan, scored on another scan of a different sequence over "
                     f"the classes present there: {100 * a['miou']:.1f}% mIoU from the generated-scene weights vs "
                     f"{100 * b['miou']:.1f}% from random weights with the same budget. One scan is far too "
                     "little data for the 19 classes; the number shows the pipeline end to end, not a benchmark "
                     "score.")
    lines += [f"- `conv engine`: the CPU convolution the run trained with; \"{PRE_FUSED}\" rows ran before the "
              "engine recorded it, with the pure-torch convolution path, and their step times are 2x or more "
              "what the fused engine gives. Re-run all of them with "
              "`flock /tmp/ps-heavy.lock .venv/bin/python bench/train.py --threads 2` (or one with "
              "`--only NAME`; `--collect` rebuilds this page from `runs/bench-train`).",
              "- Each run stops by its time budget: `--time-budget` fits the number of epochs (and so the "
              "cosine schedule) to the budget, re-planned after every epoch; validation time is not counted."]
    for exp, r in results:
        lines += ["", f"## {exp['name']}", "", exp["what"], "", "```", r["command"], "```", "",
                  "| class | IoU | points |", "|---|---|---|"]
        for c in r["classes"]:
            v = r["per_class"][c]
            lines.append(f"| {c} | {'-' if v is None else f'{100 * v:.1f}%'} | {r['points'][c]} |")
        lines += ["", " ".join(f"![{k}]({v})" for k, v in r["pictures"].items())]
    return "\n".join(lines) + "\n"


def conv_engine() -> str:
    """The CPU convolution engine a training run of this checkout uses."""
    from pointsparse import _ext

    return f"fused C++ ({_ext.core.conv_isa()})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="30 s budgets: check that everything runs")
    parser.add_argument("--only", nargs="*", default=None, help="experiment names to run")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--collect", action="store_true",
                        help="do not train: rebuild the results from the runs already in runs/bench-train")
    parser.add_argument("--out", type=page_arg, default=None,
                        help="the page (default bench/results/train.md, --quick train-quick.md in a temporary "
                             "folder); PAGE.json (the rows kept across --only runs) and the PNGs beside it")
    args = parser.parse_args()
    env = environment()
    name = "train-quick" if args.quick else "train"
    page = page_path(args.out, f"{name}.md", args.quick)
    store = page.with_suffix(".json")
    page.parent.mkdir(parents=True, exist_ok=True)
    # Results of earlier invocations (--only reruns some experiments).
    saved = json.loads(store.read_text()) if store.is_file() else {}
    all_exps = experiments(args.quick, datasets_dir())
    unknown = [n for n in args.only or () if n not in {e["name"] for e in all_exps}]
    if unknown:
        parser.error(f"--only: no experiment {', '.join(map(repr, unknown))} here; available: "
                     f"{', '.join(e['name'] for e in all_exps)} (those of a dataset need it in ../shared/datasets)")
    for exp in all_exps:
        if args.only and exp["name"] not in args.only:
            continue
        if not args.collect and exp.get("needs") and not (RUNS / exp["needs"] / "checkpoint.pt").is_file():
            print(f"skip {exp['name']}: run {exp['needs']} first", flush=True)
            continue
        if args.collect and not (RUNS / exp["name"] / "metrics.json").is_file():
            continue
        report = run(exp, args.threads, page.parent, args.collect, args.quick)
        if args.collect:
            report["conv_engine"] = saved.get(exp["name"], {}).get("conv_engine")
        else:
            report["conv_engine"] = conv_engine()
        report.pop("history", None)
        report.pop("confusion", None)
        previous = saved.get(exp["name"], {})
        report["environment"] = previous.get("environment", env) if args.collect else env
        report["threads"] = previous.get("threads", args.threads) if args.collect else args.threads
        saved[exp["name"]] = report
        store.write_text(json.dumps(saved, indent=1) + "\n")
        results = [(e, saved[e["name"]]) for e in all_exps if e["name"] in saved]
        # The header names the newest run's environment (with --collect, not this invocation's).
        newest = max((r for _, r in results), key=lambda r: r.get("environment", {}).get("date", ""))
        page.write_text(write_markdown(
            results, newest.get("environment", env), args.quick, newest.get("threads", args.threads)))
    print(f"results: {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
