"""Imports every model family so that its entry functions register themselves."""

from . import (  # noqa: F401
    fmunet, genesis, medicalnet, nnunet, p3d, pctnet, resnet2d, resnet3d_plain, segresnet, swin_unetr, vdt_resnet3d,
)
