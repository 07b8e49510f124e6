"""`python -m lorafit`: the command line, as the `lorafit` script."""

from lorafit.cli import main

main()
