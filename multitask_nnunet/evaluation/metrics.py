"""The numbers: per-case Dice (nnU-Net's definitions), case-level classification metrics (scikit-learn) and
percentile bootstrap confidence intervals over cases.

Classification is scored per case, never per patch (public multi-task projects reported F1 per patch): a
case's class probabilities are the mean over all of its patches (``mean_probabilities_per_case``, used by the
trainer's validation epochs), and metrics are computed over cases.

Dice follows nnU-Net: a region empty in both ground truth and prediction has Dice NaN, which is left out of
the region's mean (and counted, as ``n_empty_both``); voxels with the ignore label count for nothing.
"""
import warnings
from collections import defaultdict
from typing import Dict, Iterable, List, Optional

import numpy as np
from nnunetv2.evaluation.evaluate_predictions import compute_tp_fp_fn_tn, region_or_label_to_mask
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score,
                             precision_recall_fscore_support)

from multitask_nnunet.io.labels import Regions


def case_dice(gt: np.ndarray, pred: np.ndarray, regions: Regions,
              ignore_label: Optional[int]) -> Optional[Dict[str, float]]:
    """Dice per region; None when every ground-truth voxel is ignored (the case has no segmentation truth)."""
    ignore_mask = gt == ignore_label if ignore_label is not None else None
    if ignore_mask is not None and ignore_mask.all():
        return None
    dice = {}
    for name, labels in regions.items():
        tp, fp, fn, _ = compute_tp_fp_fn_tn(region_or_label_to_mask(gt, labels),
                                            region_or_label_to_mask(pred, labels), ignore_mask)
        dice[name] = float("nan") if tp + fp + fn == 0 else float(2 * tp / (2 * tp + fp + fn))
    return dice


def segmentation_summary(dice: np.ndarray, region_names: List[str], has_gt: np.ndarray) -> Dict[str, dict]:
    """``dice``: cases x regions, NaN where undefined; ``has_gt``: which cases have segmentation truth."""
    summary = {}
    for j, name in enumerate(region_names):
        column = dice[has_gt, j]
        defined = ~np.isnan(column)
        summary[name] = {"mean_dice": float(column[defined].mean()) if defined.any() else float("nan"),
                         "n_evaluated": int(defined.sum()), "n_empty_both": int((~defined).sum())}
    return summary


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, class_names: List[str]) -> dict:
    """Macro-F1 averages over the classes present in truth or prediction (scikit-learn's default), so a class
    absent from both does not count as F1 = 0; per-class values that are undefined are NaN."""
    labels = list(range(len(class_names)))
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels,
                                                                     zero_division=np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "y_pred contains classes not in y_true": expected here
        balanced = balanced_accuracy_score(y_true, y_pred)
    return {
        "macro_f1": float(f1_score(y_true, y_pred, average="macro")),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced),
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "per_class": [{"index": k, "name": name, "precision": float(precision[k]), "recall": float(recall[k]),
                       "f1": float(f1[k]), "support": int(support[k])} for k, name in enumerate(class_names)],
    }


def bootstrap_ci(dice: np.ndarray, y_true: np.ndarray, y_pred: np.ndarray, n_resamples: int,
                 seed: int) -> dict:
    """95% percentile intervals, resampling whole cases (the unit of independence) with replacement.

    Returns ``{"dice": regions x 2, "macro_f1": (lo, hi), "accuracy": (lo, hi)}``; NaN where a statistic is
    undefined in every resample (e.g. a region empty in all cases)."""
    idx = np.random.default_rng(seed).integers(0, len(y_true), size=(n_resamples, len(y_true)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a region may be undefined in all drawn cases
        dice_means = np.nanmean(dice[idx], axis=1)
        dice_ci = np.nanpercentile(dice_means, [2.5, 97.5], axis=0).T
    accuracy = (y_true[idx] == y_pred[idx]).mean(axis=1)
    macro_f1 = np.array([f1_score(y_true[i], y_pred[i], average="macro") for i in idx])
    return {"dice": dice_ci,
            "macro_f1": tuple(np.percentile(macro_f1, [2.5, 97.5])),
            "accuracy": tuple(np.percentile(accuracy, [2.5, 97.5]))}


def mean_probabilities_per_case(keys: Iterable[str], probabilities: Iterable[Iterable[float]]) -> Dict[str, np.ndarray]:
    """``{case: mean probabilities}`` over all patches of each case (``keys``: the case of each patch)."""
    grouped = defaultdict(list)
    for key, p in zip(keys, probabilities):
        grouped[key].append(np.asarray(p, dtype=np.float64))
    return {k: np.mean(v, axis=0) for k, v in grouped.items()}


def probability_metrics(y_true: np.ndarray, probabilities: np.ndarray, class_names: List[str],
                        n_bins: Optional[int] = None) -> dict:
    """Metrics of the class probabilities (N, K):

    - ROC-AUC one-vs-rest per class (``roc_auc.per_class``: scikit-learn's ``roc_auc_score`` of ``y == k``
      against ``p_k``; NaN for a class that is absent or alone in the truth) and ``roc_auc.macro``, their mean
      over the defined classes;
    - Brier score, multi-class: mean over cases of sum_k (p_k - [y == k])^2 (0 best, 2 worst);
    - ECE: 15 equal-width bins on the max probability (multitask_nnunet.calibration.ece), and the bins
      (cases, accuracy, mean confidence) for the reliability diagram."""
    from sklearn.metrics import roc_auc_score
    from multitask_nnunet.calibration import ECE_BINS, ece
    n_bins = n_bins or ECE_BINS
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(y_true, dtype=int)
    onehot = np.eye(len(class_names))[y]
    per_class = {}
    for k, name in enumerate(class_names):
        positive = y == k
        per_class[name] = float(roc_auc_score(positive, p[:, k])) if 0 < positive.sum() < len(y) else float("nan")
    defined = [v for v in per_class.values() if not np.isnan(v)]
    auc = {"macro": float(np.mean(defined)) if defined else float("nan"), "per_class": per_class}
    confidence, correct = p.max(1), (p.argmax(1) == y).astype(float)
    bins = np.minimum((confidence * n_bins).astype(int), n_bins - 1)
    counts = [int((bins == b).sum()) for b in range(n_bins)]
    return {"roc_auc": auc,
            "brier": float(((p - onehot) ** 2).sum(1).mean()),
            "ece": ece(p, y, n_bins),
            "reliability": {"n_bins": n_bins, "counts": counts,
                            "accuracy": [float(correct[bins == b].mean()) if counts[b] else float("nan")
                                         for b in range(n_bins)],
                            "confidence": [float(confidence[bins == b].mean()) if counts[b] else float("nan")
                                           for b in range(n_bins)]}}
