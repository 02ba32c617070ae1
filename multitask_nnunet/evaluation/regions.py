"""Which regions get a Dice score, and which label is ignored.

A region is a set of label values (a voxel belongs to it if its label is one of them), as in nnU-Net.

* With a dataset.json, its ``labels`` define the regions. Region-based datasets (some entry is a list of
  labels, e.g. ``"whole_pancreas": [1, 2], "pancreas_lesion": 2``) are scored on exactly those regions.
  Label-based datasets (``"pancreas": 1, "lesion": 2``) are scored per label plus a ``foreground`` union of
  all labels, because the union (e.g. the whole organ including its lesion) is usually a headline number too.
  ``labels["ignore"]`` (nnU-Net's ignore label) marks voxels that are left out of every Dice.
* Without one (a quiz-layout or flat ground truth), nothing is assumed about what the labels mean: one region
  ``label_<v>`` per foreground label value found in the ground truth, plus ``foreground`` (any label > 0).
"""
from dataclasses import dataclass
from typing import Dict, Iterable, Optional, Tuple

from multitask_nnunet.errors import InputError

FOREGROUND = "foreground"

Regions = Dict[str, Tuple[int, ...]]


@dataclass(frozen=True)
class RegionSpec:
    regions: Optional[Regions]  # None: derive from the label values found (see default_regions)
    ignore_label: Optional[int]


def regions_from_labels(labels, source: str) -> RegionSpec:
    """Regions from a dataset.json ``labels`` entry; ``source`` names the file in error messages."""
    if not isinstance(labels, dict) or labels.get("background") != 0:
        raise InputError(f"{source}: 'labels' must be a mapping with \"background\": 0")
    ignore_label = labels.get("ignore")
    if ignore_label is not None and (isinstance(ignore_label, bool) or not isinstance(ignore_label, int)):
        raise InputError(f"{source}: 'labels.ignore' must be an integer label value, found {ignore_label!r}")
    regions = {}
    for name, value in labels.items():
        if name in ("background", "ignore"):
            continue
        values = value if isinstance(value, list) else [value]
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
