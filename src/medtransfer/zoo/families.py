"""Imports every model family so that its entry functions register themselves."""

from . import fmunet, genesis, pctnet, resnet2d, resnet3d  # noqa: F401
