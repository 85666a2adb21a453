"""The argument checks every entry point shares: the device, k and tau, each written once.

``nbr-index`` commands, the Python API (``rebuild``, ``knn_entropy``, the fused pass) and the
trainer (``trainer.preflight``) call these, so that one bad value gets the same one-line error
wherever it comes in.
"""

from __future__ import annotations

import math
import numbers
import re

import torch

from .errors import BackendUnavailableError, InvalidParameterError
from .launch import LaunchError

DEVICES = ("cpu", "cuda")


def resolve_device(device: str | torch.device, local_workers: int = 1) -> torch.device:
    """'cpu', 'cuda' or 'cuda:N' as a torch.device this machine has (N < the visible GPU count).

    local_workers: processes this machine starts on it; nccl runs one per GPU, so CUDA needs
    that many GPUs (under an outer torchrun each process is one worker: 1).
    """
    name = str(device)
    if name not in DEVICES and not name.startswith("cuda:"):
        raise InvalidParameterError(f"device must be cpu or cuda[:N], got {name!r}")
    if name == "cpu":
        return torch.device("cpu")
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = None if name == "cuda" else name[len("cuda:"):]
    if index is not None and not re.fullmatch(r"[0-9]+", index):
        raise InvalidParameterError(
            f"device {name!r} is not cuda:N with N a GPU number; this machine has {_visible_gpus(visible)}: "
            f"{_device_hint(visible)}")
    if visible == 0:
        raise BackendUnavailableError(
            f"device {name} requested but no CUDA GPU is available (torch.cuda.is_available() is False: "
            f"{_visible_gpus(0)}); use --device cpu")
    if index is not None and int(index) >= visible:
        raise BackendUnavailableError(
            f"device {name} requested but this machine has {_visible_gpus(visible)}: {_device_hint(visible)}")
    if local_workers > visible:
        raise LaunchError(
            f"--world-size {local_workers} with nccl needs {local_workers} GPUs, this machine has "
            f"{visible}: lower --world-size or use --device cpu")
    return torch.device("cuda") if index is None else torch.device("cuda", int(index))


def _visible_gpus(count: int) -> str:
    """'0 visible CUDA GPUs', '1 visible CUDA GPU (cuda:0)', '2 visible CUDA GPUs (cuda:0..cuda:1)'."""
    return f"{count} visible CUDA GPU{'' if count == 1 else 's'}" + (f" ({_device_range(count)})" if count else "")


def _device_range(count: int) -> str:
    return "cuda:0" if count == 1 else f"cuda:0..cuda:{count - 1}"


def _device_hint(count: int) -> str:
    return "use --device cpu" if count == 0 else f"use --device {_device_range(count)}, cuda or cpu"


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
