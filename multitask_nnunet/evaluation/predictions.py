"""The prediction folder written by ``multitask-nnunet predict``: ``<case><ending>`` label maps,
``subtype_results.csv`` (``Names,Subtype``) and, optionally, ``class_probabilities.csv``."""
import csv
import os
from typing import Dict, List, Optional

from multitask_nnunet.class_csv import PROBABILITIES_CSV, RESULTS_CSV
from multitask_nnunet.errors import InputError
from multitask_nnunet.evaluation.case_classes import read_case_classes

PROBABILITY_PREFIX = "prob_"


def prediction_file(pred_dir: str, case: str, file_ending: str) -> str:
    return os.path.join(pred_dir, case + file_ending)


def read_predicted_classes(pred_dir: str, file_ending: str) -> Dict[str, int]:
    if not os.path.isdir(pred_dir):
        raise InputError(f"{pred_dir}: prediction folder not found")
    return read_case_classes(os.path.join(pred_dir, RESULTS_CSV), file_ending)


def class_names_from_probabilities(pred_dir: str) -> Optional[List[str]]:
    """The model's class names, from the ``prob_<name>`` columns, so that the number of classes is known even
    when the evaluated cases do not cover every class."""
    path = os.path.join(pred_dir, PROBABILITIES_CSV)
    if not os.path.isfile(path):
        return None
    with open(path, newline="", encoding="utf-8-sig") as f:
        header = next(csv.reader(f), [])
    names = [c.strip()[len(PROBABILITY_PREFIX):] for c in header if c.strip().startswith(PROBABILITY_PREFIX)]
    return names or None
