"""The AND round loop. Read :func:`train` top to bottom: it is the whole method.

    round 0            instance loss only (every sample is its own neighbourhood)
    round r = 1..R     neighbourhoods/round-r (kNN + entropy of features/round-(r-1), the
                       floor(N r / R) lowest-entropy samples as anchors) -> AND loss
    every round        the lr schedule restarts; network, optimiser and memory bank carry over;
                       at its end the memory bank is written to the store as features/round-r

The same code runs as one process or as each of W ranks (``World``): each rank trains on its
shard of the epoch (``trainer.sharding``) with batch_size / W images per step, DDP averages the
gradients, and every step all-gathers (indices, features) in rank order so that every rank
applies the same memory-bank update. Rank 0 alone rebuilds neighbourhoods (inline mode), writes
checkpoints, summaries and plots; every rank writes its own chunks of the feature snapshots.

The concerns around the loop live beside it: the checks before a run (``trainer.preflight``),
what a checkpoint carries (``trainer.run_state``), the round's anchors (``trainer.round_anchors``),
the store's lifecycle (``trainer.run_store``) and the kNN evaluation (``trainer.evaluation``).
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from trainer.checkpoint import checkpoint_path, load_checkpoint, remove_stale_temp_files
from trainer.config import TrainConfig, save_config
from trainer.data import ImageDataset
from trainer.errors import TrainerError
from trainer.evaluation import evaluate_knn
from trainer.loss import and_loss
from trainer.memory import ema_update_, init_memory
from trainer.models import build_model, compile_for_training, unwrap
from trainer.preflight import preflight
from trainer.progress import Progress
from trainer.round_anchors import RoundAnchors, anchors_for_round
from trainer.run_lock import RunLocks, run_locks
from trainer.run_state import RunState
from trainer.run_store import open_store, published_entropies, snapshot_rows, write_feature_snapshot
from trainer.schedule import lr_at, make_optimizer, set_lr
from trainer.seeding import generator, set_determinism
from trainer.sharding import epoch_batches
from trainer.tensorboard_log import EventLog
from trainer.world import World
from trainer import report

# Progress lines inside a long epoch at most this often (seconds) where no terminal shows a bar.
PROGRESS_EVERY_S = 30.0


class Diverged(TrainerError):
    """A training step's loss was NaN or infinite."""


@dataclass
class Run:
    """What stays fixed while a run trains: its config, its ranks, its data, where it reports."""
    cfg: TrainConfig
    world: World
    data: ImageDataset
    say: Callable[[str], None]     # rank 0's log; a no-op on the other ranks
    check_replicas: bool = False   # debug: assert identical banks and weights on all ranks every epoch


def train(cfg: TrainConfig, world: World, resume: bool = False, log: Callable[[str], None] = print,
          check_replicas: bool = False, data: ImageDataset | None = None, held_by: str | None = None) -> dict:
    """Train (or, with ``resume``, continue from ``<run_dir>/checkpoint.pt``) the whole method.

    ``cfg`` must be resolved (``trainer.config.resolve``): run_dir, store and epochs_per_round set.
    Every rank calls this with the same ``cfg``; returns the summary dict (the same on every rank).
    ``data``: the dataset ``trainer.preflight.preflight`` returned in this process (its checks are
    then not repeated); None: run them here. ``check_replicas``: after every epoch, assert that all
    ranks hold bit-identical memory banks and model weights (a debug mode: one digest per epoch).
    ``held_by``: the id of the run whose launcher holds the store's lease and the run dir's lock
    (``trainer.run_lock``); None: rank 0 takes them here, before anything is written.
    Raises TrainerError / storage.UserError for bad input before anything is written to the store.
    """
    if data is None:
        data = preflight(cfg, world.world_size, resume)
    with run_locks(cfg, world, held_by) as locks:
        return train_holding_locks(cfg, world, resume, log, check_replicas, data, locks)


def train_holding_locks(cfg: TrainConfig, world: World, resume: bool, log: Callable[[str], None],
                        check_replicas: bool, data: ImageDataset, locks: RunLocks) -> dict:
    """:func:`train`'s rounds, once this run is its store's and run dir's one writer."""
    run = Run(cfg, world, data, log if world.is_main else (lambda *_: None), check_replicas)
    set_determinism(cfg.deterministic)
    state = initial_state(run, resume)
    store = open_store(cfg, data, world, locks)
    if world.is_main:
        remove_stale_temp_files(cfg.run_dir)   # of a killed save; this run now holds the run dir's lock
        save_config(cfg, os.path.join(cfg.run_dir, "config.yaml"))
    for line in [describe(run), *data.notes]:
        run.say(line)
    events = EventLog.open(cfg.run_dir, cfg.tensorboard and world.is_main, cfg.epochs_per_round, len(data.train),
                           resume_step=state.round * cfg.epochs_per_round + state.epoch if resume else None)
    ddp_model = world.wrap_model(state.model, cfg.sync_bn)
    if cfg.compile:
        ddp_model = compile_for_training(ddp_model)
    run_start = time.perf_counter()

    for r in range(state.round, cfg.rounds + 1):
        state.start_round(r)
        # none in round 0; checked to come from this run's features/round-(r-1) and curriculum
        anchors = anchors_for_round(r, cfg, store, world, run.say, state.snapshot_checksum(r - 1))
        run.say(f"round {r}/{cfg.rounds}: {anchors.count} anchors of {len(data.train)}"
                + ("" if anchors.consistency is None else f", consistency {anchors.consistency:.1f}%"))
        while state.epoch < cfg.epochs_per_round:   # the lr schedule restarts every round
            row = train_and_evaluate_epoch(run, ddp_model, state, anchors)
            state.epoch_done(row)
            events.epoch(row)
            save_checkpoint_on_main(run, state)
        finish_round(run, state, store, anchors)
        events.round(state.rounds[-1], anchors.entropy)
        save_checkpoint_on_main(run, state)

    summary = {"config": cfg.to_dict(), "rounds": state.rounds,
               "final_knn_top1": state.rounds[-1]["knn_top1"] if state.rounds else None,
               "final_knn_top1_recomputed": final_knn_recomputed(run, state),
               "best_epoch": report.best_epoch(state.history), "epochs": state.history}
    if world.is_main:
        write_report(run, state, store, summary, time.perf_counter() - run_start)
    events.close()
    world.barrier()
    return summary


def initial_state(run: Run, resume: bool) -> RunState:
    """A fresh run's state or, with ``resume``, the one its checkpoint holds."""
    state = new_run_state(run.cfg, run.data, run.world.device)
    if resume:
        path = checkpoint_path(run.cfg.run_dir)
        state.load_state_dict(load_checkpoint(path), path)
        run.say(f"resuming {run.cfg.run_dir} at round {state.round} epoch {state.epoch}")
    return state


def new_run_state(cfg: TrainConfig, data: ImageDataset, device: torch.device) -> RunState:
    """The network, its optimiser and the memory bank (N, dim) of a fresh run, seeded by cfg.seed."""
    if device.type == "cuda":
        data.stage(device)  # in-memory sets live on the GPU: indexing and augmentation happen there
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.arch, data.image_size, cfg.dim).to(device)
    if device.type == "cuda":   # NHWC convolutions use the tensor cores without layout transposes
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model.parameters(), cfg.lr, cfg.momentum, cfg.weight_decay, cfg.nesterov)
    memory = init_memory(len(data.train), cfg.dim, generator(cfg.seed, "memory"), device)
    return RunState(model, optimizer, memory)


def describe(run: Run) -> str:
    cfg, data, world = run.cfg, run.data, run.world
    return (f"{cfg.method} on {cfg.dataset} (N={len(data.train)}, test {len(data.test)}, {data.image_size}px) "
            f"with {cfg.arch}, rounds 0..{cfg.rounds} x {cfg.epochs_per_round} epochs, batch {cfg.batch_size} "
            f"over {world.world_size} rank(s), device {world.device}, store {cfg.store}"
            + (f", neighbourhoods from {cfg.neighbour_features} features" if cfg.neighbour_features != "bank" else ""))


def train_and_evaluate_epoch(run: Run, ddp_model: torch.nn.Module, state: RunState, anchors: RoundAnchors) -> dict:
    """The epoch ``state.epoch`` of round ``state.round`` at its lr, then the kNN where
    cfg.eval_every asks (the round's last epoch gets the round's kNN in finish_round).
    Returns the epoch's history row."""
    cfg, r, epoch = run.cfg, state.round, state.epoch
    lr = lr_at(epoch, cfg.epochs_per_round, cfg.lr, cfg.lr_milestones, cfg.lr_gamma)
    set_lr(state.optimizer, lr)
    stats = train_one_epoch(run, ddp_model, state, anchors)
    run.world.sync_buffers(state.model)
    row = {"round": r, "epoch": epoch, "lr": lr, **stats}
    if (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0 and epoch + 1 < cfg.epochs_per_round
            and run.data.has_test):
        row["knn_top1"] = evaluate_knn(state.model, state.memory, run.data, cfg, run.world)
    if run.check_replicas:
        run.world.assert_identical(f"memory bank after round {r} epoch {epoch + 1}", state.memory)
        run.world.assert_identical(f"model after round {r} epoch {epoch + 1}",
                                   *unwrap(state.model).state_dict().values())
    run.say(f"round {r} epoch {epoch + 1}/{cfg.epochs_per_round}  loss {row['loss']:.4f}  lr {lr:.5f}  "
            f"{row['images_per_s']:.0f} img/s  {row['seconds']:.1f}s"
            + (f"  kNN {row['knn_top1']:.2f}%" if "knn_top1" in row else ""))
    return row


def train_one_epoch(run: Run, ddp_model: torch.nn.Module, state: RunState, anchors: RoundAnchors) -> dict:
    """One epoch over this rank's shard. Returns {loss, images_per_s, seconds} over all ranks; raises
    Diverged (on every rank, before anything of the epoch is saved) if a step's loss was not finite."""
    cfg, world, data, r, epoch = run.cfg, run.world, run.data, state.round, state.epoch
    ddp_model.train()
    device = world.device
    batches = epoch_batches(len(data.train), cfg.seed, r, epoch, world.rank, world.world_size, cfg.batch_size)
    if data.in_memory:   # every rank draws each whole global batch's augmentation and applies its rows
        aug_gen = generator(cfg.seed, "augment", r, epoch)
    else:                # DataLoader workers of streamed folders draw per rank
        aug_gen = generator(cfg.seed, "augment", r, epoch, world.rank)
    loss_sum = torch.zeros((), device=device)
    # The first step whose loss was not finite (inf: none), kept on the device: checking it every
    # step would make a GPU wait for each step; it is checked once, after the epoch, before
    # anything of the epoch is saved.
    first_nonfinite = torch.full((), math.inf, device=device)
    seen = 0
    start = time.perf_counter()
    train_batches = data.train_batches(batches, aug_gen, device, world.rank, world.world_size)
    with Progress(len(batches), f"  round {r} epoch {epoch + 1} step", run.say, enabled=world.is_main,
                  every_s=PROGRESS_EVERY_S) as progress:
        for step, (images, indices) in enumerate(train_batches):
            loss = train_step(ddp_model, state.optimizer, state.memory, images, indices, anchors, cfg, world)
            first_nonfinite = torch.where(torch.isfinite(loss), first_nonfinite, first_nonfinite.clamp(max=step))
            loss_sum += loss * indices.numel()
            seen += indices.numel()
            # update() calls the lambda at once, inside this iteration (so B023 does not apply).
            progress.update(1, lambda: f"{seen * world.world_size / (time.perf_counter() - start):.0f} img/s")  # noqa: B023
    totals = world.all_reduce_sum(torch.stack([loss_sum.float(), torch.tensor(float(seen), device=device)]))
    first_bad = float(world.all_gather_cat(first_nonfinite.view(1)).min())
    if math.isfinite(first_bad):
        raise Diverged(f"round {r} epoch {epoch + 1} step {int(first_bad) + 1}/{len(batches)}: the loss is not "
                       f"finite; stopped, saving nothing of this epoch (the last checkpoint, before it, stays): "
                       f"lower --lr, or check the data for NaN or constant images")
    seconds = time.perf_counter() - start
    return {"loss": float(totals[0] / totals[1]), "images_per_s": round(float(totals[1]) / seconds, 1),
            "seconds": round(seconds, 2)}


def network_forward(model: torch.nn.Module, images: torch.Tensor, precision: str) -> torch.Tensor:
    """model(images) as float32: images (b, 3, S, S) -> (b, out). On CUDA the images go
    channels-last (NHWC convolutions use the tensor cores without layout transposes); with
    precision "bf16" the network runs under autocast, and what follows (loss, bank) stays float32."""
    if images.device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        return model(images).float()


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, memory: torch.Tensor,
               images: torch.Tensor, indices: torch.Tensor, anchors: RoundAnchors, cfg: TrainConfig,
               world: World) -> torch.Tensor:
    """One optimisation step on this rank's batch, then the memory-bank update of every rank's.

    images (b, 3, S, S) float32 augmented; indices (b,) int64 dataset rows; memory (N, d), updated
    in place. Returns the batch's mean loss (a detached scalar).
    """
    features = network_forward(model, images, cfg.precision)            # (b, d), unit rows
    loss = and_loss(features, memory, indices, anchors.is_anchor, anchors.neighbours, cfg.tau)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    # Memory update after the step and outside autograd, with every rank's batch, in rank
    # order: all replicas of the bank apply the identical update.
    with torch.no_grad():
        ema_update_(memory, *world.all_gather_indexed(indices, features.detach()), cfg.eta)
    return loss.detach()


def finish_round(run: Run, state: RunState, store, anchors: RoundAnchors) -> None:
    """End of round ``state.round``: publish features/round-r (the memory bank, or the backbone's
    features: ``snapshot_rows``; the next rebuild reads it), evaluate, and record the round's row."""
    cfg, world, data, r = run.cfg, run.world, run.data, state.round
    rows = snapshot_rows(cfg, state.model, state.memory, data, world)
    state.snapshot_written(r, write_feature_snapshot(store, r, rows, world))   # the checksum round r + 1 checks
    knn = evaluate_knn(state.model, state.memory, data, cfg, world) if data.has_test else None
    if knn is not None and state.history and state.history[-1]["round"] == r:   # the round's last epoch row too
        state.history[-1]["knn_top1"] = knn
    best = report.best_epoch(state.history, r)
    row = {"round": r, "knn_top1": knn, "best_epoch_knn_top1": best["knn_top1"], "best_epoch": best["epoch"],
           "anchors": anchors.count, "consistency": anchors.consistency,
           "seconds": round(state.seconds_in_round(), 2)}
    state.round_done(row)
    run.say(f"round {r} done: " + ("no test split" if knn is None else
                                   f"kNN top-1 {knn:.2f}% (best epoch {best['epoch'] + 1}: {best['knn_top1']:.2f}%)")
            + f"  ({row['seconds']:.1f}s)")


def final_knn_recomputed(run: Run, state: RunState) -> float | None:
    """The trained model's kNN top-1 against train features recomputed without augmentation
    instead of the bank: how the released code evaluates a trained model (lemniscate's cifar.py
    after its last epoch, AND's --test-only). One inference pass over the training set."""
    if not run.data.has_test:
        return None
    if run.cfg.eval_recompute:   # the last round was already scored this way: no second pass
        return state.rounds[-1]["knn_top1"]
    knn = evaluate_knn(state.model, state.memory, run.data, run.cfg, run.world, recompute=True)
    run.say(f"final kNN top-1 against recomputed train features: {knn:.2f}% (the memory bank's: "
            f"{state.rounds[-1]['knn_top1']:.2f}%)")
    return knn


def save_checkpoint_on_main(run: Run, state: RunState) -> None:
    if run.world.is_main:
        state.save(run.cfg, run.world.world_size, run.data)


def write_report(run: Run, state: RunState, store, summary: dict, seconds: float) -> None:
    """Rank 0: the round table, summary.json and the plots of the run dir."""
    cfg, world, data, say = run.cfg, run.world, run.data, run.say
    say(report.round_table(state.rounds))
    trained = [h for h in state.history if h.get("images_per_s")]
    extra = {"dataset": {"n_train": len(data.train), "n_test": len(data.test), "num_classes": data.num_classes,
                         "image_size": data.image_size, "dataset_id": data.dataset_id},
             "world_size": world.world_size,
             "mean_images_per_s": round(float(np.mean([h["images_per_s"] for h in trained])), 1) if trained else None,
             "seconds_this_process": round(seconds, 1),
             "final_knn_top1_recomputed": summary["final_knn_top1_recomputed"],
             "best_epoch": summary["best_epoch"], "epochs": state.history}
    path = report.write_summary(cfg.run_dir, cfg.to_dict(), state.rounds, extra)
    report.save_plots(cfg.run_dir, state.rounds, published_entropies(store, cfg))
    say(f"summary: {path}")
