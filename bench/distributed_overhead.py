"""Per-step cost of the memory-bank synchronisation at W ranks (gloo on CPU, nccl on CUDA).

    .venv/bin/python bench/distributed_overhead.py --world-size 2
    .venv/bin/python bench/distributed_overhead.py --world-size 2 --size 32 --n 50000

Each rank runs the loop's real step (augmentation, DDP forward/backward/SGD step, AND loss over
the whole N-row bank) and then the synchronisation the loop adds: all-gather (indices, features)
of every rank and the EMA update of the bank. Both parts are timed per step on every rank (after
a barrier, so waiting for a slower rank is not counted as either) and the script prints
sync / (step + sync), measured in one run. Target at W = 2 on CPU: under 10%.

The step's batch norm runs over the global batch, as in the loop (``trainer.global_bn`` on CPU,
one small all-reduce per layer forward and one backward). Its cost is printed too: the same step
with per-rank batch norm (``--no-sync-bn``) is timed in the same run, alternating step by step.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

import click
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trainer.augment import AugmentSpec, augment  # noqa: E402
from trainer.distributed import free_port  # noqa: E402
from trainer.loss import and_loss  # noqa: E402
from trainer.memory import ema_update_, init_memory  # noqa: E402
from trainer.models import build_model  # noqa: E402
from trainer.schedule import make_optimizer  # noqa: E402
from trainer.world import World  # noqa: E402


def _rank(rank: int, world_size: int, port: int, arch: str, size: int, batch: int, n: int, steps: int,
          threads: int, out) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    world = World(rank=rank, world_size=world_size, local_rank=rank, device=torch.device("cpu"))
    torch.manual_seed(0)
    model = build_model(arch, size)
    local_bn_model = build_model(arch, size)
    optimizer = make_optimizer(model.parameters(), 0.03)
    local_bn_optimizer = make_optimizer(local_bn_model.parameters(), 0.03)
    ddp = world.wrap_model(model, sync_bn=True)                      # batch norm over the global batch
    local_bn_ddp = world.wrap_model(local_bn_model, sync_bn=False)   # per-rank batch norm (--no-sync-bn)
    memory = init_memory(n, 128, torch.Generator().manual_seed(0))
    spec = AugmentSpec(size, (0.5,) * 3, (0.25,) * 3)
    images = (torch.rand(batch // world_size, 3, size, size) * 255).to(torch.uint8)
    anchor = torch.ones(n, dtype=torch.bool)
    neighbours = torch.randint(0, n, (n, 1), generator=torch.Generator().manual_seed(2))
    aug_gen = torch.Generator().manual_seed(10)                      # shared: each rank takes its rows
    idx_gen = torch.Generator().manual_seed(20 + rank)

    def train_step(net, opt, idx):
        feats = net(augment(images, spec, aug_gen, rank, world_size))
        loss = and_loss(feats, memory, idx, anchor, neighbours, 0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return feats

    step_s, sync_s, local_bn_s = [], [], []
    for step in range(steps + 3):                      # 3 warm-up steps
        idx = torch.randint(0, n, (batch // world_size,), generator=idx_gen)
        world.barrier()
        start = time.perf_counter()
        feats = train_step(ddp, optimizer, idx)
        middle = time.perf_counter()
        with torch.no_grad():
            ema_update_(memory, *world.all_gather_indexed(idx, feats.detach()), 0.5)
        end = time.perf_counter()
        world.barrier()
        local_start = time.perf_counter()
        train_step(local_bn_ddp, local_bn_optimizer, idx)
        local_end = time.perf_counter()
        if step >= 3:
            step_s.append(middle - start)
            sync_s.append(end - middle)
            local_bn_s.append(local_end - local_start)
    out.put((rank, statistics.median(step_s), statistics.median(sync_s), statistics.median(local_bn_s)))
    dist.destroy_process_group()


@click.command()
@click.option("--world-size", type=int, default=2, show_default=True)
@click.option("--arch", default="smallcnn", show_default=True)
@click.option("--size", type=int, default=8, show_default=True, help="image side (8: digits)")
@click.option("--batch", type=int, default=128, show_default=True, help="global batch")
@click.option("--n", type=int, default=1500, show_default=True, help="memory-bank rows")
@click.option("--steps", type=int, default=30, show_default=True)
@click.option("--threads", type=int, default=1, show_default=True, help="torch threads per rank")
def main(world_size, arch, size, batch, n, steps, threads):
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    args = (world_size, free_port(), arch, size, batch, n, steps, threads, out)
    procs = [ctx.Process(target=_rank, args=(rank, *args)) for rank in range(world_size)]
    for p in procs:
        p.start()
    results = sorted(out.get(timeout=600) for _ in procs)
    for p in procs:
        p.join()
    step = max(r[1] for r in results)
    sync = max(r[2] for r in results)
    local_bn = max(r[3] for r in results)
    print(f"W={world_size} {arch} {size}px global batch {batch} N={n}: median per step "
          f"{step * 1e3:.2f} ms train step, {sync * 1e3:.2f} ms all-gather + bank update "
          f"-> sync is {100 * sync / (step + sync):.1f}% of the step (target < 10%)")
    print(f"batch norm over the global batch: train step {step * 1e3:.2f} ms vs {local_bn * 1e3:.2f} ms with "
          f"per-rank batch norm -> {100 * (step - local_bn) / step:+.1f}% of the step")


if __name__ == "__main__":
    main()
