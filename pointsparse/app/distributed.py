"""Processes for ``--nproc N`` and torchrun: the process group (gloo on the
CPU, nccl on GPUs), the device and thread count of each process, and the
spawned workers."""

from __future__ import annotations

import os
import socket
import sys
import threading
from dataclasses import dataclass

import torch


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pick_device(name, rank: int, local_world: int = 1) -> torch.device:
    """The device of the process of local rank ``rank`` among ``local_world``
    processes on this machine: ``name`` (``--device``), by default CUDA where
    torch has it, one device per process (NCCL takes no two processes on one
    device: more processes than devices is a ValueError saying what to pass),
    else the CPU."""
    if name is None:
        if not torch.cuda.is_available():
            return torch.device("cpu")
        what = "--device (default: cuda, this machine has CUDA)"
        device = torch.device("cuda")
    else:
        what = f"--device {name}"
        try:
            device = torch.device(name)
        except (RuntimeError, TypeError) as error:
            raise ValueError(f"--device must be cpu, cuda or cuda:N; got {name!r}") from error
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu, cuda or cuda:N; got {name!r}")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"{what}: this machine has no CUDA device (torch {torch.__version__})")
        if device.index is None:
            if local_world > count:
                raise ValueError(f"{what}: {local_world} processes on this machine need a CUDA device each (NCCL "
                                 f"takes one process per device) but it has {count}: pass --device cpu, or "
                                 f"--nproc {count} (torchrun: --nproc-per-node {count})")
            device = torch.device(f"cuda:{rank % count}")
        elif device.index >= count:
            raise ValueError(f"{what}: this machine has {count} CUDA device(s)")
        elif local_world > 1:
            raise ValueError(f"{what} puts all {local_world} processes on one device (NCCL takes one process per "
                             "device): pass --device cuda (one device each) or --device cpu")
    return device


def launch_environment() -> tuple[int, int, int, int]:
    """``(RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE)`` of this process
    as its launcher set them (torchrun, or :func:`worker_environment` for
    ``--nproc``'s workers); unset: ``(0, 1, RANK, 1)``. ValueError naming
    the variable where one is no int of its range, or where RANK is no rank
    of the WORLD_SIZE processes (a RANK left over beside no WORLD_SIZE made
    a lone process rank 2 of 1: it trained and wrote nothing), or where a
    world of several has a MASTER_PORT that is no port."""
    def read(name: str, default: int, least: int) -> int:
        text = os.environ.get(name)
        if text is None:
            return default
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < least:
            raise ValueError(f"{name} (the launcher's environment variable) must be an int >= {least}; got "
                             f"{text!r:.100}")
        return value

    world = read("WORLD_SIZE", 1, 1)
    rank = read("RANK", 0, 0)
    if rank >= world:
        unset = "; WORLD_SIZE is unset" if "WORLD_SIZE" not in os.environ else ""
        raise ValueError(f"RANK {rank} is no rank of the {world} process(es) WORLD_SIZE counts (0 to {world - 1}"
                         f"{unset}): the launcher's environment does not add up; unset RANK and LOCAL_RANK for a "
                         "run of one process, or start the processes with torchrun (or --nproc)")
    if world > 1:
        _check_port()
    return rank, world, read("LOCAL_RANK", rank, 0), read("LOCAL_WORLD_SIZE", 1, 1)


#: Seconds a process waits for the others to join its group before it says so.
WAIT_NOTE_S = 30.0


def _check_port() -> None:
    """ValueError naming MASTER_PORT where it is set and no port number
    (torch's own message named no variable: "invalid literal for int()")."""
    text = os.environ.get("MASTER_PORT")
    if text is None:
        return
    try:
        port = int(text)
    except ValueError:
        port = None
    if port is None or not 1 <= port <= 65535:
        raise ValueError(f"MASTER_PORT (the launcher's environment variable) must be a port number, 1 to 65535; "
                         f"got {text!r:.100}")


def init_distributed(args) -> Dist:
    """This process's rank, world and device from the torchrun/spawn
    environment (:func:`launch_environment`; a process group when the world
    is larger than one), and its torch threads (``--threads``, else torch's
    default divided among processes)."""
    rank, world, local, local_world = launch_environment()
    # (the processes on this machine: torchrun's and --nproc's LOCAL_WORLD_SIZE; another launcher's, unknown,
    # are not the whole world, which spans machines: no check then)
    device = pick_device(args.device, local, local_world)
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # (a process missing from the group, or an address no process listens at, waits out torch's 30 minutes
        # silently: said after a while, with what to check)
        note = threading.Timer(WAIT_NOTE_S, lambda: print(
            f"process {rank} of {world}: still waiting for the others at {os.environ.get('MASTER_ADDR')}:"
            f"{os.environ.get('MASTER_PORT')} after {WAIT_NOTE_S:g} s (torch gives up after 30 minutes): check "
            "that every process started, with the same WORLD_SIZE, MASTER_ADDR and MASTER_PORT",
            file=sys.stderr, flush=True))
        note.daemon = True
        note.start()
        try:
            torch.distributed.init_process_group(backend, rank=rank, world_size=world)
        finally:
            note.cancel()
    threads = args.threads or max(1, torch.get_num_threads() // max(world, 1))
    torch.set_num_threads(threads)
    return Dist(rank, world, device)


def worker_environment(rank: int, world: int, port: int) -> None:
    """The environment a spawned worker of ``--nproc`` reads its rank from."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))


def destroy(barrier: bool = False) -> None:
    """Leave the process group. ``barrier=True`` (on the normal path only, never
    after an error, where the other ranks may be gone) waits for every rank
    first: gloo aborts a process whose group is torn down while a peer is still
    in its last collective."""
    if torch.distributed.is_initialized():
        if barrier:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def finish_process() -> None:
    """End a process of a multi-process run that has left its group (after
    :func:`destroy`): flush and exit with status 0, without Python's
    finalization. torch's DistributedDataParallel keeps the gloo group alive
    past ``destroy_process_group`` (torch 2.13: its worker threads go on),
    and a worker thread that drops a finished collective's tensor once the
    interpreter has begun to finalize aborts the whole process ("terminate
    called without an active exception", SIGABRT: 5 of about 40 two-process
    runs on a loaded 2-core machine, after every rank had finished). Only
    for a process that runs nothing after its training: what it wrote is
    closed, its output flushed here."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
