"""Short variants, nnU-Net style (like nnUNetTrainer_5epochs): same trainer, other ``num_epochs``. Each sets
only the schedule: the curriculum, in fractions of ``num_epochs``, scales by itself (segmentation only for the
first 5% of the epochs, the head on detached features until half of them, then joint training)."""
import torch

from multitask_nnunet.training.trainer import MultitasknnUNetTrainer

__all__ = ["MultitasknnUNetTrainer_5epochs", "MultitasknnUNetTrainer_100epochs", "MultitasknnUNetTrainer_250epochs",
           "MultitasknnUNetTrainer_Demo"]


class MultitasknnUNetTrainer_5epochs(MultitasknnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 5


class MultitasknnUNetTrainer_100epochs(MultitasknnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 100


class MultitasknnUNetTrainer_250epochs(MultitasknnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 250


class MultitasknnUNetTrainer_Demo(MultitasknnUNetTrainer):
    """Minutes on a CPU with tiny plans: the demo and the tests use it. Seeded (see ``seed``); the final
    validation without mirroring."""
    seed = 0
    final_validation_mirroring = False

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 12
        self.num_iterations_per_epoch = 25
        self.num_val_iterations_per_epoch = 8
        self.save_every = 5
