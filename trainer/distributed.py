"""Launching W trainer ranks and joining their process group.

``trainer run --world-size W`` starts W local workers with torch's elastic agent (the
machinery behind ``torchrun``: c10d rendezvous, RANK / WORLD_SIZE / LOCAL_RANK in the
environment, restarts of the whole worker group on failure). Started under an outer
``torchrun`` (multi-node), the command finds those variables already set and runs as that
worker directly.

Backend: gloo on CPU, nccl on CUDA. Every rank holds the whole memory bank; the round loop
keeps the replicas identical by all-gathering (indices, features) each step (see
``trainer.loop``), so nothing here knows about AND itself.
"""
from __future__ import annotations

import os
import socket
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from storage.errors import UserError
from trainer.world import World, check_device

_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class LaunchError(UserError):
    """The distributed job cannot start as asked."""


def launched_by_torchrun() -> bool:
    """True inside a worker started by torchrun / the elastic agent (the env is set)."""
    return all(name in os.environ for name in _LAUNCHER_VARS)


def restart_count() -> int:
    """How many times the elastic agent has restarted this worker group (0 on the first try)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def check_device_for_world(device: str, world_size: int) -> None:
    """One-line errors for device requests this machine cannot satisfy."""
    if world_size < 1:
        raise LaunchError(f"--world-size must be at least 1, got {world_size}")
    check_device(device)
    if device.startswith("cuda"):
        if world_size > torch.cuda.device_count():
            raise LaunchError(
                f"--world-size {world_size} with nccl needs {world_size} GPUs, "
                f"this machine has {torch.cuda.device_count()}: lower --world-size or use --device cpu"
            )


def check_port_free(port: int, host: str = "127.0.0.1") -> None:
    """Refuse a rendezvous port another process holds (the elastic agent would hang on it)."""
    if port == 0:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            raise LaunchError(
                f"rendezvous port {port} is in use: pick a free --master-port, or 0 to choose one"
            ) from None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def join_world(device: str, timeout_s: float = 600.0) -> World:
    """Join the process group described by the launcher's environment.

    Call once per worker. With ``WORLD_SIZE=1`` (or no launcher env) it returns the
    one-process world without creating a process group.
    """
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return World.single(device)
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    torch_device = torch.device(f"cuda:{local_rank}") if device.startswith("cuda") else torch.device("cpu")
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend_for(torch_device),
            store=_attempt_store(rank, world_size, timedelta(seconds=timeout_s)),
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
        )
    return World(rank=rank, world_size=world_size, local_rank=local_rank, device=torch_device)


def _attempt_store(rank: int, world_size: int, timeout: timedelta) -> dist.Store:
    """The rendezvous key-value store, under a prefix of its own for each restart attempt.

    The elastic agent keeps one TCPStore across restarts (TORCHELASTIC_USE_AGENT_STORE); without
    a per-attempt prefix the restarted ranks read the dead attempt's gloo addresses from it and
    fail with 'connection refused'. Where the agent does not host the store, rank 0 does.
    """
    agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        host_name=os.environ["MASTER_ADDR"],
        port=int(os.environ["MASTER_PORT"]),
        world_size=world_size,
        is_master=not agent_hosts and rank == 0,
        timeout=timeout,
    )
    return dist.PrefixStore(f"and-trainer/attempt-{restart_count()}", store)


def leave_world(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def launch_local(worker, args: tuple, world_size: int, max_restarts: int = 0,
                 master_port: int = 0, run_id: str = "and-trainer") -> dict:
    """Run ``worker(*args)`` in ``world_size`` local processes under the elastic agent.

    ``worker`` must be a module-level function (it is pickled into spawned processes). The
    agent restarts the whole group up to ``max_restarts`` times when any worker dies; the
    worker resumes from its last checkpoint (``restart_count() > 0``). Returns
    {rank: return value}. A failure after the last restart raises :class:`LaunchError`.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    check_port_free(master_port)
    port = master_port or free_port()
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=world_size,
        run_id=run_id,
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{port}",
        rdzv_configs={"is_host": True},
        max_restarts=max_restarts,
        monitor_interval=0.5,
        start_method="spawn",
    )
    try:
        return elastic_launch(config, worker)(*args)
    except ChildFailedError as failure:
        rank, first = next(iter(failure.failures.items()))
        raise LaunchError(
            f"worker rank {rank} failed (exit code {first.exitcode}) after "
            f"{max_restarts} restart(s); see the log above, or raise --max-restarts"
        ) from None


def train_worker(cfg_dict: dict, resume: bool, check_replicas: bool) -> dict | None:
    """One rank of ``trainer run --world-size W`` (spawned by the elastic agent, or by an outer torchrun).

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
        summary = train(cfg, world, resume=resume, log=log, check_replicas=check_replicas)
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
