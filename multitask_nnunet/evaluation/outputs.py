"""The result files: JSON and the confusion-matrix PNG, both written atomically."""
import json
import math

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import ConfusionMatrixDisplay

from multitask_nnunet.atomic import atomic_path, atomic_write_text
from multitask_nnunet.evaluation.report import format_number


def json_ready(value):
    """NaN becomes None (JSON has no NaN) and numpy values plain Python ones."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def write_json(results: dict, path: str) -> None:
    atomic_write_text(path, json.dumps(results, indent=2) + "\n")


def save_confusion_matrix_png(results: dict, path: str) -> None:
    fig = Figure(figsize=(1.2 * len(results["class_names"]) + 2.5, 1.2 * len(results["class_names"]) + 2))
    ax = fig.subplots()
    ConfusionMatrixDisplay(confusion_matrix=np.array(results["confusion_matrix"]),
                           display_labels=results["class_names"]).plot(ax=ax, cmap="Blues", colorbar=False)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"macro-F1 {format_number(results['macro_f1'])}, accuracy {format_number(results['accuracy'])}")
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def save_reliability_png(results: dict, path: str) -> None:
    """Reliability diagram: accuracy per confidence bin (bars) against the diagonal of perfect calibration."""
    reliability = results["reliability"]
    n = reliability["n_bins"]
    edges = np.linspace(0, 1, n + 1)
    accuracy = np.array([np.nan if a is None else a for a in reliability["accuracy"]], dtype=float)
    confidence = np.array([np.nan if c is None else c for c in reliability["confidence"]], dtype=float)
    fig = Figure(figsize=(4.8, 4.8))
    ax = fig.subplots()
    filled = ~np.isnan(accuracy)
    ax.bar(edges[:-1][filled], accuracy[filled], width=1 / n, align="edge", edgecolor="black", alpha=0.7,
           label="accuracy")
    ax.plot(confidence[filled], accuracy[filled], "o", color="C3", markersize=4,
            label="bin (mean confidence, accuracy)")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (max probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"ECE {format_number(results['ece'])} ({n} bins), Brier {format_number(results['brier'])}")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
