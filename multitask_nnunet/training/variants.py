"""Short variants, nnU-Net style (like nnUNetTrainer_5epochs): same trainer, other schedules."""
import torch

from multitask_nnunet.training.trainer import MultitasknnUNetTrainer

__all__ = ["MultitasknnUNetTrainer_5epochs", "MultitasknnUNetTrainer_100epochs", "MultitasknnUNetTrainer_250epochs",
           "MultitasknnUNetTrainer_Demo"]


class MultitasknnUNetTrainer_5epochs(MultitasknnUNetTrainer):
    phase1_epochs = 2

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 5


class MultitasknnUNetTrainer_100epochs(MultitasknnUNetTrainer):
    phase1_epochs = 20
    best_weight_ramp_epochs = 30

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 100


class MultitasknnUNetTrainer_250epochs(MultitasknnUNetTrainer):
    phase1_epochs = 50

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 250


class MultitasknnUNetTrainer_Demo(MultitasknnUNetTrainer):
    """Minutes on a CPU with tiny plans: the demo and the tests use it. With so few steps the head needs a
    larger loss weight to learn; in phase 1 the features are detached, so that weight only sets the
    head's own step size."""
    phase1_epochs = 5
    phase1_cls_weight = 1.0
    phase2_cls_weight = 0.3
    best_weight_ramp_epochs = 5

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 20
        self.num_iterations_per_epoch = 25
        self.num_val_iterations_per_epoch = 8
        self.save_every = 5
