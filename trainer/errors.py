"""The trainer's user-facing error.

Every bad input the trainer detects (unknown dataset, a data root without train/test folders,
a config key that does not exist, k >= N, ...) raises :class:`TrainerError`, a
:class:`storage.UserError`: the CLI prints ``error: <message>`` and exits 2, without a traceback.
"""
from __future__ import annotations

from storage.errors import UserError


class TrainerError(UserError):
    """A problem with the trainer's configuration or data; ``str(err)`` is one line."""
