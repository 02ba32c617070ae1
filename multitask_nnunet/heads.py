"""Classification heads: one registry, one builder.

Like nnU-Net's plans, which name an architecture by its class and kwargs and rebuild it from them, a head is
described by a *spec*, ``{"class_name": ..., "kwargs": {...}}``. The trainer plans the spec
(``plan_head``), the checkpoint stores it beside the head's weights, and training, final validation and
``multitask-nnunet predict`` all rebuild the head from it through ``build_head``.

Every head has one interface::

    head(skips, segmentation_logits, guide_target=None) -> class logits (B, K)

(a head whose ``decoder_stages`` is not empty also gets ``decoder_features={stage: tensor}``: the outputs of
nnU-Net's decoder at those encoder stages' resolutions, kept by MultitaskUNet from the same pass).

``skips`` are the encoder's outputs, stage 0 (highest resolution) to the bottleneck; ``segmentation_logits``
is the decoder's highest-resolution output of the same forward pass (B, C_seg, *spatial). ``guide_target``
(training only, optional) is the ground-truth mask of the guide structure at the same resolution
(B, 1, *spatial): a head that pools by a guide may pool over it instead of the prediction ("teacher forcing",
as Faster R-CNN adds ground-truth boxes to its proposals). Heads work for 2d and 3d alike.

- ``SegGuidedHead`` (the default): pools several encoder stages, each weighted by the network's own predicted
  probability of the structure that carries the class (the *guide*, detached), concatenated with the global
  average of the bottleneck, then a small MLP. A structure that fills well under 1% of the crop is invisible
  to a global average after instance norm; weighting by its predicted probability pools exactly there.
  ``pool_decoder_stages`` (off by default) pools decoder features the same way; ``attention`` (on by default)
  learns a per-voxel score that reweights the guide within its support.
- ``GAPHead`` (the first design, kept for comparison): global average pooling of the bottleneck and an MLP.
"""
import math
from typing import Dict, List, Optional, Sequence, Type, Union

import torch
from torch import nn
from torch.nn import functional as F

from multitask_nnunet.errors import InputError

FOREGROUND_GUIDE = "foreground"


def _mlp(in_features: int, hidden: Sequence[int], num_classes: int, dropout: float) -> nn.Sequential:
    """LayerNorm, then Linear -> ReLU -> Dropout per hidden width, then Linear to the class logits."""
    layers: List[nn.Module] = [nn.LayerNorm(in_features)]
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU(inplace=True), nn.Dropout(dropout)]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def _spatial_mean(x: torch.Tensor) -> torch.Tensor:
    return x.float().mean(dim=tuple(range(2, x.ndim)))


class GAPHead(nn.Module):
    """Global average pooling of the bottleneck, LayerNorm, then an MLP to ``num_classes`` logits."""

    def __init__(self, in_channels: int, num_classes: int, hidden: Sequence[int] = (128, 64), dropout: float = 0.3):
        super().__init__()
        self.mlp = _mlp(in_channels, hidden, num_classes, dropout)

    @classmethod
    def plan(cls, encoder_channels: Sequence[int], num_classes: int, guide: Optional[dict] = None, **overrides) -> dict:
        return {"in_channels": int(encoder_channels[-1]), "num_classes": int(num_classes), "hidden": [128, 64],
                "dropout": 0.3, **overrides}

    def forward(self, skips: Sequence[torch.Tensor], segmentation_logits: Optional[torch.Tensor] = None,
                guide_target: Optional[torch.Tensor] = None):
        return self.mlp(_spatial_mean(skips[-1]))


class SegGuidedHead(nn.Module):
    """Guide-weighted pooling of encoder stages ``pool_stages`` plus the bottleneck's global average, then an MLP.

    The guide is the predicted probability of the structure that carries the class: the sigmoid of region
    channels ``guide_channels`` (their union, for region-based datasets) or the summed softmax of label
    channels (label-based), kept where it is >= 0.5 (the predicted structure). It is computed without
    gradient, area-averaged down to each stage's grid, and normalised to sum to one per case, so the pooled
    feature is a guide-weighted mean. When fewer than ``min_guide_voxels`` voxels of a case are predicted as
    the guide structure, the predicted foreground (``foreground_channels``) is used instead, and when that is
    empty too, plain global pooling: never a division by zero or a NaN.

    ``guide_top_fraction`` > 0 adds a step before the foreground fallback: a case whose guide structure is
    predicted empty pools over the voxels of its predicted foreground with the highest guide probability, that
    fraction of the foreground's voxels (at least one), weighted by that probability. Early in training a small
    structure is ranked above its surroundings before its probability reaches 0.5, so the head can pool where
    it is while the segmentation has not found it yet, in training and at inference alike.

    In training, a case whose ``guide_target`` (the ground-truth guide mask, see the module docstring) holds at
    least ``min_guide_voxels`` voxels is pooled over that mask instead: the head then learns what the
    structure looks like from the first epoch on, also while the segmentation has not found it yet (a lesion
    of < 1% of the crop is segmented late). Cases without it (no mask, the structure outside the patch, or not
    chosen for teacher forcing) use the prediction, as at inference.

    ``attention`` (planned on by default since 2026-12-02; the constructor's False keeps older checkpoints, whose
    kwargs lack it, as they were trained) learns where to pool *within* the guide's weights: per pooled stage, a linear
    score of each voxel's features (a 1x1 convolution, initialised to zero, so the head starts as the plain guide
    pooling) reweights the guide, ``w * exp(score)``, normalised per case (attention-based multiple-instance
    pooling restricted to the guide's support). While the guide falls back to the predicted foreground (a lesion
    not segmented yet), the head can still learn from the class labels alone to pool where the class shows. The
    scores see the same features as the pooling, so they are detached with them in the head-only phases.
    """

    def __init__(self, encoder_channels: Sequence[int], num_classes: int, guide_channels: Sequence[int],
                 foreground_channels: Sequence[int], guide_activation: str = "sigmoid",
                 pool_stages: Optional[Sequence[int]] = None, hidden: Sequence[int] = (128,), dropout: float = 0.3,
                 min_guide_voxels: float = 1.0, guide_top_fraction: float = 0.0,
                 pool_decoder_stages: Sequence[int] = (), attention: bool = False):
        super().__init__()
        if guide_activation not in ("sigmoid", "softmax"):
            raise ValueError(f"guide_activation must be 'sigmoid' or 'softmax', got {guide_activation!r}")
        n = len(encoder_channels)
        self.pool_stages = [s % n for s in (range(1, n) if pool_stages is None else pool_stages)]
        # the decoder has outputs at encoder stages 0 .. n-2 (none at the bottleneck); MultitaskUNet reads this
        if any(not -(n - 1) <= s < n - 1 for s in pool_decoder_stages):
            raise ValueError(f"pool_decoder_stages {list(pool_decoder_stages)}: the decoder has outputs at encoder "
                             f"stages 0..{n - 2} (or negative from the deepest)")
        self.decoder_stages = [s % (n - 1) for s in pool_decoder_stages]
        self.guide_channels = [int(c) for c in guide_channels]
        self.foreground_channels = [int(c) for c in foreground_channels]
        self.guide_activation = guide_activation
        self.min_guide_voxels = float(min_guide_voxels)
        if not 0.0 <= float(guide_top_fraction) <= 1.0:
            raise ValueError(f"guide_top_fraction must lie in [0, 1], got {guide_top_fraction!r}")
        self.guide_top_fraction = float(guide_top_fraction)
        # a decoder stage has the channels of the encoder stage it joins
        stage_channels = [int(encoder_channels[s]) for s in self.pool_stages + self.decoder_stages]
        pooled = sum(stage_channels) + int(encoder_channels[-1])
        self.attention = None
        if attention:
            self.attention = nn.ModuleList(nn.Linear(c, 1) for c in stage_channels)
            for score in self.attention:  # zero scores: the plain guide pooling until the head learns otherwise
                nn.init.zeros_(score.weight)
                nn.init.zeros_(score.bias)
        self.mlp = _mlp(pooled, hidden, num_classes, dropout)
        #: the detached weights of the last forward pass in training mode, or in any mode while
        #: ``keep_pooling_weights`` is set (the saliency pass) (not a buffer: never in a checkpoint): the guide's,
        #: at the segmentation's resolution; with ``attention``, the attended weights of the first pooled stage,
        #: at that stage's grid (where the head actually pooled)
        self.last_pooling_weights: Optional[torch.Tensor] = None
        self.keep_pooling_weights = False

    @classmethod
    def plan(cls, encoder_channels: Sequence[int], num_classes: int, guide: Optional[dict] = None, **overrides) -> dict:
        if guide is None:
            raise ValueError("SegGuidedHead needs a guide (see resolve_guide)")
        return {"encoder_channels": [int(c) for c in encoder_channels], "num_classes": int(num_classes),
                "guide_channels": list(guide["guide_channels"]),
                "foreground_channels": list(guide["foreground_channels"]),
                "guide_activation": guide["guide_activation"], "pool_stages": None, "hidden": [128],
                "dropout": 0.3, "min_guide_voxels": 1.0, "guide_top_fraction": 0.0, "pool_decoder_stages": [],
                "attention": True, **overrides}

    def _probability(self, probabilities: torch.Tensor, channels: List[int]) -> torch.Tensor:
        selected = probabilities[:, channels]
        # regions overlap (union = max); labels are exclusive (union = sum)
        return selected.amax(1) if self.guide_activation == "sigmoid" else selected.sum(1)

    @torch.no_grad()
    def pooling_weights(self, segmentation_logits: torch.Tensor,
                        guide_target: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, 1, *spatial) float32 weights at the segmentation's resolution: the ground-truth guide mask where
        ``guide_target`` has one (training), else the predicted guide structure (voxels with probability >= 0.5,
        weighted by that probability), else (``guide_top_fraction`` > 0) the top-ranked guide probabilities
        within the predicted foreground, else the predicted foreground, else uniform. Only predicted or
        top-ranked voxels count: a diffuse low probability over a whole crop (early in training) would otherwise
        outweigh a small structure."""
        logits = segmentation_logits.detach().float()
        probabilities = torch.sigmoid(logits) if self.guide_activation == "sigmoid" else torch.softmax(logits, 1)
        probability = self._probability(probabilities, self.guide_channels)
        foreground = self._probability(probabilities, self.foreground_channels)
        guide, foreground = probability * (probability >= 0.5), foreground * (foreground >= 0.5)
        predicted = lambda w: (w > 0).flatten(1).sum(1).view(-1, *([1] * (w.ndim - 1)))  # noqa: E731
        fallback = torch.where(predicted(foreground) >= self.min_guide_voxels, foreground, torch.ones_like(guide))
        if self.guide_top_fraction > 0:
            ranked = self._top_of_foreground(probability, foreground)
            fallback = torch.where(predicted(ranked) >= self.min_guide_voxels, ranked, fallback)
        weights = torch.where(predicted(guide) >= self.min_guide_voxels, guide, fallback)
        if guide_target is not None:
            target = (guide_target.detach()[:, 0] > 0).float()
            weights = torch.where(predicted(target) >= self.min_guide_voxels, target, weights)
        return weights[:, None]

    def _top_of_foreground(self, probability: torch.Tensor, foreground: torch.Tensor) -> torch.Tensor:
        """Per case, the guide probability on the ``guide_top_fraction`` of predicted-foreground voxels where it
        is highest (exactly that many, at least one), zero elsewhere; all zero without predicted foreground."""
        inside = (foreground > 0).flatten(1)
        candidates = torch.where(inside, probability.flatten(1), torch.full_like(inside, -1.0, dtype=probability.dtype))
        chosen = torch.zeros_like(inside)
        for b, n in enumerate(inside.sum(1).tolist()):
            if n > 0:
                k = max(1, int(math.ceil(self.guide_top_fraction * n)))
                chosen[b, torch.topk(candidates[b], k, sorted=False).indices] = True
        return (probability.flatten(1) * chosen).view_as(probability)

    def forward(self, skips: Sequence[torch.Tensor], segmentation_logits: torch.Tensor,
                guide_target: Optional[torch.Tensor] = None,
                decoder_features: Optional[Dict[int, torch.Tensor]] = None) -> torch.Tensor:
        weights = self.pooling_weights(segmentation_logits, guide_target)
        keep = self.training or self.keep_pooling_weights  # the training log and the saliency pass read these
        if keep:
            self.last_pooling_weights = weights
        pooled = []
        stages = [skips[s] for s in self.pool_stages] + [decoder_features[s] for s in self.decoder_stages]
        for index, features in enumerate(stages):
            # float32 on purpose: a weighted mean over ~10^6 voxels must not be accumulated in fp16
            with torch.autocast(features.device.type, enabled=False):
                flat = features.float().flatten(2)  # (B, C, N)
                w = area_resize(weights, features.shape[2:]).flatten(1)  # (B, N)
                if self.attention is not None:
                    w = _attend(w, self.attention[index](flat.transpose(1, 2))[..., 0])
                    if keep and index == 0:
                        self.last_pooling_weights = w.detach().view(-1, 1, *features.shape[2:])
                w = w / w.sum(1, keepdim=True).clamp_min(1e-12)
                pooled.append(torch.bmm(flat, w[..., None])[..., 0])
        pooled.append(_spatial_mean(skips[-1]))
        return self.mlp(torch.cat(pooled, 1))


def _attend(weights: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """``weights * exp(scores)`` per case (B, N), computed stably: the scores are shifted by their maximum over
    the weights' support, so nothing overflows and voxels outside the support keep weight zero."""
    inside = weights > 0
    shift = torch.where(inside, scores, torch.full_like(scores, -torch.inf)).amax(1, keepdim=True)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))  # an all-zero case stays zero
    return weights * torch.exp(torch.where(inside, scores - shift, torch.zeros_like(scores)))


def area_resize(weights: torch.Tensor, size) -> torch.Tensor:
    size = tuple(int(s) for s in size)
    if tuple(weights.shape[2:]) == size:
        return weights
    pool = F.adaptive_avg_pool3d if weights.ndim == 5 else F.adaptive_avg_pool2d
    return pool(weights, size)


#: every head the builder knows, by class name (the name stored in checkpoints)
HEADS: Dict[str, Type[nn.Module]] = {"SegGuidedHead": SegGuidedHead, "GAPHead": GAPHead}


def plan_head(class_name: str, encoder_channels: Sequence[int], num_classes: int, guide: Optional[dict] = None,
              **overrides) -> dict:
    """The spec of a head: its class name and the complete kwargs that ``build_head`` rebuilds it from."""
    if class_name not in HEADS:
        raise InputError(f"unknown classification head '{class_name}'; known heads: {', '.join(HEADS)}")
    kwargs = HEADS[class_name].plan(encoder_channels, num_classes, guide, **overrides)
    return {"class_name": class_name, "kwargs": _plain(kwargs)}


def build_head(spec: dict) -> nn.Module:
    """The one builder: ``HEADS[spec['class_name']](**spec['kwargs'])``."""
    if spec.get("class_name") not in HEADS:
        raise InputError(f"unknown classification head '{spec.get('class_name')}'; known heads: {', '.join(HEADS)}")
    return HEADS[spec["class_name"]](**spec["kwargs"])


def head_spec_from_checkpoint(entry: dict) -> dict:
    """The spec stored in a checkpoint's ``classification_head`` entry. Checkpoints written before the registry
    existed (version 0.1.0: ``hidden``/``dropout`` keys, a GAP head) map onto ``GAPHead``."""
    if "class_name" in entry:
        return {"class_name": entry["class_name"], "kwargs": entry["kwargs"]}
    in_channels = int(entry["state_dict"]["mlp.0.weight"].shape[0])
    return {"class_name": "GAPHead", "kwargs": {"in_channels": in_channels, "num_classes": int(entry["num_classes"]),
                                                "hidden": list(entry["hidden"]), "dropout": float(entry["dropout"])}}


def resolve_guide(label_manager, dataset_json: dict, guide: Optional[Union[str, int]] = None) -> dict:
    """Which segmentation channels guide ``SegGuidedHead``.

    ``guide`` None: the last region of ``regions_class_order`` (region-based datasets) or the highest label;
    ``"foreground"``: every foreground channel; otherwise a region or label name from dataset.json's
    ``labels`` (or a label value). The foreground channels are the fallback for an empty guide."""
    n = int(label_manager.num_segmentation_heads)
    if label_manager.has_regions:
        activation, foreground = "sigmoid", list(range(n))
    else:
        activation, foreground = "softmax", list(range(1, n))
    if guide is None:
        channels = [n - 1]
    elif guide == FOREGROUND_GUIDE:
        channels = foreground
    else:
        channels = [_channel_of(label_manager, dataset_json, guide)]
    return {"guide_channels": channels, "foreground_channels": foreground, "guide_activation": activation}


def _channel_of(label_manager, dataset_json: dict, guide: Union[str, int]) -> int:
    labels = dataset_json["labels"]
    value = labels.get(guide, guide) if isinstance(guide, str) else guide
    if label_manager.has_regions:
        region = tuple(value) if isinstance(value, (list, tuple)) else (value,)
        regions = [tuple(r) if isinstance(r, (list, tuple)) else (r,) for r in label_manager.foreground_regions]
        if region in regions:
            return regions.index(region)
    elif isinstance(value, int) and value in label_manager.foreground_labels:
        return int(value)
    raise InputError(f"head_guide {guide!r}: not a foreground region or label of this dataset "
                     f"(labels: {', '.join(map(str, labels))}; or '{FOREGROUND_GUIDE}')")


def _plain(value):
    """JSON-like copy (lists, not tuples), so specs compare equal after a checkpoint round trip."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
