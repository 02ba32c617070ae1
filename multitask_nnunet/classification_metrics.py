"""Case-level classification: patch/tile outputs aggregated per case, then macro-F1, accuracy, confusion.

Public multi-task projects reported F1 per patch; here a case's probabilities are averaged over all of its
patches first, and the metrics are computed over cases. scikit-learn computes the metrics.
"""
from collections import defaultdict
from typing import Dict, Iterable, List

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score


def mean_probabilities_per_case(keys: Iterable[str], probabilities: Iterable[Iterable[float]]) -> Dict[str, np.ndarray]:
    grouped = defaultdict(list)
    for key, p in zip(keys, probabilities):
        grouped[key].append(np.asarray(p, dtype=np.float64))
    return {k: np.mean(v, axis=0) for k, v in grouped.items()}


def classification_metrics(true: List[int], predicted: List[int], num_classes: int) -> dict:
    labels = list(range(num_classes))
    return {
        "macro_f1": float(f1_score(true, predicted, labels=labels, average="macro", zero_division=0)),
        "accuracy": float(accuracy_score(true, predicted)),
        "confusion_matrix": confusion_matrix(true, predicted, labels=labels).tolist(),
        "n_cases": len(true),
    }
