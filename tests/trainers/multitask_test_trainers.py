"""Trainers for the tests only, found by nnU-Net through nnUNet_extTrainer (conftest.nnunet_env adds this
folder after ours), exactly as a user's own subclasses are: a few iterations each, so the tests that only need
a trained model of some kind (a head round trip, class-only cases) stay fast."""
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from multitask_nnunet import MultitasknnUNetTrainer
from multitask_nnunet.training.seeding import SeededTraining


class MultitasknnUNetTrainer_TestShort(MultitasknnUNetTrainer):
    """Three epochs of four iterations each (the curriculum resolves to one epoch per phase); the final
    validation without mirroring."""
    final_validation_mirroring = False

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 3
        self.num_iterations_per_epoch = 4
        self.num_val_iterations_per_epoch = 2


class MultitasknnUNetTrainer_TestShortGAP(MultitasknnUNetTrainer_TestShort):
    """The first design: global average pooling, the head in nnU-Net's SGD, one clip for all."""
    head_class = "GAPHead"
    grad_clip_norm = 1.0

    def configure_optimizers(self):
        self.head_optimizer = None  # the head in nnU-Net's SGD (its configure_optimizers sees every parameter)
        return nnUNetTrainer.configure_optimizers(self)

    def perform_actual_validation(self, save_probabilities: bool = False):
        """None: the head round trip (test_training.py) reads only the checkpoint."""


def _two_short_epochs(trainer) -> None:
    trainer.num_epochs = 2
    trainer.num_iterations_per_epoch = 3
    trainer.num_val_iterations_per_epoch = 1


class nnUNetTrainer_TestSeeded(SeededTraining, nnUNetTrainer):
    """Stock nnU-Net, seeded like the multitask trainer: two epochs of three iterations, no final validation (the
    test compares checkpoints only)."""
    seed = 0

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _two_short_epochs(self)

    def perform_actual_validation(self, save_probabilities: bool = False):
        pass


class MultitasknnUNetTrainer_TestSeeded(MultitasknnUNetTrainer):
    """The same seed and schedule as ``nnUNetTrainer_TestSeeded``: epoch 0 is phase 0 (segmentation only), epoch 1
    phase 1 (the head trains on detached features with classification-loss weight 1). The joint phase never comes,
    on purpose (the test compares segmentation with stock's), so the curriculum is set here rather than resolved
    and checked."""
    seed = 0

    def curriculum(self):
        from multitask_nnunet.training.trainer import Curriculum
        return Curriculum(seg_warmup_epochs=1, phase1_epochs=2, head_warmup_epochs=1, best_weight_ramp_epochs=1)

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _two_short_epochs(self)

    perform_actual_validation = nnUNetTrainer_TestSeeded.perform_actual_validation


class MultitasknnUNetTrainer_TestEpochs4(MultitasknnUNetTrainer):
    """A user's subclass written nnU-Net style: it sets only the schedule (few iterations, to keep the test short),
    not the curriculum."""
    final_validation_mirroring = False

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 4
        self.num_iterations_per_epoch = 3
        self.num_val_iterations_per_epoch = 1


class MultitasknnUNetTrainer_TestEpochs12(MultitasknnUNetTrainer_TestEpochs4):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 12
        self.num_iterations_per_epoch = 2


class MultitasknnUNetTrainer_TestJointNeverComes(MultitasknnUNetTrainer_TestEpochs4):
    """An explicit schedule whose joint phase would start after the last epoch: refused at start."""
    phase1_epochs = 50
