"""Cross-validation splits in nnU-Net's ``splits_final.json`` format: a list of ``{"train": [...], "val": [...]}``.

nnU-Net would otherwise draw its own random 5-fold split over all training cases, mixing the dataset's
validation cases into training and ignoring class balance.
"""
import json
from pathlib import Path
from typing import Dict, List, Sequence

from multitask_nnunet.io.atomic import atomic_write_text
from multitask_nnunet.errors import InputError

SPLITS_FILE = "splits_final.json"
SEED = 12345  # nnU-Net's own seed for its default split


def original_split(train: Sequence[str], val: Sequence[str]) -> List[dict]:
    """One fold: the dataset's own train/validation split."""
    return [{"train": sorted(train), "val": sorted(val)}]


def stratified_folds(case_labels: Dict[str, int], folds: int) -> List[dict]:
    """``folds`` folds over all cases, each with about the same class proportions; deterministic."""
    cases = sorted(case_labels)
    if not 2 <= folds <= len(cases):
        raise InputError(f"--folds {folds}: need between 2 and {len(cases)} (the number of cases) folds")
    smallest = min(sum(1 for c in cases if case_labels[c] == k) for k in set(case_labels.values()))
    if smallest < folds:
        raise InputError(f"--folds {folds}: the smallest class has only {smallest} case(s); every class needs at "
                         f"least one case per fold")
    from sklearn.model_selection import StratifiedKFold  # here: importing sklearn costs every CLI call ~1.5 s
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=SEED)
    labels = [case_labels[c] for c in cases]
    return [{"train": sorted(cases[i] for i in tr), "val": sorted(cases[i] for i in va)}
            for tr, va in splitter.split(cases, labels)]


def write_splits(splits: List[dict], path: Path) -> None:
    """Atomic, so a crash never leaves a truncated split that nnU-Net would trust."""
    atomic_write_text(str(path), json.dumps(splits, indent=1) + "\n")
