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
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from trainer.checkpoint import checkpoint_path, data_facts, load_checkpoint, restore, save_checkpoint
from trainer.config import TrainConfig, save_config, validate, validate_for_data
from trainer.data import ImageDataset, load_dataset
from trainer.errors import TrainerError
from trainer.knn import embed, knn_predict
from trainer.loss import and_loss
from trainer.memory import ema_update_, init_memory
from trainer.models import build_model, check_compiler, compile_for_training, unwrap
from trainer.progress import Progress
from trainer.schedule import lr_at, make_optimizer, set_lr
from trainer.seeding import generator, set_determinism
from trainer.sharding import epoch_batches
from trainer.tensorboard_log import EventLog
from trainer.world import World
from trainer import report

# Progress lines inside a long epoch at most this often (seconds) where no terminal shows a bar.
PROGRESS_EVERY_S = 30.0
# How often a trainer in --index service mode looks for a published round, and says it waits.
POLL_S = 1.0
WAIT_NOTE_S = 30.0


class IndexTimeout(TrainerError):
    """No neighbourhood round was published in time (``--index service``)."""


class IndexFailed(TrainerError):
    """The index process recorded that it could not rebuild the round waited for."""


class Diverged(TrainerError):
    """A training step's loss was NaN or infinite."""


@dataclass
class Curriculum:
    """The anchors of one training round, on the training device."""
    anchor: torch.Tensor | None      # (N,) bool; None: instance loss for every sample
    neighbours: torch.Tensor | None  # (N, k) int64
    anchors: int                     # number of anchors
    consistency: float | None        # percent of anchor neighbours sharing the anchor's label
    entropy: np.ndarray | None = None  # (N,) H_i the anchors were selected by (reports only)


def train(cfg: TrainConfig, world: World, resume: bool = False,
          log: Callable[[str], None] = print, check_replicas: bool = False) -> dict:
    """Train (or, with ``resume``, continue from ``<run_dir>/checkpoint.pt``) the whole method.

    ``cfg`` must be resolved (``trainer.config.resolve``): run_dir, store and epochs_per_round set.
    Every rank calls this with the same ``cfg``; returns the summary dict (the same on every rank).
    ``check_replicas``: after every epoch, assert that all ranks hold bit-identical memory banks
    and model weights (a debug mode: it costs one digest of the bank per epoch).
    Raises TrainerError / storage.UserError for bad input before anything is written to the store.
    """
    say = log if world.is_main else (lambda *_: None)
    device = world.device
    set_determinism(cfg.deterministic)
    validate(cfg)
    if cfg.compile:
        check_compiler()

    # ---- data, model, optimiser, memory bank (all validated before the store exists)
    data = load_dataset(cfg.dataset, cfg.data_root, cfg.download, cfg.image_size, cfg.hflip, cfg.workers)
    n = len(data.train)
    validate_for_data(cfg, n, world.world_size)
    if device.type == "cuda":
        data.stage(device)  # in-memory sets live on the GPU: indexing and augmentation happen there
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.arch, data.image_size, cfg.dim).to(device)
    if device.type == "cuda":   # NHWC convolutions use the tensor cores without layout transposes
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model.parameters(), cfg.lr, cfg.momentum, cfg.weight_decay, cfg.nesterov)
    memory = init_memory(n, cfg.dim, generator(cfg.seed, "memory"), device)
    start_round, start_epoch, rows, history, round_seconds = 0, 0, [], [], 0.0

    ckpt = checkpoint_path(cfg.run_dir)
    check_run_dir(cfg, resume)
    if resume:
        state = load_checkpoint(ckpt)
        restore(state, ckpt, model, optimizer, memory)
        torch.set_rng_state(state["rng"]["torch"])
        start_round, start_epoch = state["round"], state["epoch"]
        rows, history, round_seconds = state["rounds"], state["history"], state["round_seconds"]
        say(f"resuming {cfg.run_dir} at round {start_round} epoch {start_epoch}")

    store = open_store(cfg, data, world, fresh=not resume)
    if world.is_main:
        save_config(cfg, os.path.join(cfg.run_dir, "config.yaml"))
    say(f"{cfg.method} on {cfg.dataset} (N={n}, test {len(data.test)}, {data.image_size}px) with {cfg.arch}, "
        f"rounds 0..{cfg.rounds} x {cfg.epochs_per_round} epochs, batch {cfg.batch_size} over "
        f"{world.world_size} rank(s), device {device}, store {cfg.store}")
    for note in data.notes:
        say(note)
    events = EventLog.open(cfg.run_dir, cfg.tensorboard and world.is_main, cfg.epochs_per_round, n,
                           resume_step=start_round * cfg.epochs_per_round + start_epoch if resume else None)
    ddp_model = world.wrap_model(model, cfg.sync_bn)
    if cfg.compile:
        ddp_model = compile_for_training(ddp_model)
    run_start = time.perf_counter()

    for r in range(start_round, cfg.rounds + 1):
        # ---- the curriculum of this round: anchors and their neighbourhoods (none in round 0)
        clock = time.perf_counter() - (round_seconds if r == start_round else 0.0)
        curriculum = curriculum_for_round(r, cfg, store, world, say)
        say(f"round {r}/{cfg.rounds}: {curriculum.anchors} anchors of {n}"
            + ("" if curriculum.consistency is None else f", consistency {curriculum.consistency:.1f}%"))

        # ---- train the round's epochs (the lr schedule restarts every round)
        for epoch in range(start_epoch if r == start_round else 0, cfg.epochs_per_round):
            lr = lr_at(epoch, cfg.epochs_per_round, cfg.lr, cfg.lr_milestones, cfg.lr_gamma)
            set_lr(optimizer, lr)
            stats = train_one_epoch(ddp_model, optimizer, memory, data, curriculum, cfg, world, r, epoch, say)
            world.sync_buffers(model)
            row = {"round": r, "epoch": epoch, "lr": lr, **stats}
            if (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0 and epoch + 1 < cfg.epochs_per_round
                    and data.has_test):
                row["knn_top1"] = evaluate_knn(model, memory, data, cfg, world)
            if check_replicas:
                world.assert_identical(f"memory bank after round {r} epoch {epoch + 1}", memory)
                world.assert_identical(f"model after round {r} epoch {epoch + 1}",
                                       *unwrap(model).state_dict().values())
            history.append(row)
            events.epoch(row)
            say(f"round {r} epoch {epoch + 1}/{cfg.epochs_per_round}  loss {row['loss']:.4f}  lr {lr:.5f}  "
                f"{row['images_per_s']:.0f} img/s  {row['seconds']:.1f}s"
                + (f"  kNN {row['knn_top1']:.2f}%" if "knn_top1" in row else ""))
            _save(world, ckpt, cfg, model, optimizer, memory, r, epoch + 1, rows, history,
                  time.perf_counter() - clock, data)

        # ---- end of round: publish the memory bank for the next rebuild, evaluate
        write_feature_snapshot(store, r, memory, world)
        knn = evaluate_knn(model, memory, data, cfg, world) if data.has_test else None
        if knn is not None and history and history[-1]["round"] == r:   # the round's last epoch row gets its kNN too
            history[-1]["knn_top1"] = knn
        best = report.best_epoch(history, r)
        rows.append({"round": r, "knn_top1": knn, "best_epoch_knn_top1": best["knn_top1"], "best_epoch": best["epoch"],
                     "anchors": curriculum.anchors, "consistency": curriculum.consistency,
                     "seconds": round(time.perf_counter() - clock, 2)})
        say(f"round {r} done: " + ("no test split" if knn is None else
                                   f"kNN top-1 {knn:.2f}% (best epoch {best['epoch'] + 1}: {best['knn_top1']:.2f}%)")
            + f"  ({rows[-1]['seconds']:.1f}s)")
        events.round(rows[-1], curriculum.entropy)
        _save(world, ckpt, cfg, model, optimizer, memory, r + 1, 0, rows, history, 0.0, data)

    # ---- report
    summary = {"config": cfg.to_dict(), "rounds": rows, "final_knn_top1": rows[-1]["knn_top1"] if rows else None,
               "best_epoch": report.best_epoch(history), "epochs": history}
    if world.is_main:
        say(report.round_table(rows))
        trained = [h for h in history if h.get("images_per_s")]
        extra = {"dataset": {"n_train": n, "n_test": len(data.test), "num_classes": data.num_classes,
                             "image_size": data.image_size, "dataset_id": data.dataset_id},
                 "world_size": world.world_size,
                 "mean_images_per_s": round(float(np.mean([h["images_per_s"] for h in trained])), 1) if trained else None,
                 "seconds_this_process": round(time.perf_counter() - run_start, 1),
                 "best_epoch": summary["best_epoch"], "epochs": history}
        path = report.write_summary(cfg.run_dir, cfg.to_dict(), rows, extra)
        report.save_plots(cfg.run_dir, rows, published_entropies(store, cfg))
        say(f"summary: {path}")
    events.close()
    world.barrier()
    return summary


def preflight(cfg: TrainConfig, world_size: int, resume: bool) -> None:
    """Every check ``train`` makes before it writes anything, run once in the launching process
    so that bad input gives one line there instead of W failing workers and restarts."""
    validate(cfg)
    check_run_dir(cfg, resume)
    if cfg.compile:
        check_compiler()
    data = load_dataset(cfg.dataset, cfg.data_root, cfg.download, cfg.image_size, cfg.hflip, cfg.workers)
    if world_size > len(data.train):
        raise TrainerError(f"--world-size {world_size} is larger than the training set (N = {len(data.train)})")
    validate_for_data(cfg, len(data.train), world_size)
    check_existing_store(cfg, len(data.train), data.dataset_id, fresh=not resume)


def check_existing_store(cfg: TrainConfig, n: int, dataset_id: str, fresh: bool) -> None:
    """A store already at cfg.store must match this run's N, dim and dataset, and a fresh run
    must not find rounds of another run in it. No store yet is fine: rank 0 creates it."""
    from storage import Store, StoreError

    try:
        existing = Store.open(cfg.store)
    except StoreError:
        return
    existing.check_matches(n, cfg.dim, dataset_id)
    if fresh and (existing.complete_feature_rounds() or existing.published_rounds()):
        raise TrainerError(f"store {cfg.store} already holds rounds of another run: pass --resume, "
                           f"or a fresh --store")


def check_run_dir(cfg: TrainConfig, resume: bool) -> None:
    """A fresh run needs a run dir without a checkpoint; --resume needs one with it."""
    has_checkpoint = os.path.exists(checkpoint_path(cfg.run_dir))
    if resume and not has_checkpoint:
        raise TrainerError(f"nothing to resume: {checkpoint_path(cfg.run_dir)} does not exist")
    if not resume and has_checkpoint:
        raise TrainerError(f"{cfg.run_dir} already holds a run: pass --resume to continue it, or another --run-dir")


def train_one_epoch(ddp_model: torch.nn.Module, optimizer: torch.optim.Optimizer, memory: torch.Tensor,
                    data: ImageDataset, curriculum: Curriculum, cfg: TrainConfig, world: World,
                    r: int, epoch: int, say: Callable[[str], None]) -> dict:
    """One epoch over this rank's shard. Returns {loss, images_per_s, seconds} over all ranks; raises
    Diverged (on every rank, before anything of the epoch is saved) if a step's loss was not finite."""
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
    with Progress(len(batches), f"  round {r} epoch {epoch + 1} step", say, enabled=world.is_main,
                  every_s=PROGRESS_EVERY_S) as progress:
        for step, (images, indices) in enumerate(train_batches):
            loss = train_step(ddp_model, optimizer, memory, images, indices, curriculum, cfg, world)
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
               images: torch.Tensor, indices: torch.Tensor, curriculum: Curriculum, cfg: TrainConfig,
               world: World) -> torch.Tensor:
    """One optimisation step on this rank's batch, then the memory-bank update of every rank's.

    images (b, 3, S, S) float32 augmented; indices (b,) int64 dataset rows; memory (N, d), updated
    in place. Returns the batch's mean loss (a detached scalar).
    """
    features = network_forward(model, images, cfg.precision)            # (b, d), unit rows
    loss = and_loss(features, memory, indices, curriculum.anchor, curriculum.neighbours, cfg.tau)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    # Memory update after the step and outside autograd, with every rank's batch, in rank
    # order: all replicas of the bank apply the identical update.
    with torch.no_grad():
        ema_update_(memory, *world.all_gather_indexed(indices, features.detach()), cfg.eta)
    return loss.detach()


def curriculum_for_round(r: int, cfg: TrainConfig, store, world: World, say: Callable[[str], None]) -> Curriculum:
    """Round 0 and the instance method: no anchors. Otherwise neighbourhoods/round-r from the store:
    rebuilt in-process by all ranks together (``--index inline``) or published by ``nbr-index serve``."""
    if r == 0 or not cfg.uses_neighbourhoods:
        return Curriculum(None, None, 0, None)
    if cfg.index == "inline":  # every rank computes its share of the tiles; rank 0 publishes
        from nbr_index import ProcessGroupShard, rebuild

        start = time.perf_counter()
        result = rebuild(store, r, rounds=cfg.rounds, k=cfg.k, tau=cfg.tau, mode=cfg.anchor_mode,
                         backend=cfg.index_backend, device=str(world.device),
                         shard=ProcessGroupShard(world.rank, world.world_size))
        say(f"neighbourhoods/round-{r} rebuilt inline in {time.perf_counter() - start:.1f}s" if result.published
            else f"neighbourhoods/round-{r} already published (resumed run): using it")
    else:
        wait_for_neighbourhoods(store, r, cfg.index_timeout, say)
    nb = store.read_neighbourhoods(r)
    anchor = torch.from_numpy(np.asarray(nb.anchor, dtype=bool)).to(world.device)
    neighbours = torch.from_numpy(np.asarray(nb.neighbours, dtype=np.int64)).to(world.device)
    consistency = nb.attrs.get("consistency")
    return Curriculum(anchor, neighbours, int(anchor.sum()), None if consistency is None else float(consistency),
                      np.asarray(nb.entropy))


def wait_for_neighbourhoods(store, r: int, timeout: float, say: Callable[[str], None], poll: float = POLL_S) -> None:
    """Block until neighbourhoods/round-r is published (by ``nbr-index serve``); raise IndexFailed
    when the index recorded that rebuilding it failed, IndexTimeout after ``timeout`` seconds."""
    start = time.monotonic()
    noted = -math.inf
    while r not in store.published_rounds():
        failure = store.index_failure(r)
        if failure is not None:
            raise IndexFailed(f"nbr-index serve failed to rebuild neighbourhoods/round-{r} in {store.url}: {failure}; "
                              f"see its log, fix the cause and rerun (training resumes from the last checkpoint)")
        waited = time.monotonic() - start
        if waited >= timeout:
            raise IndexTimeout(f"timed out after {timeout:.0f}s waiting for neighbourhoods/round-{r} in {store.url}: "
                               f"start `nbr-index serve --store {store.url}` or use --index inline")
        if waited - noted >= WAIT_NOTE_S:
            noted = waited
            say(f"waiting for neighbourhoods/round-{r} (from features/round-{r - 1}) to be published by "
                f"nbr-index serve in {store.url} ({waited:.0f}s of {timeout:.0f}s)")
        time.sleep(min(poll, max(0.0, timeout - waited)))


def open_store(cfg: TrainConfig, data: ImageDataset, world: World, fresh: bool):
    """Create (rank 0) or open the run's store and record the labels once (for consistency
    reports only). A fresh run refuses a store that already holds rounds of another run."""
    from storage import Store

    if world.is_main:
        check_existing_store(cfg, len(data.train), data.dataset_id, fresh)
        os.makedirs(cfg.run_dir, exist_ok=True)
        curriculum = {"rounds": cfg.rounds, "k": cfg.k, "tau": cfg.tau, "mode": cfg.anchor_mode}
        store = Store.create_or_open(cfg.store, n=len(data.train), dim=cfg.dim, dataset_id=data.dataset_id,
                                     curriculum=curriculum)
        if store.read_labels() is None:
            store.write_labels(data.train.labels.cpu().numpy().astype(np.int64))
    world.barrier()
    return store if world.is_main else Store.open(cfg.store)


def write_feature_snapshot(store, r: int, memory: torch.Tensor, world: World) -> None:
    """features/round-r <- the memory bank, written by all ranks together: rank 0 prepares, each
    rank writes the chunks it owns (chunk c belongs to rank c % W), rank 0 completes. A snapshot
    already complete (a resumed run) is left as it is."""
    done = world.broadcast_object(r in store.complete_feature_rounds() if world.is_main else None)
    if done:
        return
    bank = memory.detach().float().cpu().numpy()
    if world.is_main:
        store.prepare_features(r)
    world.barrier()
    store.write_feature_chunks(r, bank, world.rank, world.world_size)
    world.barrier()
    if world.is_main:
        store.complete_features(r)
    world.barrier()


def evaluate_knn(model: torch.nn.Module, memory: torch.Tensor, data: ImageDataset, cfg: TrainConfig,
                 world: World) -> float:
    """Weighted kNN top-1 (percent) of the test set against the memory bank (or, with
    eval_recompute, against train features recomputed without augmentation). Changes neither
    the model (eval mode + no_grad, train mode restored) nor the bank. Each rank classifies its
    slice of the test set; the counts are summed over ranks."""
    model = unwrap(model)
    device = world.device
    batch = max(256, cfg.batch_size)
    bank, bank_labels = memory, data.train.labels.to(device)
    if cfg.eval_recompute:
        bank = _embed_split_all_ranks(model, data, "train", batch, world)
    start, stop = _rank_slice(len(data.test), world)
    feats, labels = embed(model, data.eval_batches("test", batch, start, stop), device)
    if feats.shape[0]:
        predicted = knn_predict(feats, bank, bank_labels, data.num_classes, cfg.knn_k, cfg.knn_sigma)
        correct = float((predicted == labels).sum())
    else:
        correct = 0.0
    totals = world.all_reduce_sum(torch.tensor([correct, float(feats.shape[0])], device=device))
    return round(100.0 * float(totals[0]) / float(totals[1]), 2)


def _rank_slice(n: int, world: World) -> tuple[int, int]:
    per = math.ceil(n / world.world_size)
    return min(n, world.rank * per), min(n, (world.rank + 1) * per)


def _embed_split_all_ranks(model, data: ImageDataset, split: str, batch: int, world: World) -> torch.Tensor:
    """(N, dim) features of a whole split: each rank embeds its slice, then all-gather."""
    n = len(data.split(split))
    start, stop = _rank_slice(n, world)
    feats, _ = embed(model, data.eval_batches(split, batch, start, stop), world.device)
    per = math.ceil(n / world.world_size)
    padded = torch.zeros(per, feats.shape[1] if feats.numel() else model.head.out_features, device=world.device)
    padded[: feats.shape[0]] = feats
    return world.all_gather_cat(padded)[:n]


def published_entropies(store, cfg: TrainConfig) -> dict[int, np.ndarray]:
    """{round: entropy (N,)} of the neighbourhood rounds this run used (for the entropy plot)."""
    if not cfg.uses_neighbourhoods:
        return {}
    return {r: np.asarray(store.read_neighbourhoods(r).entropy)
            for r in store.published_rounds() if 1 <= r <= cfg.rounds}


def _save(world: World, path: str, cfg: TrainConfig, model, optimizer, memory: torch.Tensor, r: int, epoch: int,
          rows: list, history: list, round_seconds: float, data: ImageDataset) -> None:
    """Rank 0 writes the checkpoint (see trainer.checkpoint for the format)."""
    if not world.is_main:
        return
    save_checkpoint(path, {
        "config": cfg.to_dict(), "round": r, "epoch": epoch,
        "model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
        "memory": memory.detach().cpu(), "rounds": rows, "history": history,
        "round_seconds": round_seconds, "rng": {"torch": torch.get_rng_state()},
        "world_size": world.world_size, "data": data_facts(data),
    })
