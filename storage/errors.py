"""User-facing errors: one line that says what is wrong and how to fix it.

Every package raises a subclass of :class:`UserError` for bad input; the command-line
entry points (click groups of class ``nbr_index.click_errors.UserErrorGroup``) print
``error: <message>`` and exit with status 2, without a traceback.
"""


class UserError(Exception):
    """A problem the user can fix; ``str(err)`` is one line."""


class StoreError(UserError):
    """The store is missing, mismatched, incomplete or corrupted."""
