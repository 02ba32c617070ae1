"""The one-case predictor, the single prediction API: load a trained model once, then predict one case at a time.

    predictor = CasePredictor(MODEL_DIR, PredictorOptions(device="cpu"))
    result = predictor.predict_case(["case_0000.nii.gz"])          # or an array (c, *spatial) + {'spacing': ...}
    result.segmentation, result.probabilities, result.class_name, result.path, result.timings
    predictor.write_mask(result, "case.nii.gz")

A case goes through four stages, each timed: read (the plans' image reader), preprocess (nnU-Net's
preprocessor from the plans; its normalisation and resampling on the device with ``device_preprocessing``, by
default on CUDA: device_preprocessing.py), network (``MultitaskPredictor``: whole volume or sliding window, TTA, folds) and
export (nnU-Net's export to the input's geometry, export.py). ``predict_case`` runs them in a row;
``multitask-nnunet predict`` (batch.py) runs the same two halves, ``prepare`` (read + preprocess) in
background threads and ``finish`` (network + export) in the main thread, so both give the same masks and
classes. ``prepare`` needs only the plans: with ``load_network=False`` the network is loaded later by
``load_network()``, so that a batch run preprocesses its first cases while the network is being built.

Trust and explanation: ``finish`` applies each fold's temperature (``fold_X/calibration.json``,
multitask_nnunet.calibration) to that fold's class probabilities before the fold average, unless
``options.calibration`` is off or a fold has none; ``result.uncertainty`` holds the entropy and confidence of
the result's probabilities (and the MC-dropout mutual information with ``options.mc_dropout``). With
``options.saliency`` a separate pass with gradients (saliency.py) gives ``result.saliency`` (HiResCAM or
Grad-CAM) and ``result.pooling_weights`` (guided head), with ``options.seg_uncertainty`` ``result.seg_uncertainty``, all in the
input's geometry (export.py), written by ``write_saliency`` etc. With all of them off, ``finish`` runs exactly
the inference-mode path it ran before.

Class names come from one place, the checkpoint's head (``checkpoint["classification_head"]["class_names"]``).
"""
import os
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from multitask_nnunet.calibration import apply_temperature, class_uncertainty, mutual_information, read_temperature
from multitask_nnunet.errors import InputError
from multitask_nnunet.model.heads import guide_labels, guide_summary
from multitask_nnunet.inference.case_io import CaseIO
from multitask_nnunet.inference.device_preprocessing import to_device
from multitask_nnunet.inference.export import (export_configuration, map_in_input_geometry,
                                               segmentation_in_input_geometry)
from multitask_nnunet.inference.model_folder import ModelFolder
from multitask_nnunet.inference.options import PredictorOptions
from multitask_nnunet.inference.predictor import MultitaskPredictor, NonFiniteOutputError
from multitask_nnunet.inference.timing import EXPORT, NETWORK, PREPROCESS, READ
from multitask_nnunet.io.nifti import channel_pattern

SALIENCY, MC_DROPOUT = "saliency", "mc_dropout"  # the extra timings of --saliency and --mc-dropout
_CHANNEL = channel_pattern("")  # a file name without its ending: <case>_XXXX

Images = Union[str, Sequence[str], np.ndarray]


@dataclass
class PreparedCase:
    """A case read and preprocessed, ready for the network (what ``prepare`` returns)."""
    name: str
    files: Tuple[str, ...]               # the channel files; () for an array
    data: Union[np.ndarray, torch.Tensor]  # preprocessed (c, x, y, z), float32; a tensor on the device when
                                           # it was preprocessed there (device_preprocessing.py)
    properties: dict                     # the reader's properties plus nnU-Net's cropping and shapes
    shape: Tuple[int, ...]               # the input image's spatial shape (the reader's axis order)
    timings: Dict[str, float]            # read, preprocess (s)
    intervals: Dict[str, Tuple[float, float]] = field(default_factory=dict)  # perf_counter start, end per stage


@dataclass
class CaseResult:
    name: str
    segmentation: np.ndarray             # label map, the input image's array shape and axis order
    probabilities: np.ndarray            # class probabilities (K,), ensembled over TTA and folds
    class_index: int
    class_name: str
    path: str                            # "whole", "sliding" or "fallback" (predictor.py)
    fallback: Optional[str]              # what ran out of memory and what ran instead
    properties: dict                     # the input's geometry, for write_mask
    shape: Tuple[int, ...]               # the input's spatial shape
    preprocessed_shape: Tuple[int, ...]  # the network's input shape (spatial)
    timings: Dict[str, float]            # read, preprocess, network, export (s); + saliency, mc_dropout if on
    # explain and trust the class: entropy and confidence always, mutual_information with MC dropout
    uncertainty: Dict[str, float] = field(default_factory=dict)
    saliency: Optional[np.ndarray] = None         # HiResCAM/Grad-CAM in [0, 1], float32, like ``segmentation``
    pooling_weights: Optional[np.ndarray] = None  # SegGuidedHead's pooling weights in [0, 1], same (--saliency)
    seg_uncertainty: Optional[np.ndarray] = None  # per-voxel segmentation entropy in [0, 1], same
    # the predicted guide structure in the mask: guide_ml (mL) and no_guide (1.0: none predicted, so the class
    # rests on the organ alone); empty for a head without a guide (heads.guide_summary)
    guide: Dict[str, float] = field(default_factory=dict)


def resolve_device(device: Optional[str]) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device}: no CUDA device is available (use --device cpu)")
    return device


def checkpoint_class_names(model_dir: Union[str, ModelFolder], folds: Optional[Sequence[Union[int, str]]] = None,
                           checkpoint: str = PredictorOptions.checkpoint) -> List[str]:
    """The class names stored with the head of the first of ``folds``, without building the network (for a
    batch run that has no case to predict but CSVs to write). ``CasePredictor`` checks that folds agree."""
    return ModelFolder.open(model_dir, folds, checkpoint).class_names


class CasePredictor:
    """A trained model (folds ensembled), loaded once; ``predict_case`` for each case."""

    def __init__(self, model_dir, options: PredictorOptions = PredictorOptions(), load_network: bool = True):
        #: the model folder, shared with whoever opened it (a batch run reads its class names before loading)
        self.model = ModelFolder.open(model_dir, options.folds, options.checkpoint)
        self.model_dir = self.model.path
        self.options = options
        self.device = resolve_device(options.device)
        kwargs = {} if options.max_whole_voxels is None else {"max_whole_volume_voxels": options.max_whole_voxels}
        self.predictor = MultitaskPredictor(tile_step_size=0.5, use_mirroring=options.tta, device=self.device,
                                            mode=options.mode, **kwargs)
        self.folds = self.model.folds
        # what preprocessing needs: the plans, dataset.json and the configuration the checkpoint was trained on
        configuration = self.model.configuration
        self.configuration_name: str = configuration
        dataset_json = self.model.dataset_json
        plans_manager = PlansManager(os.path.join(self.model_dir, "plans.json"))
        on_device = self.device.type == "cuda" if options.device_preprocessing is None else options.device_preprocessing
        self.io = CaseIO(plans_manager, plans_manager.get_configuration(configuration), dataset_json,
                         self.device if on_device else None)
        self.file_ending: str = dataset_json["file_ending"]
        self.class_names: Optional[List[str]] = None  # from the checkpoint's head, once the network is loaded
        if load_network:
            self.load_network()

    def load_network(self) -> None:
        """Load every fold's checkpoint and build the network (the slow part of loading a model)."""
        self.class_names = self.predictor.initialize_from_trained_model_folder(self.model_dir, self.folds,
                                                                               self.options.checkpoint)
        self.export_configuration = export_configuration(self.predictor.configuration_manager, self.device)
        self.temperatures = self._temperatures() if self.options.calibration else None
        self.guide_labels = guide_labels(self.predictor.label_manager,
                                         self.predictor._module().classification_head.guide_channels)
        if self.options.saliency:
            from multitask_nnunet.inference.saliency import resolve_stage
            resolve_stage(len(self.predictor._module().encoder.strides), self.options.saliency_stage)

    def _temperatures(self) -> Optional[np.ndarray]:
        """(F, 1) each fold's temperature (calibration.json), or None (no calibration) unless every fold has one:
        models trained before calibration existed predict as they did."""
        temperatures = [read_temperature(os.path.join(self.model_dir, f"fold_{f}")) for f in self.folds]
        if any(t is None for t in temperatures):
            return None
        return np.array(temperatures, dtype=np.float64)[:, None]

    def _ensemble(self, fold_probabilities: np.ndarray) -> np.ndarray:
        """(..., F, K) -> (..., K): each fold's temperature applied to its own probabilities, then the mean."""
        if self.temperatures is not None:
            fold_probabilities = apply_temperature(fold_probabilities, self.temperatures)
        return np.asarray(fold_probabilities, dtype=np.float64).mean(-2).astype(np.float32)

    # ---------------------------------------------------------------- the API
    def predict_case(self, images: Images, properties: Optional[dict] = None,
                     name: Optional[str] = None) -> CaseResult:
        """Segment and classify one case. ``images``: one file per channel (nnU-Net's channel order), or an
        array (c, *spatial) in the plans' reader's axis order (SimpleITK: z, y, x) with ``properties`` holding
        at least ``spacing`` in that order, as nnU-Net's ``predict_single_npy_array`` takes them. ``name``: for
        messages and the result (default: from the first file name)."""
        return self.finish(self.prepare(images, properties, name))

    def write_mask(self, result: CaseResult, path: str) -> None:
        """The label map in the input's geometry, written atomically with the plans' writer (files input, or
        properties holding what the writer needs, e.g. SimpleITK's ``sitk_stuff``)."""
        self.io.write_mask(result.segmentation, result.properties, path)

    def write_saliency(self, result: CaseResult, path: str) -> None:
        """The saliency map (``options.saliency``), float32, in the input's geometry (case_io.write_map)."""
        self._write_map(result.saliency, result, path, "saliency")

    def write_pooling_weights(self, result: CaseResult, path: str) -> None:
        """The guided head's pooling weights (``options.saliency``, SegGuidedHead only), like ``write_saliency``."""
        self._write_map(result.pooling_weights, result, path, "pooling weights")

    def write_seg_uncertainty(self, result: CaseResult, path: str) -> None:
        """The per-voxel segmentation uncertainty (``options.seg_uncertainty``), like ``write_saliency``."""
        self._write_map(result.seg_uncertainty, result, path, "segmentation uncertainty")

    def write_figure(self, result: CaseResult, images: Images, path: str) -> None:
        """The saliency PNG (figures.py): three slices through the predicted structure with the image (``images``:
        the case's files, or its array), the mask's contour, the heatmap and the class probabilities."""
        from multitask_nnunet.inference import figures
        image = images if isinstance(images, np.ndarray) else self.io.read_image(
            [images] if isinstance(images, (str, os.PathLike)) else list(images))[0]
        figures.write_case_png(path, result.name, image[0], result.properties["spacing"], result.segmentation,
                               result.saliency, result.probabilities, self.class_names, result.uncertainty)

    def _write_map(self, values: Optional[np.ndarray], result: CaseResult, path: str, what: str) -> None:
        if values is None:
            raise ValueError(f"case '{result.name}' has no {what} map (see PredictorOptions)")
        self.io.write_map(values, result.properties, path)

    # ---------------------------------------------------------------- the two halves batch.py runs apart
    def prepare(self, images: Images, properties: Optional[dict] = None, name: Optional[str] = None) -> PreparedCase:
        """Read (files) and preprocess: CPU work, safe to run in several threads at once."""
        t0 = time.perf_counter()
        if isinstance(images, np.ndarray):
            if properties is None:
                raise InputError(f"case '{name or 'array'}': an image array needs properties with its 'spacing'")
            files, image, name = (), images, name or "array"
        else:
            files = (images,) if isinstance(images, (str, os.PathLike)) else tuple(images)
            files = tuple(os.fspath(f) for f in files)
            name = name or self._name_from_file(files[0])
            image, properties = self.io.read(name, files)
        t1 = time.perf_counter()
        data, preprocessed_properties = self.io.preprocess(image, properties, name, files)
        t2 = time.perf_counter()
        return PreparedCase(name, files, data, preprocessed_properties, tuple(image.shape[1:]),
                            {READ: t1 - t0, PREPROCESS: t2 - t1}, {READ: (t0, t1), PREPROCESS: (t1, t2)})

    def finish(self, case: PreparedCase) -> CaseResult:
        """Network and export: the main thread's work in a batch run."""
        if self.class_names is None:
            raise RuntimeError("CasePredictor.finish: call load_network() first (load_network=False)")
        t0 = time.perf_counter()
        try:
            # on CUDA, a case preprocessed on the CPU goes over from pinned memory, without blocking
            data = case.data if isinstance(case.data, torch.Tensor) else to_device(case.data, self.device)
            prediction = self.predictor.predict_preprocessed_case(data)
        except NonFiniteOutputError as e:
            source = f" ({', '.join(case.files)})" if case.files else ""
            raise InputError(f"case '{case.name}'{source}: {e}") from None
        probabilities = self._ensemble(prediction.fold_probabilities)
        index = int(np.argmax(probabilities))
        uncertainty = class_uncertainty(probabilities)
        timings = {**case.timings, NETWORK: time.perf_counter() - t0}
        if self.options.mc_dropout > 0:
            t = time.perf_counter()
            samples = self._ensemble(self.predictor.mc_dropout_probabilities(data, self.options.mc_dropout))
            uncertainty["mutual_information"] = mutual_information(samples)
            timings[MC_DROPOUT] = time.perf_counter() - t
        t1 = time.perf_counter()
        segmentation = segmentation_in_input_geometry(prediction.logits, case.properties,
                                                      self.predictor.plans_manager, self.export_configuration,
                                                      self.predictor.label_manager)
        seg_uncertainty = None
        if self.options.seg_uncertainty:
            from multitask_nnunet.inference.saliency import segmentation_entropy
            seg_uncertainty = self._in_input_geometry(
                segmentation_entropy(prediction.logits, self.predictor.label_manager.has_regions), case)
        timings[EXPORT] = time.perf_counter() - t1
        saliency = pooling = None
        if self.options.saliency:
            t = time.perf_counter()
            from multitask_nnunet.inference.saliency import class_activation_map
            cam, pool = class_activation_map(self.predictor, data, index, self.options.saliency_stage,
                                             self.options.saliency_method)
            saliency = self._in_input_geometry(cam, case)
            pooling = None if pool is None else self._in_input_geometry(pool, case)
            timings[SALIENCY] = time.perf_counter() - t
        return CaseResult(case.name, segmentation, probabilities, index, self.class_names[index],
                          prediction.path, prediction.fallback, case.properties, case.shape,
                          tuple(case.data.shape[1:]), timings, uncertainty, saliency, pooling, seg_uncertainty,
                          guide_summary(segmentation, case.properties["spacing"], self.guide_labels))

    def _in_input_geometry(self, values: torch.Tensor, case: PreparedCase) -> np.ndarray:
        return map_in_input_geometry(values, case.properties, self.predictor.plans_manager, self.export_configuration)

    def _name_from_file(self, file: str) -> str:
        base = os.path.basename(file)
        base = base[:-len(self.file_ending)] if base.endswith(self.file_ending) else os.path.splitext(base)[0]
        match = _CHANNEL.fullmatch(base)
        return match.group(1) if match else base
