"""MultitaskPredictor: segmentation logits and class probabilities from one encoder pass per input.

It subclasses nnU-Net's ``nnUNetPredictor`` to reuse its model-folder handling, sliding-window tiling
(``_internal_get_sliding_window_slicers``), Gaussian weights and padding helpers; what it adds is that every
network call also yields class logits, and how those are combined:

- whole-volume mode: the preprocessed volume is padded to at least the patch size and to the network's
  divisibility and run in one pass (FP16 autocast on CUDA, fp32 on CPU); the class comes from that pass. Auto
  mode takes it for volumes that fit in the patch (``_use_whole_volume``).
- sliding-window mode: nnU-Net's Gaussian-weighted tiles for segmentation; the class probabilities are the
  average of the tiles' softmax outputs, each tile weighted by its predicted foreground mass (sum of the
  Gaussian-weighted foreground probability) plus a small floor, so every tile counts and tiles that see the
  structure count most. The class never comes from a single tile. A head with a part that reads the whole
  case (``has_case_part``: the descriptors of ``SegGuidedHead``, whose volumes and intensity statistics a tile
  would cut) gives only its per-tile part on the tiles; that part's averaged probabilities, as log-probabilities,
  go with the stitched segmentation and the whole image through ``case_logits`` once, as in a whole-volume
  pass.
- mirroring TTA and fold ensembling average segmentation logits and class probabilities alike.

``predict_preprocessed_case`` returns which path ran with the result (``whole``, ``sliding`` or ``fallback``).
nnU-Net's safety nets (predict_from_raw_data.py, nnunetv2 2.8.1) are kept: a CUDA out-of-memory error falls
back from the whole volume to the sliding window, and from accumulating the sliding window on the GPU to
accumulating it on the CPU; logits that are not finite (NaN, inf) raise ``NonFiniteOutputError``.
"""
import itertools
import os
from queue import Empty, Queue
from threading import Event, Thread
from typing import Iterator, List, NamedTuple, Optional, Tuple

import numpy as np
import torch
from acvl_utils.cropping_and_padding.padding import pad_nd_image
from batchgenerators.utilities.file_and_folder_operations import join, load_json
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.inference.sliding_window_prediction import compute_gaussian
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.helpers import dummy_context, empty_cache
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from multitask_nnunet.errors import InputError
from multitask_nnunet.model.heads import build_head, head_spec_from_checkpoint
from multitask_nnunet.nnunet_copies import follows
from multitask_nnunet.model.network import MultitaskUNet, merge_state_dict
from multitask_nnunet.registration import DEFAULT_ARCHITECTURE_TRAINERS, ext_trainer_path

# floor added to each tile's foreground mass, relative to the tile's Gaussian mass
TILE_WEIGHT_FLOOR = 1e-3
MODES = ("auto", "whole", "sliding")
# auto mode runs a volume in one pass only when it fits in the patch on every axis, where the sliding window
# would run one tile too (same padding, same result up to float rounding). The network was trained on patches:
# a whole-volume pass over a larger volume drifts from the sliding window's output, and on crops only 1.1-1.3
# times the patch it cost lesion Dice in 15 of 20 checkpoints (up to -0.23; TechReport, 'Segmentation against stock,
# and the whole-volume pass'). ``--max-whole-voxels`` opts into larger passes by voxel count.
# which path a case took: the whole volume in one pass, the sliding window, or a fallback after running out of
# memory (whole volume -> sliding window, sliding window accumulated on the GPU -> on the CPU)
WHOLE, SLIDING, FALLBACK = "whole", "sliding", "fallback"


class NonFiniteOutputError(RuntimeError):
    """The network's output holds NaN or inf (nnU-Net's predictor raises on inf logits too)."""


class PreprocessedPrediction(NamedTuple):
    logits: torch.Tensor          # segmentation logits (c, x, y, z), float32, on the CPU, the input's shape
    probabilities: np.ndarray     # class probabilities (K,)
    path: str                     # WHOLE, SLIDING or FALLBACK
    fallback: Optional[str]       # what ran out of memory and what ran instead; None unless FALLBACK
    fold_probabilities: Optional[np.ndarray] = None  # (F, K): each fold's class probabilities (TTA-averaged);
                                                     # ``probabilities`` is their mean (calibration.py)


def load_multitask_checkpoint(path: str, mmap: bool = False) -> dict:
    """The checkpoint's entries; ``InputError`` naming the file if it is damaged or not ours. ``mmap``: map the
    weights instead of reading them (for a look at the small entries)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError, ... for a damaged file
        raise InputError(f"{path}: not a readable checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else 'no details'})") from None
    if not isinstance(checkpoint, dict) or "classification_head" not in checkpoint:
        raise InputError(f"{path}: not a multitask-nnunet checkpoint (no 'classification_head'); "
                         f"was it trained with MultitasknnUNetTrainer?")
    return checkpoint


class MultitaskPredictor(nnUNetPredictor):
    def __init__(self, tile_step_size: float = 0.5, use_mirroring: bool = False,
                 device: torch.device = torch.device("cuda"), mode: str = "auto",
                 max_whole_volume_voxels: Optional[int] = None, verbose: bool = False, allow_tqdm: bool = False):
        super().__init__(tile_step_size=tile_step_size, use_gaussian=True, use_mirroring=use_mirroring,
                         perform_everything_on_device=True, device=device, verbose=verbose,
                         verbose_preprocessing=False, allow_tqdm=allow_tqdm)
        if mode not in MODES:
            raise InputError(f"--mode must be one of {MODES}, got '{mode}'")
        self.mode = mode
        self.max_whole_volume_voxels = max_whole_volume_voxels
        if device.type == "cuda" and (mode == "whole" or max_whole_volume_voxels is not None):
            # nnU-Net turns cuDNN's autotuner on for its fixed-size tiles; whole volumes larger than the patch have a
            # new shape nearly every case, and re-tuning each one would cost more than it saves. Auto mode's own
            # rule feeds the network patch-sized inputs only (a volume that fits is padded to the patch), so it
            # keeps the autotuner
            torch.backends.cudnn.benchmark = False
        self._loaded_parameters: Optional[int] = None  # index into list_of_parameters held by the network

    # ---------------------------------------------------------------- set-up
    @follows(nnUNetPredictor.initialize_from_trained_model_folder, "451332e5a3c9")
    def initialize_from_trained_model_folder(self, model_training_output_dir: str, use_folds, checkpoint_name: str =
                                             "checkpoint_final.pth") -> List[str]:
        """Like nnU-Net's, but builds a MultitaskUNet and keeps each fold's head weights. Returns the class names
        stored with the head (``checkpoint["classification_head"]["class_names"]``), the one source of class names
        at inference; every fold must have the same."""
        dataset_json = load_json(join(model_training_output_dir, "dataset.json"))
        plans_manager = PlansManager(join(model_training_output_dir, "plans.json"))
        if use_folds is None:
            use_folds = self.auto_detect_available_folds(model_training_output_dir, checkpoint_name)
        parameters, checkpoint, class_names = [], None, None
        for fold in use_folds:
            fold = fold if fold == "all" else int(fold)
            path = join(model_training_output_dir, f"fold_{fold}", checkpoint_name)
            try:
                checkpoint = load_multitask_checkpoint(path)
            except FileNotFoundError:
                raise InputError(f"{path}: checkpoint not found") from None
            parameters.append(merge_state_dict(checkpoint["network_weights"],
                                               checkpoint["classification_head"]["state_dict"]))
            names = list(checkpoint["classification_head"]["class_names"])
            if class_names is not None and names != class_names:
                raise InputError(f"{path}: classes {names} differ from the other folds' {class_names}; "
                                 f"only folds of one dataset can be ensembled")
            class_names = names
        head = checkpoint["classification_head"]
        configuration_manager = plans_manager.get_configuration(checkpoint["init_args"]["configuration"])
        network = self.build_network(checkpoint["trainer_name"], plans_manager, configuration_manager,
                                     dataset_json, head)
        network.load_state_dict(parameters[0])
        self.manual_initialization(network, plans_manager, configuration_manager, parameters, dataset_json,
                                   checkpoint["trainer_name"], checkpoint.get("inference_allowed_mirroring_axes"))
        self._loaded_parameters = 0
        return class_names

    @staticmethod
    def build_network(trainer_name: str, plans_manager, configuration_manager, dataset_json: dict,
                      head: dict) -> MultitaskUNet:
        """The trainer's segmentation architecture, plus the head rebuilt from the checkpoint's
        ``classification_head`` entry (its class name and kwargs) by the one head builder.

        For our trainers with nnU-Net's default architecture builder (``DEFAULT_ARCHITECTURE_TRAINERS``), that
        builder's one call, ``get_network_from_plans`` with the plans' architecture (nnunetv2 2.8.1,
        ``nnUNetTrainer.build_network_architecture``), without the trainer class. Any other trainer (a user's
        subclass, one that overrides the builder) is found as nnU-Net's predictor finds it, by
        ``recursive_find_trainer_class_by_name``, whose static builder is used; nnU-Net looks for trainers
        outside its own folder only in ``nnUNet_extTrainer``, so ours go there."""
        num_inputs = determine_num_input_channels(plans_manager, configuration_manager, dataset_json)
        num_outputs = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
        if trainer_name in DEFAULT_ARCHITECTURE_TRAINERS:
            # allow_init=False: no He initialisation, the checkpoint's weights replace it at once
            segmentation_network = get_network_from_plans(
                configuration_manager.network_arch_class_name, configuration_manager.network_arch_init_kwargs,
                configuration_manager.network_arch_init_kwargs_req_import, num_inputs, num_outputs,
                allow_init=False, deep_supervision=False)
        else:
            from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
            os.environ["nnUNet_extTrainer"] = ext_trainer_path()
            trainer_class = recursive_find_trainer_class_by_name(trainer_name)
            segmentation_network = trainer_class.build_network_architecture(
                plans_manager, configuration_manager, num_inputs, num_outputs, enable_deep_supervision=False)
        return MultitaskUNet(segmentation_network, build_head(head_spec_from_checkpoint(head)))

    def manual_initialization(self, network, plans_manager, configuration_manager, parameters, dataset_json,
                              trainer_name, inference_allowed_mirroring_axes):
        super().manual_initialization(network, plans_manager, configuration_manager, parameters, dataset_json,
                                      trainer_name, inference_allowed_mirroring_axes)
        self._loaded_parameters = None

    # ---------------------------------------------------------------- prediction
    def _module(self) -> MultitaskUNet:
        net = self.network
        for attr in ("module", "_orig_mod"):  # DDP, torch.compile
            net = getattr(net, attr, net)
        return net

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.float16) if self.device.type == "cuda" else dummy_context()

    @follows(nnUNetPredictor._internal_maybe_mirror_and_predict, "96614c55a488")
    @torch.inference_mode()
    def _mirror_and_predict(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(segmentation logits, class probabilities) of one batch, averaged over the mirror axes if TTA."""
        segmentation, class_logits = self.network(x, return_classification=True)
        segmentation, class_probs = segmentation.float(), torch.softmax(class_logits.float(), 1)
        if self.use_mirroring and self.allowed_mirroring_axes:
            axes = [m + 2 for m in self.allowed_mirroring_axes]
            combinations = [c for i in range(len(axes)) for c in itertools.combinations(axes, i + 1)]
            for flip in combinations:
                s, c = self.network(torch.flip(x, flip), return_classification=True)
                segmentation += torch.flip(s.float(), flip)
                class_probs += torch.softmax(c.float(), 1)
            segmentation /= len(combinations) + 1
            class_probs /= len(combinations) + 1
        return segmentation, class_probs

    def _foreground_probability(self, segmentation_logits: torch.Tensor) -> torch.Tensor:
        if self.label_manager.has_regions:
            return torch.sigmoid(segmentation_logits).amax(1)
        return 1 - torch.softmax(segmentation_logits, 1)[:, 0]

    def _predict_whole(self, data: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        # at least the patch size, as nnU-Net pads small images in training: the instance norms then see the
        # statistics they were trained with, and a volume smaller than the patch gets the sliding window's result
        padded, revert = pad_nd_image(data.to(self.device), self.configuration_manager.patch_size, "constant",
                                      {"value": 0}, True, self._module().divisibility())
        segmentation, class_probs = self._mirror_and_predict(padded[None])
        return segmentation[0][(slice(None), *revert[1:])], class_probs[0]

    @follows(nnUNetPredictor._internal_predict_sliding_window_return_logits, "9179d1b29e93")
    def _predict_sliding(self, data: torch.Tensor, results_device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        """Tiles run on ``self.device``; logits and weights are accumulated on ``results_device`` (nnU-Net's
        ``perform_everything_on_device`` and its CPU fallback)."""
        patch_size = tuple(self.configuration_manager.patch_size)
        padded, revert = pad_nd_image(data.to(results_device), patch_size, "constant", {"value": 0}, True, None)
        gaussian = compute_gaussian(patch_size, sigma_scale=1. / 8, value_scaling_factor=10, device=results_device)
        logits = torch.zeros((self.label_manager.num_segmentation_heads, *padded.shape[1:]), device=results_device)
        weights = torch.zeros(padded.shape[1:], device=results_device)
        class_sum, weight_sum = 0, 0
        # nnU-Net's Gaussian is float16: its sum overflows to inf for patches of ~10^5 voxels, so sum in float32
        floor = TILE_WEIGHT_FLOOR * float(gaussian.float().sum())
        head = self._module().classification_head
        with head.per_tile():
            for slicer, tile in self._tiles(padded, self._internal_get_sliding_window_slicers(padded.shape[1:])):
                segmentation, class_probs = self._mirror_and_predict(tile)
                segmentation = segmentation[0].to(results_device)
                logits[slicer] += segmentation * gaussian
                weights[slicer[1:]] += gaussian
                tile_weight = float((self._foreground_probability(segmentation[None])[0] * gaussian).sum()) + floor
                class_sum = class_sum + tile_weight * class_probs[0].to(results_device)
                weight_sum += tile_weight
        logits /= weights
        logits = logits[(slice(None), *revert[1:])]
        class_probs = class_sum / weight_sum
        if head.has_case_part:  # the tiles' part as log-probabilities, the case part read on the stitched case
            with torch.autocast(self.device.type, enabled=False):
                case_logits = head.case_logits(torch.log(class_probs.float().clamp_min(1e-12))[None], logits[None],
                                               data[None].to(results_device).float())
            class_probs = torch.softmax(case_logits.float(), 1)[0].to(results_device)
        return logits, class_probs

    @follows(nnUNetPredictor._internal_predict_sliding_window_return_logits, "9179d1b29e93")
    def _tiles(self, data: torch.Tensor, slicers: list) -> Iterator[Tuple[tuple, torch.Tensor]]:
        """(slicer, contiguous tile on ``self.device``) per slicer, cut by a producer thread two tiles ahead, as in
        nnU-Net 2.8.1's ``_internal_predict_sliding_window_return_logits``: on CUDA the next tile's copy overlaps
        this tile's pass. On a busy CPU the network also runs several times faster fed this way than from
        tiles cut inline (measured: 36 tiles in 12-18 s instead of 58-66 s on the shared 2-core machine; the same
        when it is idle)."""
        queue: Queue = Queue(maxsize=2)
        stop = Event()

        def produce():
            try:
                for slicer in slicers:
                    if stop.is_set():
                        return
                    queue.put((slicer, torch.clone(data[slicer][None], memory_format=torch.contiguous_format)
                               .to(self.device)))
                queue.put(None)
            except BaseException as e:  # e.g. out of memory on the device: raised in the consumer
                queue.put(e)

        producer = Thread(target=produce, name="tiles", daemon=True)
        producer.start()
        try:
            while (item := queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while producer.is_alive():  # unblock a producer waiting on the full queue
                try:
                    queue.get(timeout=0.05)
                except Empty:
                    pass

    def _use_whole_volume(self, data: torch.Tensor) -> bool:
        if self.mode != "auto":
            return self.mode == "whole"
        if self.max_whole_volume_voxels is not None:
            return int(np.prod(data.shape[1:])) <= self.max_whole_volume_voxels
        return all(s <= p for s, p in zip(data.shape[1:], self.configuration_manager.patch_size))

    @torch.inference_mode()
    def predict_preprocessed_case(self, data: torch.Tensor) -> PreprocessedPrediction:
        """Segmentation logits (on CPU, float32, the input's spatial shape), class probabilities (K,) and the path
        that ran, for one preprocessed case (c, x, y, z), ensembled over all loaded folds. Raises
        ``NonFiniteOutputError`` when the logits or probabilities are not finite."""
        self.network = self.network.to(self.device).eval()
        logits_sum, fold_probabilities, path, fallback = None, [], None, None
        for _ in self.fold_weights():
            with self._autocast():
                logits, probs, fold_path, fold_fallback = self._predict_one_fold(data)
            if path is None or fold_path == FALLBACK:
                path, fallback = fold_path, fold_fallback
            logits_sum = logits.cpu() if logits_sum is None else logits_sum.add_(logits.cpu())
            fold_probabilities.append(probs.float().cpu())
        n = len(fold_probabilities)
        if n > 1:
            logits_sum /= n
        fold_probabilities = torch.stack(fold_probabilities).numpy()
        probabilities = fold_probabilities.sum(0) / n
        # nnU-Net's predictor raises on inf logits (FP16 overflow); NaN is as bad and passes its check
        if not (bool(torch.isfinite(logits_sum).all()) and np.isfinite(probabilities).all()):
            raise NonFiniteOutputError("the network's output holds NaN or infinite values (nnU-Net's predictor "
                                       "stops on this too)")
        return PreprocessedPrediction(logits_sum, probabilities, path, fallback, fold_probabilities)

    def fold_weights(self) -> Iterator[None]:
        """Loads each fold's weights into the network in turn (one iteration per fold); a single fold is loaded
        once, not per case. No weights loaded (final validation): the network's own, one iteration."""
        parameters = self.list_of_parameters or [None]
        for index, params in enumerate(parameters):
            if params is not None and index != self._loaded_parameters:
                self._module().load_state_dict(params)
                self._loaded_parameters = index
            yield

    @torch.inference_mode()
    def mc_dropout_probabilities(self, data: torch.Tensor, samples: int, seed: int = 0) -> np.ndarray:
        """(samples, F, K) class probabilities with the classification head's dropout on (only the head's: the
        encoder and decoder stay in eval mode), each sample a full pass of the case's path (TTA, tiles) per fold.
        Seeded (the global RNG is left as it was), so a case gets the same samples every run."""
        self.network = self.network.to(self.device).eval()
        dropouts = [m for m in self._module().classification_head.modules() if isinstance(m, torch.nn.Dropout)]
        out = []
        try:
            for m in dropouts:
                m.train()
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                torch.manual_seed(seed)
                for _ in self.fold_weights():
                    with self._autocast():
                        out.append([self._predict_one_fold(data)[1].float().cpu() for _ in range(samples)])
        finally:
            for m in dropouts:
                m.eval()
        return torch.stack([torch.stack(fold) for fold in out], 1).numpy()

    @follows(nnUNetPredictor.predict_sliding_window_return_logits, "76bacfa82a3c")
    def _predict_one_fold(self, data: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, str, Optional[str]]:
        """(logits, class probabilities, path, fallback) with the current weights. Out-of-memory fallbacks are
        tried outside the except blocks, so that the traceback no longer holds the failed pass's tensors."""
        fallback = None
        if self._use_whole_volume(data):
            try:
                return (*self._predict_whole(data), WHOLE, None)
            except torch.OutOfMemoryError:
                fallback = f"whole volume ran out of memory on {self.device}: sliding window"
            empty_cache(self.device)
        try:
            return (*self._predict_sliding(data, self.device), FALLBACK if fallback else SLIDING, fallback)
        except torch.OutOfMemoryError:
            if self.device.type == "cpu":
                raise
        empty_cache(self.device)
        fallback = ((fallback + ", which ran out of memory too: ") if fallback else "sliding window ran out of "
                    f"memory on {self.device}: ") + "accumulated on the CPU"
        return (*self._predict_sliding(data, torch.device("cpu")), FALLBACK, fallback)
