"""The round loop as W = 2 ranks (gloo on CPU): it runs unchanged, every rank keeps an identical
memory bank (the per-step all-gather), and the ranks write one store together."""
from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, cfg_dict: dict, out: str) -> None:
    sys.path.insert(0, str(ROOT))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    import trainer.loop as loop
    from trainer.config import TrainConfig
    from trainer.world import World

    snapshot = loop.write_feature_snapshot

    def recording_snapshot(store, r, memory, world):   # keep every rank's bank at each round end
        torch.save(memory.clone(), os.path.join(out, f"bank-rank{rank}-round{r}.pt"))
        snapshot(store, r, memory, world)

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
    mp.spawn(_worker, args=(2, _free_port(), cfg.to_dict(), str(tmp_path)), nprocs=2, join=True)

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
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert ckpt["world_size"] == 2 and torch.equal(ckpt["memory"], final)
    assert not any(k.startswith("module.") for k in ckpt["model"])
