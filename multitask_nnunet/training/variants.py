"""Short variants, nnU-Net style (like nnUNetTrainer_5epochs): same trainer, other schedules. The curriculum
scales with the schedule: segmentation-only warm-up for the first 5% of the epochs, the head on detached
features until half of them, then joint training (the default trainer: 50 and 500 of 1000 epochs)."""
import torch

from multitask_nnunet.training.trainer import MultitasknnUNetTrainer

__all__ = ["MultitasknnUNetTrainer_5epochs", "MultitasknnUNetTrainer_100epochs", "MultitasknnUNetTrainer_250epochs",
           "MultitasknnUNetTrainer_Demo"]


class MultitasknnUNetTrainer_5epochs(MultitasknnUNetTrainer):
    seg_warmup_epochs = 1
    phase1_epochs = 3
    head_warmup_epochs = 1

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 5


class MultitasknnUNetTrainer_100epochs(MultitasknnUNetTrainer):
    seg_warmup_epochs = 5
    phase1_epochs = 50
    head_warmup_epochs = 2
    best_weight_ramp_epochs = 30

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 100


class MultitasknnUNetTrainer_250epochs(MultitasknnUNetTrainer):
    seg_warmup_epochs = 12
    phase1_epochs = 125
    head_warmup_epochs = 3

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 250


class MultitasknnUNetTrainer_Demo(MultitasknnUNetTrainer):
    """Minutes on a CPU with tiny plans: the demo and the tests use it. Seeded (see ``seed``); the final
    validation without mirroring."""
    seed = 0
    final_validation_mirroring = False
    seg_warmup_epochs = 1
    phase1_epochs = 6
    head_warmup_epochs = 1
    best_weight_ramp_epochs = 5

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 12
        self.num_iterations_per_epoch = 25
        self.num_val_iterations_per_epoch = 8
        self.save_every = 5
