"""The records every part of the data layer passes around: an image with its geometry, a case, a dataset.

Array convention (all of medtransfer): a 3D image is a numpy array indexed ``[z, y, x]`` = (D, H, W), a 2D image
``[y, x]`` = (H, W); several channels stack in front: ``(C, D, H, W)``. ``spacing``, ``origin`` and ``direction``
follow the *array* axes in that order, in millimetres, in the patient coordinate system of DICOM/ITK (LPS).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

Task = Literal["segmentation", "classification", "unlabelled", "detection"]


@dataclass
class Image:
    """Voxels plus the geometry needed to put predictions back where they came from.

    ``direction[i]`` is the LPS unit vector of array axis ``i``; world position of index ``idx`` (array order) is
    ``origin + direction.T @ (idx * spacing)``.
    """

    array: np.ndarray
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: np.ndarray
    path: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. the orientation it was read in, to write it back

    @property
    def spatial_dims(self) -> int:
        return len(self.spacing)

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape[-self.spatial_dims :])

    @property
    def channels(self) -> int:
        return 1 if self.array.ndim == self.spatial_dims else int(self.array.shape[0])


@dataclass(frozen=True)
class Case:
    """One example of a dataset. ``images`` holds one file per channel (nnU-Net ``_0000``, ``_0001``...), or one
    file holding all channels. ``label``: a segmentation mask file; ``target``: a class index or a multi-label
    0/1 vector for classification. Detection: ``boxes`` are world boxes (LPS mm, MONAI ``cccwhd``: centre x, y, z
    then size; ``ccwh`` in 2D; see :mod:`medtransfer.data.boxes`), ``box_labels`` their classes (1-based); an empty
    tuple is a scan without objects, ``None`` a case that is not labelled for detection."""

    case_id: str
    images: tuple[Path, ...]
    label: Path | None = None
    target: int | tuple[float, ...] | None = None
    boxes: tuple[tuple[float, ...], ...] | None = None
    box_labels: tuple[int, ...] | None = None


@dataclass
class Dataset:
    """A parsed dataset description: the cases and what their labels mean."""

    name: str
    root: Path
    # "msd", "nnunet", "medicalnet_list", "csv", "folder", "luna16", "image_list_2d", "image_mask_2d", "deeplesion",
    # "monai_detection"
    format: str
    task: Task
    cases: list[Case]
    # segmentation label value -> name, class index -> name, or (detection) box class (1-based) -> name
    labels: dict[int, str] = field(default_factory=dict)
    channel_names: list[str] = field(default_factory=list)
    spatial_dims: int = 3
    test_cases: list[Case] = field(default_factory=list)  # unlabelled test images listed by the description
    description: dict[str, Any] = field(default_factory=dict)  # the raw description (dataset.json...) for reference

    def __len__(self) -> int:
        return len(self.cases)
