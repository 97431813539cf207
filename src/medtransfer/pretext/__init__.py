"""Pretraining methods: each a transform, a loss and a head where needed, run by :mod:`.runner`.

* :mod:`.genesis`: Models Genesis corruptions (flip, local shuffling, Bezier intensity map, in/out-painting) and
  the restoration loss.
* :mod:`.volume_fusion`: Volume Fusion block fusion into a pseudo-segmentation, of two views drawn by
  :mod:`.volume_fusion_views` (random-resized crops, flips, contrast).
* :mod:`.multi_dataset`: MedicalNet's multi-dataset supervised training (shared encoder, one decoder per dataset).
* :mod:`.vdt`: the variable dimension transform (2D images as 1 x C x H x W volumes).
* :mod:`.runner` / :mod:`.config`: ``medtransfer pretrain``; the per-method setups in :mod:`.setups`, on the
  helpers they share in :mod:`.prepare`.
"""
