"""Where the model looked, and how sure the segmentation is: a class activation map of the predicted class
(HiResCAM by default, or Grad-CAM), the guided head's pooling weights, and the per-voxel segmentation entropy, all
on the preprocessed grid (``export.py`` maps them to the input's geometry).

A class activation map needs gradients, so it runs as a separate forward pass with autograd on, only
when asked (``predict --saliency``); the prediction itself keeps running under inference mode. The pass is the
network's own (encoder -> decoder -> head, as ``MultitaskUNet.forward``) on the whole preprocessed volume,
padded as the whole-volume prediction pads it, without TTA; with several folds each fold's map is computed with
its weights and the maps are averaged. At encoder stage s with activations A (C, *grid):

    HiResCAM:  CAM = ReLU(sum_c (d logit_k / d A_c) * A_c),   k = the predicted class
               (Draelos & Carin 2020: element-wise, so a voxel counts through the gradient that reaches it),
    Grad-CAM:  CAM = ReLU(sum_c mean_grid(d logit_k / d A_c) * A_c)   (Selvaraju et al. 2017),

upsampled (trilinear) to the preprocessed shape and divided by its maximum (zeros when it is zero everywhere).
The gradient reaches the stage through everything the head reads from it (its own pooled features and the
deeper stages); the segmentation logits a head uses as a guide are detached, as in training.

Why HiResCAM is the default: the guided head pools each stage with weights that sum to one over the predicted
lesion, so the gradient reaching a stage is concentrated there; Grad-CAM averages it over the whole volume
first and then weighs every voxel's activation by it, which spreads the map over the crop. On the demo model,
6 correctly classified synthetic test cases, stage -2: a median of 51% (35-64%) of HiResCAM's mass lay in the
lesion dilated by 2 voxels (2.6-5.1% of the volume), against 8% (4-15%) of Grad-CAM's (TechReport 6.5,
``benchmarks/saliency_localisation.py``).
"""
from contextlib import contextmanager
from typing import Optional, Tuple

import numpy as np
import torch
from acvl_utils.cropping_and_padding.padding import pad_nd_image
from torch.nn import functional as F

from multitask_nnunet.errors import InputError
from multitask_nnunet.inference.options import DEFAULT_SALIENCY_METHOD


def _normalised(x: torch.Tensor) -> torch.Tensor:
    peak = float(x.max())
    return x / peak if peak > 0 else torch.zeros_like(x)


def resolve_stage(num_stages: int, stage: int) -> int:
    if not -num_stages <= stage < num_stages:
        raise InputError(f"--saliency-stage {stage}: the encoder has {num_stages} stages (0..{num_stages - 1}, or "
                         f"negative from the end)")
    return stage % num_stages


def class_activation_map(predictor, data: torch.Tensor, class_index: int, stage: int,
                         method: str = DEFAULT_SALIENCY_METHOD) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(the class activation map of ``method`` (x, y, z) in [0, 1], the head's pooling weights (x, y, z) in
    [0, 1] or None for a head without them) on the preprocessed grid of ``data`` (c, x, y, z), averaged over the
    predictor's folds, on the CPU. ``method``: one of options.SALIENCY_METHODS."""
    module = predictor._module()
    head = module.classification_head
    cams, pools = [], []
    with _pooling_weights_kept(head) as keeps_weights, torch.inference_mode(False), torch.enable_grad():
        x = data.to(predictor.device).clone()  # a normal tensor (the prepared one may be an inference tensor)
        padded, revert = pad_nd_image(x, predictor.configuration_manager.patch_size, "constant", {"value": 0}, True,
                                      module.divisibility())
        crop = tuple(revert[1:])
        for _ in predictor.fold_weights():
            module.eval()
            with predictor._autocast():
                skips = module.encoder(padded[None])
                s = resolve_stage(len(skips), stage)
                segmentation = module.decoder(skips)
                logits = module.classify(skips, segmentation)
                segmentation = segmentation[0] if isinstance(segmentation, (list, tuple)) else segmentation
            activation = skips[s]
            (gradient,) = torch.autograd.grad(logits[0, class_index].float(), activation)
            with torch.no_grad():
                weights = gradient.float() if method == "hirescam" else \
                    gradient.float().mean(dim=tuple(range(2, gradient.ndim)), keepdim=True)
                cam = F.relu((weights * activation.float()).sum(1, keepdim=True))
                cams.append(_normalised(_upsampled(cam, padded.shape[1:])[0, 0][crop]).cpu())
                if keeps_weights:  # as the head pooled in this pass (attention: its first pooled stage's grid)
                    pool = _upsampled(head.last_pooling_weights.float(), padded.shape[1:])
                    pools.append(_normalised(pool[0, 0][crop]).cpu())
            del skips, segmentation, logits, activation, gradient
    cam = _normalised(torch.stack(cams).mean(0))
    pool = _normalised(torch.stack(pools).mean(0)) if pools else None
    return cam, pool


def _upsampled(x: torch.Tensor, size) -> torch.Tensor:
    """(B, 1, *grid) -> (B, 1, *size), (bi/tri)linear; unchanged where the grid is already that size."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="trilinear" if x.ndim == 5 else "bilinear", align_corners=False)


@contextmanager
def _pooling_weights_kept(head):
    """Yields whether the head keeps the weights it pools with (SegGuidedHead, ``keep_pooling_weights``): the
    saliency pass reads them from its own forward instead of computing them again; dropped afterwards."""
    if not hasattr(head, "keep_pooling_weights"):
        yield False
        return
    head.keep_pooling_weights = True
    try:
        yield True
    finally:
        head.keep_pooling_weights, head.last_pooling_weights = False, None


def segmentation_entropy(logits: torch.Tensor, has_regions: bool) -> torch.Tensor:
    """Per-voxel uncertainty (x, y, z) in [0, 1] of the ensembled segmentation logits (C, x, y, z): the softmax
    entropy divided by log C (labels), or for regions the largest binary entropy of the region sigmoids divided
    by log 2."""
    logits = logits.float()
    if has_regions:
        p = torch.sigmoid(logits).clamp(1e-7, 1 - 1e-7)
        return (-(p * p.log() + (1 - p) * (1 - p).log()) / np.log(2)).amax(0)
    p = torch.softmax(logits, 0).clamp_min(1e-12)
    return -(p * p.log()).sum(0) / np.log(max(2, logits.shape[0]))
