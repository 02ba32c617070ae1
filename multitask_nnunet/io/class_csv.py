"""The class CSV format: the one module that reads and writes case classes and class probabilities.

- ``subtype_results.csv`` (``RESULTS_CSV``): the header ``Names,Subtype`` that the pancreas quiz expects; Names is
  the case name plus the file ending (``quiz_037.nii.gz``), Subtype the predicted class index. ``predict`` and
  final validation write it.
- ``class_probabilities.csv`` (``PROBABILITIES_CSV``): the same two columns, optionally ``True`` (validation),
  then one ``prob_<class name>`` column per class (``PROBABILITY_PREFIX``), then ``entropy`` (nats) and
  ``confidence`` (the maximum probability) of those probabilities (multitask_nnunet.calibration), then any extra
  per-case columns a run adds (``mutual_information`` with ``predict --mc-dropout``). Only ``prob_`` columns
  are probabilities.
- ``classes.csv`` (``GROUND_TRUTH_CSV``): ground-truth classes in the ``Names,Subtype`` format, beside the masks of
  a flat ground-truth folder (``make-synthetic`` writes its test labels so; ``evaluate`` reads them).

Rows name a case with or without the file ending; readers return bare case names only where they are given
the ending (``read_case_classes``).
"""
import csv
import io
import os
from typing import Dict, List, Optional

import numpy as np

from multitask_nnunet.io.atomic import atomic_write_text
from multitask_nnunet.errors import InputError

RESULTS_CSV = "subtype_results.csv"
PROBABILITIES_CSV = "class_probabilities.csv"
GROUND_TRUTH_CSV = "classes.csv"
HEADER = ["Names", "Subtype"]
TRUE_COLUMN = "True"
PROBABILITY_PREFIX = "prob_"
UNCERTAINTY_COLUMNS = ("entropy", "confidence")
_FIXED_COLUMNS = {*HEADER, TRUE_COLUMN, *UNCERTAINTY_COLUMNS}


def _csv_text(header: List[str], rows: List[list]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- writing
def write_case_classes(path: str, classes: Dict[str, int]) -> None:
    """``{Names: class index}`` as a ``Names,Subtype`` file, sorted by name, written atomically."""
    atomic_write_text(os.fspath(path), _csv_text(HEADER, [[n, int(classes[n])] for n in sorted(classes)]))


def write_class_csvs(folder: str, probabilities: Dict[str, np.ndarray], class_names: List[str],
                     true_labels: Optional[Dict[str, int]] = None,
                     extra_columns: Optional[Dict[str, Dict[str, float]]] = None) -> None:
    """Write both prediction CSVs for ``{Names: probabilities}``, sorted by name; ``true_labels`` adds a ``True``
    column to the probabilities file (used for validation); ``extra_columns`` ``{name: {column: value}}`` adds
    those columns after ``confidence`` (empty where a case has none)."""
    from multitask_nnunet.calibration import class_uncertainty
    extra_columns = extra_columns or {}
    extras = sorted({c for n in probabilities for c in extra_columns.get(n, {})})
    names = sorted(probabilities)
    write_case_classes(f"{folder}/{RESULTS_CSV}", {n: int(np.argmax(probabilities[n])) for n in names})
    header = HEADER + ([TRUE_COLUMN] if true_labels is not None else []) + \
        [f"{PROBABILITY_PREFIX}{c}" for c in class_names] + list(UNCERTAINTY_COLUMNS) + extras
    rows = []
    for n in names:
        uncertainty = class_uncertainty(probabilities[n])
        rows.append([n, int(np.argmax(probabilities[n]))] + ([true_labels[n]] if true_labels is not None else []) +
                    [f"{float(p):.6f}" for p in probabilities[n]] +
                    [f"{uncertainty[c]:.6f}" for c in UNCERTAINTY_COLUMNS] +
                    [_number(extra_columns.get(n, {}).get(c)) for c in extras])
    atomic_write_text(f"{folder}/{PROBABILITIES_CSV}", _csv_text(header, rows))


# ---------------------------------------------------------------------------------------------- reading
def strip_ending(name: str, file_ending: str) -> str:
    """``quiz_037.nii.gz`` -> ``quiz_037``; a bare case name is accepted as it is."""
    return name[:-len(file_ending)] if name.endswith(file_ending) else name


def read_case_classes(path: str, file_ending: str = ".nii.gz") -> Dict[str, int]:
    """Case name (without ``file_ending``) -> class index, from a ``Names,Subtype`` file (``subtype_results.csv``
    or a ground-truth ``classes.csv``). Strict: the header, two columns, integer classes, no case twice."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: file not found")
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = [row for row in csv.reader(f) if any(cell.strip() for cell in row)]
    found = ",".join(rows[0]) if rows else "an empty file"
    if not rows or [cell.strip() for cell in rows[0]] != HEADER:
        raise InputError(f"{path}: header must be '{','.join(HEADER)}', found {found!r}")
    classes = {}
    for row in rows[1:]:
        if len(row) != len(HEADER):
            raise InputError(f"{path}: row {','.join(row)!r} must have the 2 columns {','.join(HEADER)}")
        case = strip_ending(row[0].strip(), file_ending)
        try:
            label = int(row[1].strip())
        except ValueError:
            raise InputError(f"{path}: case '{case}' has class {row[1].strip()!r}, expected an integer class index")
        if case in classes:
            raise InputError(f"{path}: case '{case}' is listed more than once")
        classes[case] = label
    return classes


def read_probabilities_csv(path: str) -> Dict[str, np.ndarray]:
    """``{Names: probabilities}`` from a class_probabilities.csv (used to resume batch prediction)."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    return {r["Names"]: np.array([float(v) for k, v in r.items() if k.startswith(PROBABILITY_PREFIX)]) for r in rows}


def read_extra_columns(path: str) -> Dict[str, Dict[str, float]]:
    """``{Names: {column: value}}`` of the extra columns (not probabilities, entropy or confidence, which follow
    from the probabilities) of a class_probabilities.csv; empty cells are left out."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    return {r["Names"]: {k: float(v) for k, v in r.items() if k not in _FIXED_COLUMNS and
                         not k.startswith(PROBABILITY_PREFIX) and v not in ("", None)} for r in rows}


def _number(value: Optional[float]) -> str:
    return "" if value is None else f"{float(value):.6f}"


def probability_class_names(path: str) -> Optional[List[str]]:
    """The class names of a class_probabilities.csv's ``prob_<name>`` columns; None without the file or columns."""
    if not os.path.isfile(path):
        return None
    with open(path, newline="", encoding="utf-8-sig") as f:
        header = next(csv.reader(f), [])
    names = [c.strip()[len(PROBABILITY_PREFIX):] for c in header if c.strip().startswith(PROBABILITY_PREFIX)]
    return names or None
