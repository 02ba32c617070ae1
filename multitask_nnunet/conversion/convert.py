"""``multitask-nnunet convert``: a class-per-folder dataset (see ``layout``) to an nnU-Net v2 raw dataset.

Writes ``$nnUNet_raw/DatasetXXX_NAME/`` with ``imagesTr``, ``labelsTr``, ``imagesTs`` and a ``dataset.json``
that carries the class labels of every train and validation case (``"classification"``, see
``multitask_nnunet.io.class_labels``). Images are copied byte for byte; masks are checked against their images
and rounded to integer label maps (see ``masks``). The dataset's own train/validation split becomes fold 0 of
``splits_final.json``; ``--folds K`` writes K class-stratified folds over train + validation instead. The
splits go into ``$nnUNet_preprocessed/DatasetXXX_NAME/`` and into the raw folder (nnU-Net's planner copies
them from there if the preprocessed one is missing and never overwrites an existing one).

Cases without a mask are refused unless ``--allow-missing-masks``: then they are kept for classification
with an all-``ignore`` label map and dataset.json gets an ``"ignore"`` label.

Nothing is written on bad input: the dataset is built in a hidden folder inside ``$nnUNet_raw`` (its splits in
one inside ``$nnUNet_preprocessed``) and renamed at the end; both folders must be writable. A write that fails
there (a full, read-only or not writable file system) is one line naming the file by its final path. What a
killed run left (hidden staging folders) is removed by the next run. ``--overwrite`` replaces any dataset with the same id once the new one is complete, and deletes
its preprocessed folder, which was derived from the old data (rerun ``nnUNetv2_plan_and_preprocess``).
"""
import argparse
import os
import re
import shutil
from pathlib import Path
from typing import List, Sequence

from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json
from tqdm import tqdm

from multitask_nnunet.io.class_labels import CLASSIFICATION_KEY, ClassLabels
from multitask_nnunet.io.labels import DEFAULT_LABELS, IGNORE, LabelSpec, read_label_spec
from multitask_nnunet.conversion.layout import ENDING, SourceCase, SourceDataset, scan_dataset
from multitask_nnunet.conversion.masks import ignore_label_map, integer_label_map, write_label_map
from multitask_nnunet.conversion.splits import SPLITS_FILE, original_split, stratified_folds, write_splits
from multitask_nnunet.conversion.staging import (final_path, in_staged_folder, remove_leftover_staging,
                                                staged_folder)
from multitask_nnunet.errors import InputError, WriteError, write_failure
from multitask_nnunet.io.nifti import check_same_grid, read_geometry

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


def convert_dataset(input_dir, dataset_id: int, name: str, *, labels: LabelSpec = DEFAULT_LABELS,
                    channel_names: Sequence[str] = ("CT",), folds: int = 1, overwrite: bool = False,
                    allow_missing_masks: bool = False, progress: bool = True) -> Path:
    """Convert ``input_dir`` to ``$nnUNet_raw/Dataset<id>_<name>`` and return that folder.

    ``folds=1`` keeps the dataset's train/validation split as the only fold; ``folds=K>1`` writes K
    class-stratified folds over all labelled cases. Raises ``InputError`` on bad input, leaving nothing behind.
    """
    raw, preprocessed = _nnunet_folder("nnUNet_raw"), _nnunet_folder("nnUNet_preprocessed")
    for root in (raw, preprocessed):
        _remove_leftovers(root)
    dataset_name = _dataset_name(dataset_id, name)
    source = scan_dataset(Path(input_dir), len(channel_names))
    unmasked = [c for c in source.cases if c.mask is None]
    if unmasked and not allow_missing_masks:
        case = unmasked[0]
        raise InputError(f"case {case.name}: missing mask {case.images[0].parent / (case.name + ENDING)} "
                         f"({len(unmasked)} case(s) without a mask; pass --allow-missing-masks to keep them for "
                         f"classification only)")
    spec = labels.with_ignore() if unmasked else labels
    splits = _splits(source, folds)
    old_raw = _existing_datasets(raw, dataset_id)
    old_preprocessed = _existing_datasets(preprocessed, dataset_id)
    _refuse_clashes(dataset_id, dataset_name, old_raw + old_preprocessed, overwrite)
    _check_writable(raw, "nnUNet_raw")
    _check_writable(preprocessed, "nnUNet_preprocessed")

    # both folders are staged and swapped in together (the preprocessed one first, a moment before the raw one):
    # a failure while either is written leaves neither
    target = raw / dataset_name
    try:
        with staged_folder(target, replaces=old_raw) as staged:
            _write_dataset(staged, source, spec, channel_names, dataset_name, progress)
            write_splits(splits, staged / SPLITS_FILE)
            with staged_folder(preprocessed / dataset_name, replaces=old_preprocessed) as staged_preprocessed:
                write_splits(splits, staged_preprocessed / SPLITS_FILE)
    except (OSError, WriteError) as e:  # e.g. the disk is full: nothing was swapped in
        raise _failure(e, target) from None

    print(f"{dataset_name}: {len(source.cases)} training cases ({len(source.split_cases('train'))} train, "
          f"{len(source.split_cases('validation'))} validation), {len(source.test_images)} test images, "
          f"{len(source.class_names)} classes, {len(splits)} fold(s) -> {target}")
    if unmasked:
        print(f"{len(unmasked)} case(s) without a mask: kept for classification, label map all "
              f"'{IGNORE}' ({spec.labels[IGNORE]})")
    return target


def _failure(error: Exception, target: Path) -> Exception:
    """The one-line error for a failure while the dataset was written (nothing was swapped in). A destination at
    fault (full, read-only, not writable) is named by its final path: the file being written (``copyfile`` names
    its source first and the destination second), else the dataset folder; another file's error names that."""
    note = "nothing was written"
    if isinstance(error, WriteError):
        return WriteError(final_path(error.path), error.reason, error.errno, note)
    paths = [p for p in (error.filename2, error.filename) if isinstance(p, (str, os.PathLike))]
    destination = next((p for p in paths if in_staged_folder(p)), None if paths else target)
    failure = write_failure(error, final_path(destination)) if destination is not None else None
    if failure is not None:
        return failure.with_note(note)
    if not paths:
        return error
    return InputError(f"{paths[-1]}: {error.strerror}; {note}")


def _nnunet_folder(variable: str) -> Path:
    value = os.environ.get(variable)
    if not value:
        raise InputError(f"environment variable {variable} is not set; set nnUNet_raw, nnUNet_preprocessed and "
                         f"nnUNet_results to the nnU-Net data folders")
    return Path(value)


def _remove_leftovers(root: Path) -> None:
    removed = remove_leftover_staging(root)
    if removed:
        print(f"removed what an interrupted convert left in {root}: {', '.join(removed)}")


def _check_writable(folder: Path, variable: str) -> None:
    """Before anything is written: the folder, or the nearest existing folder above it, must be writable (a
    folder that does not exist yet is created)."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"{variable} folder {folder} is not writable: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{variable} folder {folder} is not writable" +
                         (f" (nor is {existing}, where it would be created)" if existing != folder else ""))


def _dataset_name(dataset_id: int, name: str) -> str:
    if not 1 <= dataset_id <= 999:
        raise InputError(f"dataset id {dataset_id}: must be between 1 and 999")
    if not _NAME.match(name):
        raise InputError(f"dataset name '{name}': use only letters, digits, '_' and '-'")
    return f"Dataset{dataset_id:03d}_{name}"


def _splits(source: SourceDataset, folds: int) -> List[dict]:
    if folds > 1:
        return stratified_folds({c.name: c.class_index for c in source.cases}, folds)
    if folds < 1:
        raise InputError(f"--folds {folds}: must be at least 1")
    if not source.split_cases("validation"):
        raise InputError("the input has no validation cases to keep as fold 0; add a 'validation' folder or pass "
                         "--folds K for K class-stratified folds")
    return original_split(source.split_cases("train"), source.split_cases("validation"))


def _existing_datasets(root: Path, dataset_id: int) -> List[Path]:
    return sorted(root.glob(f"Dataset{dataset_id:03d}_*")) if root.is_dir() else []


def _refuse_clashes(dataset_id: int, dataset_name: str, existing: List[Path], overwrite: bool) -> None:
    if existing and not overwrite:
        raise InputError(f"{existing[0]} already exists (dataset id {dataset_id}); pass --overwrite to replace it")
    results = os.environ.get("nnUNet_results")
    others = [p for p in _existing_datasets(Path(results), dataset_id) if p.name != dataset_name] if results else []
    if others:
        raise InputError(f"{others[0]} has dataset id {dataset_id} under another name; nnU-Net could no longer tell "
                         f"the datasets apart: choose another id or remove it")


def _write_dataset(folder: Path, source: SourceDataset, spec: LabelSpec, channel_names: Sequence[str],
                   dataset_name: str, progress: bool) -> None:
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (folder / sub).mkdir()
    for case in tqdm(source.cases, desc="cases", unit="case", disable=not progress):
        write_label_map(_label_map(case, spec), folder / "labelsTr" / f"{case.name}{ENDING}")
        for image in case.images:
            shutil.copyfile(image, folder / "imagesTr" / image.name)
    for image in source.test_images:
        shutil.copyfile(image, folder / "imagesTs" / image.name)

    class_labels = ClassLabels(source.class_names, {c.name: c.class_index for c in source.cases})
    generate_dataset_json(str(folder), {str(i): n for i, n in enumerate(channel_names)},
                          {k: (list(v) if isinstance(v, list) else v) for k, v in spec.labels.items()},
                          len(source.cases), ENDING, regions_class_order=spec.regions_class_order,
                          dataset_name=dataset_name, license="see the source dataset",
                          converted_by="multitask-nnunet convert",
                          **{CLASSIFICATION_KEY: class_labels.to_json()})


def _label_map(case: SourceCase, spec: LabelSpec):
    """The case's label map, after checking that its images and mask share one voxel grid."""
    reference = case.mask or case.images[0]
    geometry = read_geometry(reference)
    for image in case.images:
        if image != reference:
            check_same_grid(case.name, image, reference, ("image", "mask" if case.mask else "image"),
                            second_geometry=geometry)
    if case.mask is None:
        return ignore_label_map(geometry, spec.labels[IGNORE])
    return integer_label_map(case.mask, spec.values)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "convert", help="convert a class-per-folder dataset to an nnU-Net v2 raw dataset with class labels",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-i", "--input", required=True, type=Path, metavar="INPUT_DIR",
                   help="folder with train/<class folder>/, optional validation/<class folder>/ and test/")
    p.add_argument("-d", "--dataset-id", required=True, type=int, metavar="DATASET_ID", help="nnU-Net dataset id")
    p.add_argument("-n", "--name", required=True, help="dataset name: the folder is Dataset<id>_<name>")
    p.add_argument("--labels-json", type=Path, metavar="FILE",
                   help='JSON {"labels": {...}, "regions_class_order": [...]} in nnU-Net\'s format (default: '
                        f'{DEFAULT_LABELS.labels}, regions_class_order {DEFAULT_LABELS.regions_class_order})')
    p.add_argument("--channel-names", nargs="+", default=["CT"], metavar="NAME",
                   help="one name per image channel _0000, _0001, ... (default: CT)")
    p.add_argument("--folds", type=int, default=1, metavar="K",
                   help="1 (default): fold 0 = the input's train/validation split; K>1: K class-stratified folds "
                        "over train + validation")
    p.add_argument("--allow-missing-masks", action="store_true",
                   help="keep cases with an image but no mask, for classification only (label map all 'ignore')")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing dataset with this id (and delete its preprocessed folder)")
    p.set_defaults(func=_run)


def _run(args) -> None:
    labels = read_label_spec(args.labels_json) if args.labels_json else DEFAULT_LABELS
    convert_dataset(args.input, args.dataset_id, args.name, labels=labels, channel_names=args.channel_names,
                    folds=args.folds, overwrite=args.overwrite, allow_missing_masks=args.allow_missing_masks)
