"""MultitasknnUNetTrainer: nnU-Net's trainer with a classification head on the shared encoder.

Everything nnU-Net does (plans, preprocessing, data loading and augmentation, deep supervision, the SGD
optimizer with poly learning rate and gradient clipping at 12 for the segmentation network, the segmentation
loss, DDP) stays nnU-Net's. This subclass adds:

- the class labels, read from dataset.json (see multitask_nnunet.io.class_labels) and checked at initialize;
- a classification head from the head registry (multitask_nnunet.model.heads): by default the guided head,
  which pools encoder features where the network itself predicts the class-carrying structure and the organ
  around it, beside descriptors of both;
- the head's own optimizer (AdamW with warm-up and poly decay, its own gradient clipping). One AMP grad
  scaler serves both optimizers, unscaling each before it is clipped;
- a staged curriculum in fractions of ``num_epochs`` (``resolve_curriculum``),
  ``loss = seg_loss + w * cls_loss`` with class-balanced cross-entropy:
  phase 0 (epochs < ``seg_warmup_epochs``): segmentation only (w = 0, the head is not trained);
  phase 1 (epochs < ``phase1_epochs``): the head learns on detached encoder features (exactly zero encoder
  gradient from the classification loss);
  phase 2: joint training. The head's step size is its own learning rate; ``phase2_cls_weight`` sets how
  strongly the classification gradient shapes the shared encoder, which therefore moves slower for the
  classification task than the head does;
- per-case classification metrics in validation (macro-F1, accuracy, per-class recall, a warning when the
  predictions collapse to one class) and a combined metric for ``checkpoint_best.pth``;
- at the end of final validation, temperature scaling fitted on the fold's validation class probabilities,
  written to ``fold_X/calibration.json`` with the NLL and ECE before and after (multitask_nnunet.calibration);
- checkpoints whose ``network_weights`` are exactly a stock nnU-Net network's (so ``nnUNetv2_predict``
  works on them), with the head's spec and weights beside them under ``classification_head`` and the head
  optimizer's state under ``head_optimizer_state``.
"""
import math
import multiprocessing
import warnings
from time import sleep, time
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import isfile, join, maybe_mkdir_p, save_json
from nnunetv2.configuration import default_num_processes
from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
from nnunetv2.inference.export_prediction import export_prediction_from_logits
from nnunetv2.inference.sliding_window_prediction import compute_gaussian
from nnunetv2.training.loss.dice import get_tp_fp_fn_tn
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.collate_outputs import collate_outputs
from nnunetv2.utilities.file_path_utilities import check_workers_alive_and_busy
from nnunetv2.utilities.helpers import dummy_context
from torch import autocast, nn
from torch import distributed as dist
from torch._dynamo import OptimizedModule
from torch.nn.parallel import DistributedDataParallel

from multitask_nnunet.calibration import CALIBRATION_JSON, fit_calibration, write_calibration
from multitask_nnunet.io.atomic import atomic_torch_save
from multitask_nnunet.io.class_csv import write_class_csvs
from multitask_nnunet.io.class_labels import class_labels_for_cases, class_weights, read_class_labels
from multitask_nnunet.errors import InputError, WriteError
from multitask_nnunet.evaluation.metrics import classification_metrics, mean_probabilities_per_case
from multitask_nnunet.model.heads import (DEFAULT_HEAD, area_resize, build_head, head_class, head_spec_from_checkpoint,
                                          plan_head, resolve_guide)
from multitask_nnunet.nnunet_copies import follows
from multitask_nnunet.model.network import MultitaskUNet, merge_state_dict, split_state_dict
from multitask_nnunet.training.logger import MultitaskLocalLogger
from multitask_nnunet.training.seeding import SeededTraining

PHASE_NAMES = {0: "segmentation warm-up (classification head not trained)",
               1: "classification head on detached encoder features",
               2: "joint training (classification gradients reach the encoder)"}


class Curriculum(NamedTuple):
    """The curriculum in epochs, as resolved for one ``num_epochs``."""
    seg_warmup_epochs: int
    phase1_epochs: int
    head_warmup_epochs: int
    best_weight_ramp_epochs: int


class RefitRecords(NamedTuple):
    """What a head's ``refit`` fits on (``MultitasknnUNetTrainer.refit_records``)."""
    passes: List[Tuple[float, list]]   # per pass of ``refit_passes``: its sample weight, one record per case
    labels: List[int]                  # the cases' classes
    cases: List[str]                   # the cases' identifiers, in the records' order


class CurriculumError(ValueError):
    """A schedule that cannot train the head as the curriculum says; the message is one line."""


def _epoch_range(start: int, stop: int) -> str:
    return "none" if stop <= start else str(start) if stop == start + 1 else f"{start}-{stop - 1}"


def _spec_difference(planned: dict, stored: dict) -> str:
    """What differs between two head specs, e.g. ``interior True -> False`` (planned -> stored)."""
    if planned["class_name"] != stored["class_name"]:
        return f"{planned['class_name']} -> {stored['class_name']}"
    keys = sorted(set(planned["kwargs"]) | set(stored["kwargs"]))
    return ", ".join(f"{k} {planned['kwargs'].get(k, '(none)')} -> {stored['kwargs'].get(k, '(none)')}" for k in keys
                     if planned["kwargs"].get(k) != stored["kwargs"].get(k))


def _scaled(fraction: float, num_epochs: int) -> int:
    return int(math.floor(fraction * num_epochs + 0.5))


def resolve_curriculum(num_epochs: int, seg_warmup_fraction: float = 0.05, phase1_fraction: float = 0.5,
                       seg_warmup_epochs: Optional[int] = None, phase1_epochs: Optional[int] = None,
                       head_warmup_fraction: float = 0.005, head_warmup_epochs: Optional[int] = None,
                       best_weight_ramp_fraction: float = 0.05,
                       best_weight_ramp_epochs: Optional[int] = None) -> Curriculum:
    """Phase boundaries in epochs: explicit ``*_epochs`` as given, else from the fractions of ``num_epochs``.

    From fractions, a phase whose fraction span is not empty gets at least one epoch, and the joint phase at
    least the last epoch (so with 2 epochs: warm-up, then joint; with 1: joint only). Raises
    ``CurriculumError`` for a schedule in which the head is never trained, the phases are out of order or the
    joint phase never comes."""
    values = (f"num_epochs={num_epochs}, seg_warmup_fraction={seg_warmup_fraction}, "
              f"phase1_fraction={phase1_fraction}, seg_warmup_epochs={seg_warmup_epochs}, "
              f"phase1_epochs={phase1_epochs}")
    if not 0 <= seg_warmup_fraction <= phase1_fraction < 1:
        raise CurriculumError(f"{values}: the fractions need 0 <= seg_warmup_fraction <= phase1_fraction < 1")
    last = num_epochs - 1  # the joint phase's last possible start
    warmup = seg_warmup_epochs
    if warmup is None:
        warmup = 0 if seg_warmup_fraction == 0 else max(1, _scaled(seg_warmup_fraction, num_epochs))
        warmup = min(warmup, last if phase1_epochs is None else phase1_epochs)
    phase1 = phase1_epochs
    if phase1 is None:
        phase1 = warmup if phase1_fraction == seg_warmup_fraction else \
            max(warmup + 1, _scaled(phase1_fraction, num_epochs))
        phase1 = max(warmup, min(phase1, last))
    resolved = f"num_epochs={num_epochs}, seg_warmup_epochs={warmup}, phase1_epochs={phase1}"
    if warmup < 0 or phase1 < warmup:
        raise CurriculumError(f"{resolved}: phases out of order (need 0 <= seg_warmup_epochs <= phase1_epochs)")
    if warmup >= num_epochs:
        raise CurriculumError(f"{resolved}: the classification head is never trained "
                              f"(need seg_warmup_epochs < num_epochs)")
    if phase1 >= num_epochs:
        raise CurriculumError(f"{resolved}: the joint phase never comes (need phase1_epochs < num_epochs)")
    head_warmup = head_warmup_epochs if head_warmup_epochs is not None else \
        max(1, _scaled(head_warmup_fraction, num_epochs))
    ramp = best_weight_ramp_epochs if best_weight_ramp_epochs is not None else \
        max(1, _scaled(best_weight_ramp_fraction, num_epochs))
    return Curriculum(int(warmup), int(phase1), int(head_warmup), int(ramp))


def _case_data(dataset, key: str):
    """(data tensor, properties) of one preprocessed case of an nnU-Net dataset."""
    data, _, _, properties = dataset.load_case(key)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # non-writable numpy array
        return torch.from_numpy(data[:]), properties


class MultitasknnUNetTrainer(SeededTraining, nnUNetTrainer):
    """Subclass it (nnU-Net style, in your own ``nnUNet_extTrainer`` folder) and override these to change the
    head, its optimizer or the curriculum; nnU-Net's own attributes (``num_epochs``,
    ``num_iterations_per_epoch``, ``initial_lr``, ...) work as usual."""

    # ---- classification head (multitask_nnunet.model.heads) ----------------------------------------------------
    #: a head class name of multitask_nnunet.model.heads.HEADS (default ``heads.DEFAULT_HEAD``, the guided head; see
    #: heads.py for the others, and ``heads.register_head`` for your own)
    head_class = DEFAULT_HEAD
    #: overrides of the head's planned kwargs, e.g. {"hidden": [256], "dropout": 0.2, "pool_stages": [2, 3, 4]}
    head_kwargs = {}
    #: the guide of a head that pools by one (``uses_guide``): None = the last region of regions_class_order
    #: (region-based datasets) or the highest label; a region or label name of dataset.json; or "foreground"
    head_guide = None

    # ---- the head's own optimizer ----------------------------------------------------------------------
    #: the head has its own AdamW (below; per parameter group of the head, ``lr_scale`` times this learning
    #: rate, see ``ClassificationHead.parameter_groups``) and nnU-Net's SGD keeps the segmentation network
    head_lr = 1e-3
    head_weight_decay = 1e-4
    #: linear warm-up over ``head_warmup_epochs`` from the head's first trained epoch, then poly decay (exponent
    #: 0.9, like nnU-Net's) to 0 at ``num_epochs``
    head_grad_clip_norm = 1.0
    #: gradient-norm clipping of the segmentation network (nnU-Net's 12)
    grad_clip_norm = 12.0

    # ---- curriculum ------------------------------------------------------------------------------------
    #: the curriculum in fractions of ``num_epochs``, resolved when training starts (``resolve_curriculum``), so a
    #: subclass that only sets ``self.num_epochs`` gets the same curriculum, scaled: phase 0 (segmentation only)
    #: for the first ``seg_warmup_fraction`` of the epochs, phase 1 (the head on detached features) until
    #: ``phase1_fraction`` of them, then phase 2 (joint). Each phase with a non-empty fraction gets at least one
    #: epoch, and the joint phase at least the last one
    seg_warmup_fraction = 0.05
    phase1_fraction = 0.5
    #: explicit overrides in epochs (None: from the fractions above). An impossible schedule (the head never
    #: trained, phases out of order, a joint phase that never comes) is refused when training starts
    seg_warmup_epochs = None
    phase1_epochs = None
    #: the head's learning-rate warm-up and the checkpoint_best metric's ramp (below), also in fractions of
    #: ``num_epochs`` (at least one epoch) unless set in epochs
    head_warmup_fraction = 0.005
    head_warmup_epochs = None
    best_weight_ramp_fraction = 0.05
    best_weight_ramp_epochs = None
    #: classification-loss weight w in phase 1 and in phase 2 (loss = seg_loss + w * cls_loss). With the
    #: head's own AdamW, w hardly changes the head's steps (Adam is invariant to the loss scale); in phase 2 it
    #: sets how strongly the classification gradient shapes the encoder
    phase1_cls_weight = 1.0
    phase2_cls_weight = 0.1
    #: warn in the log when validation has predicted a single class for this many epochs in a row
    collapse_warning_epochs = 5

    #: checkpoint_best metric = s * EMA pseudo-Dice + (1 - s) * EMA macro-F1; s is ``best_seg_weight_phase1``
    #: until phase 2 and slides linearly to ``best_seg_weight_final`` over ``best_weight_ramp_epochs`` epochs
    #: (see the curriculum above)
    best_seg_weight_phase1 = 0.9
    best_seg_weight_final = 0.5

    # ---- final validation ------------------------------------------------------------------------------
    #: mirroring TTA in the final validation (nnU-Net's: on). Off needs 1/8 of the network passes in 3d and
    #: gives the probabilities of ``multitask-nnunet predict``'s default (no TTA), which the fitted calibration
    #: is then applied to; the demo and the tests turn it off to save CPU minutes
    final_validation_mirroring = True

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.logger.local_logger = MultitaskLocalLogger()
        self.class_labels = None  # -> initialize
        self.classification_loss = None  # -> initialize
        self.head_spec = None  # -> initialize (the network builder plans it)
        self._checkpoint_head_spec = None  # -> load_checkpoint before initialize: the head as it was trained
        self.head_optimizer = None  # -> configure_optimizers
        self._val_cases_seen = 0

    # ------------------------------------------------------------------ set-up
    @property
    def phase(self) -> int:
        if self.current_epoch < self.seg_warmup_epochs:
            return 0
        return 1 if self.current_epoch < self.phase1_epochs else 2

    @property
    def cls_weight(self) -> float:
        return (0.0, self.phase1_cls_weight, self.phase2_cls_weight)[self.phase]

    def head_learning_rate(self, epoch: int) -> float:
        if epoch < self.seg_warmup_epochs:
            return 0.0
        warm_up = min(1.0, (epoch - self.seg_warmup_epochs + 1) / max(1, self.head_warmup_epochs))
        return self.head_lr * warm_up * (1 - epoch / self.num_epochs) ** 0.9

    def best_seg_weight(self, epoch: int) -> float:
        if epoch < self.phase1_epochs:
            return self.best_seg_weight_phase1
        t = min(1.0, (epoch - self.phase1_epochs + 1) / max(1, self.best_weight_ramp_epochs))
        return self.best_seg_weight_phase1 + t * (self.best_seg_weight_final - self.best_seg_weight_phase1)

    def _dataset_json_path(self) -> str:
        return join(self.preprocessed_dataset_folder_base, 'dataset.json')

    def curriculum(self) -> Curriculum:
        """This trainer's curriculum for its ``num_epochs`` (see the class attributes), checked."""
        return resolve_curriculum(
            self.num_epochs, self.seg_warmup_fraction, self.phase1_fraction, self.seg_warmup_epochs,
            self.phase1_epochs, self.head_warmup_fraction, self.head_warmup_epochs, self.best_weight_ramp_fraction,
            self.best_weight_ramp_epochs)

    def resolve_curriculum(self) -> Curriculum:
        """``curriculum()``, with the ``*_epochs`` attributes set to its values."""
        curriculum = self.curriculum()
        for name, value in curriculum._asdict().items():
            setattr(self, name, value)
        return curriculum

    def initialize(self):
        if not self.was_initialized:
            # refuse an impossible schedule or missing labels in one line (nnUNetv2_train prints a SystemExit's
            # message without a traceback), before anything is built
            try:
                self.resolve_curriculum()
                self.class_labels = read_class_labels(self.dataset_json, self._dataset_json_path())
            except (CurriculumError, InputError) as e:
                raise SystemExit(f"{type(self).__name__}: {e}") from None
            # nnU-Net's initialize() builds the training network through self.build_network_architecture. The
            # class's static builder stays nnU-Net's, so nnUNetv2_predict builds the plain segmentation network
            # from our checkpoints; for training, this instance's builder adds the head.
            self.build_network_architecture = self._build_multitask_network
        super().initialize()
        tr_keys, val_keys = self.do_split()
        source = self._dataset_json_path()
        tr_labels = class_labels_for_cases(self.class_labels, tr_keys, source)
        class_labels_for_cases(self.class_labels, val_keys, source)
        counts = np.bincount(list(tr_labels.values()), minlength=self.class_labels.num_classes).tolist()
        weights = class_weights(counts)
        self.print_to_log_file(f"Classes {self.class_labels.class_names}, training-fold counts {counts}, "
                               f"cross-entropy weights {np.round(weights, 4).tolist()}")
        self.print_to_log_file(f"Classification head {self.head_spec['class_name']} {self.head_spec['kwargs']}; "
                               f"{'own AdamW' if self.head_optimizer is not None else 'in nnU-Net SGD'}")
        self.print_to_log_file(
            f"Curriculum for {self.num_epochs} epochs: segmentation only in epochs "
            f"{_epoch_range(0, self.seg_warmup_epochs)}, the head on detached features in epochs "
            f"{_epoch_range(self.seg_warmup_epochs, self.phase1_epochs)}, joint training in epochs "
            f"{_epoch_range(self.phase1_epochs, self.num_epochs)} (head learning-rate warm-up "
            f"{self.head_warmup_epochs} epochs)")
        self.classification_loss = nn.CrossEntropyLoss(weight=torch.tensor(weights, dtype=torch.float32,
                                                                           device=self.device))

    def _build_multitask_network(self, plans_manager, configuration_manager, num_input_channels: int,
                                 num_output_channels: int, enable_deep_supervision: bool = True) -> MultitaskUNet:
        segmentation_network = type(self).build_network_architecture(
            plans_manager, configuration_manager, num_input_channels, num_output_channels, enable_deep_supervision)
        try:  # an unknown head or guide: one line (nnUNetv2_train prints a SystemExit's message)
            guide = resolve_guide(self.label_manager, self.dataset_json, self.head_guide) \
                if head_class(self.head_class).uses_guide else None
            voxel_ml = float(np.prod(configuration_manager.spacing)) / 1000.0
            self.head_spec = plan_head(self.head_class, segmentation_network.encoder.output_channels,
                                       self.class_labels.num_classes, guide, input_channels=num_input_channels,
                                       voxel_ml=voxel_ml, **self.head_kwargs)
        except InputError as e:
            raise SystemExit(f"{type(self).__name__}: {e}") from None
        if self._checkpoint_head_spec is not None and self._checkpoint_head_spec != self.head_spec:
            # --c / --val load the checkpoint's head weights, so the head is built as that head was; options
            # without weights (which regions the descriptors read, ...) would otherwise change with the code
            self.print_to_log_file(f"The checkpoint's classification head differs from this trainer's plan "
                                   f"({_spec_difference(self.head_spec, self._checkpoint_head_spec)}): built as in the "
                                   f"checkpoint")
            self.head_spec = self._checkpoint_head_spec
        return MultitaskUNet(segmentation_network, build_head(self.head_spec))

    def _unwrapped_network(self) -> MultitaskUNet:
        mod = self.network.module if isinstance(self.network, DistributedDataParallel) else self.network
        return mod._orig_mod if isinstance(mod, OptimizedModule) else mod

    def _head_parameters(self) -> List[nn.Parameter]:
        return list(self._unwrapped_network().classification_head.parameters())

    def configure_optimizers(self):
        """nnU-Net's SGD + poly schedule for the segmentation network, and the head's own AdamW over its
        ``parameter_groups`` (learning rates set per epoch, see ``head_learning_rate``). A subclass whose
        ``configure_optimizers`` leaves ``head_optimizer`` None trains the head in nnU-Net's SGD instead, all
        parameters clipped together at ``grad_clip_norm``."""
        optimizer, lr_scheduler = super().configure_optimizers()
        head = {id(p) for p in self._head_parameters()}
        for group in optimizer.param_groups:
            group['params'] = [p for p in group['params'] if id(p) not in head]
        groups = self._unwrapped_network().classification_head.parameter_groups()
        self.head_optimizer = torch.optim.AdamW([g for g in groups if g['params']], lr=self.head_lr,
                                                weight_decay=self.head_weight_decay)
        return optimizer, lr_scheduler

    def _batch_class_labels(self, keys) -> torch.Tensor:
        labels = [self.class_labels.label_of(k, self._dataset_json_path()) for k in keys]
        return torch.tensor(labels, dtype=torch.long, device=self.device)

    def _guide_mask(self, target) -> Union[torch.Tensor, None]:
        """(B, 1, *spatial) bool ground-truth mask of the head's guide structure at the segmentation's full
        resolution; None when the head has no guide."""
        if not head_class(self.head_spec['class_name']).uses_guide:
            return None
        target = target[0] if isinstance(target, (list, tuple)) else target
        channels = self.head_spec['kwargs']['guide_channels']
        if self.label_manager.has_regions:
            # region channels (nnU-Net appends the ignore mask as an extra last channel; it is not a guide)
            mask = target[:, channels].amax(1, keepdim=True) > 0
            if self.label_manager.has_ignore_label:
                mask &= target[:, -1:] == 0
        else:
            labels = torch.tensor([self.label_manager.all_labels[c] for c in channels], device=target.device)
            mask = torch.isin(target[:, :1].long(), labels)
        return mask

    @torch.no_grad()
    def _guide_share(self, guide_mask) -> List[float]:
        """Per case whose patch holds the guide structure: the share of the head's pooling weight (as the
        head used it in this step's forward pass, ``last_pooling_weights``: at the segmentation's resolution, or
        with ``attention`` at its first pooled stage's, the mask area-averaged to that grid) that lies on the
        ground-truth structure. 1 means the head pooled only there; the structure's share of the
        foreground means it pooled the whole foreground. Empty for other cases and heads (a list, which nnU-Net's
        ``collate_outputs`` concatenates)."""
        if guide_mask is None:
            return []
        present = guide_mask.flatten(1).any(1)
        weights = getattr(self._unwrapped_network().classification_head, 'last_pooling_weights', None)
        if weights is None or not bool(present.any()):
            return []
        mask = area_resize(guide_mask.float(), weights.shape[2:])
        weights, mask = weights.flatten(1), mask.flatten(1)
        share = (weights * mask).sum(1) / weights.sum(1).clamp_min(1e-12)
        return share[present].cpu().tolist()

    def _autocast(self):
        return autocast(self.device.type, enabled=True) if self.device.type == 'cuda' else dummy_context()

    def _gather(self, obj) -> list:
        """``[obj]`` without DDP; the objects of all ranks with it."""
        if not self.is_ddp:
            return [obj]
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, obj)
        return gathered

    # ------------------------------------------------------------------ training
    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        if self.current_epoch in (self.seg_warmup_epochs, self.phase1_epochs) or self.current_epoch == 0:
            self.print_to_log_file(f"Phase {self.phase}: {PHASE_NAMES[self.phase]}")
        message = f"Phase {self.phase}, classification loss weight {self.cls_weight}"
        if self.head_optimizer is not None:
            lr = self.head_learning_rate(self.current_epoch)
            for group in self.head_optimizer.param_groups:
                group['lr'] = lr * group.get('lr_scale', 1.0)
            message += f", head learning rate {lr:.3g}"
        self.print_to_log_file(message)

    @follows(nnUNetTrainer.train_step, "141e91e02072")
    def train_step(self, batch: dict) -> dict:
        data = batch['data'].to(self.device, non_blocking=True)
        target = batch['target']
        target = [i.to(self.device, non_blocking=True) for i in target] if isinstance(target, list) else \
            target.to(self.device, non_blocking=True)
        labels = self._batch_class_labels(batch['keys'])
        phase = self.phase

        optimizers = [self.optimizer]
        if self.head_optimizer is not None and phase > 0:  # phase 0 leaves the head and its Adam state untouched
            optimizers.append(self.head_optimizer)
        for optimizer in (self.optimizer, self.head_optimizer):
            if optimizer is not None:
                optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            guide_mask = self._guide_mask(target)
            segmentation, class_logits = self.network(data, return_classification=True, detach_features=phase < 2)
            seg_loss = self.loss(segmentation, target)
            cls_loss = self.classification_loss(class_logits.float(), labels)
            # w = 0 in phase 0 still gives every head parameter a (zero) gradient, as DDP requires
            loss = seg_loss + self.cls_weight * cls_loss

        scaler = self.grad_scaler
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if scaler is not None:
            for optimizer in optimizers:  # one scaler for both: unscale each before clipping
                scaler.unscale_(optimizer)
        if self.head_optimizer is None:
            torch.nn.utils.clip_grad_norm_(self._unwrapped_network().parameters(), self.grad_clip_norm)
        else:
            # each optimizer's own parameters (configure_optimizers split them once)
            for optimizer, max_norm in ((self.optimizer, self.grad_clip_norm),
                                        (self.head_optimizer, self.head_grad_clip_norm)):
                torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g['params']], max_norm)
        for optimizer in optimizers:
            scaler.step(optimizer) if scaler is not None else optimizer.step()
        if scaler is not None:
            scaler.update()
        return {'loss': loss.detach().cpu().numpy(), 'seg_loss': seg_loss.detach().cpu().numpy(),
                'cls_loss': cls_loss.detach().cpu().numpy(),
                'guide_share': self._guide_share(guide_mask)}

    def on_train_epoch_end(self, train_outputs: List[dict]):
        super().on_train_epoch_end(train_outputs)
        outputs = collate_outputs(train_outputs)
        for key, log_key in (('seg_loss', 'train_seg_losses'), ('cls_loss', 'train_cls_losses')):
            self.logger.log(log_key, float(np.mean(np.concatenate(
                [np.ravel(v) for v in self._gather(outputs[key])]))), self.current_epoch)
        shares = np.array([s for g in self._gather(outputs['guide_share']) for s in g], dtype=float)
        self.logger.log('train_guide_share', float(shares.mean()) if shares.size else float('nan'),
                        self.current_epoch)

    # ------------------------------------------------------------------ validation (per epoch)
    @follows(nnUNetTrainer.validation_step, "d970a8588cf2")
    def validation_step(self, batch: dict) -> dict:
        """nnU-Net's validation step (loss and pseudo-Dice counts), with the class probabilities of each
        patch taken from the same forward pass."""
        data = batch['data'].to(self.device, non_blocking=True)
        target = batch['target']
        target = [i.to(self.device, non_blocking=True) for i in target] if isinstance(target, list) else \
            target.to(self.device, non_blocking=True)

        with self._autocast():
            output, class_logits = self.network(data, return_classification=True)
            del data
            loss = self.loss(output, target)
        class_probs = torch.softmax(class_logits.float(), 1).cpu().numpy()

        if self.enable_deep_supervision:
            output, target = output[0], target[0]
        axes = [0] + list(range(2, output.ndim))
        if self.label_manager.has_regions:
            predicted_onehot = (torch.sigmoid(output) > 0.5).long()
        else:
            predicted_onehot = torch.zeros(output.shape, device=output.device, dtype=torch.float16)
            predicted_onehot.scatter_(1, output.argmax(1)[:, None], 1)
        mask = None
        if self.label_manager.has_ignore_label:
            if not self.label_manager.has_regions:
                mask = (target != self.label_manager.ignore_label).float()
                target[target == self.label_manager.ignore_label] = 0
            else:
                mask = ~target[:, -1:] if target.dtype == torch.bool else 1 - target[:, -1:]
                target = target[:, :-1]
        tp, fp, fn, _ = get_tp_fp_fn_tn(predicted_onehot, target, axes=axes, mask=mask)
        tp, fp, fn = (x.detach().cpu().numpy() for x in (tp, fp, fn))
        if not self.label_manager.has_regions:
            tp, fp, fn = tp[1:], fp[1:], fn[1:]
        return {'loss': loss.detach().cpu().numpy(), 'tp_hard': tp, 'fp_hard': fp, 'fn_hard': fn,
                'case_keys': list(batch['keys']), 'class_probs': [p.tolist() for p in class_probs]}

    def on_validation_epoch_end(self, val_outputs: List[dict]):
        super().on_validation_epoch_end(val_outputs)
        keys = [k for o in val_outputs for k in o['case_keys']]
        probs = [p for o in val_outputs for p in o['class_probs']]
        gathered = self._gather((keys, probs))
        per_case = mean_probabilities_per_case([k for g in gathered for k in g[0]], [p for g in gathered for p in g[1]])
        cases = sorted(per_case)
        metrics = classification_metrics([self.class_labels.label_of(c) for c in cases],
                                         [int(np.argmax(per_case[c])) for c in cases], self.class_labels.class_names)
        epoch = self.current_epoch
        self.logger.log('val_macro_f1', metrics['macro_f1'], epoch)
        self.logger.log('val_accuracy', metrics['accuracy'], epoch)
        self.logger.log('val_class_recall', [c['recall'] for c in metrics['per_class']], epoch)
        self.logger.log('val_predicted_classes', len({int(np.argmax(per_case[c])) for c in cases}), epoch)
        previous = self.logger.get_value('ema_macro_f1', step=None)
        ema = metrics['macro_f1'] if len(previous) == 0 else 0.9 * previous[-1] + 0.1 * metrics['macro_f1']
        self.logger.log('ema_macro_f1', ema, epoch)
        s = self.best_seg_weight(epoch)
        self.logger.log('combined_metric', s * self.logger.get_value('ema_fg_dice', step=-1) + (1 - s) * ema, epoch)
        self._val_cases_seen = len(cases)

    @follows(nnUNetTrainer.on_epoch_end, "1955a9021871")
    def on_epoch_end(self):
        """nnU-Net's on_epoch_end, with ``checkpoint_best.pth`` chosen by the combined metric
        (``self._best_ema`` holds its best value) and the classification figures in the log."""
        self.logger.log('epoch_end_timestamps', time(), self.current_epoch)
        get = lambda key: self.logger.get_value(key, step=-1)  # noqa: E731
        self.print_to_log_file('train_loss', np.round(get('train_losses'), 4),
                               'seg', np.round(get('train_seg_losses'), 4), 'cls', np.round(get('train_cls_losses'), 4))
        self.print_to_log_file('val_loss', np.round(get('val_losses'), 4))
        if head_class(self.head_spec['class_name']).uses_guide:
            self.print_to_log_file('Head pooling weight on the ground-truth guide structure (train):',
                                   np.round(get('train_guide_share'), 4))
        self.print_to_log_file('Pseudo dice', [np.round(i, decimals=4) for i in get('dice_per_class_or_region')])
        self.print_to_log_file(f"Val macro-F1 {np.round(get('val_macro_f1'), 4)} accuracy "
                               f"{np.round(get('val_accuracy'), 4)} (per case, {self._val_cases_seen} cases); "
                               f"combined metric {np.round(get('combined_metric'), 4)}")
        self.print_to_log_file("Val recall per class", dict(zip(self.class_labels.class_names,
                                                                  np.round(get('val_class_recall'), 4).tolist())))
        self._warn_if_collapsed()
        self.print_to_log_file(f"Epoch time: {np.round(get('epoch_end_timestamps') - get('epoch_start_timestamps'), 2)} s")

        if (self.current_epoch + 1) % self.save_every == 0 and self.current_epoch != (self.num_epochs - 1):
            self.save_checkpoint(join(self.output_folder, 'checkpoint_latest.pth'))
        if self._best_ema is None or get('combined_metric') > self._best_ema:
            self._best_ema = get('combined_metric')
            self.print_to_log_file(f"Yayy! New best combined metric: {np.round(self._best_ema, 4)}")
            self.save_checkpoint(join(self.output_folder, 'checkpoint_best.pth'))
        if self.local_rank == 0:
            self.logger.plot_progress_png(self.output_folder)
        self.current_epoch += 1

    def _warn_if_collapsed(self) -> None:
        n = self.collapse_warning_epochs
        if self._val_cases_seen < 2 or self.current_epoch - self.seg_warmup_epochs + 1 < n:
            return  # too few cases to tell, or the head has not trained for n epochs yet
        if all(k == 1 for k in self.logger.get_value('val_predicted_classes', step=None)[-n:]):
            self.print_to_log_file(f"WARNING: validation has predicted one class for every case for {n} epochs: the "
                                   f"classification head has collapsed (see TechReport.md, 'Classification that "
                                   f"learns')")

    def _predictor(self, predictor):
        """``predictor`` (a MultitaskPredictor) set up on this trainer's network, plans and dataset, as final
        validation and the head's refit use it."""
        predictor.manual_initialization(self.network, self.plans_manager, self.configuration_manager, None,
                                        self.dataset_json, self.__class__.__name__,
                                        self.inference_allowed_mirroring_axes)
        return predictor

    # ------------------------------------------------------------------ end of training
    def on_train_end(self):
        """The head's refit (``refit_head``) in the final network and in ``checkpoint_best.pth``
        (``refit_best_checkpoint``), then nnU-Net's on_train_end, which writes ``checkpoint_final.pth``."""
        self.refit_head()
        self.refit_best_checkpoint()
        super().on_train_end()

    def refit_head(self, of: str = "") -> None:
        """For a head with ``refit_passes``: ``head.refit`` on the records of every training case of the fold
        (``refit_records``). ``of`` names the network in the log line."""
        head = self._unwrapped_network().classification_head
        if not head.refit_passes():  # under DDP every rank refits on all cases alike, so that their heads stay equal
            return
        started = time()
        tr_keys, _ = self.do_split()
        records = self.refit_records(tr_keys)
        message = head.refit(records.passes, records.labels, self.classification_loss.weight)
        self.print_to_log_file(f"Head refit{of}: {message} ({time() - started:.1f} s)")

    def refit_records(self, keys: Sequence[str]) -> "RefitRecords":
        """What ``head.refit`` fits on, for these preprocessed cases: per pass of ``refit_passes``, its weight and
        one record per case (in the order of ``cases``), each case predicted as ``multitask-nnunet predict`` does at
        its defaults (auto mode: one pass where the volume fits in the patch, else the sliding window, whose head
        reads the stitched case through ``case_logits``; no mirroring; eval mode) while the head records; and the
        cases' classes. Without augmentation and with the network's own segmentation, on the path inference takes:
        a refit on whole-volume passes met other masks at inference (TechReport.md, "How the head got here").
        The benchmarks call it with other cases (``refit_cases.py``, ``refit_folds.py``)."""
        from multitask_nnunet.inference.predictor import MultitaskPredictor

        head = self._unwrapped_network().classification_head
        self.set_deep_supervision_enabled(False)
        self.network.eval()
        predictor = self._predictor(MultitaskPredictor(use_mirroring=False, device=self.device))
        dataset = self.dataset_class(self.preprocessed_dataset_folder, list(keys))
        passes = []
        try:
            for weight, context in head.refit_passes():
                with context, head.recording() as records:
                    for key in dataset.identifiers:
                        predictor.predict_preprocessed_case(_case_data(dataset, key)[0])
                if len(records) != len(dataset.identifiers):
                    raise RuntimeError(f"head refit: {len(records)} records for {len(dataset.identifiers)} cases")
                passes.append((weight, list(records)))
        finally:
            self.set_deep_supervision_enabled(True)
            self.network.train()
        cases = list(dataset.identifiers)
        return RefitRecords(passes, [self.class_labels.label_of(k) for k in cases], cases)

    def refit_best_checkpoint(self) -> None:
        """``checkpoint_best.pth``'s head refitted as ``refit_head`` refits the final one, on that checkpoint's own
        segmentation, so that ``predict -chk checkpoint_best.pth`` meets a refitted head too; the final network's
        weights are put back afterwards."""
        path = join(self.output_folder, 'checkpoint_best.pth')
        network = self._unwrapped_network()
        if self.disable_checkpointing or not network.classification_head.refit_passes() or not isfile(path):
            return
        checkpoint = torch.load(path, map_location=self.device, weights_only=False)
        final = {k: v.detach().clone() for k, v in network.state_dict().items()}
        network.load_state_dict(merge_state_dict(checkpoint['network_weights'],
                                                 checkpoint['classification_head']['state_dict']))
        try:
            self.refit_head(" of checkpoint_best.pth")
            checkpoint['classification_head']['state_dict'] = {
                k: v.detach().clone() for k, v in split_state_dict(network.state_dict())[1].items()}
            if self.local_rank == 0:
                atomic_torch_save(checkpoint, path)
        finally:
            network.load_state_dict(final)

    # ------------------------------------------------------------------ checkpoints
    @follows(nnUNetTrainer.save_checkpoint, "3ae275b9ebfb")
    def save_checkpoint(self, filename: str) -> None:
        if self.local_rank != 0:
            return
        if self.disable_checkpointing:
            self.print_to_log_file('No checkpoint written, checkpointing is disabled')
            return
        segmentation_weights, head_weights = split_state_dict(self._unwrapped_network().state_dict())
        checkpoint = {
            'network_weights': segmentation_weights,
            'classification_head': {**self.head_spec, 'state_dict': head_weights,
                                    'num_classes': self.class_labels.num_classes,
                                    'class_names': self.class_labels.class_names},
            'optimizer_state': self.optimizer.state_dict(),
            'head_optimizer_state': self.head_optimizer.state_dict() if self.head_optimizer is not None else None,
            'grad_scaler_state': self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            'logging': self.logger.get_checkpoint(),
            '_best_ema': self._best_ema,
            'current_epoch': self.current_epoch + 1,
            'init_args': self.my_init_kwargs,
            'trainer_name': self.__class__.__name__,
            'inference_allowed_mirroring_axes': self.inference_allowed_mirroring_axes,
        }
        torch.save(checkpoint, filename)

    @follows(nnUNetTrainer.load_checkpoint, "08e42a85eba0")
    def load_checkpoint(self, filename_or_checkpoint: Union[dict, str]) -> None:
        """nnU-Net's, with the classification head and its optimizer; the checkpoint is read before ``initialize``
        so that the head is built from the checkpoint's spec (``head_spec_from_checkpoint``), as ``predict``
        builds it, not from what this code would plan today."""
        checkpoint = filename_or_checkpoint if isinstance(filename_or_checkpoint, dict) else \
            torch.load(filename_or_checkpoint, map_location=self.device, weights_only=False)
        if 'classification_head' not in checkpoint:
            raise RuntimeError(f"{filename_or_checkpoint}: checkpoint has no classification head; it was not "
                               f"written by {self.__class__.__name__}")
        try:
            stored = head_spec_from_checkpoint(checkpoint['classification_head'])
        except InputError as e:
            raise SystemExit(f"{filename_or_checkpoint}: {e}") from None
        if not self.was_initialized:
            self._checkpoint_head_spec = stored
            self.initialize()
        elif stored != self.head_spec:
            raise RuntimeError(f"{filename_or_checkpoint}: the checkpoint's classification head differs from this "
                               f"initialized trainer's ({_spec_difference(self.head_spec, stored)}); load the "
                               f"checkpoint before initialize()")
        state = merge_state_dict(checkpoint['network_weights'], checkpoint['classification_head']['state_dict'])
        self._unwrapped_network().load_state_dict({k[7:] if k.startswith('module.') else k: v
                                                   for k, v in state.items()})
        self.my_init_kwargs = checkpoint['init_args']
        self.current_epoch = checkpoint['current_epoch']
        self.logger.load_checkpoint(checkpoint['logging'])
        self._best_ema = checkpoint['_best_ema']
        self.inference_allowed_mirroring_axes = checkpoint.get('inference_allowed_mirroring_axes',
                                                               self.inference_allowed_mirroring_axes)
        self.optimizer.load_state_dict(checkpoint['optimizer_state'])
        if self.head_optimizer is not None and checkpoint.get('head_optimizer_state') is not None:
            self.head_optimizer.load_state_dict(checkpoint['head_optimizer_state'])
        if self.grad_scaler is not None and checkpoint['grad_scaler_state'] is not None:
            self.grad_scaler.load_state_dict(checkpoint['grad_scaler_state'])

    # ------------------------------------------------------------------ final validation
    @follows(nnUNetTrainer.perform_actual_validation, "57747aab3047")
    def perform_actual_validation(self, save_probabilities: bool = False):
        """nnU-Net's final validation (sliding window, step 0.5, mirroring; nnU-Net's export and
        summary.json), run through MultitaskPredictor's one-case path (``predict_preprocessed_case``, which
        ``multitask-nnunet predict`` runs too) so that each case's segmentation and class come from the same
        passes. Adds ``class_probabilities.csv``, ``subtype_results.csv`` and
        ``classification_summary.json`` (macro-F1, accuracy, confusion matrix) to the validation folder."""
        from multitask_nnunet.inference.predictor import MultitaskPredictor

        if self.is_cascaded:
            raise NotImplementedError(f"{self.__class__.__name__} does not support cascaded configurations")
        self.set_deep_supervision_enabled(False)
        self.network.eval()
        predictor = self._predictor(MultitaskPredictor(
            tile_step_size=0.5, use_mirroring=self.final_validation_mirroring, device=self.device, mode='sliding'))
        validation_folder = join(self.output_folder, 'validation')
        maybe_mkdir_p(validation_folder)
        _, val_keys = self.do_split()
        if self.is_ddp:
            val_keys = val_keys[self.local_rank::dist.get_world_size()]
        dataset_val = self.dataset_class(self.preprocessed_dataset_folder, val_keys)
        head = self._unwrapped_network().classification_head
        probabilities, no_guide = {}, {}  # no_guide: 1.0 for a case whose guide structure was not predicted
        with multiprocessing.get_context("spawn").Pool(default_num_processes) as export_pool:
            workers, results = list(export_pool._pool), []
            for key in dataset_val.identifiers:
                while check_workers_alive_and_busy(export_pool, workers, results, allowed_num_queued=2):
                    sleep(0.1)
                self.print_to_log_file(f"predicting {key}")
                data, properties = _case_data(dataset_val, key)
                prediction = predictor.predict_preprocessed_case(data)  # the one-case path of predict
                logits, probabilities[key] = prediction.logits, prediction.probabilities
                if head.uses_guide:
                    no_guide[key] = float(not bool(head.guide_found(logits[None])[0]))
                results.append(export_pool.starmap_async(export_prediction_from_logits, (
                    (logits, properties, self.configuration_manager, self.plans_manager, self.dataset_json,
                     join(validation_folder, key), save_probabilities),)))
            _ = [r.get() for r in results]
        probabilities = {k: v for g in self._gather(probabilities) for k, v in g.items()}
        no_guide = {k: v for g in self._gather(no_guide) for k, v in g.items()}

        if self.local_rank == 0:
            metrics = compute_metrics_on_folder(
                join(self.preprocessed_dataset_folder_base, 'gt_segmentations'), validation_folder,
                join(validation_folder, 'summary.json'), self.plans_manager.image_reader_writer_class(),
                self.dataset_json["file_ending"],
                self.label_manager.foreground_regions if self.label_manager.has_regions else
                self.label_manager.foreground_labels,
                self.label_manager.ignore_label, chill=True, num_processes=default_num_processes)
            self.print_to_log_file("Mean Validation Dice: ", metrics['foreground_mean']["Dice"],
                                   also_print_to_console=True)
            try:
                self._write_validation_classification(validation_folder, probabilities, no_guide)
            except WriteError as e:  # a full disk: one line (nnUNetv2_train prints a SystemExit's message)
                raise SystemExit(f"{type(self).__name__}: final validation: {e}; rerun with --val") from None
        self.set_deep_supervision_enabled(True)
        compute_gaussian.cache_clear()

    def _write_validation_classification(self, folder: str, probabilities: dict, no_guide: dict) -> None:
        ending = self.dataset_json["file_ending"]
        cases = sorted(probabilities)
        true = {c + ending: self.class_labels.label_of(c) for c in cases}
        write_class_csvs(folder, {c + ending: probabilities[c] for c in cases}, self.class_labels.class_names, true,
                         extra_columns={c + ending: {"no_guide": no_guide[c]} for c in cases if c in no_guide})
        metrics = classification_metrics([self.class_labels.label_of(c) for c in cases],
                                         [int(np.argmax(probabilities[c])) for c in cases],
                                         self.class_labels.class_names)
        save_json({**metrics, 'n_cases': len(cases), 'class_names': self.class_labels.class_names},
                  join(folder, 'classification_summary.json'))
        self.logger.log_summary("final_val/macro_f1", metrics['macro_f1'])
        self.print_to_log_file(f"Validation classification (per case, {len(cases)} cases): macro-F1 "
                               f"{metrics['macro_f1']:.4f}, accuracy {metrics['accuracy']:.4f}, confusion matrix "
                               f"{metrics['confusion_matrix']}", also_print_to_console=True)
        self._fit_calibration(np.stack([probabilities[c] for c in cases]),
                              [self.class_labels.label_of(c) for c in cases],
                              int(sum(no_guide.get(c, 0.0) for c in cases)))

    def _fit_calibration(self, probabilities: np.ndarray, labels: List[int], without_guide: int = 0) -> None:
        """Temperature scaling on this fold's validation class probabilities (multitask_nnunet.calibration), written
        to ``fold_X/calibration.json``, which ``multitask-nnunet predict`` applies by default. Cases whose guide
        structure was not predicted are fitted with the others (their count is recorded), so the temperature
        reflects missed lesions as often as validation has them."""
        if len(labels) == 0:
            return
        calibration = {**fit_calibration(probabilities, labels), "cases_without_guide": without_guide}
        write_calibration(self.output_folder, calibration)
        self.print_to_log_file(
            f"Calibration (temperature scaling on {len(labels)} validation cases, {without_guide} without a predicted "
            f"guide structure): "
            f"T = {calibration['temperature']:.4f}; "
            f"NLL {calibration['nll_before']:.4f} -> {calibration['nll_after']:.4f}, ECE ({calibration['ece_bins']} "
            f"bins) {calibration['ece_before']:.4f} -> {calibration['ece_after']:.4f}; written to {CALIBRATION_JSON}"
            + (f" ({calibration['note']})" if calibration["note"] else ""),
            also_print_to_console=True)
