"""The imaging modality of a dataset or a weight file, and the intensity preset each modality gets by default.

One rule for every command that prepares data (``medtransfer finetune``, ``medtransfer data prepare``):

1. the user's preset wins;
2. else the initial weights' preset, when weights are actually loaded, carry a preset, and their modality matches
   the data's (or the data's modality is unknown, which is warned about); a known mismatch (a CT contract on MRI
   data or the reverse) is a loud warning and the modality default is used instead;
3. else the modality default: 2D images ``zscore`` (per image), CT ``genesis_ct`` (HU window), MRI ``mri_zscore``
   (z-score over the foreground, background 0), unknown ``zscore`` with a warning.

The data's modality: ``data.modality`` when the user states it (``CT`` or ``MRI``); else the dataset's declared
channel names (MSD ``modality``, nnU-Net ``channel_names``), when every channel is CT or every one is MR-like
(MRI, MR, T1, T2, FLAIR, ADC, DWI, PD, ...); else a LUNA16 layout is CT; else (``auto`` on a 3D dataset that
declares nothing usable) the intensities of up to :data:`INSPECT_CASES` images: a minimum below
:data:`CT_AIR_HU` HU (air) reads as CT. Anything else is unknown.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence

CT_AIR_HU = -500.0  # air is about -1000 HU; MRI and other non-HU images have no values this far below 0
INSPECT_CASES = 3
MODALITIES = ("CT", "MRI")
DEFAULT_PRESETS = {"CT": "genesis_ct", "MRI": "mri_zscore", None: "zscore"}
_MR_NAMES = {"MR", "MRI", "FLAIR", "ADC", "DWI", "DTI", "PD", "PDW", "SWI", "BOLD", "FMRI", "DCE", "T1", "T2",
             "T1W", "T2W", "T1C", "T1CE", "T1GD", "T2STAR", "T2*"}
_CT_NAMES = {"CT", "CTA", "CECT", "NCCT"}


def channel_modality(name: str) -> Optional[str]:
    """``CT`` or ``MRI`` for one declared channel name (``'T2'`` -> MRI, ``'CT'`` -> CT), None when neither."""
    token = re.split(r"[^A-Z0-9*]", str(name).strip().upper())[0]
    if token in _CT_NAMES:
        return "CT"
    if token in _MR_NAMES or re.fullmatch(r"T[12][A-Z0-9]*", token):
        return "MRI"
    return None


def weights_modalities(text: str) -> set[str]:
    """The modalities a ``PretrainedCfg.modality`` text names: ``'CT and MRI'`` -> {CT, MRI}; natural images,
    chest X-ray -> empty (no CT/MRI claim)."""
    words = re.split(r"[^A-Za-z0-9*]+", text or "")
    return {m for m in map(channel_modality, words) if m}


@dataclass(frozen=True)
class Modality:
    value: Optional[str]  # "CT", "MRI" or None (unknown)
    source: str  # where it was read from, in words

    def __str__(self) -> str:
        return self.value or "unknown"


def dataset_modality(dataset, stated: str = "auto") -> Modality:
    """The modality of ``dataset`` (a :class:`~medtransfer.data.types.Dataset`); see the module docstring."""
    names = list(dataset.channel_names)
    if stated.upper() != "AUTO":
        declared = f"; the dataset declares {names}" if names else ""
        return Modality(stated.upper(), f"stated by the user (data.modality){declared}")
    where = f"{dataset.root / 'dataset.json'} " + ("modality" if dataset.format == "msd" else "channel_names")
    if names:
        found = {channel_modality(n) for n in names}
        if len(found) == 1 and None not in found:
            return Modality(found.pop(), f"{where} {names}")
    if dataset.format == "luna16":
        return Modality("CT", "the luna16 layout (LUNA16 is a CT collection)")
    declared = f"{where} {names} are not all CT or all MR channels" if names else "the dataset declares none"
    if dataset.spatial_dims != 3:
        return Modality(None, f"{declared}; 2D images are not inspected")
    lowest = _lowest_intensity(dataset.cases[:INSPECT_CASES])
    if lowest is not None and lowest[0] < CT_AIR_HU:
        return Modality("CT", f"intensities ({declared}): minimum {lowest[0]:g} in {lowest[1]} is below "
                              f"{CT_AIR_HU:g} HU")
    seen = f"minimum {lowest[0]:g} over {min(INSPECT_CASES, len(dataset.cases))} image(s)" if lowest else "no image"
    return Modality(None, f"{declared} and the intensities are not HU-like ({seen}, none below {CT_AIR_HU:g})")


def _lowest_intensity(cases: Sequence) -> Optional[tuple[float, str]]:
    from .io import read_image

    lowest = None
    for case in cases:
        path = case.images[0]
        value = float(read_image(path).array.min())
        if lowest is None or value < lowest[0]:
            lowest = (value, str(path))
        if value < CT_AIR_HU:
            break
    return lowest


def default_preset(modality: Optional[str], spatial_dims: int) -> tuple[str, str]:
    """(preset, why) of the modality default: 2D ``zscore``, CT ``genesis_ct``, MRI ``mri_zscore``, else ``zscore``."""
    if spatial_dims == 2:
        # 8-bit radiographs and photographs carry no HU: a CT window would squash them into a sliver of [0, 1]
        return "zscore", "modality default for 2D images"
    if modality in MODALITIES:
        return DEFAULT_PRESETS[modality], f"modality default for {modality}"
    return DEFAULT_PRESETS[None], "default for an unknown modality (set data.modality to CT or MRI)"


@dataclass(frozen=True)
class PresetChoice:
    preset: str
    source: str  # where the preset came from, in words
    mismatch: Optional[str] = None  # the weights' contract was set aside or overridden: why
    warning: Optional[str] = None  # something the user should check (unknown modality...)


def choose_preset(user: Optional[str], modality: Modality, spatial_dims: int, *,
                  weights_preset: Optional[str] = None, weights_modality: str = "",
                  weights_label: str = "", user_where: str = "data.preset") -> PresetChoice:
    """The intensity preset by the rule of the module docstring. ``weights_*``: the loaded weights' preset, their
    ``PretrainedCfg.modality`` text and a label naming them (``weights genesis_unet3d.chest_ct (file)``);
    ``user_where``: how the user set ``user`` (``data.preset``, ``--preset``)."""
    from .preprocess import PRESETS

    claimed = weights_modalities(weights_modality)
    fits = not claimed or modality.value is None or modality.value in claimed
    if user is not None:
        mismatch = None
        if weights_preset is not None and PRESETS[user] != PRESETS[weights_preset]:
            mismatch = f"{user_where}={user!r} but the {weights_label} expect {weights_preset!r}"
        return PresetChoice(user, f"user config ({user_where})", mismatch)
    if weights_preset is not None and fits:
        warning = None
        if modality.value is None and claimed:
            warning = (f"the data's modality is unknown ({modality.source}); the {weights_label} expect "
                       f"{weights_modality} and their preset {weights_preset!r} is used unchecked: set data.modality "
                       "(CT or MRI) or data.preset")
        return PresetChoice(weights_preset, weights_label, warning=warning)
    preset, why = default_preset(modality.value, spatial_dims)
    if weights_preset is None:
        unknown = modality.value is None and spatial_dims == 3
        return PresetChoice(preset, why, warning=f"the data's modality is unknown ({modality.source}); using "
                            f"{preset!r}: set data.modality (CT or MRI) or data.preset" if unknown else None)
    mismatch = (f"MODALITY MISMATCH: the {weights_label} were trained on {weights_modality} with preset "
                f"{weights_preset!r}, but the data is {modality.value} ({modality.source}); using the {why}, "
                f"{preset!r}, instead. Set data.preset to choose")
    return PresetChoice(preset, why, mismatch)
