"""The folds' heads refitted together, on cases none of them trained on: measured, not adopted
(``out_of_fold_refit.py`` runs it and scores it; TechReport.md, "The refit out of fold").

    python benchmarks/refit_folds.py DATASET CONFIGURATION -tr TRAINER -p PLANS -f 0 1 2 3 4

After the last epoch each fold refits its head's descriptor branch (``MultitasknnUNetTrainer.refit_head``) on its
own training cases, which its network was trained on, and as few as the fold has (with the oracle fitted on the
same cases beside it, unseen cases gained little in ratio: TechReport.md, "Which cases the refit is fitted
on"). Once every fold is trained, this refits the branch out of fold, like a stacked model:

1. every fold's network predicts its own validation cases as the refit predicts training cases
   (``refit_records``: predict's defaults, whole case, no mirroring) while its head records: one record per case,
   each from a network that did not train on it;
2. cross-fitting: per fold, a branch fitted on the other folds' records classifies the fold's own, so every case
   gets class probabilities from a branch that was not fitted on it;
3. the branch fitted on all records is written into every fold's checkpoint (each fold keeps its own network
   and MLP; only the branch is shared);
4. one temperature fitted on the cross-fitted probabilities goes to every fold's ``calibration.json``;
   ``refit_folds.json`` in the model folder gives their macro-F1. The folds' validation class files are left as
   they are: they describe the folds' own refits.

The records depend on the networks only, not on the branch, so a rerun (after an interruption, say) fits the
same branch again. The folds' validation sets must not overlap and no fold may have trained on its own
validation cases (``all``).
"""
import argparse
import copy
import json
import os
import sys
from time import time
from typing import List, Sequence

import numpy as np

from multitask_nnunet.calibration import CALIBRATION_JSON, fit_calibration, write_calibration
from multitask_nnunet.errors import InputError
from multitask_nnunet.io.atomic import atomic_torch_save, atomic_write_text

SUMMARY_JSON = "refit_folds.json"


def refit_out_of_fold(dataset: str, configuration: str, trainer_name: str, plans: str, folds: Sequence[int],
                      checkpoint: str = "checkpoint_final.pth", device: str = "cpu") -> dict:
    """Steps 1-4 of the module docstring; returns the summary also written to ``refit_folds.json``."""
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    from multitask_nnunet.evaluation.metrics import classification_metrics
    from multitask_nnunet.io.class_labels import class_weights
    from multitask_nnunet.training.trainer import MultitasknnUNetTrainer

    if len(set(folds)) < 2 or len(set(folds)) != len(folds):
        raise InputError(f"folds {' '.join(map(str, folds))}: need two or more different folds (each fold's "
                         f"validation cases are the others' refit cases)")
    for fold in folds:  # before any trainer is made (it would make the fold's folder and log)
        path = os.path.join(get_output_folder(dataset, trainer_name, plans, configuration, fold), checkpoint)
        if not os.path.isfile(path):
            raise InputError(f"{path}: no such checkpoint; train fold {fold} first")
    started = time()
    fitted, trainers, validated = [], [], set()
    for fold in folds:
        trainer = get_trainer_from_args(dataset, configuration, fold, trainer_name, plans,
                                        device=torch.device(device))
        if not isinstance(trainer, MultitasknnUNetTrainer):
            raise InputError(f"{trainer_name} is not a MultitasknnUNetTrainer: it has no classification head")
        path = os.path.join(trainer.output_folder, checkpoint)
        trainer.load_checkpoint(path)
        head = trainer._unwrapped_network().classification_head
        if not head.refit_passes():
            raise InputError(f"{path}: its head ({type(head).__name__}) has nothing to refit")
        if trainers and trainer.head_spec != trainers[0][1].head_spec:
            raise InputError(f"{path}: its classification head differs from fold {trainers[0][0]}'s; the folds must "
                             f"share one head to share its refit")
        train_keys, val_keys = trainer.do_split()
        if not val_keys:
            raise InputError(f"fold {fold} has no validation cases")
        if set(train_keys) & set(val_keys):
            raise InputError(f"fold {fold} trained on its own validation cases (fold 'all' or a split that "
                             f"repeats cases): it has no out-of-fold cases")
        if validated & set(val_keys):
            raise InputError(f"fold {fold}'s validation cases overlap another fold's ("
                             f"{', '.join(sorted(validated & set(val_keys))[:3])}): use the folds of one "
                             f"splits_final.json")
        validated |= set(val_keys)
        trainer.print_to_log_file(f"refit out of fold: predicting fold {fold}'s {len(val_keys)} validation cases")
        fitted.append(trainer.refit_records(val_keys))
        trainers.append((fold, trainer, path))

    class_names = trainers[0][1].class_labels.class_names
    labels = [label for r in fitted for label in r.labels]
    counts = np.bincount(labels, minlength=len(class_names))
    weights = torch.tensor(class_weights(counts.tolist()), dtype=torch.float32)

    def fit(records: List):
        """A copy of the first fold's head with its branch refitted on these folds' records."""
        head = copy.deepcopy(trainers[0][1]._unwrapped_network().classification_head)
        passes = [(weight, [case for r in records for case in r.passes[i][1]])
                  for i, (weight, _) in enumerate(records[0].passes)]
        head.refit(passes, [label for r in records for label in r.labels], weights)
        return head

    probabilities = {}  # case -> cross-fitted class probabilities
    for k, records in enumerate(fitted):
        head = fit(fitted[:k] + fitted[k + 1:])
        logits = head.recorded_logits(records.passes[0][1])
        for case, p in zip(records.cases, torch.softmax(logits.double(), 1).cpu().numpy()):
            probabilities[case] = p
    head = fit(fitted)
    branch = head.refitted_state()

    cases = [case for r in fitted for case in r.cases]
    stacked = np.stack([probabilities[c] for c in cases])
    calibration = {**fit_calibration(stacked, labels),
                   "fitted_on": f"refit_folds.py: cross-fitted probabilities of {len(cases)} validation cases of folds "
                                f"{', '.join(map(str, folds))}"}
    metrics = classification_metrics(labels, [int(np.argmax(p)) for p in stacked], class_names)
    for fold, trainer, path in trainers:
        checkpoint_dict = torch.load(path, map_location="cpu", weights_only=False)
        checkpoint_dict["classification_head"]["state_dict"].update({k: v.cpu() for k, v in branch.items()})
        checkpoint_dict["classification_head"]["refit"] = {"out_of_fold": True, "folds": list(folds),
                                                           "cases": len(cases)}
        atomic_torch_save(checkpoint_dict, path)
        write_calibration(trainer.output_folder, calibration)
    summary = {"folds": list(folds), "checkpoint": checkpoint, "cases": len(cases),
               "cross_fitted": {k: metrics[k] for k in ("macro_f1", "accuracy", "confusion_matrix")},
               "temperature": calibration["temperature"], "ece_before": calibration["ece_before"],
               "ece_after": calibration["ece_after"], "class_names": class_names,
               "seconds": round(time() - started, 1)}
    model_folder = os.path.dirname(trainers[0][1].output_folder)
    atomic_write_text(os.path.join(model_folder, SUMMARY_JSON), json.dumps(summary, indent=2) + "\n")
    line = (f"refit out of fold: descriptor branch refitted on {len(cases)} out-of-fold cases of folds "
            f"{', '.join(map(str, folds))} and written to every fold's {checkpoint}; cross-fitted macro-F1 "
            f"{metrics['macro_f1']:.4f}, accuracy {metrics['accuracy']:.4f}; temperature "
            f"{calibration['temperature']:.4f} in every fold's {CALIBRATION_JSON}")
    for _, trainer, _ in trainers:
        trainer.print_to_log_file(line)
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("dataset_name_or_id")
    p.add_argument("configuration")
    p.add_argument("-tr", default="MultitasknnUNetTrainer", help="trainer (default: %(default)s)")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier (default: %(default)s)")
    p.add_argument("-f", nargs="+", type=int, default=[0, 1, 2, 3, 4], help="folds (default: 0 1 2 3 4)")
    p.add_argument("-chk", default="checkpoint_final.pth", help="the checkpoint refitted (default: %(default)s)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    from multitask_nnunet.registration import ext_trainer_path
    os.environ["nnUNet_extTrainer"] = ext_trainer_path()  # nnU-Net finds the trainer as nnUNetv2_train does
    try:
        refit_out_of_fold(args.dataset_name_or_id, args.configuration, args.tr, args.p, args.f, args.chk, args.device)
    except InputError as e:
        raise SystemExit(f"refit_folds.py: {e}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
