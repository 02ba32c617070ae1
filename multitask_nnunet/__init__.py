"""multitask-nnunet: one shared nnU-Net encoder for segmentation and case-level classification."""
__version__ = "0.1.0"
__all__ = ["MultitaskUNet", "MultitasknnUNetTrainer"]


def __getattr__(name):
    # lazy, so that `multitask-nnunet convert` and friends do not import torch and nnU-Net's trainer
    if name == "MultitaskUNet":
        from multitask_nnunet.model.network import MultitaskUNet
        return MultitaskUNet
    if name == "MultitasknnUNetTrainer":
        from multitask_nnunet.training.trainer import MultitasknnUNetTrainer
        return MultitasknnUNetTrainer
    raise AttributeError(name)
