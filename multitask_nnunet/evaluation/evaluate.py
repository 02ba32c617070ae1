"""``multitask-nnunet evaluate``: score a prediction folder against ground truth.

Segmentation: Dice per case and region (regions: see ``multitask_nnunet/io/labels.py``), mean per region. Classification:
macro-F1, accuracy, balanced accuracy, per-class precision/recall/F1 and the confusion matrix (rows: true
class, columns: predicted class); from ``class_probabilities.csv``, when the prediction folder has it: ROC-AUC
one-vs-rest per class and macro, the Brier score, ECE and a reliability diagram (definitions: metrics.py,
``probability_metrics``). 95% confidence intervals by percentile bootstrap over cases for the mean
Dice of each region, macro-F1 and accuracy.

Every input is checked (files present, CSVs, class indices, voxel grids) before any voxel is read, so bad
input fails fast with a message naming the case.

Python API: ``evaluate(pred_dir, gt, ...) -> dict`` and ``format_table(results) -> str``.

The results (and ``--json``): ``dice`` holds the mean Dice per region (``{"whole_pancreas": 0.93, ...}``) and
``ci95.dice`` their intervals, so region names never meet metric names; the classification metrics are top-level.
"""
import os
from typing import Optional

import numpy as np

from typing import Dict, Iterable

from multitask_nnunet.io.class_csv import (PROBABILITIES_CSV, RESULTS_CSV, probability_class_names, read_case_classes,
                                        read_probabilities_csv, strip_ending)
from multitask_nnunet.errors import InputError, warn
from multitask_nnunet.evaluation.ground_truth import GroundTruth, read_ground_truth
from multitask_nnunet.io.labels import default_regions
from multitask_nnunet.evaluation.report import format_table
from multitask_nnunet.io.nifti import check_same_grid, read_label_map

__all__ = ["evaluate", "format_table", "add_parser"]

CONFUSION_MATRIX_PNG = "confusion_matrix.png"
RELIABILITY_PNG = "reliability_diagram.png"


def evaluate(pred_dir, gt, dataset_json: Optional[str] = None, json_file: Optional[str] = None,
             n_bootstrap: int = 1000, seed: int = 0, only_predicted: bool = False) -> dict:
    """Evaluate, write ``confusion_matrix.png`` (beside ``json_file``, else into ``pred_dir``) and, if asked,
    the JSON; return the results (JSON-ready: undefined numbers are None).

    ``dataset_json``: a dataset.json whose ``labels`` define the regions (and ``classification.class_names``
    the classes) for a ground truth that has none. ``only_predicted``: evaluate only the ground-truth cases
    that have a prediction (e.g. one cross-validation fold of a raw dataset) instead of refusing."""
    pred_dir, gt = os.fspath(pred_dir), os.fspath(gt)
    if n_bootstrap < 0:
        raise InputError(f"bootstrap resamples must be >= 0, got {n_bootstrap}")
    truth = read_ground_truth(gt, dataset_json)
    cases, missing, predicted, class_names = _checked_inputs(pred_dir, truth, gt, only_predicted)

    # imported only now: nnU-Net pulls in torch, which would slow down every CLI call and every input error
    from multitask_nnunet.evaluation import metrics, report

    regions, dice, has_gt = _dice_table(truth, cases, pred_dir, metrics.case_dice)
    names = list(regions)
    y_true = np.array([truth.classes[c] for c in cases])
    y_pred = np.array([predicted[c] for c in cases])
    segmentation = metrics.segmentation_summary(dice, names, has_gt)
    classification = metrics.classification_metrics(y_true, y_pred, class_names)
    ci95 = {}
    if n_bootstrap:
        ci = metrics.bootstrap_ci(dice, y_true, y_pred, n_bootstrap, seed)
        ci95 = {"dice": {n: ci["dice"][j] for j, n in enumerate(names)},
                "macro_f1": ci["macro_f1"], "accuracy": ci["accuracy"]}

    plots = os.path.dirname(os.path.abspath(json_file)) if json_file else pred_dir
    png = os.path.join(plots, CONFUSION_MATRIX_PNG)
    probabilities, note = _case_probabilities(pred_dir, cases, len(class_names), truth.file_ending)
    if probabilities is not None:
        scores = metrics.probability_metrics(y_true, probabilities, class_names)
        scores["reliability_diagram_png"] = os.path.join(plots, RELIABILITY_PNG)
    else:
        scores = {"roc_auc": None, "brier": None, "ece": None, "reliability": None, "reliability_diagram_png": None}
    results = report.json_ready({
        "dice": {n: segmentation[n]["mean_dice"] for n in names},
        **{k: classification[k] for k in ("macro_f1", "accuracy", "balanced_accuracy", "confusion_matrix")},
        "class_names": class_names,
        "regions": {n: list(labels) for n, labels in regions.items()},
        "ignore_label": truth.region_spec.ignore_label,
        "n_cases": len(cases),
        "n_cases_with_segmentation_gt": int(has_gt.sum()),
        "segmentation": segmentation,
        "per_class": classification["per_class"],
        "per_case": [{"case": c, "true_class": int(y_true[i]), "predicted_class": int(y_pred[i]),
                      "has_segmentation_gt": bool(has_gt[i]),
                      "dice": dict(zip(names, dice[i])) if has_gt[i] else None} for i, c in enumerate(cases)],
        "ci95": ci95,
        "bootstrap": {"n_resamples": n_bootstrap, "seed": seed},
        "ground_truth": {"path": gt, "layout": truth.layout},
        "predictions": pred_dir,
        "cases_without_prediction": missing,
        "confusion_matrix_png": png,
        **scores,
        "probability_metrics_note": note,
    })
    report.save_confusion_matrix_png(results, png)
    if results["reliability_diagram_png"]:
        report.save_reliability_png(results, results["reliability_diagram_png"])
    if json_file:
        report.write_json(results, json_file)
    return results


def _case_probabilities(pred_dir: str, cases, num_classes: int, file_ending: str):
    """(cases x K probabilities from ``class_probabilities.csv``, None) or (None, why the probability metrics are
    left out)."""
    path = os.path.join(pred_dir, PROBABILITIES_CSV)
    if not os.path.isfile(path):
        return None, f"no {PROBABILITIES_CSV} in {pred_dir}: ROC-AUC, Brier score, ECE and the reliability diagram " \
                     f"are left out"
    rows = {strip_ending(name, file_ending): p for name, p in read_probabilities_csv(path).items()}
    missing = [c for c in cases if c not in rows]
    if missing:
        return None, f"{path}: no row for case '{missing[0]}' ({len(missing)} missing): probability metrics left out"
    wrong = [c for c in cases if len(rows[c]) != num_classes]
    if wrong:
        return None, (f"{path}: case '{wrong[0]}' has {len(rows[wrong[0]])} probabilities, expected {num_classes}: "
                      f"probability metrics left out")
    return np.stack([rows[c] for c in cases]), None


def _checked_inputs(pred_dir: str, truth: GroundTruth, gt: str, only_predicted: bool):
    """Every check that needs no voxel data: cases to evaluate, those without a prediction, predicted
    classes, class names."""
    predicted = read_predicted_classes(pred_dir, truth.file_ending)
    missing = [c for c in truth.masks if not os.path.isfile(prediction_file(pred_dir, c, truth.file_ending))]
    if missing and not only_predicted:
        raise InputError(f"case '{missing[0]}': prediction "
                         f"{prediction_file(pred_dir, missing[0], truth.file_ending)} not found"
                         + (f" ({len(missing)} ground-truth cases have no prediction)" if len(missing) > 1 else ""))
    cases = [c for c in truth.masks if c not in missing]
    if not cases:
        raise InputError(f"{pred_dir}: no prediction for any of the {len(truth.masks)} ground-truth cases in {gt}")
    results_csv = os.path.join(pred_dir, RESULTS_CSV)
    for case in cases:
        if case not in predicted:
            raise InputError(f"{results_csv}: case '{case}' is missing")
    unknown = sorted(set(predicted) - set(truth.masks))
    if unknown:
        shown = ", ".join(f"'{c}'" for c in unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        warn(f"{results_csv}: {len(unknown)} row(s) for cases not in the ground truth {gt} are ignored: {shown}")
    # the model's class names (prob_<name> columns) count the classes even when the cases do not cover them all
    class_names = truth.class_names or probability_class_names(os.path.join(pred_dir, PROBABILITIES_CSV)) or \
        truth.default_class_names
    check_class_range(truth.classes, cases, len(class_names), f"ground truth {gt}")
    check_class_range(predicted, cases, len(class_names), results_csv)
    for case in cases:  # headers only: a prediction on another grid would give a meaningless Dice
        check_same_grid(case, prediction_file(pred_dir, case, truth.file_ending), truth.masks[case],
                        ("prediction", "ground truth"))
    return cases, missing, predicted, class_names


def prediction_file(pred_dir: str, case: str, file_ending: str) -> str:
    return os.path.join(pred_dir, case + file_ending)


def read_predicted_classes(pred_dir: str, file_ending: str) -> Dict[str, int]:
    if not os.path.isdir(pred_dir):
        raise InputError(f"{pred_dir}: prediction folder not found")
    return read_case_classes(os.path.join(pred_dir, RESULTS_CSV), file_ending)


def check_class_range(classes: Dict[str, int], cases: Iterable[str], num_classes: int, source: str) -> None:
    """A class index outside [0, num_classes) would silently grow the confusion matrix; refuse it instead."""
    for case in cases:
        if not 0 <= classes[case] < num_classes:
            raise InputError(f"{source}: case '{case}' has class {classes[case]}, "
                             f"expected a class index in [0, {num_classes - 1}]")


def _dice_table(truth: GroundTruth, cases, pred_dir: str, case_dice):
    """Regions and the cases x regions Dice matrix (NaN: undefined) plus which cases have segmentation truth.

    Without region definitions, each case is scored on the labels it holds (truth or prediction) and the
    regions reported are those of the labels found in the truth; a label absent from both is NaN, as it
    would have been had it been scored."""
    per_case, gt_labels = {}, set()
    for case in cases:
        gt_map = read_label_map(truth.masks[case])
        pred_map = read_label_map(prediction_file(pred_dir, case, truth.file_ending))
        regions = truth.region_spec.regions
        if regions is None:
            found = set(np.unique(gt_map).tolist())
            gt_labels |= found
            regions = default_regions(found | set(np.unique(pred_map).tolist()))
        per_case[case] = case_dice(gt_map, pred_map, regions, truth.region_spec.ignore_label)
    regions = truth.region_spec.regions or default_regions(gt_labels)
    has_gt = np.array([per_case[c] is not None for c in cases])
    dice = np.array([[(per_case[c] or {}).get(n, np.nan) for n in regions] for c in cases], dtype=float)
    return regions, dice.reshape(len(cases), len(regions)), has_gt


def _run(args) -> int:
    results = evaluate(args.pred, args.gt, dataset_json=args.dataset_json, json_file=args.json,
                       n_bootstrap=args.bootstrap, seed=args.seed, only_predicted=args.only_predicted)
    print(format_table(results))
    where = "beside the --json file" if args.json else "into the prediction folder (--json FILE puts it beside FILE)"
    print(f"\nconfusion matrix plot written {where}: {results['confusion_matrix_png']}")
    if results["reliability_diagram_png"]:
        print(f"reliability diagram written {where}: {results['reliability_diagram_png']}")
    else:
        print(results["probability_metrics_note"])
    if args.json:
        print(f"results: {args.json}")
    return 0


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate", help="Dice per region and classification metrics of a prediction folder",
        description="Score the output of 'multitask-nnunet predict' (<case>.nii.gz label maps and "
                    "subtype_results.csv) against ground truth. GT is an nnU-Net raw dataset (dataset.json with a "
                    "'classification' entry + labelsTr/), a folder of masks with classes.csv (Names,Subtype), or "
                    "a folder with class subfolders <prefix><k>/<case>.nii.gz (e.g. validation/subtype0/). "
                    "Regions come from dataset.json 'labels'; without a dataset.json: one region per label value "
                    "plus 'foreground'. A region empty in both truth and prediction has no Dice (nnU-Net: NaN) "
                    "and is left out of the mean.")
    parser.add_argument("--pred", required=True, metavar="OUT_DIR", help="prediction folder")
    parser.add_argument("--gt", required=True, metavar="GT", help="ground-truth folder (see above)")
    parser.add_argument("--dataset-json", metavar="FILE",
                        help="dataset.json giving the regions (labels) and class names, e.g. the converted "
                             "dataset's; replaces GT/dataset.json for a raw dataset")
    parser.add_argument("--json", metavar="FILE", help="also write all results as JSON here")
    parser.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                        help="bootstrap resamples for the 95%% CIs (0: none; default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    parser.add_argument("--only-predicted", action="store_true",
                        help="evaluate only the ground-truth cases that have a prediction instead of failing")
    parser.set_defaults(func=_run)
