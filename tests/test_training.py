"""MultitasknnUNetTrainer through the stock nnU-Net CLIs (plan_and_preprocess, train, predict) on the
synthetic dataset with tiny plans."""
import csv
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cli import Started, nnunet, ours, run, run_at_once
from multitask_nnunet.model.heads import HEADS, SegGuidedHead
from conftest import CONFIG, DATASET_ID, PLANS, TRAINER, load_json, nnunet_env


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_checkpoint_holds_head_and_stock_weights(trained):
    checkpoint = torch.load(trained.fold0 / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    head = checkpoint["classification_head"]
    assert head["num_classes"] == 3 and head["class_names"] == ["subtype0", "subtype1", "subtype2"]
    # the head as nnU-Net names architectures: class name + complete kwargs, from which predict rebuilds it
    assert head["class_name"] == "SegGuidedHead"
    kwargs = head["kwargs"]
    assert kwargs["guide_activation"] == "sigmoid" and kwargs["guide_channels"] == [1]  # the lesion region
    assert kwargs["foreground_channels"] == [0, 1] and kwargs["num_classes"] == 3
    assert head["state_dict"]["mlp.4.weight"].shape == (3, 128)  # LayerNorm, Linear, ReLU, Dropout, Linear
    assert not any(k.startswith("classification_head") for k in checkpoint["network_weights"])
    assert checkpoint["trainer_name"] == TRAINER and "training_phase" not in checkpoint
    # two optimizers: nnU-Net's SGD without the head, the head's own AdamW over the head's parameter groups,
    # the descriptors' linear layer at DESCRIPTOR_LR_SCALE times the head's learning rate
    head_state = checkpoint["head_optimizer_state"]
    n_head = len([k for k in head["state_dict"] if not k.startswith("standardizer.")])  # its buffers: no parameters
    groups = head_state["param_groups"]
    assert [len(g["params"]) for g in groups] == [n_head - 2, 2] and len(head_state["state"]) == n_head
    assert [g["lr_scale"] for g in groups] == [1.0, SegGuidedHead.DESCRIPTOR_LR_SCALE]
    assert groups[1]["lr"] == pytest.approx(groups[0]["lr"] * SegGuidedHead.DESCRIPTOR_LR_SCALE)
    # the refit set the statistics from the fold's 18 training cases: the organ's volume (column 1) in each
    assert int(head["state_dict"]["standardizer.count"][1]) == 18
    # nnU-Net's decoder holds the encoder, so its keys appear twice in the state dict: count tensors, not keys
    n_seg = len({v.data_ptr() for v in checkpoint["network_weights"].values()})
    assert len(checkpoint["optimizer_state"]["param_groups"][0]["params"]) == n_seg


def test_log_shows_f1_and_progress_png_exists(trained):
    log = "".join(p.read_text() for p in trained.fold0.glob("training_log_*.txt"))
    assert "Val macro-F1" in log and "Val recall per class {'subtype0'" in log
    for phase in ("Phase 0: segmentation warm-up", "Phase 1: classification head on detached encoder features",
                  "Phase 2: joint training"):
        assert phase in log
    assert "training-fold counts [6, 6, 6]" in log  # class balance counted on the training fold only
    # after the last epoch, before checkpoint_final.pth: the descriptor branch refitted on the fold's 18 training
    # cases, once more with the guide removed
    refit = log.index("Head refit: descriptor branch refitted on 18 training cases (1 more pass(es) with the guide")
    assert log.index("Epoch 11") < refit < log.index("Training done.")
    # and checkpoint_best.pth's head, on that checkpoint's own segmentation, which it keeps
    best_refit = log.index("Head refit of checkpoint_best.pth: descriptor branch refitted on 18 training cases")
    assert refit < best_refit < log.index("Training done.")
    best = torch.load(trained.fold0 / "checkpoint_best.pth", map_location="cpu", weights_only=False)
    assert int(best["classification_head"]["state_dict"]["standardizer.count"][1]) == 18
    assert "Head pooling weight on the ground-truth guide structure (train):" in log
    # one value per epoch; it measures where the head pooled, so it lies in [0, 1] once there is a lesion
    logging = torch.load(trained.fold0 / "checkpoint_final.pth", map_location="cpu", weights_only=False)["logging"]
    shares = logging["train_guide_share"]
    assert len(shares) == len(logging["train_losses"]) and all(0 <= s <= 1 for s in shares), shares
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


def test_continue_training_resumes_exactly(class_only_trained, tmp_path):
    """--c resumes from checkpoint_latest.pth: the epoch counter, phase, logs, the head and both optimizers come
    back, and only the remaining epoch runs (on a copy of the short two-optimizer model of conftest)."""
    from conftest import CLASS_ONLY_TRAINER
    trained = class_only_trained
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

    result = run(nnunet("nnUNetv2_train", 502, CONFIG, "0", "-tr", CLASS_ONLY_TRAINER, "-p", PLANS, "-device", "cpu",
                        "--c"), env, timeout=900)
    assert f"Epoch {last}\n" in result.stdout and f"Epoch {last - 1}\n" not in result.stdout
    assert "Phase 2, classification loss weight" in result.stdout  # the last epoch's phase came back
    resumed = torch.load(fold0 / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert resumed["current_epoch"] == last + 1
    # both optimizers resumed: Adam's step count and SGD's momentum continue from the checkpoint
    steps = lambda c: {int(s["step"]) for s in c["head_optimizer_state"]["state"].values()}  # noqa: E731
    assert steps(resumed) == {s + 4 for s in steps(checkpoint)}  # one more epoch of 4 iterations
    assert resumed["head_optimizer_state"]["param_groups"][0]["lr"] > 0
    assert all(len(v) == last + 1 for v in resumed["logging"].values())
    assert resumed["logging"]["val_macro_f1"][:last] == checkpoint["logging"]["val_macro_f1"]
    assert (fold0 / "validation" / "classification_summary.json").is_file()


def test_validation_rebuilds_the_head_as_the_checkpoint_holds_it(trained, tmp_path):
    """--val (and --c) build the head from the checkpoint's spec, as predict does: an option without weights that
    this code plans otherwise (here the descriptors' regions) is taken from the checkpoint and logged, not
    silently changed."""
    env = nnunet_env(tmp_path)
    for var in ("nnUNet_raw", "nnUNet_preprocessed"):
        env[var] = trained.env[var]
    fold0 = tmp_path / "nnUNet_results" / trained.results.parent.name / trained.results.name / "fold_0"
    shutil.copytree(trained.results, fold0.parent)
    shutil.rmtree(fold0 / "validation")
    checkpoint = torch.load(fold0 / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["classification_head"]["kwargs"]["interior"] is True  # what this code plans
    checkpoint["classification_head"]["kwargs"]["interior"] = False  # as a checkpoint of an older version holds it
    torch.save(checkpoint, fold0 / "checkpoint_final.pth")

    result = run(nnunet("nnUNetv2_train", DATASET_ID, CONFIG, "0", "-tr", TRAINER, "-p", PLANS, "-device", "cpu",
                        "--val"), env, timeout=900)
    assert "differs from this trainer's plan (interior True -> False): built as in the checkpoint" in result.stdout
    assert "'interior': False" in result.stdout  # the head line prints the spec it built
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


def _first_case(d):
    return sorted(d["classification"]["case_labels"])[0]


BAD_CLASS_LABELS = {  # dataset.json edit, the message nnUNetv2_train must print, whether it names the case
    "no_classification": (lambda d: d.pop("classification"), "no 'classification' entry with class labels", False),
    "case_without_label": (lambda d: d["classification"]["case_labels"].pop(_first_case(d)), "has no class label",
                           True),
    "label_out_of_range": (lambda d: d["classification"]["case_labels"].update({_first_case(d): 3}),
                           "has class label 3, expected an integer in [0, 2]", True),
}


def test_bad_class_labels_are_clear_errors(preprocessed, tmp_path):
    """nnUNetv2_train refuses a dataset.json without class labels, with a case without one or with one out of
    range, naming the case; the three runs go at once (each only starts nnU-Net and our trainer's set-up)."""
    first_case = _first_case(load_json(preprocessed.preprocessed / "dataset.json"))
    started = {name: Started(nnunet("nnUNetv2_train", DATASET_ID, CONFIG, "0", "-tr", TRAINER, "-p", PLANS, "-device",
                                    "cpu"), _write_preprocessed_copy(preprocessed, tmp_path / name, edit))
               for name, (edit, _, _) in BAD_CLASS_LABELS.items()}
    for name, process in started.items():
        result = process.result(check=False)
        _, message, names_case = BAD_CLASS_LABELS[name]
        assert result.returncode != 0, name
        assert message in result.stderr and (first_case in result.stderr or not names_case), \
            (name, result.stderr[-3000:])


# a trained model per registered head: the session's model (the default head) or a short run of a test trainer
SHORT_TRAINERS = {"GAPHead": "MultitasknnUNetTrainer_TestShortGAP"}


def train_short(pipeline, trainer: str, dataset_id=DATASET_ID) -> Path:
    run(nnunet("nnUNetv2_train", dataset_id, CONFIG, "0", "-tr", trainer, "-p", PLANS, "-device", "cpu"),
        pipeline.env, timeout=900)
    return Path(pipeline.env["nnUNet_results"]) / next(
        p.name for p in Path(pipeline.env["nnUNet_results"]).iterdir() if p.name.startswith(f"Dataset{dataset_id}_")) \
        / f"{trainer}__{PLANS}__{CONFIG}"


def test_first_phases_train_segmentation_exactly_as_stock(preprocessed):
    """With the same seed, stock nnUNetTrainer and the multitask trainer through its segmentation warm-up (phase
    0) and an epoch of the head on detached features (phase 1, classification-loss weight 1) end with the same
    segmentation weights, bit for bit: the head, its optimizer, its loss and the split gradient clipping change
    nothing of nnU-Net's segmentation training before the joint phase."""
    run_at_once([nnunet("nnUNetv2_train", DATASET_ID, CONFIG, "0", "-tr", trainer, "-p", PLANS, "-device", "cpu")
                 for trainer in ("nnUNetTrainer_TestSeeded", "MultitasknnUNetTrainer_TestSeeded")],
                preprocessed.env, timeout=900)
    results = Path(preprocessed.env["nnUNet_results"]) / "Dataset501_Synth"
    stock, ours = (torch.load(results / f"{trainer}__{PLANS}__{CONFIG}" / "fold_0" / "checkpoint_final.pth",
                              map_location="cpu", weights_only=False)
                   for trainer in ("nnUNetTrainer_TestSeeded", "MultitasknnUNetTrainer_TestSeeded"))
    # the head did train in phase 1: 3 AdamW steps on a non-zero classification loss
    steps = {int(s["step"]) for s in ours["head_optimizer_state"]["state"].values()}
    assert steps == {3}, steps
    assert ours["logging"]["train_cls_losses"][-1] > 0
    assert stock["network_weights"].keys() == ours["network_weights"].keys()
    differing = [k for k, v in stock["network_weights"].items() if not torch.equal(v, ours["network_weights"][k])]
    assert not differing, differing
    # and segmentation did train: nnU-Net's SGD holds momentum for its parameters
    assert len(stock["optimizer_state"]["state"]) == len(ours["optimizer_state"]["state"]) > 0


@pytest.mark.parametrize("head_class", sorted(HEADS))
def test_every_head_round_trips_through_checkpoint_and_predict(request, tmp_path, monkeypatch, head_class):
    """Train with each registered head through the stock CLI; the checkpoint names the head, `multitask-nnunet
    predict` rebuilds exactly that head (same class, same weights) and classifies, and stock predict still loads
    the segmentation weights strictly."""
    if head_class in SHORT_TRAINERS:
        preprocessed, trainer = request.getfixturevalue("preprocessed"), SHORT_TRAINERS[head_class]
        model_dir = train_short(preprocessed, trainer)
    else:
        preprocessed, trainer = request.getfixturevalue("trained"), TRAINER
        model_dir = preprocessed.results
    checkpoint = torch.load(model_dir / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["classification_head"]["class_name"] == head_class

    from multitask_nnunet.inference.predictor import MultitaskPredictor
    monkeypatch.setenv("nnUNet_extTrainer", preprocessed.env["nnUNet_extTrainer"])  # finds the test trainers
    predictor = MultitaskPredictor(device=torch.device("cpu"))
    predictor.initialize_from_trained_model_folder(str(model_dir), [0])
    head = predictor.network.classification_head
    assert type(head).__name__ == head_class
    for key, value in checkpoint["classification_head"]["state_dict"].items():
        torch.testing.assert_close(head.state_dict()[key], value)

    images = tmp_path / "in"
    images.mkdir()
    for p in sorted((preprocessed.source / "test").glob("*_0000.nii.gz"))[:2]:
        shutil.copy(p, images / p.name)
    # ours and stock at once; -npp 0 -nps 0: nnU-Net's sequential path, without worker processes
    run_at_once([ours("predict", "-i", images, "-o", tmp_path / "ours", "-m", model_dir, "-f", "0", "--device", "cpu"),
                 nnunet("nnUNetv2_predict", "-i", images, "-o", tmp_path / "stock", "-d", DATASET_ID, "-c", CONFIG,
                        "-f", "0", "-tr", trainer, "-p", PLANS, "-device", "cpu", "-npp", "0", "-nps", "0",
                        "--disable_tta")], preprocessed.env)
    assert len(read_csv(tmp_path / "ours" / "subtype_results.csv")) == 2
    assert len(list((tmp_path / "stock").glob("*.nii.gz"))) == 2


def test_training_with_class_only_cases(class_only, class_only_trained):
    """A dataset converted with --allow-missing-masks (conftest.class_only: some training cases and one
    validation case have a class but no mask: their label map is all ignore label) trains through the stock CLI:
    nnU-Net's segmentation loss ignores those voxels, the head learns from every case, and final validation
    writes both tasks' outputs, the class of the validation case without a mask included."""
    fold0 = class_only_trained.fold0
    checkpoint = torch.load(fold0 / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    logging = checkpoint["logging"]
    assert all(np.isfinite(logging["train_seg_losses"])) and all(np.isfinite(logging["train_cls_losses"]))
    assert len(logging["val_macro_f1"]) == 3
    summary = load_json(fold0 / "validation" / "classification_summary.json")
    assert summary["n_cases"] == len(class_only.validation) == 3
    names = [r["Names"] for r in read_csv(fold0 / "validation" / "class_probabilities.csv")]
    assert names == [f"{c}.nii.gz" for c in class_only.validation]
    assert any(c in class_only.validation for c in class_only.unmasked)
    assert (fold0 / "validation" / "summary.json").is_file()


def test_a_head_registered_outside_the_package_trains_and_predicts(preprocessed, tmp_path):
    """A head of the user's own (tests/trainers/toy_head_trainers.py: one file, one ``register_head``) trains
    through stock nnUNetv2_train and is rebuilt by ``multitask-nnunet predict`` from the checkpoint's spec."""
    trainer = "MultitasknnUNetTrainer_TestToyHead"
    model_dir = train_short(preprocessed, trainer)
    checkpoint = torch.load(model_dir / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["classification_head"]["class_name"] == "ToyHead"
    assert set(checkpoint["classification_head"]["state_dict"]) == {"linear.weight", "linear.bias"}
    images = tmp_path / "in"
    images.mkdir()
    for p in sorted((preprocessed.source / "test").glob("*_0000.nii.gz"))[:2]:
        shutil.copy(p, images / p.name)
    run(ours("predict", "-i", images, "-o", tmp_path / "out", "-m", model_dir, "-f", "0", "--device", "cpu"),
        preprocessed.env)
    rows = read_csv(tmp_path / "out" / "class_probabilities.csv")
    assert len(rows) == 2 and "guide_ml" not in rows[0]  # a head without a guide has no guide columns


@pytest.mark.parametrize("num_epochs,curriculum", [(1, (0, 0)), (2, (1, 1)), (3, (1, 2)), (4, (1, 2)), (12, (1, 6)),
                                                    (100, (5, 50)), (250, (13, 125)), (1000, (50, 500))])
def test_curriculum_scales_with_num_epochs(num_epochs, curriculum):
    """The default fractions (5% segmentation only, the head on detached features until half) resolved for a
    schedule: at least one epoch per phase where the schedule allows, the joint phase always reached."""
    from multitask_nnunet.training.trainer import resolve_curriculum
    resolved = resolve_curriculum(num_epochs)
    assert (resolved.seg_warmup_epochs, resolved.phase1_epochs) == curriculum
    assert resolved.phase1_epochs < num_epochs and resolved.head_warmup_epochs >= 1


def test_impossible_curricula_are_refused_naming_the_values():
    from multitask_nnunet.training.trainer import CurriculumError, resolve_curriculum
    for kwargs, message in ((dict(seg_warmup_epochs=8), "seg_warmup_epochs=8, phase1_epochs=8: the classification "
                                                        "head is never trained"),
                            (dict(seg_warmup_epochs=3, phase1_epochs=2), "phases out of order"),
                            (dict(phase1_epochs=500), "phase1_epochs=500: the joint phase never comes"),
                            (dict(seg_warmup_fraction=0.6), "need 0 <= seg_warmup_fraction <= phase1_fraction < 1")):
        with pytest.raises(CurriculumError, match=message):
            resolve_curriculum(8, **kwargs)
    # explicit epochs still override the fractions
    assert resolve_curriculum(100, seg_warmup_epochs=10, phase1_epochs=20)[:2] == (10, 20)


RESOLVED_SCRIPT = """
import json, sys, torch
from nnunetv2.run.run_training import get_trainer_from_args
trainer = get_trainer_from_args(sys.argv[1], sys.argv[2], 0, sys.argv[3], sys.argv[4], device=torch.device('cpu'))
print(json.dumps(trainer.resolve_curriculum()._asdict()))
"""


def test_a_subclass_that_sets_only_num_epochs_trains_the_head_through_all_three_phases(preprocessed):
    """A user's subclass that sets only ``num_epochs`` (4 and 12; tests/trainers), trained by stock
    nnUNetv2_train: the curriculum is resolved for its schedule, logged, and the head's optimizer steps in every
    epoch from the end of the warm-up on; the shipped 100-epoch variant resolves 5 and 50 epochs."""
    import json
    import sys
    trainers = {"MultitasknnUNetTrainer_TestEpochs4": (4, 3, "segmentation only in epochs 0, the head on detached "
                                                             "features in epochs 1, joint training in epochs 2-3"),
                "MultitasknnUNetTrainer_TestEpochs12": (12, 2, "segmentation only in epochs 0, the head on detached "
                                                               "features in epochs 1-5, joint training in epochs 6-11")}
    run_at_once([nnunet("nnUNetv2_train", DATASET_ID, CONFIG, "0", "-tr", t, "-p", PLANS, "-device", "cpu")
                 for t in trainers], preprocessed.env, timeout=1800)
    for trainer, (epochs, iterations, phases) in trainers.items():
        fold0 = Path(preprocessed.env["nnUNet_results"]) / "Dataset501_Synth" / f"{trainer}__{PLANS}__{CONFIG}" / \
            "fold_0"
        log = "".join(p.read_text() for p in fold0.glob("training_log_*.txt"))
        assert f"Curriculum for {epochs} epochs: {phases}" in log, trainer
        for phase in ("Phase 0: segmentation warm-up", "Phase 1: classification head on detached encoder features",
                      "Phase 2: joint training"):
            assert phase in log, (trainer, phase)
        checkpoint = torch.load(fold0 / "checkpoint_final.pth", map_location="cpu", weights_only=False)
        steps = {int(s["step"]) for s in checkpoint["head_optimizer_state"]["state"].values()}
        assert steps == {(epochs - 1) * iterations}, (trainer, steps)  # every epoch but the warm-up's
        assert (fold0 / "validation" / "classification_summary.json").is_file()
    result = run([sys.executable, "-c", RESOLVED_SCRIPT, str(DATASET_ID), CONFIG, "MultitasknnUNetTrainer_100epochs",
                  PLANS], preprocessed.env)
    resolved = json.loads(result.stdout.strip().splitlines()[-1])
    assert (resolved["seg_warmup_epochs"], resolved["phase1_epochs"]) == (5, 50)


def test_an_impossible_schedule_is_refused_at_start_in_one_line(preprocessed):
    result = run(nnunet("nnUNetv2_train", DATASET_ID, CONFIG, "0", "-tr", "MultitasknnUNetTrainer_TestJointNeverComes",
                        "-p", PLANS, "-device", "cpu"), preprocessed.env, check=False)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last == ("MultitasknnUNetTrainer_TestJointNeverComes: num_epochs=4, seg_warmup_epochs=1, phase1_epochs=50: "
                    "the joint phase never comes (need phase1_epochs < num_epochs)"), result.stderr[-2000:]


def test_gather_under_gloo_equals_one_process(preprocessed, tmp_path):
    """The trainer's multi-process validation, in two CPU processes under torch.distributed's gloo backend,
    against one process: the per-epoch class outputs (``_gather`` in ``on_validation_epoch_end``, with nnU-Net's
    own gather of the Dice counts) and the final validation (each rank predicts its share of the cases, the
    class outputs are gathered, rank 0 writes the CSVs and summaries). nnU-Net's DDP entry point needs CUDA
    (NCCL), so gloo_worker.py runs our functions directly; see its docstring. Three validation cases (2 + 1 per
    rank; one per class), no mirroring, untrained weights: this is about who sees which case, not accuracy."""
    import json
    import socket
    import subprocess
    import sys

    preprocessed_root = tmp_path / "nnUNet_preprocessed"
    folder = preprocessed_root / preprocessed.preprocessed.name
    folder.mkdir(parents=True)
    for entry in preprocessed.preprocessed.iterdir():
        if entry.name != "splits_final.json":
            (folder / entry.name).symlink_to(entry)
    split = load_json(preprocessed.preprocessed / "splits_final.json")[0]
    labels = load_json(preprocessed.preprocessed / "dataset.json")["classification"]["case_labels"]
    val = sorted(min(c for c in split["val"] if labels[c] == k) for k in sorted(set(labels.values())))
    (folder / "splits_final.json").write_text(json.dumps([{"train": split["train"], "val": val}]))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def worker(rank, world, results):
        env = {**os.environ, **preprocessed.env, "nnUNet_preprocessed": str(preprocessed_root),
               "nnUNet_results": str(tmp_path / results), "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, str(Path(__file__).parent / "gloo_worker.py"), str(rank), str(world), str(port),
               str(DATASET_ID), CONFIG, TRAINER, PLANS, str(tmp_path / f"{results}_{rank}.json")]
        return subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    processes = [worker(0, 1, "single"), worker(0, 2, "ddp"), worker(1, 2, "ddp")]
    logs = [p.communicate(timeout=1800)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0, 0], "\n---\n".join(log[-3000:] for log in logs)
    single, *ranks = (load_json(tmp_path / name) for name in ("single_0.json", "ddp_0.json", "ddp_1.json"))

    # per epoch: the ranks validated different patches, a case among them on both ranks
    assert ranks[0]["epoch_keys"] != ranks[1]["epoch_keys"]
    assert set(ranks[0]["epoch_keys"]) & set(ranks[1]["epoch_keys"])
    assert 0 < single["log"]["val_macro_f1"] < 1
    for result in ranks:
        assert result["gathered_keys"] == [sorted(set(r["epoch_keys"])) for r in ranks]
        assert result["val_cases_seen"] == single["val_cases_seen"] == len(val)
        assert result["log"].keys() == single["log"].keys()
        for key, value in single["log"].items():
            np.testing.assert_allclose(result["log"][key], value, rtol=1e-12, err_msg=key)

    # final validation: every case exactly once, the same outputs as one process
    folders = [Path(r["output_folder"]) / "validation" for r in (single, ranks[0])]
    probabilities = [read_csv(f / "class_probabilities.csv") for f in folders]
    names = [sorted(row["Names"] for row in p) for p in probabilities]
    assert names[0] == names[1] == [f"{c}.nii.gz" for c in val]
    for a, b in zip(*(sorted(p, key=lambda row: row["Names"]) for p in probabilities)):
        np.testing.assert_allclose([float(v) for k, v in a.items() if k.startswith("prob_")],
                                   [float(v) for k, v in b.items() if k.startswith("prob_")], atol=1e-6)
    assert read_csv(folders[0] / "subtype_results.csv") == read_csv(folders[1] / "subtype_results.csv")
    summaries = [load_json(f / "classification_summary.json") for f in folders]
    assert summaries[0] == summaries[1] and summaries[0]["n_cases"] == len(val)
    dice = [load_json(f / "summary.json")["foreground_mean"]["Dice"] for f in folders]
    assert dice[0] == pytest.approx(dice[1], abs=1e-9)
    assert sorted(p.name for p in folders[1].glob("*.nii.gz")) == names[0]


def test_logger_resumes_from_a_checkpoint_without_the_newer_keys(tmp_path):
    """A checkpoint written before ``train_guide_share`` existed resumes with one NaN per past epoch in that
    list, so nnU-Net's one-value-per-epoch logging and progress.png keep working."""
    from multitask_nnunet.training.logger import CLASSIFICATION_KEYS, MultitaskLocalLogger
    fresh = MultitaskLocalLogger()
    old = {k: [0.5, 0.6] for k in fresh.my_fantastic_logging if k != "train_guide_share"}
    old["val_class_recall"] = [[1.0, 0.0, 0.0]] * 2
    logger = MultitaskLocalLogger()
    logger.load_checkpoint(old)
    assert set(logger.my_fantastic_logging) == set(fresh.my_fantastic_logging) >= set(CLASSIFICATION_KEYS)
    assert len(logger.my_fantastic_logging["train_guide_share"]) == 2
    assert all(np.isnan(logger.my_fantastic_logging["train_guide_share"]))
    logger.log("train_guide_share", 0.3, 2)  # the next epoch logs as usual
    logger.plot_progress_png(str(tmp_path))
    assert (tmp_path / "progress.png").is_file()
