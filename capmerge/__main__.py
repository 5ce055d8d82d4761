"""``python -m capmerge`` runs the CLI."""

from capmerge.cli import main

main()
