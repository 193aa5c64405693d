"""``python -m edgeloop`` runs the command line."""

from edgeloop.cli import main

main()
