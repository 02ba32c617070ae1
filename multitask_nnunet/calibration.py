"""Class-probability uncertainty and calibration: entropy, confidence, mutual information, ECE, NLL and
temperature scaling (Guo et al. 2017), the one home of these numbers.

Temperature scaling divides a fold's class logits by one scalar T > 0 before the softmax; T is fitted at the
end of final validation on the fold's validation cases (minimum NLL) and stored in ``fold_X/calibration.json``.
The "logits" it is fitted on and applied to are the log of the fold's class probabilities as the predictor
ensembles them (averaged over TTA mirrors and, in the sliding window, over tiles): for a single pass that is
the head's logits up to a constant, which softmax ignores, and it is what the same predictor yields at
validation and at ``predict``, whatever TTA or tiling ran. A fold's temperature goes with that fold's
probabilities, before the fold average.

Definitions (natural log):
- entropy H(p) = -sum_k p_k log p_k of the ensembled (TTA passes, folds) probability; confidence = max_k p_k;
- mutual information (MC dropout) = H(mean_s p_s) - mean_s H(p_s) over the dropout samples s;
- NLL = mean over cases of -log p_y;
- ECE: 15 equal-width bins on the confidence (max probability) over [0, 1];
  ECE = sum_b (n_b / N) |accuracy_b - mean confidence_b|.
"""
import json
import math
import os
from typing import Dict, Optional, Sequence

import numpy as np

from multitask_nnunet.io.atomic import atomic_write_text

CALIBRATION_JSON = "calibration.json"
ECE_BINS = 15
_EPS = 1e-12
# the bounded search over log T: T in [1/20, 20]
_LOG_T_BOUNDS = (-math.log(20.0), math.log(20.0))


def _as_2d(probabilities) -> np.ndarray:
    p = np.asarray(probabilities, dtype=np.float64)
    return p[None] if p.ndim == 1 else p


def entropy(probabilities) -> np.ndarray:
    """Entropy (nats) of each probability vector along the last axis."""
    p = np.clip(np.asarray(probabilities, dtype=np.float64), _EPS, 1.0)
    return -(p * np.log(p)).sum(-1)


def class_uncertainty(probabilities: np.ndarray) -> Dict[str, float]:
    """``{"entropy": H(p), "confidence": max p}`` of one case's probabilities (K,)."""
    return {"entropy": float(entropy(probabilities)), "confidence": float(np.max(probabilities))}


def mutual_information(samples: np.ndarray) -> float:
    """H(mean_s p_s) - mean_s H(p_s) of the samples (S, K) of one case (MC dropout); >= 0."""
    samples = np.asarray(samples, dtype=np.float64)
    return float(max(0.0, entropy(samples.mean(0)) - entropy(samples).mean()))


def log_probabilities(probabilities) -> np.ndarray:
    return np.log(np.clip(np.asarray(probabilities, dtype=np.float64), _EPS, 1.0))


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def apply_temperature(probabilities, temperature) -> np.ndarray:
    """softmax(log p / T) along the last axis; ``temperature`` a scalar or broadcastable (e.g. (F, 1))."""
    return softmax(log_probabilities(probabilities) / np.asarray(temperature, dtype=np.float64))


def nll(probabilities, labels: Sequence[int]) -> float:
    p = _as_2d(probabilities)
    return float(-np.log(np.clip(p[np.arange(len(p)), np.asarray(labels, dtype=int)], _EPS, 1.0)).mean())


def ece(probabilities, labels: Sequence[int], n_bins: int = ECE_BINS) -> float:
    """Expected calibration error, equal-width bins on the max probability (see the module docstring)."""
    p = _as_2d(probabilities)
    confidence, predicted = p.max(1), p.argmax(1)
    correct = (predicted == np.asarray(labels, dtype=int)).astype(float)
    bins = np.minimum((confidence * n_bins).astype(int), n_bins - 1)  # confidence 1.0 goes in the last bin
    total = 0.0
    for b in range(n_bins):
        inside = bins == b
        if inside.any():
            total += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(total)


def fit_temperature(probabilities, labels: Sequence[int]) -> float:
    """The T > 0 of minimum NLL of softmax(log p / T) on these cases: a bounded scalar search over log T
    (NLL is smooth and unimodal in log T for one scalar)."""
    from scipy.optimize import minimize_scalar
    logits = log_probabilities(_as_2d(probabilities))
    labels = np.asarray(labels, dtype=int)
    result = minimize_scalar(lambda log_t: nll(softmax(logits / math.exp(log_t)), labels),
                             bounds=_LOG_T_BOUNDS, method="bounded", options={"xatol": 1e-5})
    return float(math.exp(result.x))


def fit_calibration(probabilities, labels: Sequence[int]) -> dict:
    """Temperature and the NLL and ECE before and after it, on these (validation) cases. When every case is
    classified correctly, the NLL falls without bound as T -> 0 (each true class is the largest probability, and
    a lower T raises it): nothing to fit, T stays 1 and ``note`` says why."""
    p = _as_2d(probabilities)
    note = None
    if bool((p.argmax(1) == np.asarray(labels, dtype=int)).all()):
        temperature = 1.0
        note = "every validation case is classified correctly: the NLL has no minimum (T -> 0), T left at 1"
    else:
        temperature = fit_temperature(p, labels)
    calibrated = p if note else apply_temperature(p, temperature)
    return {"method": "temperature_scaling", "temperature": temperature, "note": note, "n_cases": int(len(p)),
            "nll_before": nll(p, labels), "nll_after": nll(calibrated, labels),
            "ece_before": ece(p, labels), "ece_after": ece(calibrated, labels), "ece_bins": ECE_BINS,
            "fitted_on": "validation class probabilities of this fold (log p as logits)"}


def write_calibration(fold_folder: str, calibration: dict) -> str:
    path = os.path.join(fold_folder, CALIBRATION_JSON)
    atomic_write_text(path, json.dumps(calibration, indent=2) + "\n")
    return path


def read_temperature(fold_folder: str) -> Optional[float]:
    """The fold's temperature, or None when it has no (readable) calibration.json (models trained before it)."""
    path = os.path.join(fold_folder, CALIBRATION_JSON)
    try:
        with open(path) as f:
            temperature = float(json.load(f)["temperature"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return temperature if math.isfinite(temperature) and temperature > 0 else None
