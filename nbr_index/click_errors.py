"""The click group of both command lines (``nbr-index`` and ``trainer``): a
:class:`storage.UserError` raised by a command becomes ``error: <message>`` on stderr and exit
status 2, without a traceback.

It lives here, not in storage, so that storage imports only numpy and zarr (docs/ARCHITECTURE.md);
trainer's command line imports it from here (trainer may import nbr_index, never the reverse).
"""
import sys

import click

from storage.errors import UserError


class UserErrorGroup(click.Group):
    """A click group whose commands turn a UserError into ``error: <message>`` on stderr and
    exit status 2 (shared by the ``trainer`` and ``nbr-index`` command lines)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(2)
