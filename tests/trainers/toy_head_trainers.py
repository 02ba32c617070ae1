"""A head defined and registered outside the package, as a user adds one: a ``ClassificationHead`` subclass with a
``plan`` classmethod, ``register_head``, and a trainer that names it. nnU-Net's trainer lookup imports this module
(nnUNet_extTrainer), which registers the head for training and for ``multitask-nnunet predict`` alike."""
import torch
from torch import nn

from multitask_nnunet.model.heads import ClassificationHead, register_head
from multitask_test_trainers import MultitasknnUNetTrainer_TestShort


@register_head
class ToyHead(ClassificationHead):
    """The bottleneck's global mean, one linear layer."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.linear = nn.Linear(in_channels, num_classes)

    @classmethod
    def plan(cls, encoder_channels, num_classes, guide=None, input_channels=1, voxel_ml=1e-3, **overrides):
        return {"in_channels": int(encoder_channels[-1]), "num_classes": int(num_classes), **overrides}

    def forward(self, skips, segmentation_logits=None, image=None):
        bottleneck = skips[-1].float()
        return self.linear(bottleneck.mean(dim=tuple(range(2, bottleneck.ndim))))


class MultitasknnUNetTrainer_TestToyHead(MultitasknnUNetTrainer_TestShort):
    head_class = "ToyHead"

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
