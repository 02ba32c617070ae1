"""MultitaskUNet: nnU-Net's own segmentation network plus a classification head on the shared encoder.

The wrapper keeps the wrapped network's ``encoder`` and ``decoder`` under the same attribute names, so
its state-dict keys are exactly nnU-Net's plus ``classification_head.*``; nnU-Net's helpers that reach for
``network.decoder.deep_supervision`` keep working, and the segmentation weights load into a stock network.
The head is built elsewhere (multitask_nnunet.model.heads) and handed in.
"""
from typing import Dict, Tuple

import numpy as np
import torch
from torch import nn

HEAD_PREFIX = "classification_head."


class MultitaskUNet(nn.Module):
    """One encoder pass feeds nnU-Net's decoder and the classification head.

    ``forward(x)`` returns what nnU-Net expects (segmentation only, deep supervision as nnU-Net set it), so
    nnU-Net's predictor and trainer code can call it unchanged. ``forward(x, return_classification=True)``
    returns ``(segmentation, class_logits)`` from the same pass: the head sees the encoder's skips, the decoder's
    highest-resolution segmentation logits and the input (see multitask_nnunet.model.heads). ``detach_features=True``
    (the curriculum's head-only phases) feeds the head detached skips, so the classification loss sends no
    gradient into the encoder; the segmentation logits a head reads are always detached. Both go through
    ``forward`` so that DDP and torch.compile wrappers see the multi-task call too.
    """

    def __init__(self, segmentation_network: nn.Module, head: nn.Module):
        super().__init__()
        # PlainConvUNet and ResidualEncoderUNet (2d and 3d) are encoder -> skips -> decoder
        self.encoder = segmentation_network.encoder
        self.decoder = segmentation_network.decoder
        self.classification_head = head

    def forward(self, x: torch.Tensor, return_classification: bool = False, detach_features: bool = False):
        skips = self.encoder(x)
        segmentation = self.decoder(skips)
        if not return_classification:
            return segmentation
        return segmentation, self.classify(x, skips, segmentation, detach_features)

    def classify(self, x: torch.Tensor, skips, segmentation, detach_features: bool = False) -> torch.Tensor:
        """The head's class logits from this pass's input, encoder skips and decoder output."""
        if detach_features:
            skips = [s.detach() for s in skips]
        full_resolution = segmentation[0] if isinstance(segmentation, (list, tuple)) else segmentation
        return self.classification_head(skips, full_resolution.detach(), x.detach())

    def forward_multitask(self, x: torch.Tensor, detach_features: bool = False) -> Tuple[object, torch.Tensor]:
        return self(x, return_classification=True, detach_features=detach_features)

    def divisibility(self) -> Tuple[int, ...]:
        """Per-axis factor every input size must be divisible by: the product of the encoder's strides."""
        factor = np.prod(np.array(self.encoder.strides, dtype=int), axis=0)
        return tuple(int(f) for f in factor)


def split_state_dict(state: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """(segmentation weights with nnU-Net's keys, head weights without the head prefix)."""
    seg = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIX)}
    head = {k[len(HEAD_PREFIX):]: v for k, v in state.items() if k.startswith(HEAD_PREFIX)}
    return seg, head


def merge_state_dict(segmentation: Dict[str, torch.Tensor], head: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {**segmentation, **{HEAD_PREFIX + k: v for k, v in head.items()}}
