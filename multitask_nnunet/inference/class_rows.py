"""The class rows of a prediction folder, kept on disk after every case so that a crash loses no finished case.

Files (all written atomically, by ``class_csv.write_class_csvs``):

- ``OUT_DIR/class_probabilities.csv`` + ``subtype_results.csv``: the merged result, one row per case.
- ``OUT_DIR/parts/part_<I>/`` (same two files): what part I of a sharded run (``--num-parts``) has finished.
  Parts never write each other's files, so they can run at the same time into one OUT_DIR.

Rows found on disk are merged with the newest file winning per case (by modification time), so a later
``--overwrite`` run, sharded or not, replaces older rows wherever they are. Rows are never dropped: rows of
cases not in the current input stay.
"""
import glob
import os
from typing import Callable, Dict, Iterable, List, Optional

import numpy as np

from multitask_nnunet.io.class_csv import PROBABILITIES_CSV, read_extra_columns, read_probabilities_csv, write_class_csvs

PARTS_FOLDER = "parts"


def part_folder(output_folder: str, part_id: int) -> str:
    return os.path.join(output_folder, PARTS_FOLDER, f"part_{part_id}")


def _sources(output_folder: str) -> List[str]:
    files = [os.path.join(output_folder, PROBABILITIES_CSV)] + \
            glob.glob(os.path.join(output_folder, PARTS_FOLDER, "part_*", PROBABILITIES_CSV))
    return sorted((f for f in files if os.path.isfile(f)), key=os.path.getmtime)


def known_rows(output_folder: str) -> Dict[str, np.ndarray]:
    """``{Names: probabilities}`` from the merged CSV and all part CSVs, newest file winning per case."""
    rows: Dict[str, np.ndarray] = {}
    for source in _sources(output_folder):
        rows.update(read_probabilities_csv(source))
    return rows


def known_extra_columns(output_folder: str) -> Dict[str, Dict[str, float]]:
    """``{Names: {column: value}}`` of the extra columns (e.g. ``mutual_information``), newest file winning."""
    rows: Dict[str, Dict[str, float]] = {}
    for source in _sources(output_folder):
        rows.update(read_extra_columns(source))
    return rows


def _same(a: Dict[str, np.ndarray], b: Dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.allclose(a[k], b[k], atol=1e-6) for k in a)


class ClassRows:
    """Adds a finished case's row and rewrites this writer's CSVs at once: the merged ones for an unsharded
    run, ``parts/part_<I>/`` (rows of this part's cases only) for part I of a sharded one.

    ``class_names`` is called the first time a CSV is written: the names come from the model's checkpoint,
    which a run with nothing to predict need not load unless it has CSVs to write."""

    def __init__(self, output_folder: str, class_names: Callable[[], List[str]], part_id: Optional[int] = None,
                 part_cases: Iterable[str] = ()):
        self.output_folder = output_folder
        self._class_names = class_names
        self._names: Optional[List[str]] = None
        self.part_id = part_id
        self.part_cases = set(part_cases)
        self.new: Dict[str, np.ndarray] = {}
        self.new_extra: Dict[str, Dict[str, float]] = {}

    @property
    def class_names(self) -> List[str]:
        if self._names is None:
            self._names = list(self._class_names())
        return self._names

    def add(self, name: str, probabilities: np.ndarray, extra: Optional[Dict[str, float]] = None) -> None:
        """``extra``: the case's extra columns (class_csv.py), e.g. ``{"mutual_information": 0.01}``."""
        self.new[name] = probabilities
        self.new_extra[name] = dict(extra or {})
        rows, extras = self._rows()
        if self.part_id is None:
            write_class_csvs(self.output_folder, rows, self.class_names, extra_columns=extras)
        else:
            mine = {n: p for n, p in rows.items() if n in self.part_cases}
            write_class_csvs(part_folder(self.output_folder, self.part_id), mine, self.class_names,
                             extra_columns=extras)

    def _rows(self):
        return ({**known_rows(self.output_folder), **self.new},
                {**known_extra_columns(self.output_folder), **self.new_extra})

    def write_merged(self) -> None:
        """Write the merged CSVs from every row on disk (and this run's), unless they already hold exactly that."""
        rows, extras = self._rows()
        merged = os.path.join(self.output_folder, PROBABILITIES_CSV)
        if not os.path.isfile(merged) or not _same(rows, read_probabilities_csv(merged)) or \
                {n: e for n, e in extras.items() if e} != {n: e for n, e in read_extra_columns(merged).items() if e}:
            write_class_csvs(self.output_folder, rows, self.class_names, extra_columns=extras)
