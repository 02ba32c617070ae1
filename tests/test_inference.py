"""``multitask-nnunet predict`` through its CLI, on the session's tiny trained model (conftest.py): outputs and
their geometry, whole-volume vs sliding window, classification, resuming, bad input, real CT sizes, sharding,
the time breakdown; and the one-case API (``CasePredictor``) against the command's outputs."""
import csv
import json
import math
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from cli import kill_when, ours, run, run_at_once
from damage import truncate

REAL_CT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real_ct"
REAL_CASES = ("quiz_512", "quiz_130")  # the two smallest, one with 3 mm slices (anisotropic resampling)


def predict_cmd(pipeline, input_dir, output_dir, *extra) -> list:
    return ours("predict", "-i", input_dir, "-o", output_dir, "-m", pipeline.results, "--device", "cpu", *extra)


def predict(pipeline, input_dir, output_dir, *extra, check=True) -> subprocess.CompletedProcess:
    return run(predict_cmd(pipeline, input_dir, output_dir, *extra), pipeline.env, check=check)


def read_csv(path) -> list:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def probabilities(folder) -> dict:
    rows = read_csv(folder / "class_probabilities.csv")
    columns = [i for i, name in enumerate(rows[0]) if name.startswith("prob_")]
    return {r[0]: np.array([float(r[i]) for i in columns]) for r in rows[1:]}


def mtimes(folder) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if p.is_file()}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 1.0 if not (a.any() or b.any()) else 2 * (a & b).sum() / (a.sum() + b.sum())


def assert_same_geometry(image: sitk.Image, mask: sitk.Image):
    assert mask.GetSize() == image.GetSize()
    for get in (sitk.Image.GetSpacing, sitk.Image.GetOrigin, sitk.Image.GetDirection):
        np.testing.assert_allclose(get(mask), get(image), rtol=0, atol=1e-6)


@dataclass(frozen=True)
class Run:
    out: Path
    stdout: str
    stderr: str
    seconds: float     # the command's wall time, measured outside it
    profile: Path


@pytest.fixture(scope="module")
def test_run(trained, tmp_path_factory) -> Run:
    """The synthetic test images predicted with the defaults (whole volume, no TTA), timed, with --profile."""
    root = tmp_path_factory.mktemp("predict")
    start = time.perf_counter()
    result = predict(trained, trained.source / "test", root / "test", "--profile", root / "profile.json")
    return Run(root / "test", result.stdout, result.stderr, time.perf_counter() - start, root / "profile.json")


@pytest.fixture(scope="module")
def test_prediction(test_run) -> Path:
    return test_run.out


def test_outputs_geometry_and_csvs(trained, test_prediction):
    images = sorted((trained.source / "test").glob("*_0000.nii.gz"))
    names = [p.name.replace("_0000", "") for p in images]
    for image_path, name in zip(images, names):
        mask = sitk.ReadImage(str(test_prediction / name))
        assert_same_geometry(sitk.ReadImage(str(image_path)), mask)
        assert set(np.unique(sitk.GetArrayFromImage(mask))) <= {0, 1, 2}
    results = read_csv(test_prediction / "subtype_results.csv")
    assert results[0] == ["Names", "Subtype"]
    assert sorted(r[0] for r in results[1:]) == names
    probs = probabilities(test_prediction)
    assert sorted(probs) == names
    for row in results[1:]:
        assert abs(probs[row[0]].sum() - 1) < 1e-4 and int(row[1]) == int(np.argmax(probs[row[0]]))


def test_framework_chatter_stays_off_the_terminal(test_run):
    """nnU-Net's trainer lookup ("Trainer '...' not found in nnunetv2.training.nnUNetTrainer", ...), its CPU
    notice about perform_everything_on_device and torch's torch.jit FutureWarning are not shown; our own lines
    are."""
    shown = test_run.stdout + test_run.stderr
    for chatter in ("not found in nnunetv2.training.nnUNetTrainer", "Searching in", "Inspecting module",
                    "perform_everything_on_device", "torch.jit", "FutureWarning"):
        assert chatter not in shown
    assert re.search(r"^6 case\(s\): 6 to predict", test_run.stdout, re.M) and "predicted 6 case(s)" in test_run.stdout


def test_classification_above_chance(trained, test_prediction):
    truth = {r[0]: int(r[1]) for r in read_csv(trained.source / "test_labels" / "classes.csv")[1:]}
    predicted = {r[0]: int(r[1]) for r in read_csv(test_prediction / "subtype_results.csv")[1:]}
    accuracy = np.mean([predicted[name] == label for name, label in truth.items()])
    assert accuracy >= 0.6, f"accuracy {accuracy:.2f} on the synthetic test cases (chance: 1/3)"


def test_resume_skips_done_cases_and_overwrite_redoes_them(trained, test_prediction, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(test_prediction, out)
    before = mtimes(out)
    n = len(before) - 2  # masks
    rerun = predict(trained, trained.source / "test", out)
    assert f"{n} case(s): 0 to predict, {n} already done and skipped" in rerun.stdout
    assert mtimes(out) == before

    redo = sorted(n for n in before if n.endswith(".nii.gz"))[2]
    (out / redo).unlink()
    rerun = predict(trained, trained.source / "test", out)
    assert f"{n} case(s): 1 to predict, {n - 1} already done and skipped" in rerun.stdout
    after = mtimes(out)
    assert {n for n in after if after[n] != before[n]} == {redo, "subtype_results.csv", "class_probabilities.csv"}
    assert len(probabilities(out)) == n

    rerun = predict(trained, trained.source / "test", out, "--overwrite")
    assert f"{n} case(s): {n} to predict, 0 already done" in rerun.stdout
    assert all(mtime != after[n] for n, mtime in mtimes(out).items())


def test_whole_volume_and_sliding_window_agree(trained, tmp_path):
    """On a volume smaller than the patch; the whole-volume pass pads to the patch as the sliding window does."""
    plans = json.loads((trained.results / "plans.json").read_text())
    patch_zyx = plans["configurations"]["3d_fullres"]["patch_size"]
    image_path = sorted((trained.source / "test").glob("*_0000.nii.gz"))[0]
    image = sitk.ReadImage(str(image_path))
    lesion = np.argwhere(sitk.GetArrayFromImage(sitk.ReadImage(str(
        trained.source / "test_labels" / image_path.name.replace("_0000", "")))) == 2).mean(0)[::-1]  # x, y, z
    size = [min(s, p * 3 // 4) for s, p in zip(image.GetSize(), patch_zyx[::-1])]
    start = [int(np.clip(c - n // 2, 0, s - n)) for c, n, s in zip(lesion, size, image.GetSize())]
    (tmp_path / "small").mkdir()
    sitk.WriteImage(sitk.RegionOfInterest(image, size, start), str(tmp_path / "small" / image_path.name))

    modes = ("whole", "sliding")
    logs = dict(zip(modes, (r.stdout for r in run_at_once(
        [predict_cmd(trained, tmp_path / "small", tmp_path / mode, "--mode", mode) for mode in modes], trained.env))))
    case = image_path.name.replace("_0000.nii.gz", "")
    assert f"{case}: whole, class" in logs["whole"] and f"{case}: sliding, class" in logs["sliding"]
    name = image_path.name.replace("_0000", "")
    whole, sliding = (sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / m / name))) for m in ("whole", "sliding"))
    for labels in ((1, 2), (2,)):  # the pancreas region (pancreas + lesion) and the lesion
        assert dice(np.isin(whole, labels), np.isin(sliding, labels)) >= 0.95
    np.testing.assert_allclose(probabilities(tmp_path / "whole")[name], probabilities(tmp_path / "sliding")[name],
                               atol=1e-3)


def write_bad_inputs(folder: Path, good: Path) -> dict:
    """One good case and one of each kind of bad input; returns {kind: text its message must hold}."""
    folder.mkdir()
    shutil.copy(good, folder / "a_good_0000.nii.gz")
    (folder / "b_unreadable_0000.nii.gz").write_bytes(b"this is not an image" * 20)
    image = sitk.ReadImage(str(good))
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    array[array.shape[0] // 2, 5, 5] = np.nan
    nan_image = sitk.GetImageFromArray(array)
    nan_image.CopyInformation(image)
    sitk.WriteImage(nan_image, str(folder / "c_nan_0000.nii.gz"))
    shutil.copy(good, folder / "d_no_channel_suffix.nii.gz")
    shutil.copy(good, folder / "e_wrong_channel_0001.nii.gz")
    return {"unreadable": f"{folder / 'b_unreadable_0000.nii.gz'}: cannot read image",
            "nan": f"{folder / 'c_nan_0000.nii.gz'}: image contains NaN",
            "naming": f"{folder / 'd_no_channel_suffix.nii.gz'}: not named <case>_XXXX.nii.gz",
            "channels": "case 'e_wrong_channel'"}


def test_bad_inputs(trained, tmp_path):
    good = sorted((trained.source / "test").glob("*_0000.nii.gz"))[0]
    expected = write_bad_inputs(tmp_path / "bad", good)
    shutil.copytree(tmp_path / "bad", tmp_path / "bad2")  # for the third run, without the naming problems
    for name in ("d_no_channel_suffix.nii.gz", "e_wrong_channel_0001.nii.gz", "c_nan_0000.nii.gz"):
        (tmp_path / "bad2" / name).unlink()
    # the three runs are independent: they go at once
    naming, continued, stopped = run_at_once(
        [predict_cmd(trained, tmp_path / "bad", tmp_path / "out"),
         predict_cmd(trained, tmp_path / "bad", tmp_path / "out_continued", "--continue-on-error"),
         predict_cmd(trained, tmp_path / "bad2", tmp_path / "out2")], trained.env, check=False)

    # naming problems are found from the file names, before the model is loaded
    assert naming.returncode == 1
    assert naming.stderr.strip().splitlines() == [f"multitask-nnunet predict: error: {expected['naming']} "
                                                  f"(nnU-Net channel naming, e.g. d_no_channel_suffix_0000.nii.gz "
                                                  f"for channel 0)"]
    assert not (tmp_path / "out").exists()

    # --continue-on-error: the good case is predicted, every failure reported on its own line
    assert continued.returncode == 1
    errors = [line for line in continued.stderr.splitlines() if line.startswith("multitask-nnunet predict: error: ")]
    assert len(errors) == 4
    for kind, text in expected.items():
        assert sum(text in line for line in errors) == 1, kind
    assert "missing e_wrong_channel_0000.nii.gz" in continued.stderr
    assert (tmp_path / "out_continued" / "a_good.nii.gz").is_file()
    assert list(probabilities(tmp_path / "out_continued")) == ["a_good.nii.gz"]

    # without it, the first bad case stops the run; the cases finished before it are kept
    assert stopped.returncode == 1
    assert stopped.stderr.strip().splitlines()[-1].startswith(
        f"multitask-nnunet predict: error: {tmp_path / 'bad2' / 'b_unreadable_0000.nii.gz'}: cannot read image")
    assert list(probabilities(tmp_path / "out2")) == ["a_good.nii.gz"]


def test_truncated_image_fails_its_case_only(trained, tmp_path):
    """Half of a .nii.gz (an interrupted copy): SimpleITK would read it with zeros for the missing voxels and
    predict. The case fails with one line naming the file, gets no mask and no CSV row; with
    --continue-on-error the other case is predicted. The truncated real CT is used as well where it is present."""
    good, damaged = sorted((trained.source / "test").glob("*_0000.nii.gz"))[:2]
    (tmp_path / "in").mkdir()
    shutil.copy(good, tmp_path / "in" / "a_good_0000.nii.gz")
    bad = {"b_half": damaged}
    if (REAL_CT / f"{REAL_CASES[0]}_0000.nii.gz").is_file():
        bad["c_real_half"] = REAL_CT / f"{REAL_CASES[0]}_0000.nii.gz"
    for name, source in bad.items():
        shutil.copy(source, tmp_path / "in" / f"{name}_0000.nii.gz")
        truncate(tmp_path / "in" / f"{name}_0000.nii.gz")

    shutil.copytree(tmp_path / "in", tmp_path / "in2")  # without the good case, for the run without
    (tmp_path / "in2" / "a_good_0000.nii.gz").unlink()     # --continue-on-error; the two runs go at once
    result, stopped = run_at_once([predict_cmd(trained, tmp_path / "in", tmp_path / "out", "--continue-on-error"),
                                   predict_cmd(trained, tmp_path / "in2", tmp_path / "out2")], trained.env, check=False)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("multitask-nnunet predict: error: ")]
    assert [e.split(": truncated or damaged file: ")[0] for e in errors] == \
        [f"multitask-nnunet predict: error: {tmp_path / 'in' / name}_0000.nii.gz" for name in sorted(bad)]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.nii.gz")) == ["a_good.nii.gz"]
    assert list(probabilities(tmp_path / "out")) == ["a_good.nii.gz"]
    assert [r[0] for r in read_csv(tmp_path / "out" / "subtype_results.csv")[1:]] == ["a_good.nii.gz"]

    # without --continue-on-error: the first bad case stops it
    assert stopped.returncode == 1
    assert stopped.stderr.strip().splitlines()[-1].startswith(
        f"multitask-nnunet predict: error: {tmp_path / 'in2' / 'b_half_0000.nii.gz'}: truncated or damaged file: ")
    assert not list((tmp_path / "out2").glob("*.nii.gz"))


def test_damaged_checkpoint_is_one_line(trained, tmp_path):
    """-chk naming a damaged checkpoint (half of the real one): one line naming the file, no output."""
    model = tmp_path / "model"
    (model / "fold_0").mkdir(parents=True)
    for name in ("dataset.json", "plans.json"):
        shutil.copy(trained.results / name, model / name)
    damaged = model / "fold_0" / "checkpoint_damaged.pth"
    data = (trained.fold0 / "checkpoint_final.pth").read_bytes()
    damaged.write_bytes(data[:len(data) // 2])
    result = run(ours("predict", "-i", trained.source / "test", "-o", tmp_path / "out", "-m", model,
                      "-chk", damaged.name, "--device", "cpu"), trained.env, check=False)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"multitask-nnunet predict: error: {damaged}: not a readable "
                                                   f"checkpoint ("), lines
    assert not list((tmp_path / "out").glob("*.nii.gz"))


def test_rerun_after_kill_removes_temporary_files(trained, tmp_path):
    """predict killed (SIGKILL) while a mask is being written leaves its temporary file; the next run removes it,
    says so in one line and finishes every case. A temporary file of a live process (this test's) is kept."""
    from multitask_nnunet.io.atomic import owner_tag
    source = trained.source / "test"
    for attempt in range(5):  # a mask write takes milliseconds: the kill can miss it; try again in a new folder
        out = tmp_path / f"out{attempt}"
        left = kill_when(predict_cmd(trained, source, out), trained.env, lambda: sorted(out.glob(".tmp_*.nii.gz")))
        if left:
            break
    assert left, "no kill landed during a mask write"
    live = out / f".tmp_{owner_tag()}-live.nii.gz"
    live.write_bytes(b"")

    result = predict(trained, source, out)
    assert f"removed {len(left)} temporary file(s) that an interrupted run left in {out}: " \
           f"{', '.join(p.name for p in left)}" in result.stdout.splitlines()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [live.name]
    names = sorted(p.name.replace("_0000", "") for p in source.glob("*_0000.nii.gz"))
    assert sorted(p.name for p in out.glob("*.nii.gz") if not p.name.startswith(".")) == names
    assert sorted(probabilities(out)) == names


@pytest.mark.skipif(not all((REAL_CT / f"{c}_0000.nii.gz").is_file() for c in REAL_CASES),
                    reason="../shared/data/real_ct not available")
def test_real_ct_sizes(trained, tmp_path):
    (tmp_path / "in").mkdir()
    for case in REAL_CASES:
        os.symlink(REAL_CT / f"{case}_0000.nii.gz", tmp_path / "in" / f"{case}_0000.nii.gz")
    predict(trained, tmp_path / "in", tmp_path / "out")
    for case in REAL_CASES:
        mask = sitk.ReadImage(str(tmp_path / "out" / f"{case}.nii.gz"))
        assert_same_geometry(sitk.ReadImage(str(REAL_CT / f"{case}_0000.nii.gz")), mask)
        assert set(np.unique(sitk.GetArrayFromImage(mask))) <= {0, 1, 2}
    assert sorted(probabilities(tmp_path / "out")) == sorted(f"{c}.nii.gz" for c in REAL_CASES)


def test_two_parts_at_once_cover_every_case_once(trained, tmp_path):
    out = tmp_path / "out"
    logs = [r.stdout for r in run_at_once([predict_cmd(trained, trained.source / "test", out, "--num-parts", "2",
                                                       "--part-id", str(i)) for i in (0, 1)], trained.env, timeout=600)]
    names = sorted(p.name.replace("_0000", "") for p in (trained.source / "test").glob("*_0000.nii.gz"))
    per_part = [set(probabilities(out / "parts" / f"part_{i}")) for i in (0, 1)]
    assert not per_part[0] & per_part[1] and sorted(per_part[0] | per_part[1]) == names
    assert sum("every case of the input is done: wrote the merged CSVs" in log for log in logs) >= 1
    assert sorted(probabilities(out)) == names
    assert sorted(r[0] for r in read_csv(out / "subtype_results.csv")[1:]) == names
    assert all((out / n).is_file() for n in names)


# ---------------------------------------------------------------- time breakdown
STAGES = ("start-up", "model load", "read", "preprocess", "network", "export", "write")


def breakdown_table(stdout: str) -> dict:
    """{stage: (wall s, busy s)} and 'other'/'total' (wall s) from the breakdown printed at the end of a run."""
    table = {}
    for line in stdout.split("time breakdown:", 1)[1].splitlines()[2:]:
        match = re.fullmatch(r"\s+(\S+(?: \S+)?)\s+(\d+\.\d+)(?:\s+(\d+\.\d+))?.*", line)
        if match:
            table[match.group(1)] = (float(match.group(2)), float(match.group(3) or "nan"))
    return table


def expected_paths(trained) -> dict:
    """Auto mode's path per synthetic test case: ``whole`` where the preprocessed volume (here the image's own
    grid: the synthetic data has the plans' spacing) fits in the patch on every axis, else ``sliding``."""
    patch = json.loads((trained.results / "plans.json").read_text())["configurations"]["3d_fullres"]["patch_size"]
    paths = {}
    for image_path in sorted((trained.source / "test").glob("*_0000.nii.gz")):
        shape = sitk.ReadImage(str(image_path)).GetSize()[::-1]
        paths[image_path.name.replace("_0000.nii.gz", "")] = \
            "whole" if all(s <= p for s, p in zip(shape, patch)) else "sliding"
    assert set(paths.values()) == {"whole", "sliding"}  # the data has both kinds of case
    return paths


def test_auto_mode_runs_one_pass_only_for_volumes_that_fit_in_the_patch(trained, case_predictor):
    """Auto mode's rule: a whole-volume pass where the sliding window would run one tile (the volume fits in the
    patch on every axis), the sliding window for anything larger; ``--max-whole-voxels`` opts into larger passes
    by voxel count, whatever the shape."""
    import torch
    predictor = case_predictor.predictor
    patch = [int(p) for p in predictor.configuration_manager.patch_size]
    fits, longer = torch.zeros(1, *patch), torch.zeros(1, patch[0] + 1, *patch[1:])
    flatter = torch.zeros(1, patch[0] * 2, patch[1] // 2, *patch[2:])  # the patch's voxel count, another shape
    assert predictor.mode == "auto" and predictor.max_whole_volume_voxels is None
    assert predictor._use_whole_volume(fits) and not predictor._use_whole_volume(longer)
    assert not predictor._use_whole_volume(flatter)
    predictor.max_whole_volume_voxels = 2 * int(np.prod(patch))
    try:
        assert predictor._use_whole_volume(longer) and predictor._use_whole_volume(flatter)
        assert not predictor._use_whole_volume(torch.zeros(1, patch[0] * 3, *patch[1:]))
    finally:
        predictor.max_whole_volume_voxels = None


def test_sliding_window_reads_the_descriptors_on_the_whole_case(trained, case_predictor):
    """On a volume larger than the patch, the head's descriptors are read once, on the stitched segmentation and
    the whole image (as a whole-volume pass reads them, and as the refit fitted them), not per tile: one record
    per case, equal to ``describe`` of the stitched case; the class adds that part to the tiles' averaged one."""
    import torch
    predictor = case_predictor.predictor
    head = predictor._module().classification_head
    assert head.has_case_part
    image = sorted((trained.source / "test").glob("*_0000.nii.gz"))[0]
    data = torch.as_tensor(case_predictor.prepare([image]).data).float()
    patch = [int(p) for p in predictor.configuration_manager.patch_size]
    data = torch.nn.functional.pad(data, [0, 0, 0, 0, 0, patch[0] // 2], mode="replicate")  # one axis longer
    assert not predictor._use_whole_volume(data)
    predictor.network = predictor.network.to(predictor.device).eval()
    with torch.inference_mode(), head.recording() as records:
        logits, probabilities = predictor._predict_sliding(data, predictor.device)
    assert len(records) == 1
    guide, organ = head.predicted_structures(logits[None])
    torch.testing.assert_close(records[0][0], head.describe(data[None], guide, organ))
    assert float(records[0][0][0, 1]) == pytest.approx(math.log1p(float((organ > 0).sum()) * head.voxel_ml), rel=1e-5)
    with torch.inference_mode():
        expected = torch.softmax(records[0][2] + head.descriptor_linear(head.standardizer(records[0][0],
                                                                                           records[0][1])), 1)[0]
    torch.testing.assert_close(probabilities.float().cpu(), expected, rtol=1e-4, atol=1e-5)


def test_time_breakdown_sums_to_wall_time(trained, test_run):
    table = breakdown_table(test_run.stdout)
    assert set(STAGES) <= set(table), test_run.stdout
    stages = sum(table[s][0] for s in STAGES)
    # the main thread's time line, stage by stage, against the wall time measured outside the process
    assert abs(stages - test_run.seconds) <= 0.1 * test_run.seconds, (stages, test_run.seconds, test_run.stdout)
    assert table["network"][0] > 0 and table["model load"][0] > 0 and table["start-up"][0] > 0
    for stage in ("read", "preprocess", "write"):  # background stages: the main thread waits at most their time
        assert table[stage][0] <= table[stage][1] + 0.01, stage

    profile = json.loads(test_run.profile.read_text())
    names = sorted(p.name.replace("_0000.nii.gz", "") for p in (trained.source / "test").glob("*_0000.nii.gz"))
    assert sorted(c["name"] for c in profile["cases"]) == names
    # auto mode: one pass for the cases that fit in the patch, the sliding window for those a little larger
    assert {c["name"]: c["path"] for c in profile["cases"]} == expected_paths(trained)
    for case in profile["cases"]:
        assert case["class_name"] in ("subtype0", "subtype1", "subtype2")
        assert all(case[f"{stage}_s"] >= 0 for stage in ("read", "preprocess", "network", "export", "write"))
    assert abs(profile["stages_wall_sum_s"] + profile["other_s"] - profile["wall_s"]) < 1e-3
    for stage in STAGES:
        assert abs(profile["stages"][stage]["wall_s"] - table[stage][0]) < 0.01, stage


# ---------------------------------------------------------------- the one-case API
@pytest.fixture(scope="module")
def case_predictor(trained):
    """The CasePredictor, in this process, with the torch threads of the CLI runs (OMP_NUM_THREADS of conftest)."""
    import torch
    from multitask_nnunet.inference.case_predictor import CasePredictor
    from multitask_nnunet.inference.options import PredictorOptions
    threads = torch.get_num_threads()
    torch.set_num_threads(int(trained.env["OMP_NUM_THREADS"]))
    yield CasePredictor(trained.results, PredictorOptions(device="cpu"))
    torch.set_num_threads(threads)


def test_one_case_api_matches_the_batch_command(trained, test_prediction, case_predictor, tmp_path):
    import torch
    checkpoint = torch.load(trained.fold0 / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert case_predictor.class_names == checkpoint["classification_head"]["class_names"]
    assert read_csv(test_prediction / "class_probabilities.csv")[0][2:] == \
        [f"prob_{c}" for c in case_predictor.class_names] + ["entropy", "confidence", "guide_ml", "no_guide"]
    classes = {r[0]: int(r[1]) for r in read_csv(test_prediction / "subtype_results.csv")[1:]}
    probs = probabilities(test_prediction)
    for image_path in sorted((trained.source / "test").glob("*_0000.nii.gz")):
        name = image_path.name.replace("_0000", "")
        expected = sitk.GetArrayFromImage(sitk.ReadImage(str(test_prediction / name)))
        result = case_predictor.predict_case([image_path])
        assert result.name == name.replace(".nii.gz", "") and result.path == expected_paths(trained)[result.name]
        np.testing.assert_array_equal(result.segmentation, expected)
        assert result.class_index == classes[name] and result.class_name == case_predictor.class_names[classes[name]]
        np.testing.assert_allclose(result.probabilities, probs[name], atol=2e-6)
        assert set(result.timings) == {"read", "preprocess", "network", "export"}

        image = sitk.ReadImage(str(image_path))  # the same case as an array with its spacing (numpy axis order)
        from_array = case_predictor.predict_case(sitk.GetArrayFromImage(image)[None],
                                                 {"spacing": list(image.GetSpacing())[::-1]}, name="a")
        np.testing.assert_array_equal(from_array.segmentation, expected)
        assert from_array.class_index == result.class_index

    case_predictor.write_mask(result, str(tmp_path / name))
    assert_same_geometry(sitk.ReadImage(str(image_path)), sitk.ReadImage(str(tmp_path / name)))


def test_one_case_api_bad_input(trained, case_predictor):
    from multitask_nnunet.errors import InputError
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(sorted((trained.source / "test").glob("*_0000.nii.gz"))[0])))
    with pytest.raises(InputError, match="case 'a' \\(image array\\): 2 channel\\(s\\); the model expects 1"):
        case_predictor.predict_case(np.stack([image, image]), {"spacing": [2.0, 0.75, 0.75]}, name="a")
    with pytest.raises(InputError, match="needs properties with its 'spacing'"):
        case_predictor.predict_case(image[None])
    with pytest.raises(InputError, match="nope_0000.nii.gz: cannot read image"):
        case_predictor.predict_case([str(trained.root / "nope_0000.nii.gz")])


def test_safety_nets_out_of_memory_fallback_and_non_finite_output(trained, case_predictor, monkeypatch):
    import torch
    from multitask_nnunet.errors import InputError
    image_path = sorted((trained.source / "test").glob("*_0000.nii.gz"))[0]
    network = case_predictor.predictor

    def out_of_memory(data):
        raise torch.OutOfMemoryError("simulated")

    with monkeypatch.context() as m:  # the whole-volume pass runs out of memory: the sliding window takes over
        m.setattr(network, "mode", "whole")
        m.setattr(network, "_predict_whole", out_of_memory)
        fallback = case_predictor.predict_case([image_path])
    with monkeypatch.context() as m:
        m.setattr(network, "mode", "sliding")
        sliding = case_predictor.predict_case([image_path])
    assert fallback.path == "fallback" and "whole volume ran out of memory" in fallback.fallback
    assert sliding.path == "sliding" and sliding.fallback is None
    np.testing.assert_array_equal(fallback.segmentation, sliding.segmentation)
    np.testing.assert_allclose(fallback.probabilities, sliding.probabilities, atol=1e-6)

    mirror_and_predict = network._mirror_and_predict

    def with_inf(x):
        segmentation, class_probabilities = mirror_and_predict(x)
        segmentation[(0, 0, *[n // 2 for n in segmentation.shape[2:]])] = float("inf")  # not in the padding
        return segmentation, class_probabilities

    with monkeypatch.context() as m:  # nnU-Net's predictor raises on inf logits; so do we, naming the case
        m.setattr(network, "_mirror_and_predict", with_inf)
        with pytest.raises(InputError, match=re.escape(f"case '{image_path.name[:-12]}' ({image_path}): the "
                                                       f"network's output holds NaN or infinite values")):
            case_predictor.predict_case([image_path])


# ---------------------------------------------------------------- lean start-up: the network from the plans
def test_our_trainers_build_the_network_from_the_plans_without_the_trainer_lookup(trained, case_predictor, tmp_path):
    """``predict`` builds the network of our trainers with nnU-Net's default architecture builder directly from
    the plans (no import of every nnU-Net trainer module); the list of those trainers is checked against the
    classes, and the network equals the one nnU-Net's trainer lookup builds."""
    import sys
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from multitask_nnunet.inference import predictor as predictor_module
    from multitask_nnunet.registration import DEFAULT_ARCHITECTURE_TRAINERS
    from multitask_nnunet.training import trainer, variants
    ours = {c.__name__ for m in (trainer, variants) for c in vars(m).values()
            if isinstance(c, type) and issubclass(c, trainer.MultitasknnUNetTrainer) and c.__module__ == m.__name__
            and c.build_network_architecture is nnUNetTrainer.build_network_architecture}
    assert ours == DEFAULT_ARCHITECTURE_TRAINERS

    p = case_predictor.predictor
    checkpoint = torch.load(trained.fold0 / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    build = lambda: p.build_network(checkpoint["trainer_name"], p.plans_manager, p.configuration_manager,  # noqa
                                    p.dataset_json, checkpoint["classification_head"])
    direct = build()
    original = predictor_module.DEFAULT_ARCHITECTURE_TRAINERS
    predictor_module.DEFAULT_ARCHITECTURE_TRAINERS = frozenset()  # the fallback: nnU-Net's trainer lookup
    try:
        looked_up = build()
    finally:
        predictor_module.DEFAULT_ARCHITECTURE_TRAINERS = original
    assert repr(direct) == repr(looked_up)
    state = case_predictor.predictor.network.state_dict()
    x = torch.randn(1, 1, *p.configuration_manager.patch_size)
    outputs = []
    for network in (direct, looked_up):
        network.load_state_dict(state)
        with torch.no_grad():
            outputs.append(network.eval()(x, return_classification=True))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)

    # the command itself: no trainer module of nnU-Net is imported (python -X importtime lists every import)
    image = sorted((trained.source / "test").glob("*_0000.nii.gz"))[0]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / image.name).symlink_to(image)
    result = run([sys.executable, "-X", "importtime", *predict_cmd(trained, tmp_path / "in", tmp_path / "out")[1:]],
                 trained.env)
    assert "multitask_nnunet.inference.predictor" in result.stderr  # the listing works
    assert "nnunetv2.training.nnUNetTrainer" not in result.stderr
    assert (tmp_path / "out" / image.name.replace("_0000", "")).is_file()


def test_unwritten_results_are_bounded(tmp_path):
    """The main thread waits for the writer once MAX_PENDING_WRITES results are unwritten, and records the
    written cases in order (their class rows only after their masks)."""
    from concurrent.futures import ThreadPoolExecutor
    from collections import deque
    from types import SimpleNamespace

    from multitask_nnunet.inference.batch import MAX_PENDING_WRITES, PredictionReport, _collect_writes
    from multitask_nnunet.inference.class_rows import ClassRows
    from multitask_nnunet.inference.timing import Breakdown

    def slow_write() -> float:
        time.sleep(0.2)
        return 0.2

    rows, report, breakdown = ClassRows(str(tmp_path), lambda: ["a", "b"]), PredictionReport(str(tmp_path)), Breakdown()
    writing = deque()
    with ThreadPoolExecutor(1) as writer:
        for i in range(MAX_PENDING_WRITES + 3):
            case = SimpleNamespace(name=f"c{i}", output_name=f"c{i}.nii.gz")
            result = SimpleNamespace(probabilities=np.array([0.3, 0.7]), uncertainty={}, guide={}, path="whole",
                                     fallback=None, class_index=1, class_name="b", shape=(1, 1, 1),
                                     preprocessed_shape=(1, 1, 1), timings={})
            writing.append((case, result, writer.submit(slow_write)))
            _collect_writes(writing, rows, report, breakdown, keep=MAX_PENDING_WRITES)
            assert len(writing) <= MAX_PENDING_WRITES
        assert report.predicted == [f"c{i}" for i in range(3)]
        _collect_writes(writing, rows, report, breakdown, keep=0)
    assert not writing and report.predicted == [f"c{i}" for i in range(MAX_PENDING_WRITES + 3)]
    assert read_csv(tmp_path / "subtype_results.csv")[1:] == [[f"c{i}.nii.gz", "1"]
                                                              for i in range(MAX_PENDING_WRITES + 3)]
