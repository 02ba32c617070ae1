"""``multitask-nnunet convert`` end to end, through the real CLI and stock nnU-Net planning/preprocessing."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from cli import kill_when, nnunet, ours, run
from damage import noisy_labels, truncate

REPO = Path(__file__).resolve().parents[1]
REAL_MASKS = REPO.parent / "shared" / "data" / "real_masks"
DATASET_ID = 501


# ---------------------------------------------------------------- helpers

def nnunet_env(tmp_path: Path) -> dict:
    env = dict(os.environ)
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env[var] = str(tmp_path / var)
    return env


def convert(source: Path, env, *extra, check=True) -> subprocess.CompletedProcess:
    return run(ours("convert", "-i", source, "-d", DATASET_ID, "-n", "Test", *extra), env, check=check)


def plan_and_preprocess(env) -> None:
    run(nnunet("nnUNetv2_plan_and_preprocess", "-d", DATASET_ID, "-c", "3d_fullres",
               "--verify_dataset_integrity", "-np", "1", "-npfp", "1"), env)


def raw_dataset(env) -> Path:
    return Path(env["nnUNet_raw"]) / f"Dataset{DATASET_ID}_Test"


def preprocessed_splits(env) -> list:
    folder = Path(env["nnUNet_preprocessed"]) / f"Dataset{DATASET_ID}_Test"
    return json.loads((folder / "splits_final.json").read_text())


def hashes(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def write(path: Path, array: np.ndarray, spacing=(0.8, 0.8, 2.0), like: sitk.Image = None) -> None:
    image = sitk.GetImageFromArray(array)
    if like is not None:
        image.CopyInformation(like)
    else:
        image.SetSpacing(spacing)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), True)


def source_cases(source: Path) -> dict:
    """{case: (split, class index)} read from the class folders, as the converter must do."""
    return {image.name[:-len("_0000.nii.gz")]: (image.parent.parent.name, int(image.parent.name[len("subtype"):]))
            for image in source.glob("*/subtype*/*_0000.nii.gz")}


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    """Nine labelled cases (3 per class: 6 train, 3 validation) and two test images."""
    out = tmp_path_factory.mktemp("synthetic") / "data"
    run(ours("make-synthetic", "-o", out, "--cases", "6", "--validation-cases", "3", "--test-cases", "2",
             "--seed", "3"), {})
    return out


TINY_MASK = np.zeros((8, 8, 8), np.float32)
TINY_MASK[2:6, 2:6, 2:6] = 1.0000152
TINY_MASK[3:5, 3:5, 3:5] = 1.9999847
TINY_CASES = [("train", "grade0", "a_01"), ("train", "grade1", "b_01"),
              ("validation", "grade0", "a_02"), ("validation", "grade1", "b_02")]


@pytest.fixture
def tiny(tmp_path) -> Path:
    """Two classes in folders named grade0/grade1 (any prefix must work), 8^3 voxels, one test image."""
    root = tmp_path / "tiny"
    image = np.arange(512, dtype=np.int16).reshape(8, 8, 8)
    for split, folder, case in TINY_CASES:
        write(root / split / folder / f"{case}.nii.gz", TINY_MASK)
        write(root / split / folder / f"{case}_0000.nii.gz", image)
    write(root / "test" / "t_01_0000.nii.gz", image)
    return root


# ---------------------------------------------------------------- tests

def test_synthetic_converts_and_survives_plan_and_preprocess(preprocessed):
    """On the shared pipeline (conftest): make-synthetic -> convert -> stock nnUNetv2_plan_and_preprocess."""
    source, out = preprocessed.source, preprocessed.raw
    dataset = json.loads((out / "dataset.json").read_text())
    cases = source_cases(source)

    assert dataset["labels"] == {"background": 0, "foreground": [1, 2], "label_2": 2}
    assert dataset["regions_class_order"] == [1, 2]
    assert dataset["channel_names"] == {"0": "CT"} and dataset["file_ending"] == ".nii.gz"
    assert dataset["numTraining"] == len(cases)
    assert dataset["classification"] == {"class_names": ["subtype0", "subtype1", "subtype2"],
                                         "case_labels": {c: k for c, (_, k) in sorted(cases.items())}}
    for case, (split, k) in cases.items():
        folder = source / split / f"subtype{k}"
        assert (out / "imagesTr" / f"{case}_0000.nii.gz").read_bytes() == \
            (folder / f"{case}_0000.nii.gz").read_bytes()
        labels = read(out / "labelsTr" / f"{case}.nii.gz")
        assert labels.dtype == np.uint8
        np.testing.assert_array_equal(labels, np.rint(read(folder / f"{case}.nii.gz")))
    assert sorted(p.name for p in (out / "imagesTs").iterdir()) == \
        sorted(p.name for p in (source / "test").iterdir())

    original = [{"train": sorted(c for c, (s, _) in cases.items() if s == "train"),
                 "val": sorted(c for c, (s, _) in cases.items() if s == "validation")}]
    assert json.loads((preprocessed.preprocessed / "splits_final.json").read_text()) == original
    assert json.loads((out / "splits_final.json").read_text()) == original
    preprocessed_json = json.loads((preprocessed.preprocessed / "dataset.json").read_text())
    assert preprocessed_json["classification"] == dataset["classification"]


def test_real_masks_are_rounded_exactly(tmp_path):
    if not REAL_MASKS.is_dir():
        pytest.skip(f"{REAL_MASKS} not present")
    rng = np.random.default_rng(0)
    source = tmp_path / "source"
    originals = {}
    for k, split in enumerate(["train", "train", "validation"]):
        path = min(REAL_MASKS.glob(f"quiz_{k}_*.nii.gz"), key=lambda p: p.stat().st_size)
        mask = sitk.ReadImage(str(path))
        values = sitk.GetArrayFromImage(mask)
        originals[path.name] = (values.copy(), mask)
        hit = rng.random(values.shape) < 0.02
        values[hit] += rng.choice([1.5e-5, -1.5e-5], size=int(hit.sum())).astype(values.dtype)
        folder = source / split / f"subtype{k}"
        write(folder / path.name, values, like=mask)
        write(folder / path.name.replace(".nii.gz", "_0000.nii.gz"),
              rng.integers(-200, 300, size=values.shape, dtype=np.int16), like=mask)
    env = nnunet_env(tmp_path)
    convert(source, env)
    for name, (values, mask) in originals.items():
        written = sitk.ReadImage(str(raw_dataset(env) / "labelsTr" / name))
        labels = sitk.GetArrayFromImage(written)
        assert np.issubdtype(labels.dtype, np.integer)
        np.testing.assert_array_equal(labels, np.rint(values))
        assert (written.GetSpacing(), written.GetOrigin(), written.GetDirection()) == \
            (mask.GetSpacing(), mask.GetOrigin(), mask.GetDirection())


def _set_voxel(value):
    def damage(root):
        mask = TINY_MASK.copy()
        mask[0, 0, 0] = value
        write(root / "train" / "grade0" / "a_01.nii.gz", mask)
    return damage


def _truncated(name: str, image: bool, unmasked: bool = False):
    """``name`` (train/grade0/a_01) rewritten with poorly compressible voxels and cut to half its bytes; with
    ``unmasked`` the case's mask is removed first (the run passes --allow-missing-masks)."""
    def damage(root):
        case = root / f"{name}.nii.gz"
        if unmasked:
            case.unlink()
        path = root / f"{name}_0000.nii.gz" if image else case
        values = noisy_labels((8, 8, 8), dtype=np.int16 if image else np.float32)
        write(path, values)
        truncate(path)
    return damage


BAD_INPUTS = {
    "label 3": (_set_voxel(3.0), ["a_01.nii.gz", "contains label 3"]),
    "non-integer": (_set_voxel(0.4), ["a_01.nii.gz", "value 0.4", "not integer labels"]),
    "shape mismatch": (lambda root: write(root / "train" / "grade1" / "b_01_0000.nii.gz",
                                          np.zeros((8, 8, 9), np.int16)),
                       ["case 'b_01'", "has shape (8, 8, 9) but mask", "has (8, 8, 8)"]),
    "spacing mismatch": (lambda root: write(root / "validation" / "grade0" / "a_02_0000.nii.gz",
                                            np.zeros((8, 8, 8), np.int16), spacing=(0.8, 0.8, 3.0)),
                         ["case 'a_02'", "has spacing (0.8, 0.8, 3) but mask", "has (0.8, 0.8, 2)"]),
    "missing image": (lambda root: (root / "validation" / "grade1" / "b_02_0000.nii.gz").unlink(),
                      ["missing image", "b_02_0000.nii.gz"]),
    "missing mask": (lambda root: (root / "validation" / "grade1" / "b_02.nii.gz").unlink(),
                     ["missing mask", "b_02.nii.gz", "--allow-missing-masks"]),
    "existing target": (None, [f"Dataset{DATASET_ID}_Old already exists", "--overwrite"]),
    "truncated mask": (_truncated("train/grade1/b_01", image=False),
                       ["train/grade1/b_01.nii.gz: truncated or damaged file"]),
    "truncated image": (_truncated("validation/grade0/a_02", image=True),
                        ["validation/grade0/a_02_0000.nii.gz: truncated or damaged file"]),
    "truncated image without mask": (_truncated("train/grade0/a_01", image=True, unmasked=True),
                                     ["train/grade0/a_01_0000.nii.gz: truncated or damaged file"],
                                     "--allow-missing-masks"),
}


@pytest.mark.parametrize("problem", BAD_INPUTS)
def test_bad_input_is_refused_and_leaves_nothing(problem, tiny, tmp_path):
    damage, expected, *options = BAD_INPUTS[problem]
    env = nnunet_env(tmp_path)
    raw = Path(env["nnUNet_raw"])
    if damage:
        damage(tiny)
    else:
        (raw / f"Dataset{DATASET_ID}_Old").mkdir(parents=True)
        (raw / f"Dataset{DATASET_ID}_Old" / "keep.txt").write_text("old")
    result = convert(tiny, env, *options, check=False)

    assert result.returncode == 1
    message = result.stderr.strip().splitlines()[-1]           # earlier lines: the progress bar
    assert message.startswith("multitask-nnunet convert: error: ")
    for part in expected:
        assert part in message
    left = sorted(p.name for p in raw.iterdir()) if raw.exists() else []
    assert left == ([] if damage else [f"Dataset{DATASET_ID}_Old"])
    assert not Path(env["nnUNet_preprocessed"]).exists()
    if not damage:
        assert (raw / f"Dataset{DATASET_ID}_Old" / "keep.txt").read_text() == "old"


def test_rerun_with_overwrite_is_byte_identical(synthetic, tmp_path):
    env = nnunet_env(tmp_path)
    convert(synthetic, env)
    first, first_splits = hashes(raw_dataset(env)), preprocessed_splits(env)
    (Path(env["nnUNet_preprocessed"]) / raw_dataset(env).name / "stale.json").write_text("{}")
    convert(synthetic, env, "--overwrite")
    assert hashes(raw_dataset(env)) == first
    assert preprocessed_splits(env) == first_splits
    assert sorted(p.name for p in Path(env["nnUNet_raw"]).iterdir()) == [raw_dataset(env).name]
    assert not (Path(env["nnUNet_preprocessed"]) / raw_dataset(env).name / "stale.json").exists()


def test_cases_without_mask_get_ignore_label(class_only):
    """convert --allow-missing-masks (conftest.class_only: training and validation cases without a mask): their
    label map is the ignore label throughout, on the image's grid, and stock plan-and-preprocess (with
    --verify_dataset_integrity) accepts the dataset."""
    pipeline, unmasked = class_only.pipeline, class_only.unmasked
    assert f"{len(unmasked)} case(s) without a mask" in class_only.convert_output
    assert any(c in json.loads((pipeline.raw / "splits_final.json").read_text())[0]["val"] for c in unmasked)
    dataset = json.loads((pipeline.raw / "dataset.json").read_text())
    assert dataset["labels"] == {"background": 0, "foreground": [1, 2], "label_2": 2, "ignore": 3}
    assert set(dataset["classification"]["case_labels"]) == set(source_cases(pipeline.source))
    for case in unmasked:
        image = sitk.ReadImage(str(pipeline.raw / "imagesTr" / f"{case}_0000.nii.gz"))
        labels = sitk.ReadImage(str(pipeline.raw / "labelsTr" / f"{case}.nii.gz"))
        assert np.all(sitk.GetArrayFromImage(labels) == 3)
        assert (labels.GetSize(), labels.GetSpacing(), labels.GetOrigin()) == \
            (image.GetSize(), image.GetSpacing(), image.GetOrigin())
    preprocessed = {p.name.split(".")[0] for p in (pipeline.preprocessed / "nnUNetPlans_3d_fullres").iterdir()}
    assert set(unmasked) <= preprocessed


def test_stratified_folds(synthetic, tmp_path):
    env = nnunet_env(tmp_path)
    convert(synthetic, env, "--folds", "3")
    cases = source_cases(synthetic)
    splits = preprocessed_splits(env)
    assert len(splits) == 3
    assert sorted(c for fold in splits for c in fold["val"]) == sorted(cases)
    for fold in splits:
        assert sorted(fold["train"] + fold["val"]) == sorted(cases)
        assert sorted(cases[c][1] for c in fold["val"]) == [0, 1, 2]
    assert json.loads((raw_dataset(env) / "splits_final.json").read_text()) == splits


def test_labels_json_channels_and_quiz_script(tiny, tmp_path):
    env = nnunet_env(tmp_path)
    spec = tmp_path / "labels.json"
    spec.write_text(json.dumps({"labels": {"background": 0, "organ": 1, "tumour": 2}}))
    convert(tiny, env, "--labels-json", str(spec), "--channel-names", "MRI")
    dataset = json.loads((raw_dataset(env) / "dataset.json").read_text())
    assert dataset["labels"] == {"background": 0, "organ": 1, "tumour": 2}
    assert "regions_class_order" not in dataset and dataset["channel_names"] == {"0": "MRI"}
    assert dataset["classification"]["class_names"] == ["grade0", "grade1"]
    assert dataset["classification"]["case_labels"] == {"a_01": 0, "a_02": 0, "b_01": 1, "b_02": 1}

    run([sys.executable, str(REPO / "dataset_conversion" / "convert_pancreas_quiz.py"), "-i", str(tiny),
         "-d", str(DATASET_ID), "-n", "Test", "--overwrite"], env)
    dataset = json.loads((raw_dataset(env) / "dataset.json").read_text())
    assert dataset["labels"] == {"background": 0, "whole_pancreas": [1, 2], "pancreas_lesion": 2}
    assert dataset["regions_class_order"] == [1, 2]


def test_unset_nnunet_raw_is_named(tiny, tmp_path):
    env = nnunet_env(tmp_path)
    del env["nnUNet_raw"]
    result = convert(tiny, env, check=False)
    assert result.returncode == 1
    assert "nnUNet_raw is not set" in result.stderr


@pytest.mark.parametrize("variable", ["nnUNet_raw", "nnUNet_preprocessed"])
def test_unwritable_nnunet_folder_is_named_and_nothing_is_left(variable, tiny, tmp_path):
    """The folder cannot be written: the tests run as root, whom chmod does not stop, so the variable points
    under a regular file, which no one can create a folder in. One line names the folder; the dataset is written
    in neither place (before, an unwritable nnUNet_preprocessed left the raw dataset written)."""
    env = nnunet_env(tmp_path)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    env[variable] = str(blocker / "nnunet")
    result = convert(tiny, env, check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"multitask-nnunet convert: error: {variable} folder {blocker / 'nnunet'} is not writable: {blocker} is a "
        f"file, not a folder"]
    for other in {"nnUNet_raw", "nnUNet_preprocessed"} - {variable}:
        assert not Path(env[other]).exists() or not any(Path(env[other]).iterdir())
    assert blocker.read_text() == "not a folder"


def test_rerun_after_kill_removes_the_staging_folder(synthetic, tmp_path):
    """convert killed (SIGKILL) while it writes the dataset leaves its hidden staging folder; the next convert
    removes it, says so in one line, and writes the same dataset as an uninterrupted run. A staging folder of a
    live process (here: this test's) is left alone."""
    env = nnunet_env(tmp_path)
    raw = Path(env["nnUNet_raw"])

    def staging_with_a_case():
        return [p for p in raw.glob(f".Dataset{DATASET_ID}_Test.tmp-*") if any(p.glob("labelsTr/*.nii.gz"))]

    for _ in range(3):  # the kill may land after the last case; try again
        left = kill_when(ours("convert", "-i", synthetic, "-d", DATASET_ID, "-n", "Test"), env, staging_with_a_case)
        if left:
            break
        shutil.rmtree(raw, ignore_errors=True)
        shutil.rmtree(env["nnUNet_preprocessed"], ignore_errors=True)
    assert left, "convert finished every time before it could be killed"
    assert not raw_dataset(env).exists()
    from multitask_nnunet.io.atomic import owner_tag
    live = raw / f".Dataset{DATASET_ID + 1}_Other.tmp-{owner_tag()}-0123abcd"
    live.mkdir()

    result = convert(synthetic, env)
    removed = [line for line in result.stdout.splitlines() if line.startswith("removed what an interrupted convert")]
    assert removed == [f"removed what an interrupted convert left in {raw}: {left[0].name}"]
    assert sorted(p.name for p in raw.iterdir()) == sorted([raw_dataset(env).name, live.name])
    clean = nnunet_env(tmp_path / "clean")
    convert(synthetic, clean)
    assert hashes(raw_dataset(env)) == hashes(raw_dataset(clean))
    assert preprocessed_splits(env) == preprocessed_splits(clean)


def test_rerun_after_kill_between_the_renames_puts_the_old_dataset_back(tiny, tmp_path):
    """convert --overwrite killed between moving the old dataset aside and renaming the new one into place
    leaves both hidden (made here by hand, named for a process that has ended): the next run puts the old
    dataset back and removes the new one, so the rerun sees the old dataset and asks for --overwrite again."""
    from multitask_nnunet.io.atomic import owner_tag
    ended = subprocess.Popen(["true"])
    ended.wait()
    tag = f"{owner_tag().rsplit('-', 1)[0]}-{ended.pid}"
    env = nnunet_env(tmp_path)
    raw = Path(env["nnUNet_raw"])
    old = raw / f".Dataset{DATASET_ID}_Test.old-{tag}-0123abcd"
    new = raw / f".Dataset{DATASET_ID}_Test.tmp-{tag}-4567cdef"
    for folder in (old, new):
        folder.mkdir(parents=True)
        (folder / "dataset.json").write_text(folder.name)

    result = convert(tiny, env, check=False)
    assert result.stdout.splitlines()[0] == (f"removed what an interrupted convert left in {raw}: {old.name} (put "
                                             f"back as Dataset{DATASET_ID}_Test), {new.name}")
    assert "already exists" in result.stderr and result.returncode == 1
    assert sorted(p.name for p in raw.iterdir()) == [f"Dataset{DATASET_ID}_Test"]
    assert (raw_dataset(env) / "dataset.json").read_text() == old.name


def test_missing_input_folder_is_named(tmp_path):
    result = convert(tmp_path / "does_not_exist", nnunet_env(tmp_path), check=False)
    assert result.returncode == 1
    assert result.stderr.strip() == f"multitask-nnunet convert: error: {tmp_path / 'does_not_exist'}: " \
                                    f"input folder does not exist"


def _rename_class_folders(root: Path, names) -> None:
    for split in ("train", "validation"):
        for old, new in zip(("grade0", "grade1"), names):
            (root / split / old).rename(root / split / new)


@pytest.mark.parametrize("names, accepted", [(("0", "1"), True), (("subtype0", "class_1"), False)])
def test_convert_and_evaluate_share_the_class_folder_rule(names, accepted, tiny, tmp_path):
    """The same class folders are accepted, or refused with the same message, by both commands."""
    _rename_class_folders(tiny, names)
    env = nnunet_env(tmp_path)
    pred = tmp_path / "pred"
    pred.mkdir()
    for _, folder, case in TINY_CASES[2:]:  # validation cases, predicted perfectly
        shutil.copy(tiny / "validation" / names[int(folder[-1])] / f"{case}.nii.gz", pred)
    (pred / "subtype_results.csv").write_text("Names,Subtype\na_02.nii.gz,0\nb_02.nii.gz,1\n")
    converted = convert(tiny, env, check=False)
    evaluated = run(ours("evaluate", "--pred", pred, "--gt", tiny / "validation", "--bootstrap", 0,
                         "--json", tmp_path / "r.json"), env, check=False)
    if accepted:
        assert converted.returncode == 0 and evaluated.returncode == 0, converted.stderr + evaluated.stderr
        dataset = json.loads((raw_dataset(env) / "dataset.json").read_text())
        assert dataset["classification"]["class_names"] == list(names)
        results = json.loads((tmp_path / "r.json").read_text())
        assert results["class_names"] == list(names) and results["macro_f1"] == 1.0
    else:
        expected = "class folders use different name prefixes ['class_', 'subtype']; expected one"
        for result, command in ((converted, "convert"), (evaluated, "evaluate")):
            assert result.returncode == 1
            assert result.stderr.startswith(f"multitask-nnunet {command}: error: ")
            assert expected in result.stderr.strip().splitlines()[-1]


def test_empty_validation_class_folder_warns(tiny, tmp_path):
    for path in (tiny / "validation" / "grade1").iterdir():
        path.unlink()
    result = convert(tiny, nnunet_env(tmp_path))
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    assert warnings == [f"multitask-nnunet convert: warning: {tiny / 'validation' / 'grade1'} holds no cases: the "
                        f"original train/validation split (fold 0 unless --folds) has no validation case of class "
                        f"'grade1'"]
    assert preprocessed_splits(nnunet_env(tmp_path)) == [{"train": ["a_01", "b_01"], "val": ["a_02"]}]
