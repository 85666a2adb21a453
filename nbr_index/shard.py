"""A rebuild split over W workers: each computes its share of the tiles, the partial statistics
are combined over torch.distributed, and rank 0 publishes the round once.

- ``nbr-index rebuild --world-size W`` (:func:`rebuild_sharded`) launches W local workers with
  torch's elastic agent (``launch.py``: c10d rendezvous, gloo on CPU, nccl on CUDA); under an
  outer ``torchrun`` every process is one worker (:func:`join_launcher_group`).
- The trainer's inline rebuild passes a :class:`ProcessGroupShard` of its own process group, so
  its W ranks rebuild together.

The shares are contiguous ranges of the tiles (``fused.shard_tile_runs``), and the statistics
merge exactly (``partial.py``), so W workers publish what one process publishes, bit for bit.
Before any tile is computed the workers agree (:meth:`ProcessGroupShard.agree`): a worker that
cannot open the store, or sees another snapshot, curriculum or tiling than rank 0, makes every
worker stop with the same one-line error, and nothing is published. A restart by the elastic
agent (``--max-restarts``) recomputes the round from the store; publishing is idempotent, so the
round is published exactly once.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from storage import Store
from storage.errors import UserError

from .checks import resolve_device
from .errors import NbrIndexError
from .launch import (environment_rank, init_process_group, launch_local, leave_process_group,
                     restart_count)
from .partial import PartialStatistics, merge_best_

RUN_ID = "nbr-index-rebuild"


class WorkerViewError(NbrIndexError):
    """Workers of one sharded rebuild do not see the same store, round or parameters."""


@dataclass(frozen=True)
class ProcessGroupShard:
    """Worker ``index`` of the ``count`` ranks of the default torch.distributed process group."""

    index: int
    count: int

    @classmethod
    def of_process_group(cls) -> "ProcessGroupShard":
        return cls(dist.get_rank(), dist.get_world_size())

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def combine(self, partial: PartialStatistics) -> PartialStatistics:
        """The statistics of every worker's tiles, on every worker: the fixed-point sums are
        all-reduced (exact), the top-k sets all-gathered and merged in rank order."""
        if self.count == 1:
            return partial
        dist.all_reduce(partial.exp_sum, op=dist.ReduceOp.SUM)
        dist.all_reduce(partial.exp_dot, op=dist.ReduceOp.SUM)
        if partial.values is not None:
            values = [torch.empty_like(partial.values) for _ in range(self.count)]
            indices = [torch.empty_like(partial.indices) for _ in range(self.count)]
            dist.all_gather(values, partial.values)
            dist.all_gather(indices, partial.indices)
            merged_values, merged_indices = values[0], indices[0]
            for other_values, other_indices in zip(values[1:], indices[1:]):
                merge_best_(merged_values, merged_indices, other_values, other_indices)
            partial.values, partial.indices = merged_values, merged_indices
        return partial

    def agree(self, view: dict | None, error: UserError | None = None) -> list[dict]:
        """Every worker's ``view`` (what it is about to compute), once all have one.

        If some worker had ``error`` instead, every worker raises the first such error (in rank
        order); if some view differs from rank 0's, every worker raises WorkerViewError. Keys
        starting with "_" are reported, not compared.
        """
        if self.count == 1:
            if error is not None:
                raise error
            return [view]
        mine = {"error": str(error), "kind": type(error).__name__} if error is not None else {"view": view}
        everyone: list = [None] * self.count
        dist.all_gather_object(everyone, mine)
        for rank, entry in enumerate(everyone):
            if "error" in entry:
                if rank == self.index:
                    raise error
                raise NbrIndexError(entry["error"]) from None
        views = [entry["view"] for entry in everyone]
        for rank, other in enumerate(views[1:], start=1):
            for key in sorted(set(views[0]) | set(other)):
                if not key.startswith("_") and views[0].get(key) != other.get(key):
                    raise WorkerViewError(
                        f"worker rank {rank} sees {key} = {other.get(key)!r} where rank 0 sees "
                        f"{views[0].get(key)!r}: every worker must open the same store (--store) with "
                        f"the same round and parameters"
                    )
        return views

    def barrier(self) -> None:
        if self.count > 1:
            dist.barrier()


# ----------------------------------------------------------------------- launching the workers


def rebuild_sharded(store_url: str, round: int, world_size: int, *, max_restarts: int = 0, master_port: int = 0,
                    stall_seconds: float = 0.0, progress_seconds: float = 5.0, quiet: bool = False,
                    **rebuild_options):
    """Rebuild one round with ``world_size`` local workers under the elastic agent.

    rebuild_options go to :func:`nbr_index.rebuild` (rounds, k, tau, mode, backend, device, ...).
    Bad input fails here, before any worker starts; an error a worker meets is raised here as one
    line. Returns the :class:`nbr_index.RebuildResult` of the published round. stall_seconds:
    test hook, every worker of the first attempt sleeps this long at its first progress report
    (so that a test can kill one mid-pass).
    """
    from .rebuild import check_rebuild_arguments, published_result

    store = Store.open(store_url)
    check_rebuild_arguments(store, round, world_size=world_size, **rebuild_options)
    resolve_device(rebuild_options.get("device", "cpu"), local_workers=world_size)
    outcomes = launch_local(_rebuild_worker, (store.url, round, rebuild_options, stall_seconds, progress_seconds,
                                              quiet), world_size, max_restarts, master_port, run_id=RUN_ID)
    outcome = outcomes[0]
    if "error" in outcome:
        raise NbrIndexError(outcome["error"])
    return published_result(store, round, published=outcome["published"])


def _rebuild_worker(store_url: str, round: int, rebuild_options: dict, stall_seconds: float,
                    progress_seconds: float, quiet: bool) -> dict:
    """One worker of :func:`rebuild_sharded` (spawned by the elastic agent). A UserError comes back
    as {"error": message}: bad input does not get better with a restart."""
    shard, device = join_launcher_group(rebuild_options.get("device", "cpu"))
    try:
        result = rebuild_as_worker(store_url, round, shard, stall_seconds=stall_seconds,
                                   progress_seconds=progress_seconds, quiet=quiet, **{**rebuild_options, "device": device})
        return {"published": result.published}
    except UserError as error:
        return {"error": str(error)}
    finally:
        leave_process_group()


def join_launcher_group(device: str) -> tuple[ProcessGroupShard, str]:
    """Join the process group of the launcher's environment (elastic agent or torchrun): this
    worker's shard, and its device (cuda:LOCAL_RANK on CUDA)."""
    rank, world_size, local_rank = environment_rank()
    torch_device = torch.device(f"cuda:{local_rank}" if str(device).startswith("cuda") else "cpu")
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
    if world_size > 1:
        init_process_group(torch_device, rank, world_size, RUN_ID)
    return ProcessGroupShard(rank, world_size), str(torch_device)


def rebuild_as_worker(store_url: str, round: int, shard: ProcessGroupShard, *, stall_seconds: float = 0.0,
                      progress_seconds: float = 5.0, quiet: bool = False, **rebuild_options):
    """Open the store (all workers agree they could), then rebuild this worker's share of the round
    (rebuild_options["device"]: this worker's device, from :func:`join_launcher_group`)."""
    from .progress import StderrProgress
    from .rebuild import rebuild

    from .rebuild import check_rebuild_arguments

    store = error = None
    try:
        store = Store.open(store_url)
        check_rebuild_arguments(store, round, world_size=shard.count, **rebuild_options)  # W <= row blocks, ...
    except UserError as failure:
        error = failure
    shard.agree({}, error)
    options = dict(rebuild_options)
    if torch.device(options.get("device", "cpu")).type == "cpu" and options.get("workers") is None:
        # W local workers share the cores: one pass thread per core and worker.
        local_workers = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        options["workers"] = max(1, (os.cpu_count() or 1) // local_workers)
    report = None if quiet or not shard.is_main else StderrProgress(
        f"nbr-index rebuild round {round} (rank 0 of {shard.count})", every_seconds=progress_seconds)
    still_to_stall = stall_seconds > 0 and restart_count() == 0  # a restarted worker does not stall again

    def progress(done: int, total: int) -> None:
        nonlocal still_to_stall
        if still_to_stall:
            still_to_stall = False
            print(f"worker rank {shard.index}: stalling {stall_seconds:.0f} s (test hook)", flush=True)
            time.sleep(stall_seconds)
        if report is not None:
            report(done, total)

    return rebuild(store, round, shard=shard, progress=progress, **options)
