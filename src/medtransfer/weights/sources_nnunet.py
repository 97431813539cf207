"""nnU-Net v2 trainer checkpoints (``checkpoint_final.pth``, ``checkpoint_best.pth``), detected by their keys.

``nnUNetTrainer.save_checkpoint`` writes one dict::

    network_weights                   the network's state_dict (dynamic_network_architectures key names)
    optimizer_state, grad_scaler_state, logging, _best_ema, current_epoch
    init_args                         the trainer's constructor arguments: plans, configuration, fold, dataset_json,
                                      device (older trainers also unpack_dataset)
    trainer_name, inference_allowed_mirroring_axes

Everything in it is plain data (numpy scalars in ``logging`` and ``_best_ema``, a ``torch.device`` in ``init_args``),
so :func:`medtransfer.weights.io.read_checkpoint` reads it with ``weights_only=True``. The network cannot be built
from the tensors alone; the converter keeps what the file says about it (plans, configuration, dataset.json, trainer,
fold) on the returned state_dict as ``.nnunet`` for :mod:`medtransfer.zoo.nnunet`.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

from .sources import Source, StateDict, is_tensor_dict, keys_start_with, register_source, strip_prefixes

_INFO_KEYS = ("trainer_name", "current_epoch", "inference_allowed_mirroring_axes")


class NNUNetStateDict(dict):
    """The network tensors of an nnU-Net checkpoint, plus ``nnunet``: the file's plans, configuration, fold,
    dataset_json and trainer (each None when absent), and ``metadata`` (what ``zoo.builder.read_converted``
    merges into the file's metadata)."""

    nnunet: dict[str, Any]
    metadata: dict[str, Any]


def is_nnunet_checkpoint(obj: Any) -> bool:
    if not isinstance(obj, Mapping) or not is_tensor_dict(obj.get("network_weights")):
        return False
    weights = obj["network_weights"]
    return "init_args" in obj or "trainer_name" in obj or any(k.startswith("encoder.stages.") for k in weights)


def nnunet_info(obj: Mapping) -> dict[str, Any]:
    """The file's description of its network; values are copies, missing ones None."""
    init = obj.get("init_args")
    init = init if isinstance(init, Mapping) else {}
    info: dict[str, Any] = {k: copy.deepcopy(init.get(k)) for k in ("plans", "configuration", "fold", "dataset_json")}
    for key in _INFO_KEYS:
        value = obj.get(key)
        info[key] = list(value) if isinstance(value, tuple) else value
    return info


def _convert_nnunet(obj: Any) -> StateDict:
    sd = dict(obj["network_weights"])
    for prefix in ("module.", "_orig_mod."):  # DDP / torch.compile wrappers, should a trainer not have removed them
        if keys_start_with(sd, prefix, 1.0):
            sd = strip_prefixes(sd, [prefix])
    out = NNUNetStateDict(sd)
    out.nnunet = nnunet_info(obj)
    # the zoo module derives the input channels and input contract from the plans; the import stays local so that
    # weights/ needs no model code to read files
    from ..zoo.nnunet import file_metadata

    out.metadata = file_metadata(out.nnunet)
    return out


register_source(
    Source(
        name="nnunet",
        description="nnU-Net v2 checkpoint_final.pth: {'network_weights', 'init_args' (plans...), 'trainer_name', ...}",
        detect=is_nnunet_checkpoint,
        convert=_convert_nnunet,
        priority=12,
    )
)
