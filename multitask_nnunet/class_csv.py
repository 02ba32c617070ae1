"""The classification output files: ``subtype_results.csv`` and ``class_probabilities.csv``.

``subtype_results.csv`` has the header ``Names,Subtype`` that the pancreas quiz expects (Names is the case
name plus the file ending, e.g. ``quiz_037.nii.gz``; Subtype the predicted class index).
``class_probabilities.csv`` adds one ``prob_<class name>`` column per class.
"""
import csv
import io
from typing import Dict, List, Optional

import numpy as np

from multitask_nnunet.atomic import atomic_write_text

RESULTS_CSV = "subtype_results.csv"
PROBABILITIES_CSV = "class_probabilities.csv"


def _csv_text(header: List[str], rows: List[list]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def write_class_csvs(folder: str, probabilities: Dict[str, np.ndarray], class_names: List[str],
                     true_labels: Optional[Dict[str, int]] = None) -> None:
    """Write both CSVs for ``{name: probabilities}``, sorted by name; ``true_labels`` adds a ``True`` column
    to the probabilities file (used for validation)."""
    names = sorted(probabilities)
    results = [[n, int(np.argmax(probabilities[n]))] for n in names]
    atomic_write_text(f"{folder}/{RESULTS_CSV}", _csv_text(["Names", "Subtype"], results))
    header = ["Names", "Subtype"] + (["True"] if true_labels is not None else []) + \
             [f"prob_{c}" for c in class_names]
    rows = [[n, int(np.argmax(probabilities[n]))] + ([true_labels[n]] if true_labels is not None else []) +
            [f"{float(p):.6f}" for p in probabilities[n]] for n in names]
    atomic_write_text(f"{folder}/{PROBABILITIES_CSV}", _csv_text(header, rows))


def read_probabilities_csv(path: str) -> Dict[str, np.ndarray]:
    """``{Names: probabilities}`` from a class_probabilities.csv (used to resume batch prediction)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {r["Names"]: np.array([float(v) for k, v in r.items() if k.startswith("prob_")]) for r in rows}
