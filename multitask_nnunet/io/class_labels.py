"""Case-level class labels: where they live and how they are checked.

The one source of truth is a ``"classification"`` entry in the dataset's ``dataset.json``::

    "classification": {
        "class_names": ["subtype0", "subtype1", "subtype2"],
        "case_labels": {"quiz_0_041": 0, "quiz_1_003": 1, ...}
    }

nnU-Net copies dataset.json verbatim into ``nnUNet_preprocessed/DatasetXXX`` and, on training, into the
results folder, so the labels and class names travel with the preprocessed data and with the trained model.
Labels are never parsed from file names.

Class folders (where ``convert`` reads a case's class, and ``evaluate`` reads quiz-layout ground truth): the class
of a case is the number at the end of its folder's name. A class folder is named ``<prefix><index>``, e.g.
``subtype0``, ``grade_1`` or just ``2``; the prefix may be empty and never ends in a digit. All class folders of
one dataset share one prefix, so that ``subtype0`` next to ``class_1`` is refused instead of being read as two
unrelated classes. Hidden entries (``.``) are not folders of a dataset.
"""
import re
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

from multitask_nnunet.errors import InputError

CLASSIFICATION_KEY = "classification"


@dataclass(frozen=True)
class ClassLabels:
    class_names: List[str]
    case_labels: Dict[str, int]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def label_of(self, case: str, source: str = "dataset.json") -> int:
        if case not in self.case_labels:
            raise InputError(f"{source}: case '{case}' has no class label in '{CLASSIFICATION_KEY}.case_labels'")
        return self.case_labels[case]

    def to_json(self) -> dict:
        return {"class_names": list(self.class_names), "case_labels": dict(sorted(self.case_labels.items()))}


def read_class_labels(dataset_json: dict, source: str = "dataset.json") -> ClassLabels:
    """Read and validate the classification entry; ``source`` names the file in error messages."""
    entry = dataset_json.get(CLASSIFICATION_KEY)
    if not isinstance(entry, dict):
        raise InputError(f"{source}: no '{CLASSIFICATION_KEY}' entry with class labels; convert the dataset with "
                         f"'multitask-nnunet convert' or add {{\"class_names\": [...], \"case_labels\": {{...}}}}")
    names = entry.get("class_names")
    labels = entry.get("case_labels")
    if not isinstance(names, list) or len(names) < 2:
        raise InputError(f"{source}: '{CLASSIFICATION_KEY}.class_names' must list at least 2 class names")
    if not isinstance(labels, dict):
        raise InputError(f"{source}: '{CLASSIFICATION_KEY}.case_labels' must map case names to class indices")
    for case, label in labels.items():
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(names):
            raise InputError(f"{source}: case '{case}' has class label {label!r}, "
                             f"expected an integer in [0, {len(names) - 1}]")
    return ClassLabels([str(n) for n in names], {str(k): int(v) for k, v in labels.items()})


def class_labels_for_cases(labels: ClassLabels, cases, source: str = "dataset.json") -> Dict[str, int]:
    """The labels of ``cases``; a case without a label is an error that names it."""
    return {c: labels.label_of(c, source) for c in cases}


def class_weights(counts: List[int]) -> List[float]:
    """Class-balanced cross-entropy weights: 1/(count+1), normalised to sum to 1."""
    raw = [1.0 / (c + 1) for c in counts]
    total = sum(raw)
    return [r / total for r in raw]


# ---------------------------------------------------------------------------------------------- class folders
_CLASS_FOLDER = re.compile(r"^(.*?)(\d+)$")
EXAMPLE = "subtype0, subtype1, ..."


def parse_class_folder(name: str) -> Optional[Tuple[str, int]]:
    """``subtype2`` -> ``("subtype", 2)``; ``None`` for a name that is not a class folder's."""
    match = _CLASS_FOLDER.match(name)
    if match is None or name.startswith("."):
        return None
    return match.group(1), int(match.group(2))


def check_one_prefix(names: Iterable[str], where: str) -> str:
    """The prefix that all class folder ``names`` share; ``where`` names the dataset in the error."""
    prefixes = sorted({parse_class_folder(n)[0] for n in names})
    if len(prefixes) > 1:
        raise InputError(f"{where}: class folders use different name prefixes {prefixes}; expected one, "
                         f"e.g. {EXAMPLE}")
    return prefixes[0] if prefixes else ""
