"""Which trained model to predict with: an nnU-Net results folder ``Trainer__Plans__configuration``, given
directly (``-m``) or as nnUNetv2_predict takes it (``-d -c [-tr] [-p]``, resolved under ``nnUNet_results``),
and which of its folds.

``ModelFolder`` is that choice made once: one ``predict`` run or one service resolves the folder and its folds,
and reads dataset.json and the first fold's small checkpoint entries (class names, configuration) once, for
the CSV header, preprocessing and the model alike.
"""
import os
from dataclasses import dataclass
from functools import cached_property
from typing import List, Optional, Sequence, Tuple, Union

from multitask_nnunet.errors import InputError
from multitask_nnunet.inference.options import DEFAULT_CHECKPOINT

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


Folds = Optional[Sequence[Union[int, str]]]


@dataclass(frozen=True)
class ModelFolder:
    """A resolved model folder, the folds asked for (None: every ``fold_N`` with the checkpoint) and the
    checkpoint's file name. What it reads is read on first use and kept: the folds, dataset.json and the first
    fold's checkpoint entries (memory-mapped: the small entries are read, the weights are not)."""
    path: str
    requested_folds: Optional[Tuple[Union[int, str], ...]] = None
    checkpoint: str = DEFAULT_CHECKPOINT

    @classmethod
    def open(cls, model_dir: Union[str, "ModelFolder", None] = None, folds: Folds = None,
             checkpoint: str = DEFAULT_CHECKPOINT, *, dataset: Optional[str] = None,
             configuration: Optional[str] = None, trainer: str = DEFAULT_TRAINER,
             plans: str = DEFAULT_PLANS) -> "ModelFolder":
        """``model_dir`` as ``-m`` gives it, or ``dataset``/``configuration``/``trainer``/``plans`` as ``-d -c
        -tr -p`` do; a ``ModelFolder`` is kept as it is (with what it has read) when it asks for the same folds
        and checkpoint, and is not resolved again otherwise."""
        requested = None if folds is None else tuple(folds)
        if isinstance(model_dir, ModelFolder):
            if (model_dir.requested_folds, model_dir.checkpoint) == (requested, checkpoint):
                return model_dir
            return cls(model_dir.path, requested, checkpoint)
        return cls(resolve_model_folder(model_dir, dataset, configuration, trainer, plans), requested, checkpoint)

    @cached_property
    def folds(self) -> List[Union[int, str]]:
        return resolve_folds(self.path, self.requested_folds, self.checkpoint)

    @cached_property
    def dataset_json(self) -> dict:
        from batchgenerators.utilities.file_and_folder_operations import load_json
        return load_json(os.path.join(self.path, "dataset.json"))

    @cached_property
    def first_entries(self) -> dict:
        """The first fold's checkpoint, memory-mapped."""
        from multitask_nnunet.inference.predictor import load_multitask_checkpoint
        path = os.path.join(self.path, f"fold_{self.folds[0]}", self.checkpoint)
        if not os.path.isfile(path):
            raise InputError(f"{path}: checkpoint not found")
        return load_multitask_checkpoint(path, mmap=True)

    @property
    def class_names(self) -> List[str]:
        """The class names stored with the first fold's head (``CasePredictor`` checks that folds agree)."""
        return list(self.first_entries["classification_head"]["class_names"])

    @property
    def configuration(self) -> str:
        """The configuration the checkpoint was trained on."""
        return self.first_entries["init_args"]["configuration"]
