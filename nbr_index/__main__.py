"""``python -m nbr_index`` = the ``nbr-index`` command."""

from nbr_index.cli import main

main(prog_name="nbr-index")
