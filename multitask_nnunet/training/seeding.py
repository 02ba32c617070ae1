"""Seeded training for any nnU-Net trainer: ``class MyTrainer(SeededTraining, nnUNetTrainer)``.

nnU-Net's training is unseeded (nnunetv2 2.8.1): the initial weights come from torch's global generator, and
the data-augmentation workers start with ``seeds=None``. With ``seed`` set, this mixin seeds random, numpy and
torch in the training process before ``initialize()`` draws the weights, and gives each augmentation worker
that nnU-Net builds a seed of its own. ``MultitasknnUNetTrainer`` uses it, and so can a stock trainer: two
trainers with the same seed then see the same initial segmentation weights and the same batches, which is how
the tests prove that the multitask trainer's first two phases train the segmentation network exactly as stock
``nnUNetTrainer`` does.
"""
import random
import sys

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class SeededTraining:
    """Mixin before ``nnUNetTrainer`` (or a subclass of it) in the bases."""

    #: None (nnU-Net's behaviour): unseeded. An int seeds random, numpy and torch in the training process and
    #: each data-augmentation worker. nnU-Net's augmenter takes batches from its workers in the order they
    #: finish, so a seeded run repeats only with one worker (``nnUNet_n_proc_DA=1``), on the same device and
    #: thread count (on CUDA, nnU-Net's ``cudnn.benchmark`` may pick other kernels each run)
    seed = None

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.seed is not None:  # before initialize() draws the network's initial weights
            random.seed(self.seed)
            np.random.seed(self.seed)
            torch.manual_seed(self.seed)

    def get_dataloaders(self):
        """nnU-Net's data loaders. nnU-Net starts its augmentation workers unseeded (batchgenerators'
        NonDetMultiThreadedAugmenter with ``seeds=None``, nnunetv2 2.8.1); with ``seed``, the augmenters it
        builds get seeds of their own, which include the epoch training starts at, so that a resumed run
        (``--c``) does not replay the first batches. Seeding them as they are built, not restarting them
        afterwards, avoids a worker shutdown at start-up, which can print a traceback from batchgenerators'
        results thread."""
        if self.seed is None:
            return super().get_dataloaders()
        stock = sys.modules[nnUNetTrainer.__module__]
        augmenter_class = stock.NonDetMultiThreadedAugmenter
        next_seed = [self.seed + 1000 + 10000 * self.current_epoch]

        def seeded_augmenter(*args, **kwargs):  # train first, then validation
            kwargs["seeds"] = [next_seed[0] + w for w in range(kwargs["num_processes"])]
            next_seed[0] += 1000
            return augmenter_class(*args, **kwargs)

        stock.NonDetMultiThreadedAugmenter = seeded_augmenter
        try:
            return super().get_dataloaders()
        finally:
            stock.NonDetMultiThreadedAugmenter = augmenter_class
