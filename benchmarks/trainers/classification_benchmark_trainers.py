"""Trainers of ``benchmarks/classification_learning.py``: one schedule for all, set by the benchmark.

The benchmark puts this folder into ``nnUNet_extTrainer``, so stock ``nnUNetv2_train ... -tr NAME`` finds these
classes. Each one only sets the schedule, read from environment variables that the benchmark sets from its
``--epochs``, ``--iterations`` and ``--val-iterations`` (nnU-Net's defaults where a variable is unset); the
package's curriculum, in fractions of ``num_epochs``, scales with it by itself:

    MULTITASK_BENCH_EPOCHS            num_epochs
    MULTITASK_BENCH_ITERATIONS        num_iterations_per_epoch
    MULTITASK_BENCH_VAL_ITERATIONS    num_val_iterations_per_epoch
    MULTITASK_BENCH_TRAIN_SEED        seed (``--train-seed``; unset: unseeded, nnU-Net's behaviour), for every
                                      class here, stock included (multitask_nnunet.training.seeding)

- ``nnUNetTrainer_ClsBench``: stock nnU-Net, segmentation only (the Dice reference).
- ``nnUNetTrainer_ClsBenchRepeat`` and ``MultitasknnUNetTrainer_ClsBenchRepeat``: the same two once more, under
  other names so that the benchmark trains them again (an independent draw when unseeded).
- ``MultitasknnUNetTrainer_ClsBench``: the package's defaults.
- ``MultitasknnUNetTrainer_ClsBenchGAP``: the first design (GAP of the bottleneck, the head in nnU-Net's SGD):
  the classification reference.
- ``MultitasknnUNetTrainer_ClsBenchPrevious``: the guided head as it was before the organ context, the
  descriptors and guide dropout (attention within the guide only): the pairing for those three.
- ``MultitasknnUNetTrainer_ClsBenchDescriptorsInMLP``: the default with the descriptors among the MLP's inputs
  instead of their own branch (``descriptor_logits``): the pairing for that branch.
- ``MultitasknnUNetTrainer_ClsBenchNoContext``, ``_ClsBenchNoDescriptors``, ``_ClsBenchNoGuideDropout``: the
  default without one of the three.
- ``MultitasknnUNetTrainer_ClsBenchNoAttn``: the default without attention within the guide.
- ``MultitasknnUNetTrainer_ClsBenchWholeRegions``: the default with the descriptors' intensities read on the
  whole predicted structures (``interior`` off), as before interiors: the pairing for them.
- ``MultitasknnUNetTrainer_ClsBenchSegNeutral``: the default, but phase 1 lasts to the end: the head never
  reaches the encoder, so segmentation trains as stock's does (the control for the Dice cost of the joint phase).

What was measured and not adopted (teacher forcing of the guide, top-ranked guide voxels, pooling decoder
features) is described with its figures in TechReport.md; its code is in git history.

nnU-Net records a trainer's init arguments through ``locals()``, so every class keeps nnU-Net's explicit
``__init__`` signature.
"""
import os

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from multitask_nnunet import MultitasknnUNetTrainer
from multitask_nnunet.training.seeding import SeededTraining

__all__ = ["nnUNetTrainer_ClsBench", "nnUNetTrainer_ClsBenchRepeat", "MultitasknnUNetTrainer_ClsBenchGAP",
           "MultitasknnUNetTrainer_ClsBench", "MultitasknnUNetTrainer_ClsBenchRepeat",
           "MultitasknnUNetTrainer_ClsBenchPrevious", "MultitasknnUNetTrainer_ClsBenchDescriptorsInMLP",
           "MultitasknnUNetTrainer_ClsBenchNoContext",
           "MultitasknnUNetTrainer_ClsBenchNoDescriptors", "MultitasknnUNetTrainer_ClsBenchNoGuideDropout",
           "MultitasknnUNetTrainer_ClsBenchNoAttn", "MultitasknnUNetTrainer_ClsBenchSegNeutral",
           "MultitasknnUNetTrainer_ClsBenchWholeRegions"]

SCHEDULE_VARIABLES = {"num_epochs": "MULTITASK_BENCH_EPOCHS",
                      "num_iterations_per_epoch": "MULTITASK_BENCH_ITERATIONS",
                      "num_val_iterations_per_epoch": "MULTITASK_BENCH_VAL_ITERATIONS"}


#: read when nnUNetv2_train imports this module, before any trainer is built
TRAIN_SEED = int(os.environ["MULTITASK_BENCH_TRAIN_SEED"]) if os.environ.get("MULTITASK_BENCH_TRAIN_SEED") else None


def _set_schedule(trainer) -> None:
    for attribute, variable in SCHEDULE_VARIABLES.items():
        value = os.environ.get(variable)
        if value:
            setattr(trainer, attribute, int(value))


class nnUNetTrainer_ClsBench(SeededTraining, nnUNetTrainer):
    seed = TRAIN_SEED

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _set_schedule(self)


class nnUNetTrainer_ClsBenchRepeat(nnUNetTrainer_ClsBench):
    """``nnUNetTrainer_ClsBench`` again: an independent stock run on the same data and schedule."""


class MultitasknnUNetTrainer_ClsBench(MultitasknnUNetTrainer):
    """The package's defaults, with the benchmark's schedule."""
    seed = TRAIN_SEED

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _set_schedule(self)


class MultitasknnUNetTrainer_ClsBenchRepeat(MultitasknnUNetTrainer_ClsBench):
    """``MultitasknnUNetTrainer_ClsBench`` again: an independent run of the default on the same data and schedule."""


class MultitasknnUNetTrainer_ClsBenchGAP(MultitasknnUNetTrainer_ClsBench):
    """The first design: GAP of the bottleneck, the head in nnU-Net's SGD, one global clip at 1.0, loss weights
    1.0 then 0.3, no segmentation warm-up, phase switch at a quarter of the epochs."""
    head_class = "GAPHead"
    grad_clip_norm = 1.0
    phase1_cls_weight = 1.0
    phase2_cls_weight = 0.3
    seg_warmup_fraction = 0.0
    phase1_fraction = 0.25

    def configure_optimizers(self):
        self.head_optimizer = None  # the head in nnU-Net's SGD (its configure_optimizers sees every parameter)
        return nnUNetTrainer.configure_optimizers(self)


class MultitasknnUNetTrainer_ClsBenchPrevious(MultitasknnUNetTrainer_ClsBench):
    """The guided head with attention only: no organ context, no descriptors, no guide dropout."""
    head_kwargs = {"context": False, "descriptors": False, "guide_dropout": 0.0}


class MultitasknnUNetTrainer_ClsBenchDescriptorsInMLP(MultitasknnUNetTrainer_ClsBench):
    """The default with the descriptors among the MLP's inputs (layer-normalised with the pooled features)
    instead of their own standardised linear branch."""
    head_kwargs = {"descriptor_logits": False}


class MultitasknnUNetTrainer_ClsBenchNoContext(MultitasknnUNetTrainer_ClsBench):
    head_kwargs = {"context": False}


class MultitasknnUNetTrainer_ClsBenchNoDescriptors(MultitasknnUNetTrainer_ClsBench):
    head_kwargs = {"descriptors": False}


class MultitasknnUNetTrainer_ClsBenchNoGuideDropout(MultitasknnUNetTrainer_ClsBench):
    head_kwargs = {"guide_dropout": 0.0}


class MultitasknnUNetTrainer_ClsBenchNoAttn(MultitasknnUNetTrainer_ClsBench):
    head_kwargs = {"attention": False}


class MultitasknnUNetTrainer_ClsBenchWholeRegions(MultitasknnUNetTrainer_ClsBench):
    head_kwargs = {"interior": False}


class MultitasknnUNetTrainer_ClsBenchSegNeutral(MultitasknnUNetTrainer_ClsBench):
    """The default with phase 1 (the head on detached features) to the last epoch: no classification gradient
    ever reaches the encoder or decoder. The package refuses a schedule whose joint phase never comes, so this
    control sets its curriculum itself."""

    def curriculum(self):
        return super().curriculum()._replace(phase1_epochs=self.num_epochs)
