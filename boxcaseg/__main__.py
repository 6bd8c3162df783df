"""``python -m boxcaseg`` (and ``torchrun ... -m boxcaseg``): the CLI."""

from boxcaseg.cli import main

main()
