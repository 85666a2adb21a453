"""Launching W local workers with torch's elastic agent, and joining their process group.

``nbr-index rebuild --world-size W`` (and ``trainer run --world-size W``, which imports this
module) starts W local workers with torch's elastic agent: the machinery behind ``torchrun``,
with c10d rendezvous, RANK / WORLD_SIZE / LOCAL_RANK in the environment, and restarts of the
whole worker group on failure. Started under an outer ``torchrun`` (multi-node), a command finds
those variables already set and runs as that worker directly. Backend: gloo on CPU, nccl on CUDA.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

from storage.errors import UserError

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


def environment_rank() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the launcher's environment; (0, 1, 0) without one."""
    if not launched_by_torchrun():
        return 0, 1, 0
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])


def init_process_group(device: torch.device, rank: int, world_size: int, prefix: str,
                       timeout_s: float = 600.0) -> None:
    """Join the launcher's process group (once per process), with a rendezvous store of its own
    per restart attempt (see :func:`attempt_store`)."""
    if dist.is_initialized():
        return
    timeout = timedelta(seconds=timeout_s)
    dist.init_process_group(backend=backend_for(device), store=attempt_store(rank, world_size, timeout, prefix),
                            rank=rank, world_size=world_size, timeout=timeout)


def leave_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def attempt_store(rank: int, world_size: int, timeout: timedelta, prefix: str) -> dist.Store:
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
    return dist.PrefixStore(f"{prefix}/attempt-{restart_count()}", store)


def launch_local(worker, args: tuple, world_size: int, max_restarts: int = 0,
                 master_port: int = 0, run_id: str = "and-trainer") -> dict:
    """Run ``worker(*args)`` in ``world_size`` local processes under the elastic agent.

    ``worker`` must be a module-level function (it is pickled into spawned processes). The
    agent restarts the whole group up to ``max_restarts`` times when any worker dies. Returns
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
