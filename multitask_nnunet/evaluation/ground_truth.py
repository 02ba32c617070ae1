"""Ground truth (masks, case classes, region definitions) from any of the three folder layouts we meet.

1. nnU-Net raw dataset: ``GT/dataset.json`` (with ``labels``, ``file_ending`` and a ``classification``
   entry) and ``GT/labelsTr/<case><file_ending>``.
2. Flat: ``GT/<case>.nii.gz`` masks plus ``GT/classes.csv`` (``Names,Subtype``), as the synthetic generator
   writes its test labels.
3. Quiz: masks in class folders ``GT/.../<prefix><k>/<case>.nii.gz`` (e.g. ``validation/subtype0``), beside
   the ``<case>_0000.nii.gz`` images; the class is the folder's number ``k`` (the rule ``convert`` uses too:
   ``multitask_nnunet.io.class_labels``). Every class folder under GT counts, so point GT at the split that was
   predicted (``data/validation``, not ``data``).

The layouts are tried in this order. ``dataset_json`` (a file) supplies region definitions and class names
for layouts 2 and 3 and replaces the folder's own dataset.json in layout 1.
"""
import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional

from multitask_nnunet.io.class_csv import GROUND_TRUTH_CSV, read_case_classes, strip_ending
from multitask_nnunet.io.class_labels import (CLASSIFICATION_KEY, EXAMPLE, check_one_prefix, class_labels_for_cases,
                                           parse_class_folder, read_class_labels)
from multitask_nnunet.errors import InputError
from multitask_nnunet.io.labels import RegionSpec, regions_from_labels
from multitask_nnunet.io.nifti import channel_pattern

MASK_ENDING = ".nii.gz"


@dataclass(frozen=True)
class GroundTruth:
    layout: str                        # "nnunet_raw", "flat" or "quiz"
    masks: Dict[str, str]              # case -> mask file
    classes: Dict[str, int]            # case -> class index
    class_names: Optional[List[str]]   # from a dataset.json; None when the ground truth does not name them
    default_class_names: List[str]     # names derived from the folder layout, for when nobody names them
    region_spec: RegionSpec
    file_ending: str


def read_ground_truth(gt: str, dataset_json: Optional[str] = None) -> GroundTruth:
    if not os.path.isdir(gt):
        raise InputError(f"{gt}: ground-truth folder not found")
    given = _load_json(dataset_json) if dataset_json else None
    if os.path.isfile(os.path.join(gt, "dataset.json")) and os.path.isdir(os.path.join(gt, "labelsTr")):
        return _nnunet_raw(gt, given or _load_json(os.path.join(gt, "dataset.json")),
                           dataset_json or os.path.join(gt, "dataset.json"))
    if os.path.isfile(os.path.join(gt, GROUND_TRUTH_CSV)):
        return _flat(gt, given, dataset_json)
    return _quiz(gt, given, dataset_json)


def _load_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise InputError(f"{path}: dataset.json not found")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e})")


def _masks_in(folder: str, ending: str, skip_images: bool = False) -> Dict[str, str]:
    """``skip_images``: the folder also holds the ``<case>_0000`` images (quiz layout)."""
    image = channel_pattern(ending)
    return {strip_ending(f, ending): os.path.join(folder, f) for f in sorted(os.listdir(folder))
            if f.endswith(ending) and not (skip_images and image.fullmatch(f))}


def _regions_and_names(dataset: Optional[dict], source: Optional[str]):
    """Region spec and class names a given dataset.json provides (defaults when there is none)."""
    if dataset is None:
        return RegionSpec(None, None), None
    if "labels" not in dataset:
        raise InputError(f"{source}: no 'labels' entry to define the evaluated regions")
    names = read_class_labels(dataset, source).class_names if CLASSIFICATION_KEY in dataset else None
    return regions_from_labels(dataset["labels"], source), names


def _nnunet_raw(gt: str, dataset: dict, source: str) -> GroundTruth:
    file_ending = dataset.get("file_ending")
    if not isinstance(file_ending, str):
        raise InputError(f"{source}: no 'file_ending' entry")
    masks = _masks_in(os.path.join(gt, "labelsTr"), file_ending)
    if not masks:
        raise InputError(f"{os.path.join(gt, 'labelsTr')}: no '*{file_ending}' label files")
    labels = read_class_labels(dataset, source)
    spec, _ = _regions_and_names(dataset, source)
    return GroundTruth("nnunet_raw", masks, class_labels_for_cases(labels, masks, source), labels.class_names,
                       labels.class_names, spec, file_ending)


def _flat(gt: str, dataset: Optional[dict], source: Optional[str]) -> GroundTruth:
    masks = _masks_in(gt, MASK_ENDING)
    if not masks:
        raise InputError(f"{gt}: no '*{MASK_ENDING}' masks beside {GROUND_TRUTH_CSV}")
    csv_path = os.path.join(gt, GROUND_TRUTH_CSV)
    classes = read_case_classes(csv_path, MASK_ENDING)
    for case in masks:
        if case not in classes:
            raise InputError(f"{csv_path}: case '{case}' has a mask but no class")
    spec, names = _regions_and_names(dataset, source)
    default_names = [f"class{k}" for k in range(max(classes[c] for c in masks) + 1)]
    return GroundTruth("flat", masks, {c: classes[c] for c in masks}, names, default_names, spec, MASK_ENDING)


def _quiz(gt: str, dataset: Optional[dict], source: Optional[str]) -> GroundTruth:
    masks, classes, class_folders = {}, {}, set()
    for folder, _, _ in sorted(os.walk(gt)):
        parsed = parse_class_folder(os.path.basename(folder))
        found = _masks_in(folder, MASK_ENDING, skip_images=True) if parsed else {}
        for case, path in found.items():
            if case in masks:
                raise InputError(f"{gt}: case '{case}' has two masks: {masks[case]} and {path}")
            masks[case], classes[case] = path, parsed[1]
        if found:
            class_folders.add(os.path.basename(folder))
    if not masks:
        raise InputError(f"{gt}: not a ground-truth folder: expected an nnU-Net raw dataset (dataset.json + "
                         f"labelsTr/), masks + {GROUND_TRUTH_CSV}, or class folders like {EXAMPLE} holding "
                         f"<case>{MASK_ENDING}")
    prefix = check_one_prefix(class_folders, gt)
    spec, names = _regions_and_names(dataset, source)
    default_names = [f"{prefix}{k}" for k in range(max(classes.values()) + 1)]
    return GroundTruth("quiz", dict(sorted(masks.items())), classes, names, default_names, spec, MASK_ENDING)
