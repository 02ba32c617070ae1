"""MultitasknnUNetTrainer: nnU-Net's trainer with a classification head on the shared encoder.

Everything nnU-Net does (plans, preprocessing, data loading and augmentation, deep supervision, the SGD
optimizer with poly learning rate, the segmentation loss, DDP) stays nnU-Net's. This subclass adds:

- the class labels, read from dataset.json (see multitask_nnunet.class_labels) and checked at initialize;
- a two-phase loss ``seg_loss + w * cls_loss`` with class-balanced cross-entropy. Phase 1 (the first
  ``phase1_epochs``) feeds the head detached encoder features with a small weight, so the encoder learns
  segmentation undisturbed while the head warms up; phase 2 lets the classification gradient into the
  encoder with a larger weight;
- per-case classification metrics in validation and a combined metric for ``checkpoint_best.pth``;
- checkpoints whose ``network_weights`` are exactly a stock nnU-Net network's (so ``nnUNetv2_predict``
  works on them) with the head stored beside them under ``classification_head``.
"""
import multiprocessing
import warnings
from time import sleep, time
from typing import List, Union

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import join, maybe_mkdir_p, save_json
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

from multitask_nnunet.class_csv import write_class_csvs
from multitask_nnunet.class_labels import class_labels_for_cases, class_weights, read_class_labels
from multitask_nnunet.case_probabilities import mean_probabilities_per_case
from multitask_nnunet.evaluation.metrics import classification_metrics
from multitask_nnunet.network import MultitaskUNet, merge_state_dict, split_state_dict
from multitask_nnunet.training.logger import MultitaskLocalLogger


class MultitasknnUNetTrainer(nnUNetTrainer):
    """Subclass it (nnU-Net style, in your own ``nnUNet_extTrainer`` folder) and override these to change the
    schedule; nnU-Net's own attributes (``num_epochs``, ``num_iterations_per_epoch``, ...) work as usual."""

    #: epochs of phase 1 (head on detached features); phase 2 starts at this epoch
    phase1_epochs = 20
    #: classification-loss weight w in phase 1 and in phase 2
    phase1_cls_weight = 0.01
    phase2_cls_weight = 0.1
    #: classification head: hidden widths and dropout
    head_hidden = (128, 64)
    head_dropout = 0.3
    #: gradient-norm clipping (nnU-Net uses 12)
    grad_clip_norm = 1.0
    #: checkpoint_best metric = s * EMA pseudo-Dice + (1 - s) * EMA macro-F1; s is ``best_seg_weight_phase1``
    #: in phase 1 and slides linearly to ``best_seg_weight_final`` over ``best_weight_ramp_epochs`` epochs
    best_seg_weight_phase1 = 0.9
    best_seg_weight_final = 0.5
    best_weight_ramp_epochs = 50

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.logger.local_logger = MultitaskLocalLogger()
        self.class_labels = None  # -> initialize
        self.classification_loss = None  # -> initialize
        self._val_cases_seen = 0

    # ------------------------------------------------------------------ set-up
    @property
    def phase(self) -> int:
        return 1 if self.current_epoch < self.phase1_epochs else 2

    @property
    def cls_weight(self) -> float:
        return self.phase1_cls_weight if self.phase == 1 else self.phase2_cls_weight

    def best_seg_weight(self, epoch: int) -> float:
        if epoch < self.phase1_epochs:
            return self.best_seg_weight_phase1
        t = min(1.0, (epoch - self.phase1_epochs + 1) / max(1, self.best_weight_ramp_epochs))
        return self.best_seg_weight_phase1 + t * (self.best_seg_weight_final - self.best_seg_weight_phase1)

    def _dataset_json_path(self) -> str:
        return join(self.preprocessed_dataset_folder_base, 'dataset.json')

    def initialize(self):
        if not self.was_initialized:
            # fail on missing labels before anything is built
            self.class_labels = read_class_labels(self.dataset_json, self._dataset_json_path())
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
        self.classification_loss = nn.CrossEntropyLoss(weight=torch.tensor(weights, dtype=torch.float32,
                                                                           device=self.device))

    def _build_multitask_network(self, plans_manager, configuration_manager, num_input_channels: int,
                                 num_output_channels: int, enable_deep_supervision: bool = True) -> MultitaskUNet:
        segmentation_network = type(self).build_network_architecture(
            plans_manager, configuration_manager, num_input_channels, num_output_channels, enable_deep_supervision)
        return MultitaskUNet(segmentation_network, self.class_labels.num_classes, self.head_hidden,
                             self.head_dropout)

    def _unwrapped_network(self) -> MultitaskUNet:
        mod = self.network.module if self.is_ddp else self.network
        return mod._orig_mod if isinstance(mod, OptimizedModule) else mod

    def _batch_class_labels(self, keys) -> torch.Tensor:
        labels = [self.class_labels.label_of(k, self._dataset_json_path()) for k in keys]
        return torch.tensor(labels, dtype=torch.long, device=self.device)

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
        if self.current_epoch == self.phase1_epochs:
            self.print_to_log_file("Phase 2: classification gradients now reach the encoder")
        self.print_to_log_file(f"Phase {self.phase}, classification loss weight {self.cls_weight}")

    def train_step(self, batch: dict) -> dict:
        data = batch['data'].to(self.device, non_blocking=True)
        target = batch['target']
        target = [i.to(self.device, non_blocking=True) for i in target] if isinstance(target, list) else \
            target.to(self.device, non_blocking=True)
        labels = self._batch_class_labels(batch['keys'])

        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            segmentation, class_logits = self.network(data, return_classification=True,
                                                      detach_features=self.phase == 1)
            seg_loss = self.loss(segmentation, target)
            cls_loss = self.classification_loss(class_logits.float(), labels)
            loss = seg_loss + self.cls_weight * cls_loss

        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.grad_clip_norm)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.grad_clip_norm)
            self.optimizer.step()
        return {'loss': loss.detach().cpu().numpy(), 'seg_loss': seg_loss.detach().cpu().numpy(),
                'cls_loss': cls_loss.detach().cpu().numpy()}

    def on_train_epoch_end(self, train_outputs: List[dict]):
        super().on_train_epoch_end(train_outputs)
        outputs = collate_outputs(train_outputs)
        for key, log_key in (('seg_loss', 'train_seg_losses'), ('cls_loss', 'train_cls_losses')):
            self.logger.log(log_key, float(np.mean(np.concatenate(
                [np.ravel(v) for v in self._gather(outputs[key])]))), self.current_epoch)

    # ------------------------------------------------------------------ validation (per epoch)
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
        previous = self.logger.get_value('ema_macro_f1', step=None)
        ema = metrics['macro_f1'] if len(previous) == 0 else 0.9 * previous[-1] + 0.1 * metrics['macro_f1']
        self.logger.log('ema_macro_f1', ema, epoch)
        s = self.best_seg_weight(epoch)
        self.logger.log('combined_metric', s * self.logger.get_value('ema_fg_dice', step=-1) + (1 - s) * ema, epoch)
        self._val_cases_seen = len(cases)

    def on_epoch_end(self):
        """nnU-Net's on_epoch_end, with ``checkpoint_best.pth`` chosen by the combined metric
        (``self._best_ema`` holds its best value) and the classification figures in the log."""
        self.logger.log('epoch_end_timestamps', time(), self.current_epoch)
        get = lambda key: self.logger.get_value(key, step=-1)  # noqa: E731
        self.print_to_log_file('train_loss', np.round(get('train_losses'), 4),
                               'seg', np.round(get('train_seg_losses'), 4), 'cls', np.round(get('train_cls_losses'), 4))
        self.print_to_log_file('val_loss', np.round(get('val_losses'), 4))
        self.print_to_log_file('Pseudo dice', [np.round(i, decimals=4) for i in get('dice_per_class_or_region')])
        self.print_to_log_file(f"Val macro-F1 {np.round(get('val_macro_f1'), 4)} accuracy "
                               f"{np.round(get('val_accuracy'), 4)} (per case, {self._val_cases_seen} cases); "
                               f"combined metric {np.round(get('combined_metric'), 4)}")
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

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, filename: str) -> None:
        if self.local_rank != 0:
            return
        if self.disable_checkpointing:
            self.print_to_log_file('No checkpoint written, checkpointing is disabled')
            return
        segmentation_weights, head_weights = split_state_dict(self._unwrapped_network().state_dict())
        checkpoint = {
            'network_weights': segmentation_weights,
            'classification_head': {'state_dict': head_weights, 'num_classes': self.class_labels.num_classes,
                                    'class_names': self.class_labels.class_names,
                                    'hidden': list(self.head_hidden), 'dropout': self.head_dropout},
            'training_phase': self.phase,
            'optimizer_state': self.optimizer.state_dict(),
            'grad_scaler_state': self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            'logging': self.logger.get_checkpoint(),
            '_best_ema': self._best_ema,
            'current_epoch': self.current_epoch + 1,
            'init_args': self.my_init_kwargs,
            'trainer_name': self.__class__.__name__,
            'inference_allowed_mirroring_axes': self.inference_allowed_mirroring_axes,
        }
        torch.save(checkpoint, filename)

    def load_checkpoint(self, filename_or_checkpoint: Union[dict, str]) -> None:
        if not self.was_initialized:
            self.initialize()
        checkpoint = filename_or_checkpoint if isinstance(filename_or_checkpoint, dict) else \
            torch.load(filename_or_checkpoint, map_location=self.device, weights_only=False)
        if 'classification_head' not in checkpoint:
            raise RuntimeError(f"{filename_or_checkpoint}: checkpoint has no classification head; it was not "
                               f"written by {self.__class__.__name__}")
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
        if self.grad_scaler is not None and checkpoint['grad_scaler_state'] is not None:
            self.grad_scaler.load_state_dict(checkpoint['grad_scaler_state'])

    # ------------------------------------------------------------------ final validation
    def perform_actual_validation(self, save_probabilities: bool = False):
        """nnU-Net's final validation (sliding window, step 0.5, mirroring; nnU-Net's export and
        summary.json), run through MultitaskPredictor so that each case's segmentation and class come from
        the same passes. Adds ``class_probabilities.csv``, ``subtype_results.csv`` and
        ``classification_summary.json`` (macro-F1, accuracy, confusion matrix) to the validation folder."""
        from multitask_nnunet.inference.predictor import MultitaskPredictor

        if self.is_cascaded:
            raise NotImplementedError(f"{self.__class__.__name__} does not support cascaded configurations")
        self.set_deep_supervision_enabled(False)
        self.network.eval()
        predictor = MultitaskPredictor(tile_step_size=0.5, use_mirroring=True, device=self.device, mode='sliding')
        predictor.manual_initialization(self.network, self.plans_manager, self.configuration_manager, None,
                                        self.dataset_json, self.__class__.__name__,
                                        self.inference_allowed_mirroring_axes)
        validation_folder = join(self.output_folder, 'validation')
        maybe_mkdir_p(validation_folder)
        _, val_keys = self.do_split()
        if self.is_ddp:
            val_keys = val_keys[self.local_rank::dist.get_world_size()]
        dataset_val = self.dataset_class(self.preprocessed_dataset_folder, val_keys)
        probabilities = {}
        with multiprocessing.get_context("spawn").Pool(default_num_processes) as export_pool:
            workers, results = list(export_pool._pool), []
            for key in dataset_val.identifiers:
                while check_workers_alive_and_busy(export_pool, workers, results, allowed_num_queued=2):
                    sleep(0.1)
                self.print_to_log_file(f"predicting {key}")
                data, _, _, properties = dataset_val.load_case(key)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # non-writable numpy array
                    data = torch.from_numpy(data[:])
                logits, probabilities[key] = predictor.predict_preprocessed(data)
                results.append(export_pool.starmap_async(export_prediction_from_logits, (
                    (logits, properties, self.configuration_manager, self.plans_manager, self.dataset_json,
                     join(validation_folder, key), save_probabilities),)))
            _ = [r.get() for r in results]
        probabilities = {k: v for g in self._gather(probabilities) for k, v in g.items()}

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
            self._write_validation_classification(validation_folder, probabilities)
        self.set_deep_supervision_enabled(True)
        compute_gaussian.cache_clear()

    def _write_validation_classification(self, folder: str, probabilities: dict) -> None:
        ending = self.dataset_json["file_ending"]
        cases = sorted(probabilities)
        true = {c + ending: self.class_labels.label_of(c) for c in cases}
        write_class_csvs(folder, {c + ending: probabilities[c] for c in cases}, self.class_labels.class_names, true)
        metrics = classification_metrics([self.class_labels.label_of(c) for c in cases],
                                         [int(np.argmax(probabilities[c])) for c in cases],
                                         self.class_labels.class_names)
        save_json({**metrics, 'n_cases': len(cases), 'class_names': self.class_labels.class_names},
                  join(folder, 'classification_summary.json'))
        self.logger.log_summary("final_val/macro_f1", metrics['macro_f1'])
        self.print_to_log_file(f"Validation classification (per case, {len(cases)} cases): macro-F1 "
                               f"{metrics['macro_f1']:.4f}, accuracy {metrics['accuracy']:.4f}, confusion matrix "
                               f"{metrics['confusion_matrix']}", also_print_to_console=True)
