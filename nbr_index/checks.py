"""The argument checks every entry point shares: the device, k and tau, each written once.

``nbr-index`` commands, the Python API (``rebuild``, ``knn_entropy``, the fused pass) and the
trainer (``trainer.preflight``) call these, so that one bad value gets the same one-line error
wherever it comes in.
"""

from __future__ import annotations

import math
import numbers

import torch

from .errors import BackendUnavailableError, InvalidParameterError
from .launch import LaunchError

DEVICES = ("cpu", "cuda")


def resolve_device(device: str | torch.device, local_workers: int = 1) -> torch.device:
    """'cpu', 'cuda' or 'cuda:N' as a torch.device this machine has.

    local_workers: processes this machine starts on it; nccl runs one per GPU, so CUDA needs
    that many GPUs (under an outer torchrun each process is one worker: 1).
    """
    name = str(device)
    if name not in DEVICES and not name.startswith("cuda:"):
        raise InvalidParameterError(f"device must be cpu or cuda[:N], got {name!r}")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise BackendUnavailableError(
                f"device {name} requested but no CUDA GPU is available (torch.cuda.is_available() is False); "
                f"use --device cpu")
        if local_workers > torch.cuda.device_count():
            raise LaunchError(
                f"--world-size {local_workers} with nccl needs {local_workers} GPUs, this machine has "
                f"{torch.cuda.device_count()}: lower --world-size or use --device cpu")
    return torch.device(name)


def check_k(k, n: int, allow_entropy_only: bool = False) -> None:
    """k neighbours per row among N rows, self excluded: 1 <= k < N (an integer, not a bool).
    allow_entropy_only admits k = 0, the entropy-only pass a FAISS backend runs beside its k-NN."""
    low = 0 if allow_entropy_only else 1
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not low <= k < n:
        note = "0: entropy only; self is excluded" if allow_entropy_only else "self is excluded"
        raise InvalidParameterError(f"k must satisfy {low} <= k < N = {n} ({note}), got k = {k!r}")


def check_tau(tau) -> None:
    """The softmax temperature: a positive finite number."""
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or not (tau > 0 and math.isfinite(tau)):
        raise InvalidParameterError(f"tau must be a positive temperature, got {tau}")
