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
