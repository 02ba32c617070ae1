"""Trainers of ``benchmarks/classification_learning.py``: one schedule for all, set by the benchmark.

The benchmark puts this folder into ``nnUNet_extTrainer``, so stock ``nnUNetv2_train ... -tr NAME`` finds these
classes. Each one only sets the schedule, read from environment variables that the benchmark sets from its
``--epochs``, ``--iterations`` and ``--val-iterations`` (nnU-Net's defaults where a variable is unset):

    MULTITASK_BENCH_EPOCHS            num_epochs
    MULTITASK_BENCH_ITERATIONS        num_iterations_per_epoch
    MULTITASK_BENCH_VAL_ITERATIONS    num_val_iterations_per_epoch
    MULTITASK_BENCH_TRAIN_SEED        seed (``--train-seed``; unset: unseeded, nnU-Net's behaviour), for every
                                      class here, stock included (multitask_nnunet.training.seeding)

- ``nnUNetTrainer_ClsBench``: stock nnU-Net, segmentation only (the Dice reference).
- ``nnUNetTrainer_ClsBenchRepeat`` and ``MultitasknnUNetTrainer_ClsBenchRepeat``: the same two once more, under
  other names so that the benchmark trains them again: nnU-Net's training is not seeded, so a repeat is an
  independent draw of the run-to-run spread.
- ``MultitasknnUNetTrainer_ClsBenchGAP``: the seed's head (global average pooling of the bottleneck) with
  nnU-Net's optimizer: the classification reference.
- ``MultitasknnUNetTrainer_ClsBench``: the package's default head, optimizer and curriculum.
- ``MultitasknnUNetTrainer_ClsBenchTF``: the default with teacher forcing of the guide in phase 1 (every case
  pooled over its ground-truth lesion while the features are detached).
- ``MultitasknnUNetTrainer_ClsBenchTF50``: as ``_ClsBenchTF``, and for half of the cases in phase 2 too.
- ``MultitasknnUNetTrainer_ClsBenchSegNeutral``: the default, but phase 1 lasts to the end: the head never
  reaches the encoder, so segmentation trains as stock's does (the control for the Dice cost of the joint phase).
- ``MultitasknnUNetTrainer_ClsBenchPoolDeep`` and ``MultitasknnUNetTrainer_ClsBenchPoolShallow``: the default with
  the guide pooling only the bottleneck, or only stages 1 and 2 (the default pools stages 1 to 4). With
  ``--train-seed`` their segmentation is stock's bit for bit until the joint phase, so the head alone differs.
- ``MultitasknnUNetTrainer_ClsBenchPoolDecoder``: the default with stages 1 to 3 pooled from nnU-Net's decoder
  (its outputs at those resolutions) instead of the encoder, the bottleneck as in the default;
  ``MultitasknnUNetTrainer_ClsBenchPoolBoth``: the default's encoder stages 1 to 4 plus the decoder's 1 to 3.
  In the joint phase their classification loss also reaches the decoder.
- ``MultitasknnUNetTrainer_ClsBenchTopK``: the default with ``guide_top_fraction=0.1``: while the lesion is
  predicted empty, the head pools the top-ranked tenth of the predicted pancreas by lesion probability.
- ``MultitasknnUNetTrainer_ClsBenchAttn``: ``attention=True``: a learned score per voxel reweights the guide's
  pooling, so while the lesion is predicted empty the head can learn to pool where the class shows within the
  predicted pancreas. The package's default since 2026-12-02 (measured as this class against the default of the
  time); ``MultitasknnUNetTrainer_ClsBenchNoAttn`` is the default without it (the default before).

TechReport 6.0 lists which class ran under which name (the defaults changed while they were measured).

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
           "MultitasknnUNetTrainer_ClsBenchTF", "MultitasknnUNetTrainer_ClsBenchTF50",
           "MultitasknnUNetTrainer_ClsBenchSegNeutral", "MultitasknnUNetTrainer_ClsBenchPoolDeep",
           "MultitasknnUNetTrainer_ClsBenchPoolShallow", "MultitasknnUNetTrainer_ClsBenchPoolDecoder",
           "MultitasknnUNetTrainer_ClsBenchPoolBoth", "MultitasknnUNetTrainer_ClsBenchTopK",
           "MultitasknnUNetTrainer_ClsBenchAttn", "MultitasknnUNetTrainer_ClsBenchNoAttn"]

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


def _scale_curriculum(trainer, seg_warmup: float, phase1: float) -> None:
    """Phase boundaries as fractions of the benchmark's epochs (at least one epoch per phase when > 0)."""
    trainer.seg_warmup_epochs = max(1, round(seg_warmup * trainer.num_epochs)) if seg_warmup > 0 else 0
    trainer.phase1_epochs = max(trainer.seg_warmup_epochs + 1, round(phase1 * trainer.num_epochs))
    trainer.head_warmup_epochs = max(1, round(0.005 * trainer.num_epochs))
    trainer.best_weight_ramp_epochs = max(1, round(0.05 * trainer.num_epochs))


class MultitasknnUNetTrainer_ClsBenchGAP(MultitasknnUNetTrainer):
    """The first design, as measured in the issue: GAP of the bottleneck, the head in nnU-Net's SGD, one global
    clip at 1.0, loss weights 1.0 then 0.3, no segmentation warm-up, phase switch at a quarter of the epochs."""
    seed = TRAIN_SEED
    head_class = "GAPHead"
    separate_head_optimizer = False
    grad_clip_norm = 1.0
    phase1_cls_weight = 1.0
    phase2_cls_weight = 0.3

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _set_schedule(self)
        _scale_curriculum(self, 0, 0.25)


class MultitasknnUNetTrainer_ClsBench(MultitasknnUNetTrainer):
    """The package's defaults (SegGuidedHead, its own AdamW, nnU-Net's SGD and clip 12 for segmentation), with
    the default curriculum's proportions: segmentation only for the first 5% of the epochs (50 of 1000), the
    head on detached features until half of them (500 of 1000), then joint."""
    seed = TRAIN_SEED

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _set_schedule(self)
        _scale_curriculum(self, MultitasknnUNetTrainer.seg_warmup_epochs / 1000,
                          MultitasknnUNetTrainer.phase1_epochs / 1000)


class MultitasknnUNetTrainer_ClsBenchRepeat(MultitasknnUNetTrainer_ClsBench):
    """``MultitasknnUNetTrainer_ClsBench`` again: an independent run of the default on the same data and schedule."""


class MultitasknnUNetTrainer_ClsBenchTF(MultitasknnUNetTrainer_ClsBench):
    """As ``MultitasknnUNetTrainer_ClsBench``, with teacher forcing of the guide for every case in phase 1."""
    phase1_teacher_forcing = 1.0
    phase2_teacher_forcing = 0.0


class MultitasknnUNetTrainer_ClsBenchTF50(MultitasknnUNetTrainer_ClsBenchTF):
    """As ``MultitasknnUNetTrainer_ClsBenchTF``, with teacher forcing for half of the cases in phase 2 too."""
    phase2_teacher_forcing = 0.5


class MultitasknnUNetTrainer_ClsBenchSegNeutral(MultitasknnUNetTrainer_ClsBench):
    """As ``MultitasknnUNetTrainer_ClsBench``, with phase 1 (the head on detached features) to the last epoch:
    no classification gradient ever reaches the encoder or decoder."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.phase1_epochs = self.num_epochs


class MultitasknnUNetTrainer_ClsBenchPoolDeep(MultitasknnUNetTrainer_ClsBench):
    """As ``MultitasknnUNetTrainer_ClsBench``, with the guide pooling the bottleneck only (``pool_stages=[-1]``,
    beside its global average): the ablation of the default's stages 1 to 4."""
    head_kwargs = {"pool_stages": [-1]}


class MultitasknnUNetTrainer_ClsBenchPoolShallow(MultitasknnUNetTrainer_ClsBench):
    """As ``MultitasknnUNetTrainer_ClsBench``, with the guide pooling the two highest-resolution stages it can use
    (``pool_stages=[1, 2]``, beside the bottleneck's global average)."""
    head_kwargs = {"pool_stages": [1, 2]}


class MultitasknnUNetTrainer_ClsBenchPoolDecoder(MultitasknnUNetTrainer_ClsBench):
    """As ``MultitasknnUNetTrainer_ClsBench``, with stages 1 to 3 pooled from the decoder instead of the encoder
    (``pool_stages=[-1]``, the bottleneck, which has no decoder output; ``pool_decoder_stages=[1, 2, 3]``: the
    small plans' five stages, so the same resolutions as the default)."""
    head_kwargs = {"pool_stages": [-1], "pool_decoder_stages": [1, 2, 3]}


class MultitasknnUNetTrainer_ClsBenchPoolBoth(MultitasknnUNetTrainer_ClsBench):
    """As ``MultitasknnUNetTrainer_ClsBench`` (encoder stages 1 to 4), plus the decoder's stages 1 to 3."""
    head_kwargs = {"pool_decoder_stages": [1, 2, 3]}


class MultitasknnUNetTrainer_ClsBenchTopK(MultitasknnUNetTrainer_ClsBench):
    """As ``MultitasknnUNetTrainer_ClsBench``, with ``guide_top_fraction=0.1``: while no lesion is predicted, the
    head pools the 10% of the predicted pancreas voxels with the highest lesion probability (in training and at
    inference), not the whole pancreas."""
    head_kwargs = {"guide_top_fraction": 0.1}


class MultitasknnUNetTrainer_ClsBenchAttn(MultitasknnUNetTrainer_ClsBench):
    """As ``MultitasknnUNetTrainer_ClsBench``, with ``attention=True``: a learned per-voxel score (zero at the
    start) reweights the guide's pooling at every pooled stage, in training and at inference."""
    head_kwargs = {"attention": True}


class MultitasknnUNetTrainer_ClsBenchNoAttn(MultitasknnUNetTrainer_ClsBench):
    """As ``MultitasknnUNetTrainer_ClsBench`` without the attention (``attention=False``): the plain guided pooling,
    the default until 2026-12-02."""
    head_kwargs = {"attention": False}
