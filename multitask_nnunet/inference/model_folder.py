"""Which trained model to predict with: an nnU-Net results folder ``Trainer__Plans__configuration``, given
directly (``-m``) or as nnUNetv2_predict takes it (``-d -c [-tr] [-p]``, resolved under ``nnUNet_results``),
and which of its folds.
"""
import os
from typing import List, Optional, Sequence, Union

from multitask_nnunet.errors import InputError

DEFAULT_TRAINER = "MultitasknnUNetTrainer"
DEFAULT_PLANS = "nnUNetPlans"


def resolve_model_folder(model_dir: Optional[str] = None, dataset: Optional[str] = None,
                         configuration: Optional[str] = None, trainer: str = DEFAULT_TRAINER,
                         plans: str = DEFAULT_PLANS) -> str:
    if (model_dir is None) == (dataset is None):
        raise InputError("give the model either as -m MODEL_DIR or as -d DATASET -c CONFIGURATION [-tr] [-p]")
    if model_dir is None:
        if configuration is None:
            raise InputError(f"-d {dataset}: -c CONFIGURATION is required too (e.g. -c 3d_fullres)")
        if not os.environ.get("nnUNet_results"):
            raise InputError(f"-d {dataset}: nnUNet_results is not set (or give the model folder with -m)")
        from nnunetv2.utilities.file_path_utilities import get_output_folder
        try:
            model_dir = get_output_folder(dataset, trainer, plans, configuration)
        except (RuntimeError, ValueError) as e:
            raise InputError(f"-d {dataset}: {str(e).split('. ')[0]}") from None
    model_dir = os.fspath(model_dir)
    for required in ("dataset.json", "plans.json"):
        if not os.path.isfile(os.path.join(model_dir, required)):
            raise InputError(f"model folder {model_dir}: no {required} (expected an nnU-Net results folder "
                             f"Trainer__Plans__configuration)")
    return model_dir


def resolve_folds(model_dir: str, folds: Optional[Sequence[Union[int, str]]], checkpoint: str) -> List[Union[int, str]]:
    """The folds asked for, or (None) every ``fold_N`` with the checkpoint, as nnUNetv2_predict detects them."""
    if folds is None:
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
        folds = nnUNetPredictor.auto_detect_available_folds(model_dir, checkpoint)
        if not folds:
            raise InputError(f"model folder {model_dir}: no fold_N/{checkpoint} found")
    try:
        return [f if f == "all" else int(f) for f in folds]
    except ValueError:
        raise InputError(f"-f {' '.join(map(str, folds))}: folds are integers or 'all'") from None
