"""The folder that ``nnUNet_extTrainer`` points at (see multitask_nnunet.registration)."""
