"""Which integer labels a mask may hold and how nnU-Net trains them (the ``labels`` of dataset.json).

A spec is nnU-Net's own format: ``labels`` maps names to a label or, for region-based training, a list of
labels; ``regions_class_order`` is required with regions. The package default is generic: two nested
structures, label 1 inside which lies label 2 (an organ with a lesion), trained as the regions
"foreground" = {1, 2} and "label_2" = {2}. Other datasets pass their own spec (``--labels-json``), e.g.::

    {"labels": {"background": 0, "whole_pancreas": [1, 2], "pancreas_lesion": 2},
     "regions_class_order": [1, 2]}

An ``"ignore"`` label is added by the converter itself, only when some cases have no mask.
"""
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Union

from multitask_nnunet.errors import InputError

IGNORE = "ignore"


@dataclass(frozen=True)
class LabelSpec:
    labels: Dict[str, Union[int, List[int]]]
    regions_class_order: Optional[List[int]] = None

    def __post_init__(self):
        check_label_spec(self.labels, self.regions_class_order, "label spec")

    @property
    def values(self) -> List[int]:
        """Every integer a converted mask may contain (ignore label included if the spec declares one)."""
        values = {v for r in self.labels.values() for v in (r if isinstance(r, list) else [r])}
        return sorted(values)

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
        members = value if isinstance(value, list) else [value]
        if not members or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in members):
            raise InputError(f"{source}: label '{name}' is {value!r}; expected a non-negative integer or a list "
                             f"of them")
    if labels.get("background") != 0:
        raise InputError(f"{source}: 'labels' must contain \"background\": 0")
    if IGNORE in labels and isinstance(labels[IGNORE], list):
        raise InputError(f"{source}: the '{IGNORE}' label must be a single integer")
    plain = sorted({v for k, r in labels.items() if k != IGNORE for v in (r if isinstance(r, list) else [r])})
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
