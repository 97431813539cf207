"""3D ResNets of MedicalNet (Med3D) and VDT, with the official state_dict names so published files load key for key.

- **MedicalNet**: S. Chen, K. Ma, Y. Zheng, "Med3D: Transfer Learning for 3D Medical Image Analysis",
  arXiv:1904.00625, 2019; official code ``Tencent/MedicalNet`` (``models/resnet.py``). ResNet-10..200 with an
  output stride of 8: ``layer3``/``layer4`` keep stride 1 and dilate by 2/4 instead, and the segmentation head
  ``conv_seg`` predicts at input/4.
- **VDT**: S. Zhang, Z. Li, H.-Y. Zhou, J. Ma, Y. Yu, "Advancing 3D Medical Image Analysis with Variable Dimension
  Transform based Supervised 3D Pre-training", Neurocomputing 2023, arXiv:2201.01426; official code
  ``urmagicsmine/CSPR`` (``mmcls/models/backbones/resnet3d.py``). A ResNet3D-18 pretrained on ImageNet, each RGB image
  seen as a 3-slice single-channel volume, so by default it never strides along depth.

Both families share the residual blocks and the two shortcut types; they differ in the stem, the stage strides and
dilations, and the rule that decides where a stage's first block gets a shortcut branch (see ``needs_shortcut`` in
:class:`ResNet3dTrunk`). Written from the spec (``spec/seed-systems.md`` sections 1a, 2a, 7), no code copied.

The code lives in three modules: :mod:`.resnet3d_trunk` (blocks, shortcuts, the trunk), :mod:`.medicalnet` and
:mod:`.vdt_resnet3d` (one family each, registered on import); this module names them in one place.
"""

from .medicalnet import (
    MEDICALNET_SHORTCUT,
    MedicalNetResNet,
    infer_medicalnet_kwargs,
    medicalnet_resnet,
    medicalnet_resnet10,
    medicalnet_resnet18,
    medicalnet_resnet34,
    medicalnet_resnet50,
    medicalnet_resnet101,
    medicalnet_resnet152,
    medicalnet_resnet200,
)
from .resnet3d_trunk import (
    SHORTCUTS,
    BasicBlock3d,
    Block,
    Bottleneck3d,
    ResNet3dTrunk,
    Triple,
    ZeroPadShortcut,
    conv_seg_head,
    make_shortcut,
    make_stage,
)
from .vdt_resnet3d import VDTResNet3d, infer_vdt_kwargs, vdt_resnet18_3d

__all__ = [
    "BasicBlock3d",
    "Block",
    "Bottleneck3d",
    "MEDICALNET_SHORTCUT",
    "MedicalNetResNet",
    "ResNet3dTrunk",
    "SHORTCUTS",
    "Triple",
    "VDTResNet3d",
    "ZeroPadShortcut",
    "conv_seg_head",
    "infer_medicalnet_kwargs",
    "infer_vdt_kwargs",
    "make_shortcut",
    "make_stage",
    "medicalnet_resnet",
    "medicalnet_resnet10",
    "medicalnet_resnet101",
    "medicalnet_resnet152",
    "medicalnet_resnet18",
    "medicalnet_resnet200",
    "medicalnet_resnet34",
    "medicalnet_resnet50",
    "vdt_resnet18_3d",
]
