"""``python -m edgebft`` runs the CLI."""

from edgebft.cli import main

main()
