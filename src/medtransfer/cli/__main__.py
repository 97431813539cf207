"""``python -m medtransfer.cli`` (and ``torchrun -m medtransfer.cli``): the same as the ``medtransfer`` command."""

from . import main

main()
