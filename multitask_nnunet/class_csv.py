"""The classification output files: ``subtype_results.csv`` and ``class_probabilities.csv``.

``subtype_results.csv`` has the header ``Names,Subtype`` that the pancreas quiz expects (Names is the case
name plus the file ending, e.g. ``quiz_037.nii.gz``; Subtype the predicted class index).
``class_probabilities.csv`` adds one ``prob_<class name>`` column per class, then ``entropy`` (nats) and
``confidence`` (the maximum probability) of those probabilities (multitask_nnunet.calibration), then any extra
per-case columns a run adds (``mutual_information`` with ``predict --mc-dropout``). Only ``prob_`` columns
are probabilities.
"""
import csv
import io
from typing import Dict, List, Optional

import numpy as np

from multitask_nnunet.atomic import atomic_write_text

RESULTS_CSV = "subtype_results.csv"
PROBABILITIES_CSV = "class_probabilities.csv"
PROBABILITY_PREFIX = "prob_"
UNCERTAINTY_COLUMNS = ("entropy", "confidence")
_FIXED_COLUMNS = {"Names", "Subtype", "True", *UNCERTAINTY_COLUMNS}


def _csv_text(header: List[str], rows: List[list]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def write_class_csvs(folder: str, probabilities: Dict[str, np.ndarray], class_names: List[str],
                     true_labels: Optional[Dict[str, int]] = None,
                     extra_columns: Optional[Dict[str, Dict[str, float]]] = None) -> None:
    """Write both CSVs for ``{name: probabilities}``, sorted by name; ``true_labels`` adds a ``True`` column
    to the probabilities file (used for validation); ``extra_columns`` ``{name: {column: value}}`` adds those
    columns after ``confidence`` (empty where a case has none)."""
    from multitask_nnunet.calibration import class_uncertainty
    extra_columns = extra_columns or {}
    extras = sorted({c for n in probabilities for c in extra_columns.get(n, {})})
    names = sorted(probabilities)
    results = [[n, int(np.argmax(probabilities[n]))] for n in names]
    atomic_write_text(f"{folder}/{RESULTS_CSV}", _csv_text(["Names", "Subtype"], results))
    header = ["Names", "Subtype"] + (["True"] if true_labels is not None else []) + \
             [f"{PROBABILITY_PREFIX}{c}" for c in class_names] + list(UNCERTAINTY_COLUMNS) + extras
    rows = []
    for n in names:
        uncertainty = class_uncertainty(probabilities[n])
        rows.append([n, int(np.argmax(probabilities[n]))] + ([true_labels[n]] if true_labels is not None else []) +
                    [f"{float(p):.6f}" for p in probabilities[n]] +
                    [f"{uncertainty[c]:.6f}" for c in UNCERTAINTY_COLUMNS] +
                    [_number(extra_columns.get(n, {}).get(c)) for c in extras])
    atomic_write_text(f"{folder}/{PROBABILITIES_CSV}", _csv_text(header, rows))


def read_probabilities_csv(path: str) -> Dict[str, np.ndarray]:
    """``{Names: probabilities}`` from a class_probabilities.csv (used to resume batch prediction)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {r["Names"]: np.array([float(v) for k, v in r.items() if k.startswith(PROBABILITY_PREFIX)])
            for r in rows}


def read_extra_columns(path: str) -> Dict[str, Dict[str, float]]:
    """``{Names: {column: value}}`` of the extra columns (not probabilities, entropy or confidence, which follow
    from the probabilities) of a class_probabilities.csv; empty cells are left out."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {r["Names"]: {k: float(v) for k, v in r.items() if k not in _FIXED_COLUMNS and
                         not k.startswith(PROBABILITY_PREFIX) and v not in ("", None)} for r in rows}


def _number(value: Optional[float]) -> str:
    return "" if value is None else f"{float(value):.6f}"
