"""``python -m kvmmem``: the same as the ``kvmmem`` console script."""

from kvmmem.cli import main

main()
