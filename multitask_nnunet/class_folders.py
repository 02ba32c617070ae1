"""Class folders: the class of a case is the number at the end of its folder's name.

One rule, used by ``convert`` (reading a dataset) and ``evaluate`` (reading quiz-layout ground truth): a class
folder is named ``<prefix><index>``, e.g. ``subtype0``, ``grade_1`` or just ``2``; the prefix may be empty and
never ends in a digit. All class folders of one dataset share one prefix, so that ``subtype0`` next to
``class_1`` is refused instead of being read as two unrelated classes. Hidden entries (``.``) are not folders
of a dataset.
"""
import re
from typing import Iterable, Optional, Tuple

from multitask_nnunet.errors import InputError

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
