"""User-facing errors: one line that says what is wrong and how to fix it.

Every package raises a subclass of :class:`UserError` for bad input; the command-line
entry points (click groups of class :class:`UserErrorGroup`) print ``error: <message>`` and
exit with status 2, without a traceback.
"""
import sys

import click


class UserError(Exception):
    """A problem the user can fix; ``str(err)`` is one line."""


class StoreError(UserError):
    """The store is missing, mismatched, incomplete or corrupted."""


class UserErrorGroup(click.Group):
    """A click group whose commands turn a UserError into ``error: <message>`` on stderr and
    exit status 2 (shared by the ``trainer`` and ``nbr-index`` command lines)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(2)
