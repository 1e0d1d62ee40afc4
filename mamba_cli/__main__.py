"""`python -m mamba_cli ...` runs the `mamba` command."""

from .app import main

main()
