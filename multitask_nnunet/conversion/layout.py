"""Find the cases of a class-per-folder dataset; the class comes from the folder, never from a file name.

Layout (the pancreas quiz's; any folder prefix works)::

    INPUT/train/<prefix><K>/<case>.nii.gz          mask of <case>, class K
    INPUT/train/<prefix><K>/<case>_0000.nii.gz     image channel 0000 of <case> (_0001, ... for more channels)
    INPUT/validation/<prefix><K>/...               same naming; optional
    INPUT/test/<case>_0000.nii.gz                  images only; optional

Class K's name is its folder's name (the rule, shared with ``evaluate``: ``multitask_nnunet.io.class_labels``);
the indices must run 0, 1, ..., K-1, all class folders share one prefix, and a name must mean the same index in
train/ and validation/. A class without a validation case is a warning (the original split cannot score it).
A case without a mask is reported with ``mask=None``; the caller decides.
"""
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from multitask_nnunet.io.class_labels import EXAMPLE, check_one_prefix, parse_class_folder
from multitask_nnunet.errors import InputError, warn
from multitask_nnunet.io.nifti import channel_pattern

ENDING = ".nii.gz"
SPLIT_FOLDERS = ("train", "validation")
TEST_FOLDER = "test"
_CHANNEL = channel_pattern("")  # a file stem <case>_XXXX


@dataclass(frozen=True)
class SourceCase:
    """A labelled case of the dataset being converted (``convert``)."""
    name: str
    class_index: int
    split: str                  # "train" or "validation"
    images: Tuple[Path, ...]    # one per channel, in channel order
    mask: Optional[Path]


@dataclass(frozen=True)
class SourceDataset:
    class_names: List[str]
    cases: List[SourceCase]           # sorted by name
    test_images: List[Path]     # sorted by file name

    def split_cases(self, split: str) -> List[str]:
        return [c.name for c in self.cases if c.split == split]


def scan_dataset(input_dir: Path, num_channels: int) -> SourceDataset:
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise InputError(f"{input_dir}: input folder does not exist" if not input_dir.exists() else
                         f"{input_dir}: not a folder; expected the dataset folder holding {SPLIT_FOLDERS[0]}/")
    if not (input_dir / SPLIT_FOLDERS[0]).is_dir():
        raise InputError(f"{input_dir}: no '{SPLIT_FOLDERS[0]}' folder (expected "
                         f"{SPLIT_FOLDERS[0]}/<class folder>/<case>.nii.gz and <case>_0000.nii.gz)")
    class_folders = {split: _class_folders(input_dir / split) for split in SPLIT_FOLDERS}
    class_names = _class_names(input_dir, class_folders)
    index_of = {name: i for i, name in enumerate(class_names)}

    cases: Dict[str, SourceCase] = {}
    for split, folders in class_folders.items():
        for folder in folders:
            for case in _cases_in(folder, split, index_of[folder.name], num_channels):
                if case.name in cases:
                    raise InputError(f"case {case.name} appears twice: in {cases[case.name].images[0].parent} and "
                                     f"in {folder}")
                cases[case.name] = case
    for name, index in index_of.items():
        if not any(c.class_index == index for c in cases.values()):
            raise InputError(f"{input_dir}: class folder '{name}' holds no cases")
    _warn_about_validation(input_dir, class_names, cases.values())
    return SourceDataset(class_names, [cases[n] for n in sorted(cases)], _test_images(input_dir, num_channels))


def _class_folders(split_dir: Path) -> List[Path]:
    if not split_dir.is_dir():
        return []
    folders = []
    for entry in sorted(split_dir.iterdir()):
        if entry.name.startswith("."):
            continue
        if not entry.is_dir() or parse_class_folder(entry.name) is None:
            raise InputError(f"{entry}: expected only class folders named <prefix><class index> (e.g. "
                             f"{EXAMPLE}) in {split_dir}")
        folders.append(entry)
    return folders


def _class_names(input_dir: Path, class_folders: Dict[str, List[Path]]) -> List[str]:
    by_index: Dict[int, str] = {}
    folders = [f for split_folders in class_folders.values() for f in split_folders]
    check_one_prefix([f.name for f in folders], str(input_dir))
    for folder in folders:
        index = parse_class_folder(folder.name)[1]
        if by_index.setdefault(index, folder.name) != folder.name:
            raise InputError(f"{input_dir}: class folders '{by_index[index]}' and '{folder.name}' both have "
                             f"class index {index}")
    missing = [i for i in range(max(by_index, default=-1) + 1) if i not in by_index]
    if missing or len(by_index) < 2:
        raise InputError(f"{input_dir}: class folder indices must run 0, 1, ..., K-1 with K >= 2; found "
                         f"{sorted(by_index.values(), key=lambda n: parse_class_folder(n)[1])}")
    return [by_index[i] for i in range(len(by_index))]


def _warn_about_validation(input_dir: Path, class_names: List[str], cases) -> None:
    """A validation split that lacks a class leaves fold 0 (the original split) unable to score that class."""
    validation = input_dir / SPLIT_FOLDERS[1]
    counts = [0] * len(class_names)
    for case in cases:
        if case.split == SPLIT_FOLDERS[1]:
            counts[case.class_index] += 1
    if not any(counts):
        return
    for name, count in zip(class_names, counts):
        if count == 0:
            where = (f"{validation / name} holds no cases" if (validation / name).is_dir()
                     else f"{validation} has no class folder '{name}'")
            warn(f"{where}: the original train/validation split (fold 0 unless --folds) has no validation case "
                 f"of class '{name}'")


def _nifti_stems(folder: Path) -> List[str]:
    stems = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if not entry.is_file() or not entry.name.endswith(ENDING):
            raise InputError(f"{entry}: unexpected {'folder' if entry.is_dir() else 'file'}; expected only "
                             f"{ENDING} images and masks in {folder}")
        stems.append(entry.name[:-len(ENDING)])
    return stems


def _group_channels(folder: Path, stems: List[str]) -> Tuple[Dict[str, Dict[int, Path]], List[str]]:
    """Split file stems into per-case channel images and the rest (masks).

    A stem ``X_0000`` is an image unless ``X_0000_0000`` also exists, which makes it a mask named ``X_0000``.
    """
    present = set(stems)
    images: Dict[str, Dict[int, Path]] = {}
    others = []
    for stem in stems:
        m = _CHANNEL.fullmatch(stem)
        if m and f"{stem}_0000" not in present:
            images.setdefault(m.group(1), {})[int(m.group(2))] = folder / f"{stem}{ENDING}"
        else:
            others.append(stem)
    return images, others


def _channel_list(case: str, folder: Path, channels: Dict[int, Path], num_channels: int) -> Tuple[Path, ...]:
    for c in range(num_channels):
        if c not in channels:
            raise InputError(f"case {case}: missing image {folder / f'{case}_{c:04d}{ENDING}'}")
    extra = sorted(set(channels) - set(range(num_channels)))
    if extra:
        raise InputError(f"case {case}: unexpected image {channels[extra[0]]}; the dataset has {num_channels} "
                         f"channel(s), 0000 to {num_channels - 1:04d}")
    return tuple(channels[c] for c in range(num_channels))


def _cases_in(folder: Path, split: str, class_index: int, num_channels: int) -> List[SourceCase]:
    images, masks = _group_channels(folder, _nifti_stems(folder))
    for mask in masks:
        if mask not in images:
            raise InputError(f"case {mask}: missing image {folder / f'{mask}_0000{ENDING}'} for mask "
                             f"{folder / f'{mask}{ENDING}'}")
    return [SourceCase(name, class_index, split, _channel_list(name, folder, channels, num_channels),
                 folder / f"{name}{ENDING}" if name in masks else None)
            for name, channels in sorted(images.items())]


def _test_images(input_dir: Path, num_channels: int) -> List[Path]:
    folder = input_dir / TEST_FOLDER
    if not folder.is_dir():
        return []
    images, others = _group_channels(folder, _nifti_stems(folder))
    if others:
        raise InputError(f"{folder / (others[0] + ENDING)}: {TEST_FOLDER}/ holds images only, named "
                         f"<case>_<4-digit channel>{ENDING}")
    return sorted(p for case, channels in images.items()
                  for p in _channel_list(case, folder, channels, num_channels))
