"""Launching W trainer ranks and joining their process group.

``trainer run --world-size W`` starts W local workers with torch's elastic agent (the
machinery behind ``torchrun``: c10d rendezvous, RANK / WORLD_SIZE / LOCAL_RANK in the
environment, restarts of the whole worker group on failure). Started under an outer
``torchrun`` (multi-node), the command finds those variables already set and runs as that
worker directly.

Backend: gloo on CPU, nccl on CUDA. The launch itself (the elastic agent, the per-attempt
rendezvous store, the port checks) is ``nbr_index.launch``, shared with ``nbr-index rebuild``.
Every rank holds the whole memory bank; the round loop keeps the replicas identical by
all-gathering (indices, features) each step (see ``trainer.loop``), so nothing here knows about
AND itself.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

from nbr_index.launch import (LaunchError, check_port_free, environment_rank,  # noqa: F401
                              free_port, init_process_group, launch_local, launched_by_torchrun, restart_count)
from storage.errors import UserError
from trainer.world import World

#: The TCP ports a rendezvous can bind (0: the system picks a free one).
PORT_RANGE = (0, 65535)


def check_launch(world_size: int, max_restarts: int, master_port: int) -> None:
    """The launch flags of ``trainer run``, checked with its config before anything is written
    (a port outside PORT_RANGE made socket.bind raise OverflowError inside the launch)."""
    if world_size < 1:
        raise LaunchError(f"--world-size must be at least 1, got {world_size}")
    if max_restarts < 0:
        raise LaunchError(f"--max-restarts must be 0 or more, got {max_restarts}")
    low, high = PORT_RANGE
    if not low <= master_port <= high:
        raise LaunchError(f"--master-port must be a TCP port in [1, {high}], or 0 to pick a free one, "
                          f"got {master_port}")


def join_world(device: str, timeout_s: float = 600.0) -> World:
    """Join the process group described by the launcher's environment.

    Call once per worker. With ``WORLD_SIZE=1`` (or no launcher env) it returns the
    one-process world without creating a process group.
    """
    rank, world_size, local_rank = environment_rank()
    if world_size == 1:
        return World.single(device)
    torch_device = torch.device(f"cuda:{local_rank}") if device.startswith("cuda") else torch.device("cpu")
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
    init_process_group(torch_device, rank, world_size, "and-trainer", timeout_s)
    return World(rank=rank, world_size=world_size, local_rank=local_rank, device=torch_device)


def leave_world(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def train_worker(cfg_dict: dict, resume: bool, check_replicas: bool, held_by: str | None = None) -> dict | None:
    """One rank of ``trainer run --world-size W`` (spawned by the elastic agent, or by an outer torchrun).

    ``held_by``: the run id of the launcher that holds the store's lease and the run dir's lock for
    all workers and restarts (``trainer.run_lock``); None (an outer torchrun): rank 0 takes them.

    After a restart by the agent (a worker died), every rank resumes from the run's last
    checkpoint; the first attempt honours ``resume`` as given. Returns the summary on rank 0.
    """
    from trainer.checkpoint import checkpoint_path
    from trainer.config import config_from_dict
    from trainer.loop import train

    cfg = config_from_dict(cfg_dict)
    world = join_world(cfg.device)
    try:
        if restart_count() > 0:
            resume = os.path.exists(checkpoint_path(cfg.run_dir))
            if world.is_main:
                print(f"restart {restart_count()}: " + ("resuming from the last checkpoint" if resume
                                                         else "no checkpoint yet, starting over"), flush=True)
        log = run_dir_log(cfg.run_dir) if world.is_main else (lambda _message: None)
        summary = train(cfg, world, resume=resume, log=log, check_replicas=check_replicas, held_by=held_by)
    except UserError as err:
        # One line for the user; the agent reports the exit status (and restarts, if allowed).
        print(f"error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    finally:
        leave_world(world)
    return summary if world.is_main else None


def run_dir_log(run_dir: str):
    """A log function: print (flushed, the agent's pipes buffer) and append to <run_dir>/train.log."""
    log_path = os.path.join(run_dir, "train.log")

    def log(message: str) -> None:
        print(message, flush=True)
        if os.path.isdir(run_dir):
            with open(log_path, "a") as fh:
                fh.write(message + "\n")
    return log
