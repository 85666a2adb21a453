"""User-facing errors of the neighbourhood index: one line each, raised for bad input.

All are :class:`storage.UserError` subclasses, so the command-line entry points print
``error: <message>`` and exit with status 2 without a traceback.
"""

from storage.errors import UserError


class NbrIndexError(UserError):
    """Bad input to the neighbourhood index (parameters, features, backend)."""


class InvalidFeaturesError(NbrIndexError):
    """The feature rows cannot be used: NaN/Inf, not L2-normalised, wrong shape or dimension."""


class InvalidParameterError(NbrIndexError):
    """A parameter is out of range: k, tau, round, rounds, mode, block sizes."""


class BackendUnavailableError(NbrIndexError):
    """The requested backend or device is not available on this machine."""


class FeaturesNotReadyError(NbrIndexError):
    """The feature snapshot a round needs is missing or not complete yet."""


class RebuildCancelled(Exception):
    """Raised from a progress callback to abandon a rebuild (nothing is published).

    Not a UserError: it is control flow for ``nbr-index serve`` shutting down.
    """
