"""Explain and trust the class: ``predict --saliency`` (the decision map, HiResCAM or Grad-CAM NIfTI in the input's
geometry, PNGs, index.html), uncertainty (entropy, confidence, MC-dropout mutual information, per-voxel segmentation entropy),
temperature scaling fitted in final validation and applied by ``predict``, and ``evaluate``'s probability
metrics (ROC-AUC, Brier, ECE, reliability diagram). The CLIs run as subprocesses on the session's tiny model."""
import csv
import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from cli import Started, ours, run, run_at_once
from test_evaluation import CASES, PRED, write_predictions, write_quiz_truth
from test_inference import predict, predict_cmd

# ---------------------------------------------------------------- pure: calibration maths and the CSV format


def test_temperature_scaling_lowers_nll_of_an_overconfident_model(tmp_path):
    from multitask_nnunet.calibration import (apply_temperature, ece, fit_calibration, nll, read_temperature,
                                              softmax, write_calibration)
    rng = np.random.default_rng(0)
    n, k = 400, 3
    labels = rng.integers(0, k, n)
    logits = rng.normal(0, 1, (n, k))
    logits[np.arange(n), labels] += 1.0           # informative but noisy: about 60% correct ...
    overconfident = softmax(6.0 * logits)         # ... with logits blown up 6x
    calibration = fit_calibration(overconfident, labels)
    assert calibration["nll_after"] < calibration["nll_before"] - 0.5
    assert calibration["ece_after"] < calibration["ece_before"]
    assert 4.0 < calibration["temperature"] < 9.0  # about the factor the logits were blown up by
    np.testing.assert_allclose(apply_temperature(overconfident, calibration["temperature"]).argmax(1),
                               overconfident.argmax(1))  # a temperature never changes the class
    assert abs(nll(apply_temperature(overconfident, calibration["temperature"]), labels)
               - calibration["nll_after"]) < 1e-9
    assert ece(overconfident, labels) == calibration["ece_before"]
    separable = fit_calibration(softmax(6.0 * np.eye(k)[labels]), labels)  # every case right: nothing to fit
    assert separable["temperature"] == 1.0 and "no minimum" in separable["note"]
    write_calibration(str(tmp_path), calibration)
    assert read_temperature(str(tmp_path)) == pytest.approx(calibration["temperature"])
    assert read_temperature(str(tmp_path / "missing")) is None


def test_class_csv_columns(tmp_path):
    from multitask_nnunet.io.class_csv import read_extra_columns, read_probabilities_csv, write_class_csvs
    probabilities = {"b.nii.gz": np.array([0.2, 0.8]), "a.nii.gz": np.array([0.5, 0.5])}
    write_class_csvs(str(tmp_path), probabilities, ["x", "y"], extra_columns={"b.nii.gz": {"mutual_information": 0.25}})
    assert (tmp_path / "subtype_results.csv").read_text() == "Names,Subtype\na.nii.gz,0\nb.nii.gz,1\n"
    rows = list(csv.reader(open(tmp_path / "class_probabilities.csv")))
    assert rows[0] == ["Names", "Subtype", "prob_x", "prob_y", "entropy", "confidence", "mutual_information"]
    assert rows[1] == ["a.nii.gz", "0", "0.500000", "0.500000", f"{np.log(2):.6f}", "0.500000", ""]
    entropy = -(0.2 * np.log(0.2) + 0.8 * np.log(0.8))
    assert rows[2] == ["b.nii.gz", "1", "0.200000", "0.800000", f"{entropy:.6f}", "0.800000", "0.250000"]
    read = read_probabilities_csv(str(tmp_path / "class_probabilities.csv"))  # still only the prob_ columns
    np.testing.assert_array_equal(read["b.nii.gz"], [0.2, 0.8])
    assert read_extra_columns(str(tmp_path / "class_probabilities.csv")) == \
        {"a.nii.gz": {}, "b.nii.gz": {"mutual_information": 0.25}}


# six cases of test_evaluation (true 0,0,1,1,2,2; predicted 0,1,1,1,2,0), probabilities that agree with PRED:
PROBABILITIES = [[0.75, 0.15, 0.10], [0.30, 0.55, 0.15], [0.10, 0.75, 0.15],
                 [0.25, 0.55, 0.20], [0.10, 0.15, 0.75], [0.55, 0.25, 0.20]]
# Brier per case: .095, .815, .095, .305, .095, 1.005 -> mean 2.41 / 6
BRIER = 2.41 / 6
# 15 bins: confidence 0.75 (bin 11): 3 cases, all correct, |1 - .75| * 3/6; 0.55 (bin 8): 1 of 3 correct
ECE = 0.25 * 0.5 + abs(1 / 3 - 0.55) * 0.5
# one-vs-rest AUC by pairs (positive above negative, ties 1/2): class 0: 7/8, class 1: 7.5/8, class 2: 7.5/8
AUC = {"subtype0": 7 / 8, "subtype1": 7.5 / 8, "subtype2": 7.5 / 8}


def test_evaluate_probability_metrics_hand_computed(tmp_path):
    assert [int(np.argmax(p)) for p in PROBABILITIES] == PRED
    gt = write_quiz_truth(tmp_path / "data")
    pred = write_predictions(str(tmp_path / "pred"))
    with open(tmp_path / "pred" / "class_probabilities.csv", "w", newline="") as f:
        csv.writer(f).writerows([["Names", "Subtype", "prob_subtype0", "prob_subtype1", "prob_subtype2", "entropy",
                                  "confidence"]] +
                                [[c + ".nii.gz", k, *p, 0, max(p)] for c, k, p in zip(CASES, PRED, PROBABILITIES)])
    out = run(ours("evaluate", "--pred", pred, "--gt", gt, "--json", tmp_path / "r.json", "--bootstrap", "0"), {})
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["brier"] == pytest.approx(BRIER, abs=1e-9)
    assert results["ece"] == pytest.approx(ECE, abs=1e-9)
    for name, value in AUC.items():
        assert results["roc_auc"]["per_class"][name] == pytest.approx(value, abs=1e-9)
    assert results["roc_auc"]["macro"] == pytest.approx(np.mean(list(AUC.values())), abs=1e-9)
    assert results["reliability"]["counts"][11] == 3 and results["reliability"]["counts"][8] == 3
    assert (tmp_path / "reliability_diagram.png").stat().st_size > 5000 and "reliability diagram" in out.stdout
    assert "ROC-AUC macro" in out.stdout and results["probability_metrics_note"] is None

    (tmp_path / "pred" / "class_probabilities.csv").unlink()  # without it: the keys are there, empty, with a note
    from multitask_nnunet.evaluation.evaluate import evaluate
    results = evaluate(pred, gt, n_bootstrap=0)
    assert results["roc_auc"] is None and results["brier"] is None and results["reliability_diagram_png"] is None
    assert "no class_probabilities.csv" in results["probability_metrics_note"]


# ---------------------------------------------------------------- predict on the session's trained model
EXPLAIN_FLAGS = ("--saliency", "--seg-uncertainty", "--mc-dropout", "2")


def read_rows(path) -> list:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def probabilities(folder) -> dict:
    return {r["Names"]: np.array([float(v) for k, v in r.items() if k.startswith("prob_")])
            for r in read_rows(folder / "class_probabilities.csv")}


def mtimes(folder) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if p.is_file()}


@pytest.fixture(scope="module")
def explained(trained, tmp_path_factory):
    """The synthetic test images predicted with every explanation option on, and once with --no-calibration."""
    root = tmp_path_factory.mktemp("explain")
    run_at_once([predict_cmd(trained, trained.source / "test", root / "explain", *EXPLAIN_FLAGS, "--profile",
                             root / "profile.json"),
                 predict_cmd(trained, trained.source / "test", root / "plain", "--no-calibration")], trained.env)
    return root


def test_calibration_fitted_in_final_validation_and_applied_by_predict(trained, explained, tmp_path):
    from multitask_nnunet.calibration import apply_temperature
    calibration = json.loads((trained.fold0 / "calibration.json").read_text())
    assert calibration["temperature"] > 0 and calibration["nll_after"] <= calibration["nll_before"] + 1e-9
    assert {"ece_before", "ece_after", "n_cases", "note"} <= set(calibration)
    log = "".join(p.read_text() for p in trained.fold0.glob("training_log_*.txt"))
    assert "Calibration (temperature scaling on" in log

    # predict applies a fold's temperature by default: a copy of the model with T = 2.5 against --no-calibration
    model = tmp_path / trained.results.name
    shutil.copytree(trained.results, model, ignore=shutil.ignore_patterns("validation", "checkpoint_best.pth",
                                                                        "checkpoint_latest.pth"))
    (model / "fold_0" / "calibration.json").write_text(json.dumps({"temperature": 2.5}))
    run(ours("predict", "-i", trained.source / "test", "-o", tmp_path / "calibrated", "-m", model, "--device", "cpu"),
        trained.env)
    calibrated, plain = probabilities(tmp_path / "calibrated"), probabilities(explained / "plain")
    assert sorted(calibrated) == sorted(plain)
    for name in plain:  # one fold: calibrated = softmax(log p / T) of the uncalibrated p (CSVs: 6 decimals, so
        expected = apply_temperature(plain[name], 2.5)  # compared where p >= 0.01)
        shown = plain[name] >= 0.01
        np.testing.assert_allclose(calibrated[name][shown], expected[shown], rtol=1e-2, atol=1e-4)
        assert np.argmax(calibrated[name]) == np.argmax(plain[name])
    assert max(np.abs(calibrated[n] - plain[n]).max() for n in plain) > 0.05


def test_uncertainty_columns_and_unchanged_results_csv(explained):
    for folder, extra in ((explained / "explain", ["mutual_information"]), (explained / "plain", [])):
        assert (folder / "subtype_results.csv").read_text().splitlines()[0] == "Names,Subtype"
        rows = read_rows(folder / "class_probabilities.csv")
        assert list(rows[0]) == ["Names", "Subtype", "prob_subtype0", "prob_subtype1", "prob_subtype2", "entropy",
                                 "confidence", *sorted(extra + ["guide_ml", "no_guide"])]
        for r in rows:  # the predicted lesion's volume, and the flag of a case without one
            assert float(r["guide_ml"]) >= 0 and float(r["no_guide"]) == float(float(r["guide_ml"]) == 0)
            p = np.array([float(r[f"prob_subtype{k}"]) for k in range(3)])
            assert float(r["confidence"]) == pytest.approx(p.max(), abs=2e-6)
            assert float(r["entropy"]) == pytest.approx(-(p * np.log(np.clip(p, 1e-12, 1))).sum(), abs=1e-4)
            if extra:
                assert 0 <= float(r["mutual_information"]) <= np.log(3)
    profile = json.loads((explained / "profile.json").read_text())
    for case in profile["cases"]:
        assert case["saliency_s"] > 0 and case["mc_dropout_s"] > 0
        assert set(case["uncertainty"]) == {"entropy", "confidence", "mutual_information"}


def test_saliency_maps_geometry_figures_and_lesion_mass(trained, explained):
    from scipy.ndimage import binary_dilation
    out = explained / "explain"
    truth = {r[0]: int(r[1]) for r in list(csv.reader(open(trained.source / "test_labels" / "classes.csv")))[1:]}
    predicted = {r["Names"]: int(r["Subtype"]) for r in read_rows(out / "subtype_results.csv")}
    fractions = {}
    for image_path in sorted((trained.source / "test").glob("*_0000.nii.gz")):
        case = image_path.name.replace("_0000.nii.gz", "")
        image = sitk.ReadImage(str(image_path))
        for suffix in ("_saliency", "_pooling", "_seg_uncertainty"):
            volume = sitk.ReadImage(str(out / f"{case}{suffix}.nii.gz"))
            assert volume.GetSize() == image.GetSize()
            for get in (sitk.Image.GetSpacing, sitk.Image.GetOrigin, sitk.Image.GetDirection):
                np.testing.assert_allclose(get(volume), get(image), rtol=0, atol=1e-6)
            values = sitk.GetArrayFromImage(volume)
            assert values.dtype == np.float32 and values.min() >= 0 and values.max() <= 1 + 1e-6
            assert values.max() > (0.1 if suffix == "_seg_uncertainty" else 0.5), (case, suffix)
        assert (out / f"{case}_saliency.png").stat().st_size > 10_000
        lesion = sitk.GetArrayFromImage(sitk.ReadImage(str(trained.source / "test_labels" / f"{case}.nii.gz"))) == 2
        dilated = binary_dilation(lesion, iterations=2)
        for suffix in ("_pooling", "_saliency"):
            values = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{case}{suffix}.nii.gz")))
            fractions[case, suffix] = round(float(values[dilated].sum() / values.sum()), 3)
    correct = [c for c, _ in fractions if predicted[c + ".nii.gz"] == truth[c + ".nii.gz"]]
    assert correct, "no test case classified correctly"
    # the guided head's pooling weights lie in the lesion; HiResCAM (the default) puts a median of about half its
    # mass there (TechReport 6.5), far more than the lesion's 2.6-5.1% of the volume
    for case in correct:
        assert fractions[case, "_pooling"] >= 0.5 and fractions[case, "_saliency"] >= 0.25, fractions
    index = (out / "index.html").read_text()
    assert all(f'src="{c}_saliency.png"' in index for c, _ in fractions)


def test_resume_and_overwrite_with_the_extra_outputs(trained, explained, tmp_path):
    plain = tmp_path / "plain"  # a folder predicted without them: every case is redone when they are asked for
    shutil.copytree(explained / "plain", plain)
    plain_rerun = Started(predict_cmd(trained, trained.source / "test", plain, "--mc-dropout", "1"), trained.env)
    out = tmp_path / "out"
    shutil.copytree(explained / "explain", out)
    before = mtimes(out)
    # the same request, and one asking for less: both find every case done and write nothing
    reruns = run_at_once([predict_cmd(trained, trained.source / "test", out, *EXPLAIN_FLAGS),
                          predict_cmd(trained, trained.source / "test", out)], trained.env)
    assert all("6 case(s): 0 to predict, 6 already done" in r.stdout for r in reruns) and mtimes(out) == before

    png = sorted(n for n in before if n.endswith("_saliency.png"))[1]
    (out / png).unlink()  # one requested output missing: that case only is redone
    rerun = predict(trained, trained.source / "test", out, *EXPLAIN_FLAGS)
    assert "6 case(s): 1 to predict, 5 already done" in rerun.stdout
    case = png[:-len("_saliency.png")]
    changed = {n for n, t in mtimes(out).items() if before.get(n) != t}
    assert changed == {f"{case}{s}" for s in (".nii.gz", "_saliency.nii.gz", "_pooling.nii.gz", "_saliency.png",
                                              "_seg_uncertainty.nii.gz")} | {"subtype_results.csv",
                                                                             "class_probabilities.csv"}

    rerun = plain_rerun.result()
    assert "6 case(s): 6 to predict, 0 already done" in rerun.stdout
    assert "mutual_information" in read_rows(plain / "class_probabilities.csv")[0]

    after = mtimes(out)
    rerun = predict(trained, trained.source / "test", out, *EXPLAIN_FLAGS, "--overwrite")
    assert "6 case(s): 6 to predict, 0 already done" in rerun.stdout
    assert all(t != after[n] for n, t in mtimes(out).items() if n in after and n != "index.html")


def test_bad_options_are_one_line_errors(trained, tmp_path):
    bad = {"--mc-dropout -1": ["--mc-dropout", "-1"], "--saliency-stage 40": ["--saliency", "--saliency-stage", "40"]}
    results = run_at_once([predict_cmd(trained, trained.source / "test", tmp_path / "o", *extra)
                           for extra in bad.values()], trained.env, check=False)
    for message, result in zip(bad, results):
        assert result.returncode == 1 and result.stderr.strip().splitlines()[-1].startswith(
            f"multitask-nnunet predict: error: {message}"), message


def test_both_saliency_methods_in_process(trained):
    """The one-case API with each saliency method on one correctly classified test case: every map lies in [0, 1]
    on the input's grid with its peak at 1; the decision map (the default) lies on the predicted organ, where the
    head pooled; HiResCAM puts more of its mass in the dilated lesion than Grad-CAM. An unknown method is a
    one-line InputError."""
    import torch
    from scipy.ndimage import binary_dilation
    from multitask_nnunet.errors import InputError
    from multitask_nnunet.inference.case_predictor import CasePredictor
    from multitask_nnunet.inference.options import PredictorOptions

    truth = {r[0]: int(r[1]) for r in list(csv.reader(open(trained.source / "test_labels" / "classes.csv")))[1:]}
    image = sorted((trained.source / "test").glob("*_0000.nii.gz"))[0]
    case = image.name.replace("_0000.nii.gz", "")
    lesion = sitk.GetArrayFromImage(sitk.ReadImage(str(trained.source / "test_labels" / f"{case}.nii.gz")))
    dilated = binary_dilation(lesion == 2, iterations=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(int(trained.env["OMP_NUM_THREADS"]))
    try:
        shares = {}
        for method in ("decision", "hirescam", "gradcam"):
            predictor = CasePredictor(trained.results, PredictorOptions(device="cpu", saliency=True,
                                                                        saliency_method=method))
            result = predictor.predict_case([str(image)])
            assert result.class_index == truth[case + ".nii.gz"], "the case must be classified correctly"
            assert result.saliency.shape == result.segmentation.shape and result.saliency.dtype == np.float32
            assert result.saliency.min() >= 0 and result.saliency.max() == pytest.approx(1.0)
            shares[method] = float(result.saliency[dilated].sum() / result.saliency.sum())
            if method == "decision":  # the head's own pooling maps: nothing away from the predicted organ
                organ = binary_dilation(result.segmentation > 0, iterations=3)
                assert float(result.saliency[~organ].sum()) < 0.01 * float(result.saliency.sum())
    finally:
        torch.set_num_threads(threads)
    assert shares["hirescam"] > shares["gradcam"], shares
    with pytest.raises(InputError, match="--saliency-method nope: choose one of decision, gradcam, hirescam"):
        PredictorOptions(saliency=True, saliency_method="nope")
