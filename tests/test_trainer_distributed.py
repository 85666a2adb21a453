"""The round loop as W = 2 ranks (gloo on CPU): it runs unchanged, every rank keeps an identical
memory bank (the per-step all-gather), and the ranks write one store together."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainer.distributed import free_port



def _worker(rank: int, world_size: int, port: int, cfg_dict: dict, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    import trainer.loop as loop
    from trainer.config import TrainConfig
    from trainer.world import World

    snapshot = loop.write_feature_snapshot

    def recording_snapshot(store, r, rows, world):   # keep every rank's snapshot rows at each round end
        torch.save(rows.clone(), os.path.join(out, f"bank-rank{rank}-round{r}.pt"))
        snapshot(store, r, rows, world)

    loop.write_feature_snapshot = recording_snapshot
    world = World(rank=rank, world_size=world_size, local_rank=rank, device=torch.device("cpu"))
    summary = loop.train(TrainConfig(**cfg_dict), world, log=lambda _: None)
    with open(os.path.join(out, f"summary-rank{rank}.json"), "w") as fh:
        json.dump(summary["rounds"], fh)
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_keep_identical_memory_banks_and_share_the_store(tmp_path):
    from trainer.config import TrainConfig, resolve

    cfg = resolve(TrainConfig(rounds=2, epochs_per_round=1, run_dir=str(tmp_path / "run"), seed=5))
    mp.spawn(_worker, args=(2, free_port(), cfg.to_dict(), str(tmp_path)), nprocs=2, join=True)

    for r in range(3):
        a = torch.load(tmp_path / f"bank-rank0-round{r}.pt")
        b = torch.load(tmp_path / f"bank-rank1-round{r}.pt")
        assert torch.equal(a, b), f"round {r}: the replicas diverged"
    rows = [json.loads((tmp_path / f"summary-rank{k}.json").read_text()) for k in range(2)]
    assert [r["knn_top1"] for r in rows[0]] == [r["knn_top1"] for r in rows[1]]
    assert [r["anchors"] for r in rows[0]] == [0, 750, 1500]

    from storage import Store

    store = Store.open(cfg.store)
    assert store.complete_feature_rounds() == [0, 1, 2] and store.published_rounds() == [1, 2]
    final = torch.load(tmp_path / "bank-rank0-round2.pt")
    assert torch.equal(torch.from_numpy(store.feature_reader(2).read_all()), final)
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and torch.equal(ckpt["memory"], final)
    assert not any(k.startswith("module.") for k in ckpt["model"])


@pytest.mark.slow
def test_two_ranks_publish_the_backbones_features_of_the_whole_training_set(tmp_path):
    """--neighbour-features backbone at W = 2: each rank embeds half the rows, the all-gather
    gives both the same (N, F) snapshot, and it is the final network's on the plain images."""
    from storage import Store
    from trainer.config import TrainConfig, resolve
    from trainer.data import load_dataset
    from trainer.embedding import embed, load_model

    cfg = resolve(TrainConfig(rounds=1, epochs_per_round=1, dim=32, neighbour_features="backbone",
                              run_dir=str(tmp_path / "run"), seed=5))
    mp.spawn(_worker, args=(2, free_port(), cfg.to_dict(), str(tmp_path)), nprocs=2, join=True)

    for r in range(2):
        a = torch.load(tmp_path / f"bank-rank0-round{r}.pt")
        assert a.shape == (1500, 128) and torch.equal(a, torch.load(tmp_path / f"bank-rank1-round{r}.pt"))
    store = Store.open(cfg.store)
    assert store.info.dim == 128 and store.read_neighbourhoods(1).attrs["neighbour_features"] == "backbone"
    expected = torch.nn.functional.normalize(
        embed(load_model(cfg.run_dir), load_dataset("digits").train.images, head=False), dim=1)
    torch.testing.assert_close(torch.from_numpy(store.feature_reader(1).read_all()), expected, atol=2e-5, rtol=0)


# ---------------------------------------------------------------- batch norm over the global batch

def _global_bn_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    from trainer.global_bn import convert_to_global_bn

    x, weights, bn = _bn_problem()
    bn = convert_to_global_bn(bn)
    share = x[rank::world_size].clone().requires_grad_(True)
    out = bn(share)
    (out * weights[rank::world_size]).sum().backward()
    torch.save({"out": out.detach(), "x_grad": share.grad, "weight_grad": bn.weight.grad, "bias_grad": bn.bias.grad,
                "running_mean": bn.running_mean, "running_var": bn.running_var,
                "eval": bn.eval()(x)}, os.path.join(out_dir, f"bn-rank{rank}.pt"))
    dist.destroy_process_group()


def _bn_problem():
    """A (12, 3, 4, 4) batch far from zero mean (where E[x^2] - E[x]^2 would lose digits), loss
    weights, and a BatchNorm2d with non-trivial affine parameters."""
    g = torch.Generator().manual_seed(0)
    x = 5.0 + 0.5 * torch.randn(12, 3, 4, 4, generator=g)
    weights = torch.randn(12, 3, 4, 4, generator=g)
    bn = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.5, -0.5, 2.0]))
        bn.bias.copy_(torch.tensor([0.1, 0.2, -0.3]))
    return x, weights, bn


def test_global_batch_norm_on_gloo_equals_batch_norm_on_the_whole_batch(tmp_path):
    """Each of 3 ranks holds every third image; the statistics, input gradients, summed parameter
    gradients and running statistics equal torch's BatchNorm2d on all 12 images."""
    world_size = 3
    mp.spawn(_global_bn_worker, args=(world_size, free_port(), str(tmp_path)), nprocs=world_size, join=True)
    x, weights, bn = _bn_problem()
    x = x.clone().requires_grad_(True)
    out = bn(x)
    (out * weights).sum().backward()
    ranks = [torch.load(tmp_path / f"bn-rank{r}.pt") for r in range(world_size)]
    for r, got in enumerate(ranks):
        torch.testing.assert_close(got["out"], out.detach()[r::world_size], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got["x_grad"], x.grad[r::world_size], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got["running_mean"], bn.running_mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got["running_var"], bn.running_var, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["eval"], bn.eval()(x).detach(), rtol=1e-5, atol=1e-5)
    # DDP averages parameter gradients over ranks; each rank's own is its loss's share
    torch.testing.assert_close(sum(g["weight_grad"] for g in ranks), bn.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sum(g["bias_grad"] for g in ranks), bn.bias.grad, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- W ranks compute the one-process run

def _one_epoch_worker(rank: int, world_size: int, port: int, cfg_dict: dict, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    from trainer.config import TrainConfig
    from trainer.loop import train
    from trainer.world import World

    world = World(rank=rank, world_size=world_size, local_rank=rank, device=torch.device("cpu"))
    train(TrainConfig(**cfg_dict), world, log=lambda _: None)
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_train_the_same_network_as_one_process(tmp_path):
    """Two epochs (24 steps; the instance loss, so no rebuild in between) at W = 2 and at W = 1
    from the same seed: the same global batches, the same augmentation of every image, batch
    norm over the global batch and averaged gradients give the same weights and memory bank up
    to float rounding, which 24 steps amplify: W = 2 lies no farther from W = 1 than W = 1 at two
    threads instead of one does (measured without flip: 9.3% and 10.2% of how far training moved
    the worst weight; with --hflip 1.2% and 0%). With --no-sync-bn each rank normalises its own
    half batch: a different network (measured, weights up to 59% of their movement away).
    Two threads are not a noise floor on every machine: where the BLAS sums a two-thread GEMM in
    the one-thread order (seen on an AMD EPYC with 1 MiB L2 per core, 2026-12-02: 0.5%, while W = 2
    lay 9.8% away and --no-sync-bn 100%), the rounding that W = 2's all-reduces add still moves
    the weights. So W = 2 may also lie up to a fifth of the --no-sync-bn gap away: rounding stays
    inside it on both machines measured, a W = 2 that trained another network does not."""
    from trainer.config import TrainConfig, resolve
    from trainer.loop import train
    from trainer.world import World

    def config(name: str, sync_bn: bool = True) -> TrainConfig:
        return resolve(TrainConfig(method="instance", rounds=1, epochs_per_round=1, run_dir=str(tmp_path / name),
                                   seed=3, sync_bn=sync_bn))

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        # W = 1 at one thread (as in the workers) and at two: the same arithmetic summed in another
        # order, the float-rounding drift that 24 steps amplify (restored for the tests after this one)
        for name, count in (("w1", 1), ("w1-two-threads", 2)):
            torch.set_num_threads(count)
            train(config(name), World.single(), log=lambda _: None)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    for name, sync_bn in (("w2", True), ("w2-local-bn", False)):
        mp.spawn(_one_epoch_worker, args=(2, free_port(), config(name, sync_bn).to_dict(), str(tmp_path)),
                 nprocs=2, join=True)

    torch.manual_seed(3)
    from trainer.models import build_model

    start = build_model("smallcnn", 8, 128).state_dict()
    one = torch.load(tmp_path / "w1" / "checkpoint.pt", weights_only=True)

    def largest_relative_gap(name: str) -> float:
        """max over weights of |W=2 - W=1| / |W=1 - start| (integer buffers must be equal)."""
        other = torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)
        gaps = []
        for key, value in one["model"].items():
            if not value.is_floating_point():
                assert torch.equal(value, other["model"][key]), key
                continue
            moved = float((value - start[key]).abs().max())
            gaps.append(float((value - other["model"][key]).abs().max()) / moved)
        return max(gaps)

    rounding = largest_relative_gap("w1-two-threads")
    same, local_bn = largest_relative_gap("w2"), largest_relative_gap("w2-local-bn")
    print(f"largest gap to W=1, relative to training's movement: W=1 two threads {rounding:.4f}, "
          f"W=2 {same:.4f}, W=2 --no-sync-bn {local_bn:.4f}")
    assert same <= max(3e-2, 1.5 * rounding, 0.2 * local_bn)
    assert local_bn >= max(0.1, 3 * same)
    def memory_gap(name: str) -> float:
        other = torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)
        return float((other["memory"] - one["memory"]).abs().max())

    # the bank's unit rows, likewise (measured without flip: W = 2 5.0e-3, W = 1 at two threads 5.9e-3;
    # on the machine where two threads sum in the one-thread order, 5.1e-3 and 3.0e-4)
    print(f"memory bank: W=1 two threads {memory_gap('w1-two-threads'):.2e}, W=2 {memory_gap('w2'):.2e}, "
          f"W=2 --no-sync-bn {memory_gap('w2-local-bn'):.2e}")
    assert memory_gap("w2") <= max(1e-3, 1.5 * memory_gap("w1-two-threads"), 0.2 * memory_gap("w2-local-bn"))
