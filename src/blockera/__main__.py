"""`python -m blockera` runs the command line."""

from blockera.cli.main import main

main()
