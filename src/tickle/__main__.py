"""`python -m tickle` is the `tickle` command."""

from tickle.cli import main

main()
