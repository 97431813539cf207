"""Imports every model family so that its entry functions register themselves."""

from . import fmunet, genesis, medicalnet, p3d, pctnet, resnet2d, resnet3d_plain, vdt_resnet3d  # noqa: F401
