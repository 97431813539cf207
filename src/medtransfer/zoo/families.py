"""Imports every model family so that its entry functions register themselves."""

from . import fmunet, genesis, medicalnet, nnunet, p3d, pctnet, resnet2d, vdt_resnet3d  # noqa: F401
