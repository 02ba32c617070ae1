"""``multitask-nnunet evaluate`` on tiny hand-made cases whose Dice and classification numbers are known.

Six cases of 16x24x24 voxels: a pancreas box (label 1, 8x16x16 = 2048 voxels) holding a lesion box (label 2,
4x8x8 = 256 voxels). Predictions are exact except
* case 4, shifted by 2 voxels along x: whole pancreas Dice 2*1792/4096 = 0.875, lesion 2*192/512 = 0.75,
  label 1 alone (pancreas minus lesion) 2*1472/3584 = 23/28;
* case 5 has no lesion in truth or prediction: lesion Dice undefined (NaN), left out of the mean.
True classes 0,0,1,1,2,2; predicted 0,1,1,1,2,0 -> confusion matrix [[1,1,0],[0,2,0],[1,0,1]].
"""
import csv
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk

from cli import ours, run
from damage import noisy_labels, truncate

CASES = ["quiz_0_001", "quiz_0_002", "quiz_1_003", "quiz_1_004", "quiz_2_005", "quiz_2_006"]
TRUE = [0, 0, 1, 1, 2, 2]
PRED = [0, 1, 1, 1, 2, 0]
CONFUSION = [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
SPACING, ORIGIN = (0.8, 0.8, 1.5), (3.0, -5.0, 10.0)
REGION_LABELS = {"background": 0, "whole_pancreas": [1, 2], "pancreas_lesion": 2}

WHOLE = (5 + 0.875) / 6
LESION = (4 + 0.75) / 5
LABEL_1 = (5 + 23 / 28) / 6
MACRO_F1 = (0.5 + 0.8 + 2 / 3) / 3  # per class: P=R=1/2; P=2/3, R=1; P=1, R=1/2


def label_map(shift=0, lesion=True):
    seg = np.zeros((16, 24, 24), np.uint8)
    seg[4:12, 4:20, 4 + shift:20 + shift] = 1
    if lesion:
        seg[6:10, 8:16, 8 + shift:16 + shift] = 2
    return seg


def write_image(path, array, spacing=SPACING):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(ORIGIN)
    sitk.WriteImage(image, path)


def write_csv(path, rows, header=("Names", "Subtype")):
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])


def truth_maps():
    return {c: label_map(lesion=(i != 5)) for i, c in enumerate(CASES)}


def write_predictions(out_dir, classes=PRED, cases=CASES, maps=None):
    maps = maps or {c: label_map(shift=2 if i == 4 else 0, lesion=(i != 5)) for i, c in enumerate(CASES)}
    for case in cases:
        write_image(os.path.join(out_dir, case + ".nii.gz"), maps[case])
    write_csv(os.path.join(out_dir, "subtype_results.csv"), [(c + ".nii.gz", k) for c, k in zip(cases, classes)])
    return out_dir


def write_quiz_truth(root):
    """data/validation/subtypeK/<case>.nii.gz beside <case>_0000.nii.gz images; float32 masks with the quiz's
    rounding noise (1.0000152 for 1)."""
    for case, k in zip(CASES, TRUE):
        folder = os.path.join(root, "validation", f"subtype{k}")
        mask = truth_maps()[case].astype(np.float32)
        mask[mask == 1] += np.float32(1.52e-5)
        write_image(os.path.join(folder, case + ".nii.gz"), mask)
        write_image(os.path.join(folder, case + "_0000.nii.gz"), np.zeros((16, 24, 24), np.int16))
    return root


def write_raw_dataset(root, labels, extra_case=None):
    maps, classes = truth_maps(), dict(zip(CASES, TRUE))
    if extra_case:
        maps[extra_case[0]], classes[extra_case[0]] = extra_case[1], extra_case[2]
    for case, seg in maps.items():
        write_image(os.path.join(root, "labelsTr", case + ".nii.gz"), seg)
    dataset = {"channel_names": {"0": "CT"}, "labels": labels, "regions_class_order": [1, 2],
               "numTraining": len(maps), "file_ending": ".nii.gz",
               "classification": {"class_names": ["subtype0", "subtype1", "subtype2"], "case_labels": classes}}
    with open(os.path.join(root, "dataset.json"), "w") as f:
        json.dump(dataset, f)
    return root


def run_cli(*args):
    return run(ours("evaluate", *args), {}, timeout=120, check=False)


def test_quiz_layout_default_regions_cli(tmp_path):
    gt = write_quiz_truth(str(tmp_path / "data"))
    pred = write_predictions(str(tmp_path / "pred"))
    out = tmp_path / "results" / "metrics.json"
    proc = run_cli("--pred", pred, "--gt", gt, "--json", out, "--bootstrap", 200, "--seed", 1)
    assert proc.returncode == 0, proc.stderr

    results = json.loads(out.read_text())
    assert results["regions"] == {"label_1": [1], "label_2": [2], "foreground": [1, 2]}
    assert results["dice"]["label_1"] == pytest.approx(LABEL_1)
    assert results["dice"]["label_2"] == pytest.approx(LESION)
    assert results["dice"]["foreground"] == pytest.approx(WHOLE)
    assert results["segmentation"]["label_2"] == {"mean_dice": pytest.approx(LESION), "n_evaluated": 5,
                                                  "n_empty_both": 1}
    assert results["per_case"][4]["dice"] == pytest.approx({"label_1": 23 / 28, "label_2": 0.75,
                                                            "foreground": 0.875})
    assert results["per_case"][5]["dice"]["label_2"] is None
    assert results["class_names"] == ["subtype0", "subtype1", "subtype2"]
    assert results["confusion_matrix"] == CONFUSION
    assert results["macro_f1"] == pytest.approx(MACRO_F1)
    assert results["accuracy"] == pytest.approx(4 / 6)
    assert results["balanced_accuracy"] == pytest.approx(2 / 3)
    assert [(r["precision"], r["recall"], r["support"]) for r in results["per_class"]] == \
        [(0.5, 0.5, 2), (pytest.approx(2 / 3), 1.0, 2), (1.0, 0.5, 2)]
    assert set(results["ci95"]) == {"dice", "macro_f1", "accuracy"}
    assert set(results["ci95"]["dice"]) == {"label_1", "label_2", "foreground"}
    for lo, hi in [*results["ci95"]["dice"].values(), results["ci95"]["macro_f1"], results["ci95"]["accuracy"]]:
        assert 0 <= lo <= hi <= 1
    assert results["n_cases"] == 6 and results["bootstrap"] == {"n_resamples": 200, "seed": 1}
    assert (tmp_path / "results" / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "macro-F1" in proc.stdout and "label_2" in proc.stdout and "0.9500" in proc.stdout


def test_raw_dataset_regions_and_ignore_label_cli(tmp_path):
    """Region-based dataset.json; the ignore label (3) hides a false positive in case 0, and an all-ignore
    case 7 has no segmentation truth but still counts for classification."""
    labels = {**REGION_LABELS, "ignore": 3}
    all_ignore = np.full((16, 24, 24), 3, np.uint8)
    gt = write_raw_dataset(str(tmp_path / "Dataset901_Toy"), labels, ("quiz_1_007", all_ignore, 1))
    first = os.path.join(gt, "labelsTr", "quiz_0_001.nii.gz")
    seg = sitk.GetArrayFromImage(sitk.ReadImage(first))
    seg[0:2] = 3
    write_image(first, seg)
    maps = {c: label_map(shift=2 if i == 4 else 0, lesion=(i != 5)) for i, c in enumerate(CASES)}
    maps["quiz_0_001"][0:2] = 1  # false positive, but only where the truth is "ignore"
    maps["quiz_1_007"] = label_map()
    pred = write_predictions(str(tmp_path / "pred"), PRED + [1], CASES + ["quiz_1_007"], maps)
    proc = run_cli("--pred", pred, "--gt", gt, "--json", tmp_path / "r.json", "--bootstrap", 0)
    assert proc.returncode == 0, proc.stderr

    results = json.loads((tmp_path / "r.json").read_text())
    assert results["regions"] == {"whole_pancreas": [1, 2], "pancreas_lesion": [2]}
    assert results["dice"]["whole_pancreas"] == pytest.approx(WHOLE)
    assert results["dice"]["pancreas_lesion"] == pytest.approx(LESION)
    assert results["per_case"][0]["dice"] == {"whole_pancreas": 1.0, "pancreas_lesion": 1.0}
    assert {r["case"]: r for r in results["per_case"]}["quiz_1_007"] == {
        "case": "quiz_1_007", "true_class": 1, "predicted_class": 1, "has_segmentation_gt": False, "dice": None}
    assert results["n_cases"] == 7 and results["n_cases_with_segmentation_gt"] == 6
    assert results["confusion_matrix"] == [[1, 1, 0], [0, 3, 0], [1, 0, 1]]
    assert results["accuracy"] == pytest.approx(5 / 7)
    assert results["macro_f1"] == pytest.approx((0.5 + 6 / 7 + 2 / 3) / 3)
    assert results["ci95"] == {} and results["ignore_label"] == 3
    assert os.path.isfile(tmp_path / "confusion_matrix.png")


def test_flat_layout_perfect_prediction_api(tmp_path):
    """Flat masks + classes.csv, regions from --dataset-json, class names from class_probabilities.csv."""
    from multitask_nnunet.evaluation.evaluate import evaluate, format_table

    gt = tmp_path / "test_labels"
    for case, seg in truth_maps().items():
        write_image(str(gt / (case + ".nii.gz")), seg)
    write_csv(gt / "classes.csv", [(c + ".nii.gz", k) for c, k in zip(CASES, TRUE)])
    dataset_json = tmp_path / "dataset.json"
    dataset_json.write_text(json.dumps({"labels": REGION_LABELS}))
    pred = write_predictions(str(tmp_path / "pred"), TRUE, maps=truth_maps())
    write_csv(os.path.join(pred, "class_probabilities.csv"), [], ("Names", "Subtype", "prob_A", "prob_B", "prob_C"))

    results = evaluate(pred, str(gt), dataset_json=str(dataset_json), n_bootstrap=50)
    assert results["dice"]["whole_pancreas"] == 1.0 and results["dice"]["pancreas_lesion"] == 1.0
    assert results["macro_f1"] == 1.0 and results["accuracy"] == 1.0
    assert results["confusion_matrix"] == [[2, 0, 0], [0, 2, 0], [0, 0, 2]]
    assert results["class_names"] == ["A", "B", "C"] and results["ground_truth"]["layout"] == "flat"
    assert results["ci95"]["dice"]["whole_pancreas"] == [1.0, 1.0]
    assert os.path.isfile(os.path.join(pred, "confusion_matrix.png"))
    table = format_table(results)
    assert "whole_pancreas" in table and "macro-F1" in table and "[1.0000, 1.0000]" in table

    os.remove(os.path.join(pred, "quiz_2_006.nii.gz"))
    subset = evaluate(pred, str(gt), dataset_json=str(dataset_json), n_bootstrap=0, only_predicted=True)
    assert subset["n_cases"] == 5 and subset["cases_without_prediction"] == ["quiz_2_006"]


def test_bootstrap_is_seeded():
    from multitask_nnunet.evaluation.metrics import bootstrap_ci

    dice = np.array([[1.0], [0.5], [np.nan], [0.8]])
    y_true, y_pred = np.array([0, 1, 1, 0]), np.array([0, 1, 0, 0])
    a, b = (bootstrap_ci(dice, y_true, y_pred, 100, seed=7) for _ in range(2))
    assert np.array_equal(a["dice"], b["dice"]) and a["macro_f1"] == b["macro_f1"]


def _break_missing_prediction(pred, gt):
    os.remove(os.path.join(pred, "quiz_1_003.nii.gz"))


def _break_missing_csv_row(pred, gt):
    write_csv(os.path.join(pred, "subtype_results.csv"), [(c + ".nii.gz", 0) for c in CASES if c != "quiz_1_004"])


def _break_header(pred, gt):
    write_csv(os.path.join(pred, "subtype_results.csv"), [(c, 0) for c in CASES], header=("case", "class"))


def _break_class_index(pred, gt):
    write_csv(os.path.join(pred, "subtype_results.csv"), [(c + ".nii.gz", 3 if c == "quiz_2_005" else 0)
                                                          for c in CASES])


def _break_spacing(pred, gt):
    write_image(os.path.join(pred, "quiz_0_002.nii.gz"), label_map(), spacing=(0.8, 0.8, 3.0))


def _break_shape(pred, gt):
    write_image(os.path.join(pred, "quiz_0_002.nii.gz"), label_map()[:8])


def _truncate_prediction(pred, gt):
    path = os.path.join(pred, "quiz_1_004.nii.gz")
    write_image(path, noisy_labels((16, 24, 24)))
    truncate(path)


def _truncate_ground_truth(pred, gt):
    path = os.path.join(gt, "validation", "subtype2", "quiz_2_005.nii.gz")
    write_image(path, noisy_labels((16, 24, 24), dtype=np.float32))
    truncate(path)


@pytest.mark.parametrize("corrupt, expected", [
    (_break_missing_prediction, "case 'quiz_1_003': prediction"),
    (_break_missing_csv_row, "subtype_results.csv: case 'quiz_1_004' is missing"),
    (_break_header, "subtype_results.csv: header must be 'Names,Subtype', found 'case,class'"),
    (_break_class_index, "subtype_results.csv: case 'quiz_2_005' has class 3, expected a class index in [0, 2]"),
    (_break_spacing, "case 'quiz_0_002': prediction"),
    (_break_shape, "case 'quiz_0_002': prediction"),
    (_truncate_prediction, "quiz_1_004.nii.gz: truncated or damaged file"),
    (_truncate_ground_truth, "subtype2/quiz_2_005.nii.gz: truncated or damaged file"),
])
def test_bad_input_is_one_line_error(tmp_path, corrupt, expected):
    gt = write_quiz_truth(str(tmp_path / "data"))
    pred = write_predictions(str(tmp_path / "pred"))
    corrupt(pred, gt)
    proc = run_cli("--pred", pred, "--gt", gt, "--bootstrap", 0)
    assert proc.returncode == 1
    assert proc.stderr.startswith("multitask-nnunet evaluate: error: ") and proc.stderr.count("\n") == 1
    assert expected in proc.stderr
    if corrupt is _break_spacing:
        assert "has spacing (0.8, 0.8, 3) but ground truth" in proc.stderr
    if corrupt is _break_shape:
        assert "has shape (8, 24, 24) but ground truth" in proc.stderr


def test_float_mask_must_hold_integer_labels(tmp_path):
    from multitask_nnunet.errors import InputError
    from multitask_nnunet.io.nifti import read_label_map

    path = str(tmp_path / "m.nii.gz")
    write_image(path, label_map() * np.float32(1.0000152))
    assert np.array_equal(read_label_map(path), label_map())
    write_image(path, label_map() * np.float32(0.7))
    with pytest.raises(InputError, match=r"m.nii.gz: \d+ voxel\(s\) are not integer labels"):
        read_label_map(path)


def test_unrecognised_ground_truth_folder(tmp_path):
    pred = write_predictions(str(tmp_path / "pred"))
    os.makedirs(tmp_path / "empty")
    proc = run_cli("--pred", pred, "--gt", tmp_path / "empty")
    assert proc.returncode == 1 and "not a ground-truth folder" in proc.stderr


def test_csv_row_without_ground_truth_warns_and_plot_location_is_said(tmp_path):
    gt = write_quiz_truth(str(tmp_path / "data"))
    pred = write_predictions(str(tmp_path / "pred"))
    with open(os.path.join(pred, "subtype_results.csv"), "a", newline="") as f:
        csv.writer(f).writerow(["quiz_9_999.nii.gz", 1])
    proc = run_cli("--pred", pred, "--gt", gt, "--bootstrap", 0)
    assert proc.returncode == 0, proc.stderr
    csv_path = os.path.join(pred, "subtype_results.csv")
    assert proc.stderr.splitlines() == [f"multitask-nnunet evaluate: warning: {csv_path}: 1 row(s) for cases not in "
                                        f"the ground truth {gt} are ignored: 'quiz_9_999'"]
    png = os.path.join(pred, "confusion_matrix.png")
    assert f"confusion matrix plot written into the prediction folder (--json FILE puts it beside FILE): {png}" \
        in proc.stdout
    assert os.path.isfile(png)
