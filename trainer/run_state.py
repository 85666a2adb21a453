"""The state of a training run: what changes from step to step and what a checkpoint carries.

One object, with ``state_dict`` / ``load_state_dict`` as torch modules and torchtitan's
checkpointer have, so that the round loop never packs or unpacks a checkpoint by hand.
``trainer.checkpoint`` has the file format; this module knows which of its entries are the run's.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from trainer.checkpoint import checkpoint_path, data_facts, restore, save_checkpoint
from trainer.config import TrainConfig
from trainer.models import unwrap


@dataclass
class RunState:
    """Where a run is and what it has measured.

    model: the bare model (never DDP-wrapped); optimizer: its SGD (momentum buffers);
    memory: (N, d) float32 memory bank on the training device, identical on every rank;
    round, epoch: the next epoch to train (epoch == epochs_per_round: the round's training is done,
    its end-of-round work is not); rounds: finished-round rows {round, knn_top1, anchors, ...};
    history: per-epoch rows {round, epoch, lr, loss, images_per_s, seconds[, knn_top1]};
    round_seconds: seconds the current round had run when it was last saved;
    snapshot_checksums: entry r is the checksum of the features/round-r this run wrote (computed
    from its own rows), what its neighbourhood round r + 1 must be computed from
    (``trainer.provenance``); empty in checkpoints written before it was kept.
    """
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    memory: torch.Tensor
    round: int = 0
    epoch: int = 0
    rounds: list[dict] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)
    round_seconds: float = 0.0
    snapshot_checksums: list[str] = field(default_factory=list)
    _round_clock: float = field(default=0.0, repr=False)

    def state_dict(self) -> dict:
        """The run's entries of a checkpoint (tensors on the CPU, plain lists and numbers)."""
        return {"round": self.round, "epoch": self.epoch,
                "model": unwrap(self.model).state_dict(), "optimizer": self.optimizer.state_dict(),
                "memory": self.memory.detach().cpu(), "rounds": self.rounds, "history": self.history,
                "round_seconds": self.round_seconds, "snapshot_checksums": self.snapshot_checksums,
                "rng": {"torch": torch.get_rng_state()}}

    def load_state_dict(self, state: dict, path: str) -> None:
        """Continue from a checkpoint read by ``trainer.checkpoint.load_checkpoint``; a model,
        optimiser or bank whose shapes do not fit is a one-line TrainerError before anything changes."""
        restore(state, path, self.model, self.optimizer, self.memory)
        torch.set_rng_state(state["rng"]["torch"])
        self.round, self.epoch = int(state["round"]), int(state["epoch"])
        self.rounds, self.history = list(state["rounds"]), list(state["history"])
        self.round_seconds = float(state["round_seconds"])
        self.snapshot_checksums = [str(c) for c in state.get("snapshot_checksums", [])]

    # ---- the round clock: a resumed round keeps counting from the seconds it had run
    def start_round(self, r: int) -> None:
        """Enter round r; its clock continues from round_seconds when r is the round resumed in."""
        if r != self.round:
            self.round, self.epoch, self.round_seconds = r, 0, 0.0
        self._round_clock = time.perf_counter() - self.round_seconds

    def seconds_in_round(self) -> float:
        return time.perf_counter() - self._round_clock

    def epoch_done(self, row: dict) -> None:
        """Record the epoch's row; the run continues at the next epoch."""
        self.history.append(row)
        self.epoch = row["epoch"] + 1
        self.round_seconds = self.seconds_in_round()

    def snapshot_written(self, r: int, checksum: str) -> None:
        """features/round-r of this run has ``checksum`` (written now, or found written on a resume)."""
        del self.snapshot_checksums[r:]
        self.snapshot_checksums += [""] * (r - len(self.snapshot_checksums)) + [checksum]

    def snapshot_checksum(self, r: int) -> str | None:
        """The checksum of this run's features/round-r; None where the checkpoint did not keep it."""
        known = self.snapshot_checksums[r] if 0 <= r < len(self.snapshot_checksums) else ""
        return known or None

    def round_done(self, row: dict) -> None:
        """Record the round's row; the run continues at the next round's first epoch."""
        self.rounds.append(row)
        self.round, self.epoch, self.round_seconds = row["round"] + 1, 0, 0.0

    def save(self, cfg: TrainConfig, world_size: int, data) -> None:
        """Write ``<run_dir>/checkpoint.pt`` durably (call on rank 0 only)."""
        save_checkpoint(checkpoint_path(cfg.run_dir), {"config": cfg.to_dict(), **self.state_dict(),
                                                       "world_size": world_size, "data": data_facts(data)})
