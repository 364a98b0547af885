"""Two gloo processes on the CPU (127.0.0.1, a free port) train the same
weights as one process on the same global batch."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pointsparse import checkpoint

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--data", "generated", "--scenes", "4", "--val-scenes", "1", "--beams", "16", "--azimuth-steps", "192",
        "--max-range", "16", "--cr", "0.125", "--blocks", "1", "--voxel-size", "0.5", "--batch-size", "2",
        "--epochs", "1", "--optimizer", "sgd", "--lr", "0.05", "--schedule", "constant", "--no-progress",
        "--threads", "1", "--seed", "1", "--device", "cpu"]  # (gloo on the CPU; one process per GPU with CUDA)

SCRIPT = textwrap.dedent("""
    import argparse, sys
    from pointsparse.app import train as tr
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
    single = subprocess.run([sys.executable, "-m", "pointsparse.app.train", *ARGS, "--out", str(tmp_path / "one")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    # the same closing lines, the mIoU and the pictures (the parent of two processes printed its metrics.json alone)
    for run, name in ((ddp, "ddp"), (single, "one")):
        assert re.search(rf"mIoU [\d.]+%  ->  .*{name}/metrics.json\n  curves: .*{name}/curves.png\n", run.stdout), \
            run.stdout[-2000:]
    rank0 = torch.load(tmp_path / "rank0.pt")
    rank1 = torch.load(tmp_path / "rank1.pt")
    one = checkpoint.load(tmp_path / "one" / "checkpoint.pt")["model"]
    ddp_ckpt = checkpoint.load(tmp_path / "ddp" / "checkpoint.pt")
    # (the run's process count: each worker runs as one process, and its checkpoint said --nproc 1)
    assert ddp_ckpt["args"]["nproc"] == 2 and len(ddp_ckpt["history"]["step_loss"]) == 2
    for name, value in rank0.items():
        assert torch.equal(value, rank1[name]), f"ranks differ in {name}"
        assert torch.equal(value, ddp_ckpt["model"][name]), name
        if value.is_floating_point():
            scale = one[name].abs().max().clamp_min(1e-3)
            assert torch.allclose(value, one[name], atol=1e-4 * float(scale), rtol=1e-4), name
    init = checkpoint.load(tmp_path / "one" / "checkpoint.pt")
    # The two steps really moved the weights (the comparison is not trivial).
    assert init["history"]["step_loss"][0] != init["history"]["step_loss"][1]


def test_an_spvcnn_run_of_two_processes_draws_a_stream_each_and_resumes_bit_for_bit(tmp_path):
    """SPVCNN's dropout under --nproc 2: every process seeded torch with --seed, so the ranks drew nearly the same
    masks (99.5% agreement at p = 0.3, not 58%), and a checkpoint kept rank 0's generator only, which --resume
    set in every process: the resumed run drew other masks than the run left alone (weights 0.67 apart). Each
    process now draws its own stream (rank 0's is one process's), the checkpoint keeps each, and a run of two
    epochs equals one epoch resumed to two, bit for bit."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    argv = [*ARGS, "--model", "spvcnn", "--nproc", "2"]

    def run(folder: str, *extra: str, epochs: int = 2) -> None:
        (tmp_path / folder).mkdir(exist_ok=True)
        words = [*argv[:argv.index("--epochs")], "--epochs", str(epochs), *argv[argv.index("--epochs") + 2:]]
        done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / folder), *words, *extra,
                               "--out", str(tmp_path / folder / "run")], env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]

    run("whole")
    streams = [torch.load(tmp_path / "whole" / f"rank{r}-rng.pt") for r in (0, 1)]
    assert not torch.equal(*streams), "the two processes drew from one stream"
    whole = checkpoint.load(tmp_path / "whole" / "run" / "checkpoint.pt")
    assert len(whole["torch_rng_ranks"]) == 2 and torch.equal(whole["torch_rng_ranks"][0], whole["torch_rng"])
    run("cut", epochs=1)
    run("cut", "--resume")
    resumed = checkpoint.load(tmp_path / "cut" / "run" / "checkpoint.pt")
    assert resumed["history"]["step_loss"] == whole["history"]["step_loss"]
    for name, value in whole["model"].items():
        assert torch.equal(value, resumed["model"][name]), name


SHARD_SCRIPT = textwrap.dedent("""
    import argparse, sys
    import torch
    from pointsparse.app import distributed, scoring
    from pointsparse.app import train as tr

    def worker(rank, world, port, argv, out):
        distributed.worker_environment(rank, world, port)
        parser = argparse.ArgumentParser()
        tr.add_arguments(parser)
        args = parser.parse_args(argv)
        try:
            job = tr.TrainingJob(args, distributed.init_distributed(args))
            samples = job.val_samples()
            cm, first = scoring.evaluate(job.model, samples, len(job.classes), args.ignore_index, job.dist.device,
                                         all_reduce=True)
            torch.save({"read": sorted(job.val_src._cache), "names": [s.name for s in samples], "cm": cm,
                        "first": None if first is None else first[3]}, f"{out}/shard{rank}.pt")
            distributed.destroy(barrier=True)
        finally:
            distributed.destroy()
        distributed.finish_process()  # (as the app's workers end: see its docstring)

    if __name__ == "__main__":
        out, argv = sys.argv[1], sys.argv[2:]
        torch.multiprocessing.spawn(worker, args=(2, distributed.free_port(), argv, out), nprocs=2, join=True)
""")


def test_each_rank_scores_its_validation_shard_and_the_sum_is_one_process_score(tmp_path):
    """Three validation clouds over two processes: rank 0 reads and scores
    clouds 0 and 2, rank 1 cloud 1; the all-reduced confusion matrix (so the
    mIoU) equals one process scoring all three."""
    import argparse

    import numpy as np

    from pointsparse.app import scoring
    from pointsparse.app import train as tr
    from pointsparse.app.distributed import Dist

    argv = [*ARGS, "--val-scenes", "3", "--out", str(tmp_path / "run")]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    script = tmp_path / "shards.py"
    script.write_text(SHARD_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path), *argv], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"shard{r}.pt", weights_only=False) for r in (0, 1)]
    assert ranks[0]["read"] == [0, 2] and ranks[1]["read"] == [1]
    assert len(ranks[0]["names"]) == 2 and len(ranks[1]["names"]) == 1
    parser = argparse.ArgumentParser()
    tr.add_arguments(parser)
    args = parser.parse_args(argv)
    one = tr.TrainingJob(args, Dist())
    cm, first = scoring.evaluate(one.model, one.val_samples(), len(one.classes), args.ignore_index, "cpu")
    assert sorted(ranks[0]["names"] + ranks[1]["names"]) == sorted(s.name for s in one.val_samples())
    assert cm.sum() > 0
    assert np.array_equal(ranks[0]["cm"], cm) and np.array_equal(ranks[1]["cm"], cm)
    assert ranks[0]["first"] == first[3]


SKEW_SCRIPT = textwrap.dedent("""
    import sys
    from pointsparse.app import cli
    from pointsparse.app import train as tr

    REAL = tr._spawn_worker

    def worker(rank, world, port, args):
        if rank == 0:  # rank 0's clock: each step 1000 s longer than rank 1's
            log = tr.TrainingJob.log_step
            tr.TrainingJob.log_step = lambda job, epoch, loss, seconds: log(job, epoch, loss, seconds + 1000)
        if world > 1:
            REAL(rank, world, port, args)

    if __name__ == "__main__":
        parser = cli.CommandParser()
        tr.add_arguments(parser)
        args = parser.parse_args(sys.argv[1:])
        tr._spawn_worker = worker
        sys.exit(tr.main(args))
""")


def test_the_time_limit_stops_every_process_together(tmp_path):
    """Each process times its own steps, so near --time-limit one process
    could stop while the other went on into the next epoch: the job hung in
    mismatched collectives. Every process now follows rank 0's decision (as
    for --time-budget's plan): here rank 0's clock has passed the limit
    after epoch 1 and rank 1's has not, and both stop."""
    import json
    import signal

    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    script = tmp_path / "skew.py"
    script.write_text(SKEW_SCRIPT)
    argv = [*ARGS[:ARGS.index("--epochs")], "--epochs", "3", *ARGS[ARGS.index("--epochs") + 2:]]
    proc = subprocess.Popen([sys.executable, str(script), *argv, "--time-limit", "1", "--nproc", "2", "--out",
                             str(tmp_path / "run")], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError("the processes did not stop together: the job hung after epoch 1") from None
    assert proc.returncode == 0, err[-3000:]
    report = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert report["epochs"] == 1 and report["stopped_by_time_limit"] is True
    assert checkpoint.load(tmp_path / "run" / "checkpoint.pt")["epoch"] == 1


def _children(pid: int) -> set[int]:
    """The pids of ``pid``'s live children that torch's spawn started (Linux
    /proc; multiprocessing's resource tracker, a child too, left out)."""
    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            command = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z" and b"spawn_main" in command:
            out.add(int(stat.parent.name))
    return out


def _signalled(argv, env, marker: str, act, stuck: str):
    """``(exit status, stderr, act's result)`` of ``argv`` run in a session
    of its own, ``act(proc)`` called once a stdout line starts with
    ``marker``; an AssertionError saying ``stuck`` where it has not ended
    60 s after (its process group killed)."""
    import signal

    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        for line in proc.stdout:
            if line.startswith(marker):
                break
        seen = act(proc)
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError(stuck) from None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, err, seen


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:  # (gone)
        return False


def test_a_sigint_to_the_parent_alone_stops_its_workers(tmp_path):
    """``kill -INT`` of a ``train --nproc 2`` parent alone (a scheduler's or an
    IDE's stop; a terminal's Ctrl-C signals every process): the parent took
    the KeyboardInterrupt and then waited at exit for its spawned workers,
    which trained on (the command's one-line Ctrl-C end now kills the
    process at once, and torch's spawn then ends the workers; through
    Python's own exit, as here, it hung). It now stops them (SIGINT, then
    SIGKILL after a grace period) and ends; the workers are gone."""
    import signal

    if not Path("/proc/self/stat").is_file():
        pytest.skip("reads the processes' parents from /proc")
    # (POINTSPARSE_TRACEBACK=1: the interrupt goes up through Python's own exit, which joins the workers; the
    # command's one-line end kills the process at once, and torch's spawn ends workers whose parent died)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONUNBUFFERED="1", POINTSPARSE_TRACEBACK="1")
    argv = [*ARGS[:ARGS.index("--epochs")], "--epochs", "10000", *ARGS[ARGS.index("--epochs") + 2:]]

    def interrupt(proc):
        workers = _children(proc.pid)
        proc.send_signal(signal.SIGINT)  # (the parent alone: its own session, no terminal)
        return workers

    status, _, workers = _signalled([sys.executable, "-m", "pointsparse", "train", *argv, "--nproc", "2", "--out",
                                     str(tmp_path / "run")], env, "epoch 2/", interrupt,
                                    "the parent waited on workers that trained on")
    assert status == -signal.SIGINT
    assert len(workers) == 2, workers
    import time

    deadline = time.monotonic() + 20  # (the parent ends after them; their exit is reaped a moment later)
    while any(_running(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_running(pid) for pid in workers), workers


SLOW_WRITE_SCRIPT = textwrap.dedent("""
    import os, sys, time
    from pointsparse.app import cli, train as tr

    REAL = tr._spawn_worker

    def worker(rank, world, port, args):
        if rank == 0:  # rank 0's write of epoch 2's checkpoint stops in its fsync (a slow disk) until a signal comes
            fsync = os.fsync

            def slow(fd):
                if os.path.isfile(os.path.join(args.out, "checkpoint.pt")):
                    print("WRITING", flush=True)
                    for _ in range(1200):  # (short sleeps: a signal another thread took is handled between them)
                        time.sleep(0.1)
                fsync(fd)
            os.fsync = slow
        if world > 1:
            REAL(rank, world, port, args)

    if __name__ == "__main__":
        if os.environ.get("SLOW_WRITE_MODULE"):  # (python -m pointsparse.app.train, as torchrun starts each process)
            worker(0, 1, 0, type("Args", (), {"out": sys.argv[sys.argv.index("--out") + 1]}))
            sys.exit(tr._cli(sys.argv[1:]))
        tr._spawn_worker = worker
        sys.exit(cli.main(["train", *sys.argv[1:]]))  # (143 after SIGTERM's line: called with its words)
""")


@pytest.mark.parametrize("how", ["nproc", "torchrun"])
def test_a_sigterm_cleans_up_a_checkpoint_write(tmp_path, how):
    """A scheduler's stop signals every process of the job: ``kill -TERM``
    of ``train --nproc 2``'s process group. The workers had no handler, so
    rank 0, killed by SIGTERM's default action in a checkpoint write, left
    its temporary file (up to hundreds of MB) in the run folder; so did
    ``python -m pointsparse.app.train`` (each process torchrun starts, whose
    agent stops them by SIGTERM). Each cleans up as for a Ctrl-C now and
    then ends by SIGTERM (the command: after its line, 143 in-process)."""
    import signal

    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONUNBUFFERED="1", SLOW_WRITE_MODULE="1" if how == "torchrun" else "")
    script = tmp_path / "slow_write.py"
    script.write_text(SLOW_WRITE_SCRIPT)
    out = tmp_path / "run"
    argv = [sys.executable, str(script), *ARGS[:ARGS.index("--epochs")], "--epochs", "3",
            *ARGS[ARGS.index("--epochs") + 2:], *(["--nproc", "2"] if how == "nproc" else []), "--out", str(out)]

    def terminate(proc):
        temporary = [p.name for p in out.iterdir() if ".tmp-" in p.name]
        if how == "nproc":
            os.killpg(proc.pid, signal.SIGTERM)  # (the whole group: the parent and its workers)
        else:
            proc.send_signal(signal.SIGTERM)
        return temporary

    status, err, temporary = _signalled(argv, env, "WRITING", terminate, "it did not end after SIGTERM")
    assert temporary, "the write had not begun"  # (the test's own premise)
    if how == "nproc":
        assert status == 143, err[-3000:]
        assert err.strip().endswith("pointsparse train: terminated (SIGTERM) (train --resume continues from its "
                                    "last checkpoint)"), err[-3000:]
    else:
        assert status == -signal.SIGTERM, err[-3000:]
    assert checkpoint.load(out / "checkpoint.pt")["epoch"] == 1  # (epoch 1's, whole)
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name], sorted(p.name for p in out.iterdir())
