"""Where the model looked, and how sure the segmentation is: the map of what the head used for its decision
(by default), a class activation map of the predicted class (HiResCAM or Grad-CAM), the guided head's pooling
weights, and the per-voxel segmentation entropy, all on the preprocessed grid (``export.py`` maps them to the
input's geometry).

Maps that need gradients run as a separate forward pass with autograd on, only when asked (``predict
--saliency``); the prediction itself keeps running under inference mode. The pass is the network's own
(encoder -> decoder -> head, as ``MultitaskUNet.forward``) on the whole preprocessed volume, padded as the
whole-volume prediction pads it, without TTA; with several folds each fold's map is computed with its weights
and the maps are averaged.

- ``decision`` (the default for a head that pools by a guide): the head's own pooling maps, the guide's
  (attended) and the organ's (context branch), each weighted by its branch's part in the predicted class's
  logit: ReLU(sum over the branch's pooled features of d logit_k / d feature * feature). It shows what the
  decision rested on: the lesion, or the organ when the lesion was missed or carries little of the class.
- at encoder stage s with activations A (C, *grid), k = the predicted class:

    HiResCAM:  CAM = ReLU(sum_c (d logit_k / d A_c) * A_c)   (Draelos & Carin 2020: element-wise),
    Grad-CAM:  CAM = ReLU(sum_c mean_grid(d logit_k / d A_c) * A_c)   (Selvaraju et al. 2017),

  upsampled (trilinear) to the preprocessed shape and divided by its maximum (zeros when it is zero
  everywhere). The gradient reaches the stage through everything the head reads from it; the segmentation
  logits a head uses as a guide are detached, as in training. Gradient maps answer "which activations would
  move the logit", which on a guided head lights edges the head never pooled (``benchmarks/saliency_localisation.py``
  measures the share of each map's mass in the lesion).
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
    """(the map of ``method`` (x, y, z) in [0, 1], the head's pooling weights (x, y, z) in [0, 1] or None for a
    head without them) on the preprocessed grid of ``data`` (c, x, y, z), averaged over the predictor's folds, on
    the CPU. ``method``: one of options.SALIENCY_METHODS; ``decision`` falls back to ``hirescam`` for a head that
    does not pool by a guide."""
    module = predictor._module()
    head = module.classification_head
    cams, pools = [], []
    with _pooling_weights_kept(head) as keeps_weights, torch.inference_mode(False), torch.enable_grad():
        decision = method == "decision" and keeps_weights and bool(head.branches)
        x = data.to(predictor.device).clone()  # a normal tensor (the prepared one may be an inference tensor)
        padded, revert = pad_nd_image(x, predictor.configuration_manager.patch_size, "constant", {"value": 0}, True,
                                      module.divisibility())
        crop = tuple(revert[1:])
        for _ in predictor.fold_weights():
            module.eval()
            mlp_input = []
            hook = head.mlp.register_forward_hook(lambda m, args, out: mlp_input.append(args[0])) if decision \
                else None
            try:
                with predictor._autocast():
                    skips = module.encoder(padded[None])
                    s = resolve_stage(len(skips), stage)
                    segmentation = module.decoder(skips)
                    logits = module.classify(padded[None], skips, segmentation)
            finally:
                if hook is not None:
                    hook.remove()
            activation = skips[s]
            gradient, *mlp_gradient = torch.autograd.grad(logits[0, class_index].float(),
                                                          [activation] + mlp_input[:1])
            with torch.no_grad():
                pool = None
                if keeps_weights:  # as the head pooled in this pass (attention: its first pooled stage's grid)
                    pool = _normalised(_upsampled(head.last_pooling_weights.float(), padded.shape[1:])[0, 0][crop])
                    pools.append(pool.cpu())
                if decision:
                    cams.append(_decision_map(head, mlp_input[0], mlp_gradient[0], pool, padded.shape[1:], crop).cpu())
                else:
                    weights = gradient.float() if method != "gradcam" else \
                        gradient.float().mean(dim=tuple(range(2, gradient.ndim)), keepdim=True)
                    cam = F.relu((weights * activation.float()).sum(1, keepdim=True))
                    cams.append(_normalised(_upsampled(cam, padded.shape[1:])[0, 0][crop]).cpu())
            del skips, segmentation, logits, activation, gradient, mlp_input, mlp_gradient
    cam = _normalised(torch.stack(cams).mean(0))
    pool = _normalised(torch.stack(pools).mean(0)) if pools else None
    return cam, pool


def _decision_map(head, mlp_input: torch.Tensor, mlp_gradient: torch.Tensor, guide_map: torch.Tensor, size,
                  crop) -> torch.Tensor:
    """Each branch's pooling map (the guide's, the organ's), weighted by that branch's part in the predicted
    class's logit: ReLU of the sum of gradient times input over the branch's pooled features (the first-order
    share of the logit that the branch carries). Equal weights when no branch contributes positively."""
    contribution = {name: float(F.relu((mlp_gradient[0, part] * mlp_input[0, part]).float().sum()))
                    for name, part in head.branches.items()}
    maps = {"guide": guide_map}
    if "context" in head.branches and head.last_context_weights is not None:
        maps["context"] = _normalised(_upsampled(head.last_context_weights.float(), size)[0, 0][crop])
    total = sum(contribution[name] for name in maps)
    shares = {name: (contribution[name] / total if total > 0 else 1.0 / len(maps)) for name in maps}
    return _normalised(sum(shares[name] * maps[name] for name in maps))


def _upsampled(x: torch.Tensor, size) -> torch.Tensor:
    """(B, 1, *grid) -> (B, 1, *size), (bi/tri)linear; unchanged where the grid is already that size."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="trilinear" if x.ndim == 5 else "bilinear", align_corners=False)


@contextmanager
def _pooling_weights_kept(head):
    """Yields whether the head keeps the weights it pools with (a head that ``uses_guide``, through
    ``keep_pooling_weights``): the saliency pass reads them from its own forward instead of computing them again;
    dropped afterwards."""
    if not head.uses_guide:
        yield False
        return
    head.keep_pooling_weights = True
    try:
        yield True
    finally:
        head.keep_pooling_weights, head.last_pooling_weights, head.last_context_weights = False, None, None


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
