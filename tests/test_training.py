"""MultitasknnUNetTrainer through the stock nnU-Net CLIs (plan_and_preprocess, train, predict) on the
synthetic dataset with tiny plans."""
import csv
import shutil

import pytest
import torch

from cli import nnunet, run
from conftest import CONFIG, DATASET_ID, PLANS, TRAINER, load_json, nnunet_env


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_checkpoint_holds_head_and_stock_weights(trained):
    checkpoint = torch.load(trained.fold0 / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    head = checkpoint["classification_head"]
    assert head["num_classes"] == 3 and head["class_names"] == ["subtype0", "subtype1", "subtype2"]
    assert head["state_dict"]["mlp.7.weight"].shape == (3, 64)
    assert checkpoint["training_phase"] == 2
    assert not any(k.startswith("classification_head") for k in checkpoint["network_weights"])
    assert checkpoint["trainer_name"] == TRAINER


def test_log_shows_f1_and_progress_png_exists(trained):
    log = "".join(p.read_text() for p in trained.fold0.glob("training_log_*.txt"))
    assert "Val macro-F1" in log and "Phase 2: classification gradients now reach the encoder" in log
    assert "training-fold counts [6, 6, 6]" in log  # class balance counted on the training fold only
    assert (trained.fold0 / "progress.png").stat().st_size > 10_000


def test_final_validation_outputs(trained):
    validation = trained.fold0 / "validation"
    val_cases = load_json(trained.preprocessed / "splits_final.json")[0]["val"]
    assert sorted(p.name for p in validation.glob("*.nii.gz")) == sorted(c + ".nii.gz" for c in val_cases)
    assert "foreground_mean" in load_json(validation / "summary.json")
    rows = read_csv(validation / "class_probabilities.csv")
    assert [r["Names"] for r in rows] == sorted(c + ".nii.gz" for c in val_cases)
    for r in rows:
        assert abs(sum(float(v) for k, v in r.items() if k.startswith("prob_")) - 1) < 1e-4
    summary = load_json(validation / "classification_summary.json")
    assert {"macro_f1", "accuracy", "confusion_matrix"} <= set(summary)
    assert sum(map(sum, summary["confusion_matrix"])) == len(val_cases)


def test_both_tasks_learn(trained):
    """A few CPU minutes through the stock CLI: whole-region Dice >= 0.8 and macro-F1 well above chance
    (1/3) on the held-out validation cases, per case."""
    validation = trained.fold0 / "validation"
    dice = load_json(validation / "summary.json")["mean"]
    whole_region = next(v["Dice"] for k, v in dice.items() if k.replace(" ", "") in ("(1,2)", "[1,2]"))
    assert whole_region >= 0.8, dice
    assert load_json(validation / "classification_summary.json")["macro_f1"] >= 0.6


def test_stock_predict_works_on_our_model(trained, tmp_path):
    images = tmp_path / "in"
    images.mkdir()
    for p in sorted((trained.source / "test").glob("*_0000.nii.gz"))[:2]:
        shutil.copy(p, images / p.name)
    out = tmp_path / "out"
    run(nnunet("nnUNetv2_predict", "-i", images, "-o", out, "-d", DATASET_ID, "-c", CONFIG, "-f", "0",
               "-tr", TRAINER, "-p", PLANS, "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_tta"),
        trained.env)
    assert len(list(out.glob("*.nii.gz"))) == 2


def test_continue_training_resumes_exactly(trained, tmp_path):
    """--c resumes from checkpoint_latest.pth: the epoch counter, phase, logs and head come back, and only
    the remaining epoch runs."""
    env = nnunet_env(tmp_path)
    for var in ("nnUNet_raw", "nnUNet_preprocessed"):
        env[var] = trained.env[var]
    fold0 = tmp_path / "nnUNet_results" / trained.results.parent.name / trained.results.name / "fold_0"
    shutil.copytree(trained.results, fold0.parent)
    checkpoint = torch.load(fold0 / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    last = checkpoint["current_epoch"] - 1
    checkpoint["current_epoch"] = last  # as if the run had stopped after epoch last - 1
    checkpoint["logging"] = {k: v[:last] for k, v in checkpoint["logging"].items()}
    torch.save(checkpoint, fold0 / "checkpoint_latest.pth")
    (fold0 / "checkpoint_final.pth").unlink()
    shutil.rmtree(fold0 / "validation")

    result = run(nnunet("nnUNetv2_train", DATASET_ID, CONFIG, "0", "-tr", TRAINER, "-p", PLANS, "-device", "cpu",
                        "--c"), env, timeout=900)
    assert f"Epoch {last}\n" in result.stdout and f"Epoch {last - 1}\n" not in result.stdout
    resumed = torch.load(fold0 / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert resumed["current_epoch"] == last + 1 and resumed["training_phase"] == 2
    assert all(len(v) == last + 1 for v in resumed["logging"].values())
    assert resumed["logging"]["val_macro_f1"][:last] == checkpoint["logging"]["val_macro_f1"]
    assert (fold0 / "validation" / "classification_summary.json").is_file()


def _write_preprocessed_copy(trained, tmp_path, edit):
    """A copy of the preprocessed dataset whose dataset.json is changed by ``edit``."""
    env = nnunet_env(tmp_path)
    target = tmp_path / "nnUNet_preprocessed" / trained.preprocessed.name
    shutil.copytree(trained.preprocessed, target)
    dataset = load_json(target / "dataset.json")
    edit(dataset)
    (target / "dataset.json").write_text(__import__("json").dumps(dataset))
    env["nnUNet_raw"] = trained.env["nnUNet_raw"]
    return env


def test_missing_class_labels_is_a_clear_error(preprocessed, tmp_path):
    env = _write_preprocessed_copy(preprocessed, tmp_path, lambda d: d.pop("classification"))
    result = run(nnunet("nnUNetv2_train", DATASET_ID, CONFIG, "0", "-tr", TRAINER, "-p", PLANS, "-device", "cpu"),
                 env, check=False)
    assert result.returncode != 0
    assert "no 'classification' entry with class labels" in result.stderr


@pytest.mark.parametrize("edit,message", [
    (lambda d: d["classification"]["case_labels"].pop(sorted(d["classification"]["case_labels"])[0]),
     "has no class label"),
    (lambda d: d["classification"]["case_labels"].update({sorted(d["classification"]["case_labels"])[0]: 3}),
     "has class label 3, expected an integer in [0, 2]"),
])
def test_bad_case_labels_name_the_case(preprocessed, tmp_path, edit, message):
    env = _write_preprocessed_copy(preprocessed, tmp_path, edit)
    first_case = sorted(load_json(preprocessed.preprocessed / "dataset.json")["classification"]["case_labels"])[0]
    result = run(nnunet("nnUNetv2_train", DATASET_ID, CONFIG, "0", "-tr", TRAINER, "-p", PLANS, "-device", "cpu"),
                 env, check=False)
    assert result.returncode != 0
    assert message in result.stderr and first_case in result.stderr
