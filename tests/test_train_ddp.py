"""Two gloo processes on the CPU (127.0.0.1, a free port) train the same
weights as one process on the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from pointsparse import checkpoint

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--data", "generated", "--scenes", "4", "--val-scenes", "1", "--beams", "16", "--azimuth-steps", "192",
        "--max-range", "16", "--cr", "0.125", "--blocks", "1", "--voxel-size", "0.5", "--batch-size", "2",
        "--epochs", "1", "--optimizer", "sgd", "--lr", "0.05", "--schedule", "constant", "--no-progress",
        "--threads", "1", "--seed", "1"]

SCRIPT = textwrap.dedent("""
    import argparse, sys
    from pointsparse import train as tr
    parser = argparse.ArgumentParser()
    tr.add_arguments(parser)
    args = parser.parse_args(sys.argv[2:])
    args.rank_weights = sys.argv[1]
    args._module = sys  # as the pointsparse CLI leaves it: must not travel to the workers
    sys.exit(tr.main(args))
""")


def test_two_processes_match_one(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    ddp = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), *ARGS, "--nproc", "2",
                          "--out", str(tmp_path / "ddp")], env=env, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = subprocess.run([sys.executable, "-m", "pointsparse.train", *ARGS, "--out", str(tmp_path / "one")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    rank0 = torch.load(tmp_path / "rank0.pt")
    rank1 = torch.load(tmp_path / "rank1.pt")
    one = checkpoint.load(tmp_path / "one" / "checkpoint.pt")["model"]
    ddp_ckpt = checkpoint.load(tmp_path / "ddp" / "checkpoint.pt")
    assert ddp_ckpt["args"]["nproc"] == 1 and len(ddp_ckpt["history"]["step_loss"]) == 2
    for name, value in rank0.items():
        assert torch.equal(value, rank1[name]), f"ranks differ in {name}"
        assert torch.equal(value, ddp_ckpt["model"][name]), name
        if value.is_floating_point():
            scale = one[name].abs().max().clamp_min(1e-3)
            assert torch.allclose(value, one[name], atol=1e-4 * float(scale), rtol=1e-4), name
    init = checkpoint.load(tmp_path / "one" / "checkpoint.pt")
    # The two steps really moved the weights (the comparison is not trivial).
    assert init["history"]["step_loss"][0] != init["history"]["step_loss"][1]
