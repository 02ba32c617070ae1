"""Imported by nnU-Net's trainer lookup (nnUNet_extTrainer); it only re-exports the package's trainers."""
from multitask_nnunet.training.trainer import MultitasknnUNetTrainer  # noqa: F401
from multitask_nnunet.training.variants import *  # noqa: F401,F403
