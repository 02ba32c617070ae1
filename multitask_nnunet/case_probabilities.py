"""Case-level class probabilities from patch-level outputs.

Public multi-task projects reported F1 per patch; here a case's class probabilities are the mean over all
of its patches, and metrics are computed over cases.
"""
from collections import defaultdict
from typing import Dict, Iterable

import numpy as np


def mean_probabilities_per_case(keys: Iterable[str], probabilities: Iterable[Iterable[float]]) -> Dict[str, np.ndarray]:
    grouped = defaultdict(list)
    for key, p in zip(keys, probabilities):
        grouped[key].append(np.asarray(p, dtype=np.float64))
    return {k: np.mean(v, axis=0) for k, v in grouped.items()}
