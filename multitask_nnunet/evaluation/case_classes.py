"""The ``Names,Subtype`` case-class CSV format.

``predict`` writes the predicted classes as ``subtype_results.csv`` in this format and a flat ground-truth
folder carries its classes as ``classes.csv`` in the same format, so both go through this one strict reader.
"""
import csv
import os
from typing import Dict, Iterable

from multitask_nnunet.errors import InputError

HEADER = ["Names", "Subtype"]


def strip_ending(name: str, file_ending: str) -> str:
    """``quiz_037.nii.gz`` -> ``quiz_037``; a bare case name is accepted as it is."""
    return name[:-len(file_ending)] if name.endswith(file_ending) else name


def read_case_classes(path: str, file_ending: str = ".nii.gz") -> Dict[str, int]:
    """Case name -> class index; rows name a case with or without ``file_ending``."""
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


def check_class_range(classes: Dict[str, int], cases: Iterable[str], num_classes: int, source: str) -> None:
    """A class index outside [0, num_classes) would silently grow the confusion matrix; refuse it instead."""
    for case in cases:
        if not 0 <= classes[case] < num_classes:
            raise InputError(f"{source}: case '{case}' has class {classes[case]}, "
                             f"expected a class index in [0, {num_classes - 1}]")
