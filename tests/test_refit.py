"""``multitask-nnunet refit-head`` on three folds trained by stock nnUNetv2_train: the folds' descriptor branches
refitted together on out-of-fold cases, the calibration and validation class files rewritten, predict on the
refitted folds, a rerun that fits the same branch, and the settings it refuses."""
import json
import shutil

import numpy as np
import torch

from cli import nnunet, ours, run
from conftest import CONFIG, PLANS, load_json, nnunet_env
from test_training import read_csv

TRAINER = "MultitasknnUNetTrainer_TestShort"
DATASET = "Dataset502_ClassOnly"
FOLDS = (0, 1, 2)


def branch(checkpoint: dict) -> dict:
    return {k: v for k, v in checkpoint["classification_head"]["state_dict"].items()
            if k.startswith(("standardizer.", "descriptor_linear."))}


def test_refit_head_refits_every_fold_on_out_of_fold_cases(class_only, tmp_path):
    env = nnunet_env(tmp_path)
    preprocessed = tmp_path / "nnUNet_preprocessed" / DATASET
    shutil.copytree(class_only.pipeline.preprocessed, preprocessed)
    dataset = load_json(preprocessed / "dataset.json")
    labels = dataset["classification"]["case_labels"]
    by_class = sorted(labels, key=lambda c: (labels[c], c))
    folds = [sorted(by_class[k::len(FOLDS)]) for k in FOLDS]  # every class in every fold's validation set
    (preprocessed / "splits_final.json").write_text(json.dumps(
        [{"train": sorted(set(labels) - set(val)), "val": val} for val in folds]))
    for fold in FOLDS:
        run(nnunet("nnUNetv2_train", 502, CONFIG, fold, "-tr", TRAINER, "-p", PLANS, "-device", "cpu"), env,
            timeout=900)
    model = tmp_path / "nnUNet_results" / DATASET / f"{TRAINER}__{PLANS}__{CONFIG}"
    before = [torch.load(model / f"fold_{f}" / "checkpoint_final.pth", weights_only=False) for f in FOLDS]
    assert not all(torch.equal(before[0]["classification_head"]["state_dict"]["descriptor_linear.weight"],
                               b["classification_head"]["state_dict"]["descriptor_linear.weight"])
                   for b in before[1:])  # each fold refitted its own branch on its own training cases

    refit = ours("refit-head", 502, CONFIG, "-tr", TRAINER, "-p", PLANS, "-f", *FOLDS, "--device", "cpu")
    result = run(refit, env, timeout=900)
    assert "out-of-fold cases of folds 0, 1, 2" in result.stdout + result.stderr
    after = [torch.load(model / f"fold_{f}" / "checkpoint_final.pth", weights_only=False) for f in FOLDS]
    shared = branch(after[0])
    assert shared and all(set(branch(a)) == set(shared) and all(torch.equal(branch(a)[k], shared[k]) for k in shared)
                          for a in after[1:])  # one branch in every fold
    assert not torch.equal(shared["descriptor_linear.weight"],
                           before[0]["classification_head"]["state_dict"]["descriptor_linear.weight"])
    for b, a in zip(before, after):  # the rest of every fold as it was
        assert all(torch.equal(v, a["network_weights"][k]) for k, v in b["network_weights"].items())
        assert all(torch.equal(v, a["classification_head"]["state_dict"][k])
                   for k, v in b["classification_head"]["state_dict"].items() if k not in shared)
        assert a["classification_head"]["refit"] == {"out_of_fold": True, "folds": list(FOLDS), "cases": 12}

    summary = load_json(model / "refit_head.json")
    assert summary["cases"] == len(labels) == 12 and summary["folds"] == list(FOLDS)
    assert np.array(summary["cross_fitted"]["confusion_matrix"]).sum() == 12
    temperatures = {load_json(model / f"fold_{f}" / "calibration.json")["temperature"] for f in FOLDS}
    assert temperatures == {summary["temperature"]}
    for fold, val in zip(FOLDS, folds):
        validation = model / f"fold_{fold}" / "validation"
        rows = read_csv(validation / "class_probabilities.csv")
        assert sorted(r["Names"] for r in rows) == [c + ".nii.gz" for c in val]
        assert all(int(r["True"]) == labels[r["Names"][:-7]] for r in rows)
        assert load_json(validation / "classification_summary.json")["n_cases"] == len(val)

    # the refitted folds predict, and a rerun fits the same branch
    images = tmp_path / "images"
    images.mkdir()
    for case in folds[0][:2]:
        shutil.copy(class_only.pipeline.raw / "imagesTr" / f"{case}_0000.nii.gz", images)
    out = tmp_path / "pred"
    run(ours("predict", "-i", images, "-o", out, "-m", model, "-f", *FOLDS, "--device", "cpu"), env, timeout=900)
    assert [r["Names"] for r in read_csv(out / "subtype_results.csv")] == [c + ".nii.gz" for c in folds[0][:2]]
    run(refit, env, timeout=900)
    again = branch(torch.load(model / "fold_1" / "checkpoint_final.pth", weights_only=False))
    assert all(torch.allclose(again[k], shared[k], atol=1e-5) for k in shared)

    # refused in one line: one fold; a fold that is not trained
    for folds_given, expected in (((0,), "need two or more different folds"),
                                  ((0, 3), "fold_3/checkpoint_final.pth: no such checkpoint")):
        failed = run(ours("refit-head", 502, CONFIG, "-tr", TRAINER, "-p", PLANS, "-f", *folds_given, "--device",
                          "cpu"), env, check=False, timeout=600)
        assert failed.returncode == 1, failed.stderr
        lines = failed.stderr.strip().splitlines()
        assert expected in lines[-1] and lines[-1].startswith("multitask-nnunet refit-head: error:"), failed.stderr
        assert "Traceback" not in failed.stderr
