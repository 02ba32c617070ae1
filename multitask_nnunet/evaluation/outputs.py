"""The result files: JSON and the confusion-matrix PNG.

Both are written to a temporary name and renamed, so a reader never sees half a file.
"""
import json
import math
import os
import tempfile

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import ConfusionMatrixDisplay

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


def _atomic_write(path: str, write) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_json(results: dict, path: str) -> None:
    _atomic_write(path, lambda f: f.write(json.dumps(results, indent=2).encode() + b"\n"))


def save_confusion_matrix_png(results: dict, path: str) -> None:
    fig = Figure(figsize=(1.2 * len(results["class_names"]) + 2.5, 1.2 * len(results["class_names"]) + 2))
    ax = fig.subplots()
    ConfusionMatrixDisplay(confusion_matrix=np.array(results["confusion_matrix"]),
                           display_labels=results["class_names"]).plot(ax=ax, cmap="Blues", colorbar=False)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"macro-F1 {format_number(results['macro_f1'])}, accuracy {format_number(results['accuracy'])}")
    fig.tight_layout()
    _atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
