"""The ``labels`` of dataset.json: what a mask may hold, how nnU-Net trains it, which regions are scored.

Every reader of a ``labels`` entry goes through this module. A spec is checked here as nnU-Net's
``LabelManager`` would read it (the tests compare the two), and the service reads a model's labels through
that model's own ``LabelManager``, so that conversion, evaluation and the service read labels the way
planning, training and inference do. Checking a spec does not import nnU-Net's label handling, which
imports torch: a command refusing its input answers at once.

A spec is nnU-Net's format: ``labels`` maps names to a label or, for region-based training, a list of
labels; ``regions_class_order`` is required with regions. The package default is generic: two nested
structures, label 1 inside which lies label 2 (an organ with a lesion), trained as the regions
"foreground" = {1, 2} and "label_2" = {2}. Other datasets pass their own spec (``--labels-json``), e.g.::

    {"labels": {"background": 0, "whole_pancreas": [1, 2], "pancreas_lesion": 2},
     "regions_class_order": [1, 2]}

An ``"ignore"`` label is added by the converter itself, only when some cases have no mask.

Scored regions (evaluation). A region is a set of label values (a voxel belongs to it if its label is one of
them), as in nnU-Net.

* With a dataset.json, its ``labels`` define the regions. Region-based datasets (some entry is a list of
  labels, e.g. ``"whole_pancreas": [1, 2], "pancreas_lesion": 2``) are scored on exactly those regions.
  Label-based datasets (``"pancreas": 1, "lesion": 2``) are scored per label plus a ``foreground`` union of
  all labels, because the union (e.g. the whole organ including its lesion) is usually a headline number too.
  ``labels["ignore"]`` (nnU-Net's ignore label) marks voxels that are left out of every Dice.
* Without one (a quiz-layout or flat ground truth), nothing is assumed about what the labels mean: one region
  ``label_<v>`` per foreground label value found in the ground truth, plus ``foreground`` (any label > 0).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Iterable, List, Optional, Tuple, Union

import numpy as np

if TYPE_CHECKING:
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

from multitask_nnunet.errors import InputError
from multitask_nnunet.io.nifti import labels_volume_ml

IGNORE = "ignore"
FOREGROUND = "foreground"

Regions = Dict[str, Tuple[int, ...]]


def members(value) -> Tuple[int, ...]:
    """The label values of one ``labels`` entry: a label, or a region's list of labels."""
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


@dataclass(frozen=True)
class LabelSpec:
    labels: Dict[str, Union[int, List[int]]]
    regions_class_order: Optional[List[int]] = None

    def __post_init__(self):
        check_label_spec(self.labels, self.regions_class_order, "label spec")

    @property
    def values(self) -> List[int]:
        """Every integer a converted mask may contain (ignore label included if the spec declares one): the
        labels of nnU-Net's ``LabelManager`` plus its ignore label, read off the checked spec."""
        return sorted({int(v) for value in self.labels.values() for v in members(value)})

    def with_ignore(self) -> "LabelSpec":
        """The spec plus an ignore label one above the highest label, as nnU-Net requires."""
        if IGNORE in self.labels:
            return self
        return LabelSpec({**self.labels, IGNORE: max(self.values) + 1}, self.regions_class_order)


def check_label_spec(labels, regions_class_order, source: str) -> None:
    """Refuse a spec nnU-Net would reject later (with an assertion deep inside planning)."""
    if not isinstance(labels, dict) or not labels:
        raise InputError(f"{source}: 'labels' must map label names to an integer or a list of integers")
    for name, value in labels.items():
        values = members(value)
        if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values):
            raise InputError(f"{source}: label '{name}' is {value!r}; expected a non-negative integer or a list "
                             f"of them")
    if labels.get("background") != 0:
        raise InputError(f"{source}: 'labels' must contain \"background\": 0")
    if IGNORE in labels and isinstance(labels[IGNORE], list):
        raise InputError(f"{source}: the '{IGNORE}' label must be a single integer")
    plain = sorted({v for k, r in labels.items() if k != IGNORE for v in members(r)})
    if plain != list(range(len(plain))):
        raise InputError(f"{source}: labels must be consecutive integers 0, 1, 2, ...; got {plain}")
    if IGNORE in labels and labels[IGNORE] != plain[-1] + 1:
        raise InputError(f"{source}: the '{IGNORE}' label must be {plain[-1] + 1} (one above the highest label)")
    regions = [r for r in labels.values() if isinstance(r, list) and len(r) > 1]
    if regions:
        num_regions = sum(1 for k, r in labels.items() if k != IGNORE and r != 0 and r != [0])
        if not isinstance(regions_class_order, list) or len(regions_class_order) != num_regions:
            raise InputError(f"{source}: region-based labels need 'regions_class_order' with one label per "
                             f"region ({num_regions}); got {regions_class_order!r}")


def read_label_spec(path: Path) -> LabelSpec:
    """Read ``{"labels": {...}, "regions_class_order": [...]}`` from a JSON file."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read label spec: {e}") from None
    if not isinstance(data, dict) or "labels" not in data:
        raise InputError(f"{path}: expected a JSON object with 'labels' (and 'regions_class_order' for regions)")
    check_label_spec(data["labels"], data.get("regions_class_order"), str(path))
    return LabelSpec(data["labels"], data.get("regions_class_order"))


DEFAULT_LABELS = LabelSpec({"background": 0, "foreground": [1, 2], "label_2": 2}, [1, 2])


@dataclass(frozen=True)
class RegionSpec:
    regions: Optional[Regions]  # None: derive from the label values found (see default_regions)
    ignore_label: Optional[int]


def regions_from_labels(labels, source: str) -> RegionSpec:
    """Scored regions from a dataset.json ``labels`` entry; ``source`` names the file in error messages.

    Evaluation scores any ground truth a dataset.json names, so it asks less than training does: label values
    need not be consecutive, and regions need no ``regions_class_order``."""
    if not isinstance(labels, dict) or labels.get("background") != 0:
        raise InputError(f"{source}: 'labels' must be a mapping with \"background\": 0")
    ignore_label = labels.get(IGNORE)
    if ignore_label is not None and (isinstance(ignore_label, bool) or not isinstance(ignore_label, int)):
        raise InputError(f"{source}: 'labels.ignore' must be an integer label value, found {ignore_label!r}")
    regions = {}
    for name, value in labels.items():
        if name in ("background", IGNORE):
            continue
        values = members(value)
        if not values or any(isinstance(v, bool) or not isinstance(v, int) for v in values):
            raise InputError(f"{source}: label '{name}' must be an integer or a list of integers, found {value!r}")
        regions[name] = tuple(sorted(set(values)))
    if not regions:
        raise InputError(f"{source}: 'labels' defines no foreground label")
    region_based = any(len(v) > 1 for v in regions.values())
    if not region_based and FOREGROUND not in regions:
        regions[FOREGROUND] = tuple(sorted({v for r in regions.values() for v in r}))
    return RegionSpec(regions, ignore_label)


def default_regions(label_values: Iterable[int]) -> Regions:
    """One region per foreground label value plus their union; the label values are those that occur."""
    values = sorted({int(v) for v in label_values if v > 0})
    regions = {f"label_{v}": (v,) for v in values}
    regions[FOREGROUND] = tuple(values)
    return regions


def volumes_ml(segmentation: np.ndarray, spacing, manager: LabelManager) -> Dict[str, float]:
    """Millilitres per label or region of a model's ``LabelManager`` (a region: the voxels holding any of its
    labels); background has no volume."""
    volumes = {}
    for name, value in manager.label_dict.items():
        values = [int(v) for v in members(value)]
        if any(values):
            volumes[name] = round(labels_volume_ml(segmentation, spacing, values), 4)
    return volumes
