"""Experiments for the pruning procedures (issue 8): does each do what its
paper claims, at this small scale?

    python bench/prune_procedures.py [--quick] [--only schedule,lottery,...] [--scene] [--out PAGE.md]

Sections: sensitivity, schedule (iterative vs one-shot), lottery (tickets,
controls, rewinding), init (SNIP/GraSP/SynFlow and RigL vs dense and random),
amc (learned vs uniform ratios at equal FLOPs), netadapt (latency budget,
measured again). Digits sections need the optional scikit-learn and are
skipped without it; ``--scene`` adds the generated-scene sparse-conv runs.
Results: bench/results/prune_procedures.md (+ .json with every number) and
bench/results/prune_*.png (``--out PAGE.md``: the page there, PAGE.json and
the plots beside it; ``--quick``: all in a temporary folder). Sections run
before are kept from the .json. One torch thread (tiny models; the machine is
shared)."""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import time

import torch

from _common import RESULTS_DIR, environment, page_arg, page_path

from pointsparse.app import procedures as P
from pointsparse.app import tasks as T
from pointsparse.app.procedures import trained
from pointsparse.prune import adapters, amc, netadapt, procedure, rigl, sensitivity, surgery

SECTIONS = ("sensitivity", "schedule", "lottery", "init", "amc", "netadapt", "minkunet")


def have_sklearn() -> bool:
    try:
        import sklearn  # noqa: F401
        return True
    except ImportError:
        return False


def plot(path, series: dict, xlabel: str, ylabel: str, title: str, xlog=False, hline=None):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.2, 4.0))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", ms=3, label=label)
    if hline is not None:
        ax.axhline(hline[1], color="k", ls="--", lw=0.8, label=hline[0])
    if xlog:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------ sections
def run_sensitivity(q, folder):
    out = {}
    for model, gran in (("mlp", "unstructured"), ("cnn", "channel")):
        task = T.digits_task(model)
        m = trained(task)
        res, chosen, _ = P.sensitivity(task, m, gran, 0.02, metric="val accuracy",
                                       plot=folder / f"prune_sensitivity_{model}.png")
        pruned = copy.deepcopy(m)
        sensitivity.apply_ratios(pruned, chosen, gran)
        out[model] = {"granularity": gran, "baseline": res.baseline, "curves": res.curves, "chosen": chosen,
                      "pruned_val": task.eval_fn(pruned), "pruned_test": task.test_fn(pruned),
                      "dense_test": task.test_fn(m), "sparsity": adapters.sparsity(pruned)}
    return out


def run_schedule(q, folder, scene=False):
    out = {"digits": {}}
    task = T.digits_task("mlp")
    dense = trained(task)
    out["digits"]["dense_test"] = task.test_fn(dense)
    budget = 100 if q else 500
    sparsities = [0.9, 0.98] if q else [0.9, 0.95, 0.98, 0.99]
    for s in sparsities:
        row = {}
        for name in ("one-shot", "iterative AGP", "iterative constant"):
            m = copy.deepcopy(dense)
            kind = "oneshot" if name == "one-shot" else "agp" if "AGP" in name else "constant"
            P.schedule(task, m, s, kind, 5, budget)
            row[name] = task.test_fn(m)
        m = copy.deepcopy(dense)  # no fine-tuning at all
        procedure.global_magnitude_prune(m, s)
        row["one-shot, no fine-tune"] = task.test_fn(m)
        out["digits"][str(s)] = row
    if scene:
        st = T.scene_task(points=4000 if q else 6000)
        dense = trained(st, steps=30 if q else 60)
        res = {"dense_test": st.test_fn(dense)}
        ft = 10 if q else 25
        for s in (0.9, 0.97):
            a, b = copy.deepcopy(dense), copy.deepcopy(dense)
            P.schedule(st, a, s, "oneshot", 5, ft)
            P.schedule(st, b, s, "agp", 5, ft)
            res[str(s)] = {"one-shot": st.test_fn(a), "iterative AGP": st.test_fn(b)}
        out["scene"] = res
    xs = sparsities
    plot(folder / "prune_schedule.png",
         {k: (xs, [out["digits"][str(s)][k] for s in xs]) for k in out["digits"][str(xs[0])]},
         "sparsity", "test accuracy", "digits MLP: one-shot vs iterative (equal fine-tune steps)",
         hline=("dense", out["digits"]["dense_test"]))
    return out


def _lottery(task, rounds, k, seed=0, control_rounds=()):
    res, ctrl = P.lottery(task, task.make_model(seed), task.train_steps, rounds, 0.2, k, control_rounds, seed,
                          metric_fn=task.test_fn)
    rows = [dict(r) for r in res.rounds]
    for r, c in ctrl.items():
        rows[r].update(c)
    return rows


def run_lottery(q, folder):
    """Tickets down to ~2% of the MLP's weights and ~7% of the deep CNN's,
    with both controls at several rounds; the deep CNN at a larger learning
    rate (0.08), where rewinding to k > 0 is reported to matter."""
    out = {}
    mlp = T.digits_task("mlp")
    rounds = 4 if q else 17
    out["mlp k=0"] = _lottery(mlp, rounds, 0, control_rounds=(2, 4) if q else (7, 10, 14, 17))
    deep = T.digits_task("deep")
    deep.lr = 0.08
    deep.train_steps = 150 if q else 300
    drounds = 3 if q else 12
    ctrl = (drounds,) if q else (7, 12)
    out["deep k=0"] = _lottery(deep, drounds, 0, control_rounds=ctrl)
    out["deep k=15"] = _lottery(deep, drounds, 15, control_rounds=ctrl)
    series = {}
    for key, rows in out.items():
        series[key] = ([1 - r["sparsity"] for r in rows], [r["metric"] for r in rows])
        c = [r for r in rows if "reinit" in r]
        series[key + " reinit"] = ([1 - r["sparsity"] for r in c], [r["reinit"] for r in c])
        if key.startswith("mlp"):
            series[key + " random mask"] = ([1 - r["sparsity"] for r in c], [r["random_mask"] for r in c])
    plot(folder / "prune_lottery.png", series, "fraction of weights remaining", "test accuracy",
         "lottery tickets (digits)", xlog=True)
    return out


def run_init(q, folder):
    out = {}
    task = T.digits_task("mlp")
    steps = 150 if q else task.train_steps
    dense = task.make_model(0)
    task.train_fn(dense, steps)
    out["dense"] = task.test_fn(dense)
    sparsities = [0.9, 0.98] if q else [0.9, 0.95, 0.98]
    for s in sparsities:
        row = {}
        for method in ("snip", "grasp", "synflow"):
            m = P.prune_at_init(task, task.make_model(0), method, s, steps, batches=8, iterations=100)
            row[method] = task.test_fn(m)
        # a random mask of the same sparsity in every layer
        m = task.make_model(0)
        layer_masks = {}
        g = torch.Generator().manual_seed(0)
        for n, mod in adapters.prunable_layers(m):
            keep = max(1, round((1 - s) * mod.weight.numel()))
            flat = torch.zeros(mod.weight.numel(), dtype=torch.bool)
            flat[torch.randperm(mod.weight.numel(), generator=g)[:keep]] = True
            layer_masks[n] = flat.view_as(mod.weight)
        adapters.apply_masks(m, layer_masks)
        task.train_fn(m, steps)
        row["random (uniform)"] = task.test_fn(m)
        for dist in ("uniform", "erk"):
            m = task.make_model(0)
            st = rigl.static_sparse(m, 1 - s, dist)
            with st:
                task.train_fn(m, steps)
            row[f"static {dist}"] = task.test_fn(m)
            m = task.make_model(0)
            P.rigl(task, m, s, dist, steps, update_interval=25)
            row[f"RigL {dist}"] = task.test_fn(m)
        out[str(s)] = row
    keys = list(out[str(sparsities[0])])
    plot(folder / "prune_init.png", {k: (sparsities, [out[str(s)][k] for s in sparsities]) for k in keys},
         "sparsity", "test accuracy", "digits MLP: pruning at init and RigL vs dense", hline=("dense", out["dense"]))
    return out


def _amc_vs_uniform(task, m, fraction, episodes, finetune, reconstruct, calib):
    res = P.amc(task, m, fraction, episodes, min(30, episodes // 3), "error", reconstruct, calib)
    infos = amc.layer_infos(m, task.example_input)
    producers = [i.name for i in infos if i.producer]
    u = amc.uniform_ratio_for_flops(infos, res.flops)
    uniform = {n: u for n in producers}
    row = {"amc_ratios": res.ratios, "uniform_ratio": u, "amc_flops": res.flops / res.dense_flops,
           "uniform_flops": amc.flops_for(infos, uniform) / res.dense_flops}
    for name, ratios in (("amc", res.ratios), ("uniform", uniform)):
        p = P.cut_channels(m, ratios, reconstruct, calib)
        row[f"{name}_test_no_ft"] = task.test_fn(p)
        task.train_fn(p, finetune, lr=task.lr * 0.1)
        row[f"{name}_test_ft"] = task.test_fn(p)
        row[f"{name}_params"] = surgery.count_parameters(p)
    return row


def run_amc(q, scene=False):
    out = {}
    task = T.digits_task("cnn")
    m = trained(task)
    out["dense_test"] = task.test_fn(m)
    out["dense_params"] = surgery.count_parameters(m)
    episodes = 40 if q else 150
    for frac in ([0.5] if q else [0.5, 0.3]):
        for rec in (False, True):
            out[f"digits flops={frac} ls={rec}"] = _amc_vs_uniform(task, m, frac, episodes, 50 if q else 150, rec,
                                                                  task.example_input)
    if scene:
        st = T.scene_task(points=4000 if q else 6000, width=16)
        sm = trained(st, steps=30 if q else 60)
        out["scene_dense_test"] = st.test_fn(sm)
        out["scene flops=0.4"] = _amc_vs_uniform(st, sm, 0.4, 20 if q else 60, 10 if q else 20, False, None)
    return out


def run_netadapt(q, folder, scene=False):
    out = {}
    runs = [("digits-cnn", T.digits_task("cnn"), None)]
    if scene:
        runs.append(("scene", T.scene_task(points=4000 if q else 6000, width=32), None))
    for label, task, _ in runs:
        is_scene = label == "scene"
        m = trained(task, steps=(30 if q else 60) if is_scene else None)
        x = task.example_input if is_scene else torch.cat([task.example_input] * 8)  # 512 images
        res, table, table_s = P.netadapt(task, m, x, 0.5, short_steps=(3 if q else 5) if is_scene else (10 if q else 30),
                                         long_steps=(10 if q else 30) if is_scene else (50 if q else 200),
                                         candidates=4 if q else 8, repeats=5,
                                         table_path=folder / f"prune_netadapt_table_{label}.json")
        before = netadapt.measure_latency(m, x, 15)
        after = netadapt.measure_latency(res.model, x, 15)
        out[label] = {"table_seconds": table_s, "table_entries": sum(len(r) for r in table.entries.values()),
                      "measured_before_ms": before * 1e3, "estimate_before_ms": res.initial_latency * 1e3,
                      "budget_ms": res.budget * 1e3, "estimate_after_ms": res.estimated_latency * 1e3,
                      "measured_after_ms": after * 1e3, "channels": res.channels, "iterations": len(res.history),
                      "dense_test": task.test_fn(m), "adapted_test": task.test_fn(res.model),
                      "dense_params": surgery.count_parameters(m), "adapted_params": surgery.count_parameters(res.model),
                      "history": res.history}
    return out


def run_minkunet(q):
    """The unstructured procedures on MinkUNet over generated scenes (needs
    ``pointsparse.models``): one-shot vs iterative, SNIP / SynFlow / RigL vs
    dense at the same sparsity."""
    try:
        from pointsparse.models import MinkUNet
    except ImportError:
        return {"skipped": "pointsparse.models.MinkUNet is not available on this branch"}
    import subprocess
    root = RESULTS_DIR.parents[1]
    origin = subprocess.run(["git", "log", "-1", "--format=%h", "--", "pointsparse/models/minkunet.py"],
                            capture_output=True, text=True, cwd=root).stdout.strip()
    if not origin:  # the model files are there but not committed on this branch
        train = subprocess.run(["git", "rev-parse", "--short", "train"], capture_output=True, text=True,
                               cwd=root).stdout.strip()
        origin = f"uncommitted copy of branch train @ {train}" if train else "uncommitted"
    cr = 0.25

    def make(seed=0):
        torch.manual_seed(seed)
        return MinkUNet(3, 4, cr=cr, blocks=1)

    st = T.scene_task(points=3000 if q else 5000, make_model=make)
    steps = 20 if q else 50
    out = {"cr": cr, "steps": steps, "voxels": len(st.example_input), "source": origin}
    dense = make(0)
    t0 = time.perf_counter()
    st.train_fn(dense, steps)
    out["seconds_per_step"] = (time.perf_counter() - t0) / steps
    out["dense"] = st.test_fn(dense)
    ft = max(5, steps // 2)
    for s in (0.9,):
        a, b = copy.deepcopy(dense), copy.deepcopy(dense)
        P.schedule(st, a, s, "oneshot", 5, ft)
        P.schedule(st, b, s, "agp", 5, ft)
        out[f"one-shot {s}"] = st.test_fn(a)
        out[f"iterative AGP {s}"] = st.test_fn(b)
        for method in ("snip", "synflow"):
            m = P.prune_at_init(st, make(0), method, s, steps, batches=1, iterations=20)
            out[f"{method} {s}"] = st.test_fn(m)
        m = make(0)
        P.rigl(st, m, s, "erk", steps, update_interval=max(2, steps // 10))
        out[f"RigL erk {s}"] = st.test_fn(m)
    # AMC on the channels inside MinkUNet's residual blocks (surgery.channel_groups)
    row = _amc_vs_uniform(st, dense, 0.6, 8 if q else 24, 5 if q else 10, False, None)
    out["amc"] = row
    return out


# ------------------------------------------------------------------ report
def _fmt(v):
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _ratios(r: dict) -> str:
    return json.dumps({n: round(v, 2) for n, v in r["amc_ratios"].items()})


def _table(d: dict, skip: str, first: str) -> list[str]:
    """A table of ``d``'s entries but ``skip``, one row per key, one column per inner key."""
    keys = [k for k in d if k != skip]
    cols = list(d[keys[0]])
    return (["| " + first + " | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
            + [f"| {k} | " + " | ".join(_fmt(d[k][c]) for c in cols) + " |" for k in keys])


def _render_header(env: dict, command: str) -> list[str]:
    return ["# Pruning procedures: experiments", "",
            f"Command: `{command}`", "",
            "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), "",
            "Taken on a shared 2-core machine under load (other helpers building and testing), one torch thread. "
            "Accuracies are on held-out digits test images (497) or a held-out generated scene (voxel mIoU); "
            "one seed each, so differences of ~1 point are within noise.", ""]


def _render_sensitivity(s: dict) -> list[str]:
    lines = ["## Sensitivity", ""]
    for model, r in s.items():
        lines += [f"digits {model}, {r['granularity']}: baseline val accuracy {r['baseline']:.3f}; ratios under a "
                  f"drop of 0.02: `{json.dumps(r['chosen'])}` -> overall sparsity {r['sparsity']:.3f}, test "
                  f"accuracy {r['dense_test']:.3f} -> {r['pruned_test']:.3f} (no fine-tuning). "
                  f"Curves: `prune_sensitivity_{model}.png`.", ""]
    return lines


def _render_schedule(s: dict) -> list[str]:
    d = s["digits"]
    lines = ["## Iterative vs one-shot (digits MLP 64-300-100-10, equal fine-tuning steps)", "",
             f"Dense test accuracy {d['dense_test']:.3f}. Fine-tuning at 1/10 of the training lr.", ""]
    lines += _table(d, "dense_test", "sparsity")
    if "scene" in s:
        sc = s["scene"]
        lines += ["", f"Generated scene, sparse-conv chain (mIoU; dense {sc['dense_test']:.3f}):", "",
                  "| sparsity | one-shot | iterative AGP |", "|---|---|---|"]
        lines += [f"| {k} | {v['one-shot']:.3f} | {v['iterative AGP']:.3f} |" for k, v in sc.items()
                  if k != "dense_test"]
    return lines + ["", "Plot: `prune_schedule.png`.", ""]


def _render_lottery(s: dict) -> list[str]:
    lines = ["## Lottery tickets (20% of the remaining weights pruned per round, global magnitude)", ""]
    for key, rows in s.items():
        lines += [f"{key}:", "", "| round | weights left | ticket | reinit (same mask) | random mask |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['round']} | {1 - r['sparsity']:.3f} | {r['metric']:.3f} | {_fmt(r.get('reinit', '-'))} | "
                  f"{_fmt(r.get('random_mask', '-'))} |" for r in rows]
        lines += [""]
    return lines + ["Plot: `prune_lottery.png`.", ""]


def _render_init(s: dict) -> list[str]:
    lines = ["## Pruning at initialisation and RigL (digits MLP, same training steps as dense)", "",
             f"Dense test accuracy {s['dense']:.3f}.", ""]
    return lines + _table(s, "dense", "sparsity") + ["", "Plot: `prune_init.png`.", ""]


def _render_amc(s: dict) -> list[str]:
    lines = ["## AMC vs uniform channel ratios at equal FLOPs", "",
             f"digits CNN: dense test accuracy {s['dense_test']:.3f}, {s['dense_params']} parameters.", "",
             "| setting | AMC ratios | uniform ratio | FLOPs AMC / uniform | AMC test (no ft / ft) | "
             "uniform test (no ft / ft) |", "|---|---|---|---|---|---|"]
    for k, r in s.items():
        if not isinstance(r, dict):
            continue
        lines.append(f"| {k} | `{_ratios(r)}` | "
                     f"{r['uniform_ratio']:.2f} | {r['amc_flops']:.3f} / {r['uniform_flops']:.3f} | "
                     f"{r['amc_test_no_ft']:.3f} / {r['amc_test_ft']:.3f} | "
                     f"{r['uniform_test_no_ft']:.3f} / {r['uniform_test_ft']:.3f} |")
    if "scene_dense_test" in s:
        lines += ["", f"Scene dense mIoU {s['scene_dense_test']:.3f}."]
    return lines + [""]


def _render_netadapt(s: dict) -> list[str]:
    lines = ["## NetAdapt: latency budget 50% of the measured table estimate", "",
             "| network | table (entries, s) | measured before | table estimate before | budget | estimate after | "
             "measured after | channels | params | test metric |", "|---|---|---|---|---|---|---|---|---|---|"]
    for k, r in s.items():
        lines.append(f"| {k} | {r['table_entries']}, {r['table_seconds']:.1f} s | {r['measured_before_ms']:.2f} ms | "
                     f"{r['estimate_before_ms']:.2f} ms | "
                     f"{r['budget_ms']:.2f} ms | {r['estimate_after_ms']:.2f} ms | {r['measured_after_ms']:.2f} ms | "
                     f"`{json.dumps(r['channels'])}` | {r['dense_params']} -> {r['adapted_params']} | "
                     f"{r['dense_test']:.3f} -> {r['adapted_test']:.3f} |")
    return lines + [""]


def _render_minkunet(s: dict) -> list[str]:
    lines = ["## MinkUNet on generated scenes", ""]
    if "skipped" in s:
        return lines + [f"Skipped: {s['skipped']}.", ""]
    lines += [f"MinkUNet(3, 4, cr={s['cr']}, blocks=1) (source: {s.get('source')}), {s['voxels']} voxels per "
              f"scene, {s['steps']} training "
              f"steps ({s['seconds_per_step']:.2f} s each), voxel mIoU on a held-out scene:", "",
              "| run | mIoU |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in s.items()
              if k not in ("cr", "steps", "voxels", "seconds_per_step", "source", "amc")]
    if "amc" in s:
        r = s["amc"]
        lines += ["", f"AMC on the {len(r['amc_ratios'])} channel groups inside MinkUNet's blocks, FLOPs "
                  f"budget 0.6: AMC {r['amc_flops']:.3f} of dense FLOPs, mIoU {r['amc_test_no_ft']:.3f} before / "
                  f"{r['amc_test_ft']:.3f} after fine-tuning; uniform ratio {r['uniform_ratio']:.2f} "
                  f"({r['uniform_flops']:.3f} of dense FLOPs): {r['uniform_test_no_ft']:.3f} / "
                  f"{r['uniform_test_ft']:.3f}. Ratios: `{_ratios(r)}`."]
    return lines + [""]


RENDERERS = (("sensitivity", _render_sensitivity), ("schedule", _render_schedule), ("lottery", _render_lottery),
             ("init", _render_init), ("amc", _render_amc), ("netadapt", _render_netadapt),
             ("minkunet", _render_minkunet))


def render(data: dict, command: str) -> str:
    """The markdown page of the stored results: one section per experiment present."""
    lines = _render_header(data.get("_env", {}), command)
    for key, section in RENDERERS:
        if data.get(key):
            lines += section(data[key])
    if data.get("_notes"):
        lines += ["## What these show", "", data["_notes"], ""]
    return "\n".join(lines)

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default=",".join(SECTIONS[:-1]), help=f"comma-separated sections of {SECTIONS}")
    ap.add_argument("--scene", action="store_true", help="also run the generated-scene sparse-conv experiments")
    ap.add_argument("--out", type=page_arg, default=None,
                    help="the page (default bench/results/prune_procedures.md); PAGE.json and the plots beside it")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    only = [s for s in args.only.split(",") if s]
    bad = [s for s in only if s not in SECTIONS]
    if bad:
        ap.error(f"unknown sections {bad}; choose from {SECTIONS}")
    if not have_sklearn():
        print("scikit-learn is not installed: the digits experiments are skipped (pip install scikit-learn)")
        return 0
    page = page_path(args.out, "prune_procedures.md", args.quick)  # --quick: a temporary folder
    store, folder, q = page.with_suffix(".json"), page.parent, args.quick
    folder.mkdir(parents=True, exist_ok=True)
    data = json.loads(store.read_text()) if store.exists() else {}
    fns = {"sensitivity": lambda: run_sensitivity(q, folder), "schedule": lambda: run_schedule(q, folder, args.scene),
           "lottery": lambda: run_lottery(q, folder), "init": lambda: run_init(q, folder),
           "amc": lambda: run_amc(q, args.scene), "netadapt": lambda: run_netadapt(q, folder, args.scene),
           "minkunet": lambda: run_minkunet(q)}
    for name in only:
        t0 = time.perf_counter()
        data[name] = fns[name]()
        print(f"{name}: {time.perf_counter() - t0:.0f} s")
        print(json.dumps(data[name], default=str)[:1500])
        data["_env"] = environment()
        store.write_text(json.dumps(data, indent=1, default=str))
    command = "python bench/prune_procedures.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    page.write_text(render(data, command.strip()) + "\n")
    print(f"written {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
