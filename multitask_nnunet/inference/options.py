"""The options of prediction, in two groups: how the model predicts a case (``PredictorOptions``, what the
one-case predictor needs) and how a folder is run (``BatchOptions``, which holds a ``PredictorOptions``).

No torch here: the CLI builds these before it decides whether the model is needed at all.
"""
import os
from dataclasses import dataclass, field
from typing import Optional, Tuple, Union

from multitask_nnunet.errors import InputError

DEFAULT_WORKERS = max(1, min(3, (os.cpu_count() or 2) - 1))
DEFAULT_CHECKPOINT = "checkpoint_final.pth"
DEFAULT_SALIENCY_STAGE = -2  # the stage before the bottleneck
SALIENCY_METHODS = ("decision", "gradcam", "hirescam")  # saliency.py
DEFAULT_SALIENCY_METHOD = "decision"  # what the head pooled, weighted by each branch's part in the decision


@dataclass(frozen=True)
class PredictorOptions:
    """How the model predicts one case (``CasePredictor``)."""
    folds: Optional[Tuple[Union[int, str], ...]] = None  # None: every fold_N with the checkpoint
    checkpoint: str = DEFAULT_CHECKPOINT
    device: Optional[str] = None                         # None: cuda if available, else cpu
    tta: bool = False                                    # mirroring test-time augmentation
    mode: str = "auto"                                   # auto | whole | sliding
    max_whole_voxels: Optional[int] = None               # auto mode's whole-volume limit (None: the predictor's)
    device_preprocessing: Optional[bool] = None          # normalise and resample on the device (None: on CUDA)
    # explain and trust the class (saliency.py, multitask_nnunet/calibration.py)
    saliency: bool = False                               # a class activation map (+ the guided head's pooling weights)
    saliency_stage: int = DEFAULT_SALIENCY_STAGE         # encoder stage the map is taken at (negative: from the end)
    saliency_method: str = DEFAULT_SALIENCY_METHOD       # one of SALIENCY_METHODS
    calibration: bool = True                             # apply fold_X/calibration.json's temperature if there
    mc_dropout: int = 0                                  # N > 0: N more passes, head dropout on (mutual information)
    seg_uncertainty: bool = False                        # per-voxel entropy of the segmentation, in input geometry

    def __post_init__(self):
        if self.folds is not None:  # lists (argparse, callers) become tuples: the options stay hashable
            object.__setattr__(self, "folds", tuple(self.folds))
        if self.mc_dropout < 0:
            raise InputError(f"--mc-dropout {self.mc_dropout}: need 0 (off) or a number of passes")
        if self.saliency_method not in SALIENCY_METHODS:
            raise InputError(f"--saliency-method {self.saliency_method}: choose one of {', '.join(SALIENCY_METHODS)}")


@dataclass(frozen=True)
class BatchOptions:
    """How ``predict_folder`` runs a folder: resume, sharding, errors, threads, output of the time profile."""
    predictor: PredictorOptions = field(default_factory=PredictorOptions)
    overwrite: bool = False               # predict cases that are already done again
    num_parts: int = 1                    # sharding as nnU-Net's -num_parts / -part_id
    part_id: int = 0
    continue_on_error: bool = False       # predict the other cases, report every failure at the end
    workers: int = DEFAULT_WORKERS        # background threads that read and preprocess
    progress: bool = True                 # tqdm bar and one log line per case
    profile: Optional[str] = None         # per-case timing JSON written here (timing.py)
