"""Classification heads: one interface, one registry, one builder.

Like nnU-Net's plans, which name an architecture by its class and kwargs and rebuild it from them, a head is
described by a *spec*, ``{"class_name": ..., "kwargs": {...}}``. The trainer plans the spec
(``plan_head``), the checkpoint stores it beside the head's weights, and training, final validation and
``multitask-nnunet predict`` all rebuild the head from it through ``build_head``.

Every head is a ``ClassificationHead``::

    head(skips, segmentation_logits, image=None) -> class logits (B, K)

``skips`` are the encoder's outputs, stage 0 (highest resolution) to the bottleneck; ``segmentation_logits``
is the decoder's highest-resolution output of the same forward pass (B, C_seg, *spatial), detached; ``image``
is the network's input of that pass (B, C_in, *spatial), nnU-Net-normalised. Heads work for 2d and 3d alike.
A head whose answer needs the whole case (``has_case_part``) splits it for the sliding window: the tiles give
their part (``per_tile``) and ``case_logits`` adds the rest once, from the stitched segmentation and the image.

- ``SegGuidedHead`` (the default): reads the structure that carries the class (the *guide*: for the pancreas
  quiz, the lesion) and the organ around it (the predicted foreground: the whole pancreas), as the network
  itself predicts them. A structure that fills well under 1% of the crop is invisible to a global average
  after instance norm; weighting by its predicted probability pools exactly there. Per pooled encoder stage:
  the guide-weighted mean (attention within the guide), the organ-weighted mean (the context branch), then the
  bottleneck's global mean and explicit descriptors of the predicted structures (volumes, intensity in the
  lesion, its rim and the organ), then a small MLP. Trained with guide dropout, so that a missed lesion leaves
  a head that answers from the organ, less confidently, instead of one that is confidently wrong.
- ``GAPHead`` (the first design, kept for comparison): global average pooling of the bottleneck and an MLP.

Adding a head: subclass ``ClassificationHead``, give it a ``plan`` classmethod, and register it in ``HEADS``
(``register_head``).
"""
from contextlib import contextmanager, nullcontext
from typing import ContextManager, Dict, List, Optional, Sequence, Tuple, Type, Union

import torch
from torch import nn
from torch.nn import functional as F

from multitask_nnunet.errors import InputError
from multitask_nnunet.io.nifti import labels_volume_ml

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


class ClassificationHead(nn.Module):
    """What the trainer, the network, the saliency pass and the training log may ask of a head.

    ``uses_guide``: ``plan`` needs the guide (``resolve_guide``), and the trainer logs where the head pooled
    (``last_pooling_weights`` against the ground-truth guide). ``last_pooling_weights``: the detached weights of
    the last forward pass in training mode, or in any mode while ``keep_pooling_weights`` is set (the saliency
    pass), (B, 1, *grid); None for a head that does not pool by a guide. ``guide_channels``: the segmentation
    channels of the guide (empty without one)."""
    uses_guide = False

    def __init__(self):
        super().__init__()
        self.last_pooling_weights: Optional[torch.Tensor] = None
        self.keep_pooling_weights = False
        self.guide_channels: List[int] = []
        #: where each pooling branch sits in the head's final MLP input, by name (the saliency pass weighs the
        #: branches' maps by them; empty for a head without pooling branches), and the organ weights of a context
        #: branch, kept like ``last_pooling_weights``
        self.branches: Dict[str, slice] = {}
        self.last_context_weights: Optional[torch.Tensor] = None
        self._records: Optional[list] = None  # see ``recording``

    @classmethod
    def plan(cls, encoder_channels: Sequence[int], num_classes: int, guide: Optional[dict] = None,
             input_channels: int = 1, voxel_ml: float = 1e-3, **overrides) -> dict:
        """The complete kwargs of this head for a network (``input_channels``, ``voxel_ml``: the volume of one
        voxel of the configuration's spacing, in mL), with ``overrides`` applied."""
        raise NotImplementedError

    def parameter_groups(self) -> List[dict]:
        """The head's parameters for its optimizer, as torch param groups; a group's ``lr_scale`` multiplies the
        head's learning rate for it (default: one group, scale 1)."""
        return [{"params": list(self.parameters()), "lr_scale": 1.0}]

    #: the head has a part that reads the whole case (``per_tile``, ``case_logits``)
    has_case_part = False

    @contextmanager
    def per_tile(self):
        """Within it, ``forward`` returns only the logits of the part a tile can give (for a head with a case
        part); the sliding window averages those over its tiles and calls ``case_logits`` once on the stitched
        case. A head without a case part answers per tile as it always does."""
        yield

    def case_logits(self, tile_logits: torch.Tensor, segmentation_logits: torch.Tensor,
                    image: torch.Tensor) -> torch.Tensor:
        """The case's class logits from the tiles' part (``tile_logits``, (B, K)) and the case part read on the
        whole case: its stitched segmentation logits and its image (B, C, *spatial)."""
        return tile_logits

    def refit_passes(self) -> List[Tuple[float, ContextManager]]:
        """What the trainer runs after the last epoch for a head that refits part of itself on the training
        cases (empty: no refit). Per pass, a sample weight and a context in which the trainer predicts every
        training case once (whole volume, no augmentation) while the head records what it needs
        (``recording``); then it calls ``refit``."""
        return []

    @contextmanager
    def recording(self):
        """Yields the list into which ``forward`` appends one record per call (heads that refit)."""
        self._records = []
        try:
            yield self._records
        finally:
            self._records = None

    def refit(self, passes: List[Tuple[float, list]], labels: Sequence[int], class_weights: torch.Tensor) -> str:
        """Refit from ``(weight, records)`` per pass of ``refit_passes`` (records in the order of ``labels``, the
        training cases' classes); returns a line for the training log."""
        raise NotImplementedError

    def recorded_logits(self, records: list) -> torch.Tensor:
        """(N, K) the class logits this head gives the recorded cases (records of ``recording``)."""
        raise NotImplementedError

    def refitted_state(self) -> Dict[str, torch.Tensor]:
        """The entries of the state dict that ``refit`` sets."""
        return {}

    def forward(self, skips: Sequence[torch.Tensor], segmentation_logits: Optional[torch.Tensor] = None,
                image: Optional[torch.Tensor] = None) -> torch.Tensor:
        raise NotImplementedError


class GAPHead(ClassificationHead):
    """Global average pooling of the bottleneck, LayerNorm, then an MLP to ``num_classes`` logits."""

    def __init__(self, in_channels: int, num_classes: int, hidden: Sequence[int] = (128, 64), dropout: float = 0.3):
        super().__init__()
        self.mlp = _mlp(in_channels, hidden, num_classes, dropout)

    @classmethod
    def plan(cls, encoder_channels: Sequence[int], num_classes: int, guide: Optional[dict] = None,
             input_channels: int = 1, voxel_ml: float = 1e-3, **overrides) -> dict:
        return {"in_channels": int(encoder_channels[-1]), "num_classes": int(num_classes), "hidden": [128, 64],
                "dropout": 0.3, **overrides}

    def forward(self, skips, segmentation_logits=None, image=None):
        return self.mlp(_spatial_mean(skips[-1]))


class SegGuidedHead(ClassificationHead):
    """Guide- and organ-weighted pooling of encoder stages ``pool_stages``, the bottleneck's global average and
    descriptors of the predicted structures, then an MLP.

    The guide is the predicted probability of the structure that carries the class: the sigmoid of region
    channels ``guide_channels`` (their union, for region-based datasets) or the summed softmax of label
    channels (label-based), kept where it is >= 0.5 (the predicted structure). The organ is the predicted
    foreground (``foreground_channels``), likewise. Both are computed without gradient, area-averaged down to
    each stage's grid and normalised to sum to one per case, so each pooled feature is a weighted mean. When
    fewer than ``min_guide_voxels`` voxels of a case are predicted as the guide, the guide branch pools the
    organ instead, and when that is empty too, the whole input: never a division by zero or a NaN.

    - ``attention``: per pooled stage, a linear score of each voxel's features (initialised to zero, so the head
      starts as the plain guide pooling) reweights the guide, ``w * exp(score)``, normalised per case
      (attention-based multiple-instance pooling restricted to the guide's support). While the guide falls back
      to the organ (a lesion not segmented yet), the head can still learn from the class labels alone where
      the class shows.
    - ``context``: the organ-weighted mean of the same stages, always, beside the guide's: the parenchyma
      around the lesion carries class signal too, and it is what is left when the lesion is missed.
    - ``descriptors``: what a radiologist reads, from the input image (nnU-Net-normalised) and the predicted
      structures: log volume (mL, ``voxel_ml`` per voxel) of the guide and of the organ, the guide's share of
      the organ, whether a guide was found, and per input channel the mean and spread of intensity in the
      guide, its rim (up to 2 voxels outside it) and the organ without the guide.
    - ``interior``: those intensities are read where the predicted structures are not in doubt: the guide's
      interior (the guide less its one-voxel boundary, when that leaves ``INTERIOR_MIN_VOXELS``), its rim within
      the organ (up to ``RIM_VOXELS`` 6-connected steps, so no background outside the organ), and the organ's
      interior beyond the rim. A boundary voxel mixes the structure with its neighbour:
      a lesion's spread read over its whole predicted mask is mostly the step from lesion to parenchyma at its
      edge, and the parenchyma's mean takes in the lesion voxels the segmentation missed. Volumes still count
      the whole predicted structures.
    - ``descriptor_logits``: the descriptors get a branch of their own instead of joining the MLP's input:
      standardised feature by feature with running statistics (``RunningStandardizer``; a statistic of a
      structure that was not predicted is imputed at its mean, the found flag says it is missing), then one
      linear layer to class logits, added to the MLP's. This is a logistic regression on what a radiologist
      reads, learnt at ``DESCRIPTOR_LR_SCALE`` times the head's learning rate, and refitted after the last
      epoch (``refit``): the training cases as the final network segments them at inference, without nnU-Net's
      augmentation (which shifts intensities by up to a quarter), each once more with its guide removed
      (weight ``guide_dropout``), the rest of the head held fixed.
    - ``guide_dropout``: in training, each case's predicted guide is dropped with this probability, so the head
      also learns to answer as if the lesion had been missed (guide found = 0, the guide branch on the organ).

    The constructor's defaults (all off) rebuild checkpoints whose kwargs predate an option as they were
    trained; ``plan`` turns them on for new trainings.
    """
    uses_guide = True
    RIM_VOXELS = 2
    #: ``interior``: a guide whose interior holds fewer voxels is read whole (a spread needs a few voxels)
    INTERIOR_MIN_VOXELS = 10
    DESCRIPTOR_LR_SCALE = 10.0
    #: the refit's L2 penalty, REFIT_L2 * |W|^2 / (2 N) over N cases (scikit-learn's C = 1 / REFIT_L2)
    REFIT_L2 = 1.0

    def __init__(self, encoder_channels: Sequence[int], num_classes: int, guide_channels: Sequence[int],
                 foreground_channels: Sequence[int], guide_activation: str = "sigmoid",
                 pool_stages: Optional[Sequence[int]] = None, hidden: Sequence[int] = (128,), dropout: float = 0.3,
                 min_guide_voxels: float = 1.0, attention: bool = False, context: bool = False,
                 descriptors: bool = False, guide_dropout: float = 0.0, input_channels: int = 1,
                 voxel_ml: float = 1e-3, descriptor_logits: bool = False, interior: bool = False):
        super().__init__()
        if guide_activation not in ("sigmoid", "softmax"):
            raise ValueError(f"guide_activation must be 'sigmoid' or 'softmax', got {guide_activation!r}")
        if not 0.0 <= float(guide_dropout) < 1.0:
            raise ValueError(f"guide_dropout must lie in [0, 1), got {guide_dropout!r}")
        n = len(encoder_channels)
        self.pool_stages = [s % n for s in (range(1, n) if pool_stages is None else pool_stages)]
        self.guide_channels = [int(c) for c in guide_channels]
        self.foreground_channels = [int(c) for c in foreground_channels]
        self.guide_activation = guide_activation
        self.min_guide_voxels = float(min_guide_voxels)
        self.context = bool(context)
        self.guide_dropout = float(guide_dropout)
        self.input_channels = int(input_channels)
        self.voxel_ml = float(voxel_ml)
        self.interior = bool(interior)
        self.num_descriptors = (4 + 6 * self.input_channels) if descriptors else 0
        if descriptor_logits and not descriptors:
            raise ValueError("descriptor_logits needs descriptors=True")
        stage_channels = [int(encoder_channels[s]) for s in self.pool_stages]
        pooled = sum(stage_channels) * (2 if self.context else 1) + int(encoder_channels[-1])
        self.standardizer = self.descriptor_linear = None
        self._remove_guide = False  # see ``guide_removed``
        self._per_tile = False  # see ``per_tile``
        if descriptor_logits:
            self.standardizer = RunningStandardizer(self.num_descriptors)
            self.descriptor_linear = nn.Linear(self.num_descriptors, num_classes)
            nn.init.zeros_(self.descriptor_linear.weight)  # no say until it has learnt
            nn.init.zeros_(self.descriptor_linear.bias)
        else:
            pooled += self.num_descriptors
        self.attention = None
        if attention:
            self.attention = nn.ModuleList(nn.Linear(c, 1) for c in stage_channels)
            for score in self.attention:  # zero scores: the plain guide pooling until the head learns otherwise
                nn.init.zeros_(score.weight)
                nn.init.zeros_(score.bias)
        self.mlp = _mlp(pooled, hidden, num_classes, dropout)
        width = sum(stage_channels)
        self.branches = {"guide": slice(0, width)}
        if self.context:
            self.branches["context"] = slice(width, 2 * width)

    @classmethod
    def plan(cls, encoder_channels: Sequence[int], num_classes: int, guide: Optional[dict] = None,
             input_channels: int = 1, voxel_ml: float = 1e-3, **overrides) -> dict:
        if guide is None:
            raise ValueError("SegGuidedHead needs a guide (see resolve_guide)")
        kwargs = {"encoder_channels": [int(c) for c in encoder_channels], "num_classes": int(num_classes),
                  "guide_channels": list(guide["guide_channels"]),
                  "foreground_channels": list(guide["foreground_channels"]),
                  "guide_activation": guide["guide_activation"], "pool_stages": None, "hidden": [128],
                  "dropout": 0.3, "min_guide_voxels": 1.0, "attention": True, "context": True, "descriptors": True,
                  "guide_dropout": 0.25, "input_channels": int(input_channels), "voxel_ml": float(voxel_ml),
                  "interior": True, **overrides}
        # the descriptors' own branch unless asked otherwise; none without descriptors
        kwargs["descriptor_logits"] = bool(overrides.get("descriptor_logits", kwargs["descriptors"]))
        return kwargs

    def parameter_groups(self) -> List[dict]:
        if self.descriptor_linear is None:
            return super().parameter_groups()
        own = {id(p) for p in self.descriptor_linear.parameters()}
        return [{"params": [p for p in self.parameters() if id(p) not in own], "lr_scale": 1.0},
                {"params": list(self.descriptor_linear.parameters()), "lr_scale": self.DESCRIPTOR_LR_SCALE}]

    def _probability(self, probabilities: torch.Tensor, channels: List[int]) -> torch.Tensor:
        selected = probabilities[:, channels]
        # regions overlap (union = max); labels are exclusive (union = sum)
        return selected.amax(1) if self.guide_activation == "sigmoid" else selected.sum(1)

    @torch.no_grad()
    def predicted_structures(self, segmentation_logits: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(guide, organ), each (B, *spatial) float32: the predicted probability where it is >= 0.5, else 0.
        Only predicted voxels count: a diffuse low probability over a whole crop (early in training) would
        otherwise outweigh a small structure."""
        logits = segmentation_logits.detach().float()
        probabilities = torch.sigmoid(logits) if self.guide_activation == "sigmoid" else torch.softmax(logits, 1)
        guide = self._probability(probabilities, self.guide_channels)
        organ = self._probability(probabilities, self.foreground_channels)
        return guide * (guide >= 0.5), organ * (organ >= 0.5)

    @torch.no_grad()
    def guide_found(self, segmentation_logits: torch.Tensor) -> torch.Tensor:
        """(B,) bool: the guide structure is predicted (at least ``min_guide_voxels`` voxels)."""
        return self._found(self.predicted_structures(segmentation_logits)[0])

    def _found(self, weights: torch.Tensor) -> torch.Tensor:
        """(B,) bool: at least ``min_guide_voxels`` voxels of the case are non-zero."""
        return (weights > 0).flatten(1).sum(1) >= self.min_guide_voxels

    def _fallback(self, preferred: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
        view = (-1,) + (1,) * (preferred.ndim - 1)
        return torch.where(self._found(preferred).view(view), preferred, fallback)

    @torch.no_grad()
    def pooling_weights(self, segmentation_logits: torch.Tensor) -> torch.Tensor:
        """(B, 1, *spatial) float32 weights of the guide branch at the segmentation's resolution: the predicted
        guide, else the predicted organ, else uniform."""
        guide, organ = self.predicted_structures(segmentation_logits)
        return self._guide_weights(guide, organ)[:, None]

    def _guide_weights(self, guide: torch.Tensor, organ: torch.Tensor) -> torch.Tensor:
        return self._fallback(guide, self._fallback(organ, torch.ones_like(organ)))

    def forward(self, skips, segmentation_logits, image=None):
        guide, organ = self._structures(segmentation_logits)
        if self.training and self.guide_dropout > 0:
            kept = torch.rand(guide.shape[0], device=guide.device) >= self.guide_dropout
            guide = guide * kept.view(-1, *([1] * (guide.ndim - 1)))
        weights = self._guide_weights(guide, organ)[:, None]
        organ_weights = self._fallback(organ, torch.ones_like(organ))[:, None]
        keep = self.training or self.keep_pooling_weights  # the training log and the saliency pass read these
        if keep:
            self.last_pooling_weights = weights
            self.last_context_weights = organ_weights if self.context else None
        guide_pooled, organ_pooled = [], []
        for index, s in enumerate(self.pool_stages):
            features = skips[s]
            # float32 on purpose: a weighted mean over ~10^6 voxels must not be accumulated in fp16
            with torch.autocast(features.device.type, enabled=False):
                flat = features.float().flatten(2)  # (B, C, N)
                w = area_resize(weights, features.shape[2:]).flatten(1)  # (B, N)
                if self.attention is not None:
                    w = _attend(w, self.attention[index](flat.transpose(1, 2))[..., 0])
                    if keep and index == 0:
                        self.last_pooling_weights = w.detach().view(-1, 1, *features.shape[2:])
                guide_pooled.append(_weighted_mean(flat, w))
                if self.context:
                    organ_pooled.append(_weighted_mean(flat, area_resize(organ_weights, features.shape[2:]).flatten(1)))
        pooled = guide_pooled + organ_pooled + [_spatial_mean(skips[-1])]
        if not self.num_descriptors:
            return self.mlp(torch.cat(pooled, 1))
        if image is None:
            raise ValueError("SegGuidedHead(descriptors=True) needs the network's input image")
        if self.descriptor_linear is None:
            return self.mlp(torch.cat(pooled + [self.describe(image, guide, organ)], 1))
        mlp_logits = self.mlp(torch.cat(pooled, 1))
        if self._per_tile:
            return mlp_logits
        return self._with_descriptors(mlp_logits, image, guide, organ)

    def _structures(self, segmentation_logits: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        guide, organ = self.predicted_structures(segmentation_logits)
        return (torch.zeros_like(guide) if self._remove_guide else guide), organ

    def _with_descriptors(self, mlp_logits, image, guide, organ) -> torch.Tensor:
        """``mlp_logits`` plus the descriptor branch's logits; records both for the refit while ``recording``."""
        device = self.descriptor_linear.weight.device  # the stitched case may lie on the CPU (sliding window)
        regions = self.intensity_regions(guide, organ)  # once: on a whole CT its dilations are the cost
        descriptors = self.describe(image, guide, organ, regions).to(device)
        presence = self.descriptor_presence(guide, organ, regions).to(device)
        mlp_logits = mlp_logits.to(device)
        if self._records is not None:
            self._records.append((descriptors.detach().float().cpu(), presence.cpu(),
                                  mlp_logits.detach().float().cpu()))
        return mlp_logits + self.descriptor_linear(self.standardizer(descriptors, presence))

    @property
    def has_case_part(self) -> bool:
        """The descriptor branch reads the whole case: volumes and intensity statistics of a structure that a
        tile cuts are not the structure's."""
        return self.descriptor_linear is not None

    @contextmanager
    def per_tile(self):
        self._per_tile = self.has_case_part
        try:
            yield
        finally:
            self._per_tile = False

    def case_logits(self, tile_logits, segmentation_logits, image):
        if not self.has_case_part:
            return super().case_logits(tile_logits, segmentation_logits, image)
        guide, organ = self._structures(segmentation_logits)
        return self._with_descriptors(tile_logits.float(), image, guide, organ)

    def refit_passes(self) -> List[Tuple[float, ContextManager]]:
        if self.descriptor_linear is None:
            return []
        if self.guide_dropout == 0:
            return [(1.0, nullcontext())]
        return [(1.0 - self.guide_dropout, nullcontext()), (self.guide_dropout, self.guide_removed())]

    @contextmanager
    def guide_removed(self):
        """Within it, the head reads every case as if its guide had been missed (as guide dropout does)."""
        self._remove_guide = True
        try:
            yield
        finally:
            self._remove_guide = False

    def refit(self, passes: List[Tuple[float, list]], labels: Sequence[int], class_weights: torch.Tensor) -> str:
        """The descriptor branch refitted as a logistic regression: the standardiser's statistics set to those of
        the first pass's measured values, then the linear layer fitted by L-BFGS to the class-weighted
        cross-entropy of ``MLP logits + linear(standardised descriptors)`` over all passes' records, each
        weighted by its pass, with an L2 penalty of ``REFIT_L2 * |W|^2 / (2 N)`` (N cases)."""
        device = self.descriptor_linear.weight.device

        def stacked(records, i):
            return _stacked(records, i, device)

        y = torch.as_tensor(list(labels), dtype=torch.long, device=device)
        first = passes[0][1]
        self.standardizer.set_statistics(stacked(first, 0), stacked(first, 1))
        with torch.no_grad():
            z = torch.cat([self.standardizer.standardise(stacked(r, 0), stacked(r, 1)) for _, r in passes])
        offsets = torch.cat([stacked(r, 2) for _, r in passes])
        targets = y.repeat(len(passes))
        weights = torch.cat([torch.full((len(y),), float(w), device=device) for w, _ in passes]) * \
            class_weights.detach().to(device, torch.float32)[targets]
        weight = self.descriptor_linear.weight.detach().float().clone().requires_grad_(True)
        bias = self.descriptor_linear.bias.detach().float().clone().requires_grad_(True)

        def loss_of(w, b):
            ce = F.cross_entropy(offsets + z @ w.T + b, targets, reduction="none")
            return (weights * ce).sum() / weights.sum() + self.REFIT_L2 * (w ** 2).sum() / (2 * len(y))

        with torch.no_grad():
            before = float(loss_of(weight, bias))
        optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            loss = loss_of(weight, bias)
            loss.backward()
            return loss

        with torch.enable_grad():
            optimizer.step(closure)
        with torch.no_grad():
            after = float(loss_of(weight, bias))
            self.descriptor_linear.weight.copy_(weight)
            self.descriptor_linear.bias.copy_(bias)
        accuracy = float(((offsets[:len(y)] + z[:len(y)] @ weight.detach().T + bias.detach()).argmax(1) == y)
                         .float().mean())
        return (f"descriptor branch refitted on {len(y)} training cases ({len(passes) - 1} more pass(es) with the "
                f"guide removed): weighted loss {before:.4f} -> {after:.4f}, training accuracy {accuracy:.4f}")

    @torch.no_grad()
    def recorded_logits(self, records: list) -> torch.Tensor:
        device = self.descriptor_linear.weight.device
        values, present, mlp_logits = (_stacked(records, i, device) for i in range(3))
        return mlp_logits + self.descriptor_linear(self.standardizer.standardise(values, present))

    def refitted_state(self) -> Dict[str, torch.Tensor]:
        """The descriptor branch: the standardiser's statistics and the linear layer."""
        return {k: v.detach().clone() for k, v in self.state_dict().items()
                if k.startswith(("standardizer.", "descriptor_linear."))}

    @torch.no_grad()
    def descriptor_presence(self, guide: torch.Tensor, organ: torch.Tensor,
                            regions: Optional[Tuple[torch.Tensor, ...]] = None) -> torch.Tensor:
        """(B, D) bool: which of ``describe``'s values were measured (a structure's statistics need the structure;
        the organ's volume and the found flag always count). ``regions``: ``intensity_regions``, if at hand."""
        lesion = guide > 0
        found = self._found(lesion)  # the guide's own statistics and those of its rim
        always = torch.ones_like(found)
        columns = [found, always, found, always]
        regions = self.intensity_regions(guide, organ) if regions is None else regions
        for region, needs_guide in zip(regions, (True, True, False)):  # mean and spread per input channel
            present = region.flatten(1).any(1) & (found if needs_guide else always)
            columns += [present] * (2 * self.input_channels)
        return torch.stack(columns, 1)

    @torch.no_grad()
    def intensity_regions(self, guide: torch.Tensor, organ: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """(lesion, rim, parenchyma), each (B, *spatial) bool: where ``describe`` reads intensities. Without
        ``interior``: the predicted guide, up to ``RIM_VOXELS`` voxels (a cube) around it, the organ less the
        guide. With it, see the class docstring."""
        lesion, organ = guide > 0, organ > 0
        if not self.interior:
            rim = _dilate(lesion, self.RIM_VOXELS, cube=True) & ~lesion
            return lesion, rim, organ & ~lesion
        core = ~_dilate(~lesion, 1)
        enough = core.flatten(1).sum(1) >= self.INTERIOR_MIN_VOXELS
        core = torch.where(enough.view(-1, *([1] * (lesion.ndim - 1))), core, lesion)
        near = _dilate(lesion, self.RIM_VOXELS)
        organ = organ | lesion
        parenchyma = ~_dilate(~organ, 1) & ~near
        # a small organ may have no interior away from the guide: then the organ less the guide
        kept = parenchyma.flatten(1).any(1).view(-1, *([1] * (lesion.ndim - 1)))
        return core, near & organ & ~lesion, torch.where(kept, parenchyma, organ & ~lesion)

    @torch.no_grad()
    def describe(self, image: torch.Tensor, guide: torch.Tensor, organ: torch.Tensor,
                 regions: Optional[Tuple[torch.Tensor, ...]] = None) -> torch.Tensor:
        """(B, 4 + 6 * C_in) float32 descriptors of the predicted structures (see the class docstring).
        ``regions``: ``intensity_regions``, if at hand."""
        image = image.detach().float()
        lesion = guide > 0
        organ = organ > 0
        lesion_n, organ_n = lesion.flatten(1).sum(1).float(), (organ | lesion).flatten(1).sum(1).float()
        found = self._found(lesion).float()
        columns = [torch.log1p(lesion_n * self.voxel_ml), torch.log1p(organ_n * self.voxel_ml),
                   lesion_n / organ_n.clamp_min(1), found]
        flat = image.flatten(2)  # (B, C_in, N)
        for mask in self.intensity_regions(guide, organ) if regions is None else regions:
            m = mask.flatten(1).float()[:, None]  # (B, 1, N)
            n = m.sum(2).clamp_min(1)
            mean = (flat * m).sum(2) / n
            spread = (((flat - mean[..., None]) ** 2 * m).sum(2) / n).sqrt()
            present = (m.sum(2) > 0).float()
            columns += list((mean * present).unbind(1)) + list((spread * present).unbind(1))
        return torch.stack(columns, 1)


class RunningStandardizer(nn.Module):
    """Feature-wise standardisation by running statistics, ``(x - mean) / sd`` clipped to +-``clip``, where a
    value that was not measured (``present`` False) becomes 0, its mean.

    In training, each batch's present values update the statistics: a cumulative average at first, then an
    exponential one with weight ``momentum``, so that they follow the features as the segmentation they are
    measured on improves. Unlike batch norm it does not depend on the batch (nnU-Net's batches hold 2 cases),
    and evaluation uses the same statistics as training's last steps."""

    def __init__(self, num_features: int, momentum: float = 0.01, min_sd: float = 1e-2, clip: float = 5.0):
        super().__init__()
        self.momentum, self.min_sd, self.clip = float(momentum), float(min_sd), float(clip)
        self.register_buffer("mean", torch.zeros(num_features))
        self.register_buffer("var", torch.ones(num_features))
        self.register_buffer("count", torch.zeros(num_features))

    def forward(self, values: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        values, present = values.float(), present.float()
        if self.training:
            self._update(values, present)
        return self.standardise(values, present)

    def standardise(self, values: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """``values`` by the current statistics, whatever the mode."""
        sd = self.var.sqrt().clamp_min(self.min_sd)
        return ((values.float() - self.mean) / sd).clamp(-self.clip, self.clip) * present.float()

    @staticmethod
    def _moments(values: torch.Tensor, present: torch.Tensor):
        """(count, mean, variance) per feature of the present values (0 where there are none)."""
        n = present.sum(0)
        mean = (values * present).sum(0) / n.clamp_min(1)
        return n, mean, ((values - mean) ** 2 * present).sum(0) / n.clamp_min(1)

    @torch.no_grad()
    def set_statistics(self, values: torch.Tensor, present: torch.Tensor) -> None:
        """The statistics replaced by those of these present values (a feature without any keeps its mean, and
        one with a single value its variance)."""
        n, mean, var = self._moments(values.float(), present.float())
        self.mean.copy_(torch.where(n > 0, mean, self.mean))
        self.var.copy_(torch.where(n > 1, var, self.var))
        self.count.copy_(n)

    @torch.no_grad()
    def _update(self, values: torch.Tensor, present: torch.Tensor) -> None:
        n, mean, var = self._moments(values, present)
        seen = n > 0
        rate = torch.where(seen, (n / (self.count + n).clamp_min(1)).clamp_min(self.momentum), torch.zeros_like(n))
        delta = mean - self.mean
        self.var.copy_(torch.where(self.count + n > 0, (1 - rate) * self.var + rate * var
                                   + rate * (1 - rate) * delta ** 2, self.var))
        self.mean.add_(rate * delta)
        self.count.add_(n)


def _dilate(mask: torch.Tensor, steps: int, cube: bool = False) -> torch.Tensor:
    """(B, *spatial) bool ``mask`` grown by ``steps`` voxels: 6-connected steps (4-connected in 2d), or with
    ``cube`` within a cube of side 2 * steps + 1. Outside the volume counts as outside the mask."""
    x = mask[:, None].float()
    dims = x.ndim - 2
    pool = F.max_pool3d if dims == 3 else F.max_pool2d
    if cube:
        return pool(x, 2 * steps + 1, stride=1, padding=steps)[:, 0] > 0
    for _ in range(steps):
        grown = x
        for axis in range(dims):
            kernel = tuple(3 if a == axis else 1 for a in range(dims))
            grown = torch.maximum(grown, pool(x, kernel, stride=1, padding=tuple(k // 2 for k in kernel)))
        x = grown
    return x[:, 0] > 0


def _stacked(records: list, i: int, device) -> torch.Tensor:
    """Item ``i`` of every record (``SegGuidedHead.recording``) as one float32 tensor; cloned, as the records may
    be inference tensors."""
    return torch.cat([r[i] for r in records]).to(device, torch.float32).clone()


def _weighted_mean(flat: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(B, C, N) features, (B, N) non-negative weights -> (B, C) weighted means."""
    w = weights / weights.sum(1, keepdim=True).clamp_min(1e-12)
    return torch.bmm(flat, w[..., None])[..., 0]


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


#: the head a trainer plans unless it names another (``MultitasknnUNetTrainer.head_class``)
DEFAULT_HEAD = "SegGuidedHead"

#: every head the builder knows, by class name (the name stored in checkpoints)
HEADS: Dict[str, Type[ClassificationHead]] = {"SegGuidedHead": SegGuidedHead, "GAPHead": GAPHead}

#: kwargs of earlier versions' SegGuidedHead that no longer exist, with the value that meant "off": a checkpoint
#: that has them at that value rebuilds without them
_RETIRED_KWARGS = {"SegGuidedHead": {"guide_top_fraction": 0.0, "pool_decoder_stages": []}}


def register_head(cls: Type[ClassificationHead]) -> Type[ClassificationHead]:
    """Makes a head known to the builder under its class name (usable as a decorator). Register it in a module
    that the training and the prediction both import, e.g. the module of the trainer that names it."""
    if not (isinstance(cls, type) and issubclass(cls, ClassificationHead)):
        raise TypeError(f"{cls!r} is not a ClassificationHead subclass")
    HEADS[cls.__name__] = cls
    return cls


def head_class(class_name: str) -> Type[ClassificationHead]:
    """The registered head class of that name; ``InputError`` naming the known heads otherwise."""
    if class_name not in HEADS:
        raise InputError(f"unknown classification head '{class_name}'; known heads: {', '.join(HEADS)}")
    return HEADS[class_name]


def plan_head(class_name: str, encoder_channels: Sequence[int], num_classes: int, guide: Optional[dict] = None,
              input_channels: int = 1, voxel_ml: float = 1e-3, **overrides) -> dict:
    """The spec of a head: its class name and the complete kwargs that ``build_head`` rebuilds it from."""
    kwargs = head_class(class_name).plan(encoder_channels, num_classes, guide, input_channels=input_channels,
                                    voxel_ml=voxel_ml, **overrides)
    return {"class_name": class_name, "kwargs": _plain(kwargs)}


def build_head(spec: dict) -> nn.Module:
    """The one builder: ``HEADS[spec['class_name']](**spec['kwargs'])``."""
    return head_class(spec.get("class_name"))(**spec["kwargs"])


def head_spec_from_checkpoint(entry: dict) -> dict:
    """The spec stored in a checkpoint's ``classification_head`` entry. Checkpoints written before the registry
    existed (version 0.1.0: ``hidden``/``dropout`` keys, a GAP head) map onto ``GAPHead``."""
    if "class_name" in entry:
        kwargs = dict(entry["kwargs"])
        for key, off in _RETIRED_KWARGS.get(entry["class_name"], {}).items():
            if key in kwargs:
                if _plain(kwargs[key]) != off:
                    raise InputError(f"the checkpoint's {entry['class_name']} was trained with {key}="
                                     f"{kwargs[key]!r}, an option this version no longer has")
                del kwargs[key]
        return {"class_name": entry["class_name"], "kwargs": kwargs}
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


def guide_labels(label_manager, channels: Sequence[int]) -> List[int]:
    """The labels of an exported label map that make up the segmentation channels ``channels`` (a region: every
    label it holds; labels: the channel's own)."""
    labels = set()
    for c in channels:
        if label_manager.has_regions:
            region = label_manager.foreground_regions[c]
            labels.update(int(v) for v in (region if isinstance(region, (list, tuple)) else [region]))
        else:
            labels.add(int(label_manager.all_labels[c]))
    return sorted(labels)


def guide_summary(segmentation, spacing, labels: Sequence[int]) -> Dict[str, float]:
    """``{"guide_ml": volume of the guide labels in mL, "no_guide": 1.0 if none was predicted else 0.0}`` of an
    exported label map with voxel ``spacing`` (mm); empty for a head without a guide (no ``labels``)."""
    if not labels:
        return {}
    volume = labels_volume_ml(segmentation, spacing, labels)
    return {"guide_ml": round(volume, 4), "no_guide": 0.0 if volume > 0 else 1.0}


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
