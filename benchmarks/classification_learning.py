"""Classification learning at the real task's scale: several trainers, same data, same schedule, both tasks.

Steps (every nnU-Net step is the stock command line, run as a subprocess):

1. ``multitask-nnunet make-synthetic --geometry quiz --difficulty D`` (quiz-like proportions: crops 40-48 x
   90-110 x 110-130 voxels at 0.75x0.75x2 mm, pancreas ~5% of the crop; ``--difficulty easy`` (default): lesion
   0.3-0.7% of the crop and the class only, and unmistakably, in the lesion's look; ``hard``: the quiz's
   log-normal lesion sizes and classes that overlap, in the lesion, its rim and the parenchyma),
   ``multitask-nnunet convert`` and stock ``nnUNetv2_plan_and_preprocess -c 3d_fullres``.
2. Plans: ``--plans small`` (default on CPU) writes ``nnUNetSmallPlans``, a copy of nnU-Net's plans with few
   features per stage (``--base-features``, ``--max-features``) and, if asked, a smaller patch
   (``--patch-size``); ``--plans default`` trains nnU-Net's ``nnUNetPlans`` unchanged (for CUDA).
3. For each trainer (``--trainers``; default: stock ``nnUNetTrainer_ClsBench`` for segmentation only, then
   ``MultitasknnUNetTrainer_ClsBenchGAP`` as the classification reference, ``MultitasknnUNetTrainer_ClsBench``
   for the package's default and ``MultitasknnUNetTrainer_ClsBenchTF``, the default with teacher forcing of
   the guide in phase 1; all in ``benchmarks/trainers/``, which this script puts first in
   ``nnUNet_extTrainer``): ``nnUNetv2_train DATASET 3d_fullres 0 -tr T -p PLANS -device DEV`` with the schedule
   of ``--epochs``, ``--iterations`` and ``--val-iterations`` (passed to the trainers through
   ``MULTITASK_BENCH_EPOCHS``, ``MULTITASK_BENCH_ITERATIONS`` and ``MULTITASK_BENCH_VAL_ITERATIONS``). Fold 0 is
   the generated train/validation split. The log goes to ``RUN/logs/<trainer>_train.log``.
4. Test set: multitask trainers through ``multitask-nnunet predict --tta`` (auto mode: whole volume when it
   fits) and ``multitask-nnunet evaluate``; stock through ``nnUNetv2_predict`` at its defaults (sliding
   window, step 0.5, mirroring TTA), scored in-process with the same Dice functions
   (``multitask_nnunet.evaluation``). Both sides use mirroring TTA, so masks are compared at equal TTA.

Measured per trainer:
- wall time of ``nnUNetv2_train`` (training + nnU-Net's final validation) and seconds per epoch;
- per-epoch validation macro-F1 over cases and the mean training classification loss per epoch
  (``fold_0/checkpoint_final.pth``, ``["logging"]``), the share of the guided head's pooling weight on the
  ground-truth lesion in training, and per-epoch pseudo-Dice of the lesion (all trainers);
- final validation (every validation case, sliding window + TTA): macro-F1
  (``validation/classification_summary.json``) and nnU-Net's Dice (``validation/summary.json``);
- test: macro-F1, mean Dice of the whole region and of the lesion, and each multitask trainer's Dice minus
  stock's, twice: as predicted in step 4 (auto mode may run a crop larger than the patch as one whole-volume
  pass), and at equal inference, from a second prediction with ``--tta --mode sliding`` (stock's sliding window,
  step 0.5, and mirroring; ``predictions_sliding/<trainer>``);
- test, against the oracle: a logistic regression (``multitask_nnunet.conversion.synthetic.oracle_macro_f1``)
  fitted on the truth features of the ``train`` cases (fold 0's training set; make-synthetic's
  ``truth_features.csv``, measured on the true masks) and scored on the test cases: the macro-F1 that the true
  masks' measurable features allow, with all features and with the volumes alone (lesion, pancreas, share);
  and, when stock is among the trainers, the same regression on the same features measured on stock's
  predicted masks (its training cases' masks, ``nnUNetv2_predict --disable_tta``, for the fit; its test masks
  for the score): what this schedule's segmentation leaves of the oracle.
  Per multitask trainer: its test macro-F1 over each oracle's; the test cases whose lesion it missed (its
  predicted lesion, the highest label, shares no voxel with the true one): how many, and the macro-F1 on those
  and on the others; ECE (``multitask-nnunet evaluate``: 15 bins on the max probability); the mean confidence
  (max probability) on missed and on found cases. The missed count is given for stock as well.
- pool (``--pool-cases N``, default 150 with ``--difficulty hard``, else 0): N more test cases, drawn by the
  same generator with another seed (``--pool-seed``; images and masks made once under
  ``WORKDIR/pool_*``, shared by every run), predicted by each multitask trainer through ``multitask-nnunet
  predict`` at its defaults (auto mode, no TTA) and scored by ``multitask-nnunet evaluate``: macro-F1, its ratio
  to the oracle on the same cases (the regression fitted on the same training cases), Dice, missed lesions,
  ECE and confidence. On 15 test cases one case moves macro-F1 by about 0.07; on 150 by under 0.01, so the
  pool is what a difference between heads is read on. Beside it, two ceilings at this schedule's
  segmentation, the oracle's regression on the same features measured on predicted masks (fitted on the
  training cases' masks, scored on the pool's): stock's masks (``nnUNetv2_predict --disable_tta``; stock's
  Dice itself is compared on the test cases, at equal inference) and each multitask trainer's own
  (``predict`` at its defaults, ``predictions_train/<trainer>``). F1 over its own masks' oracle says how well
  the head reads what its segmentation found; the truth oracle over stock's masks' oracle, how much of the gap
  a head cannot close while its segmentation stays stock's.
The tables are printed at the end; ``--json FILE`` writes every figure, the settings and the machine.
``--oracle-only`` makes (or reuses) the data and prints the oracle alone, in seconds.

Reruns reuse every finished step: the data (per seed, case counts and difficulty) under ``WORKDIR/data_*``
(``_hard`` at the end for ``--difficulty hard``), and each
trained model and prediction under ``WORKDIR/data_*/runs/<plans>_<device>_e<E>_i<I>_v<V>[_t<train seed>]/``, so
another trainer or schedule costs only its own training. An interrupted training resumes (``--c``).

Paired runs: ``--train-seed N`` seeds every trainer, stock included (``multitask_nnunet.training.seeding``), and
uses one augmentation worker. Stock and a multitask trainer then start from the same segmentation weights and
see the same batches; through phases 0 and 1 their segmentation training is identical bit for bit (a test
proves it on tiny plans), so the Dice difference at the end comes from the joint phase alone. Unseeded
(nnU-Net's behaviour), each training is an independent draw.

Settings:
- CPU (the default without CUDA): ``--plans small`` with 4 -> 64 features (one convolution per stage, batch 2)
  and a 40x96x112 patch, 12 epochs x 50 iterations (+10 validation iterations), nnUNet_n_proc_DA 2.
  nnU-Net plans a 48x112x128 patch for these crops (median 45x98x123), larger than the crop; the smaller
  patch still holds ~85% of the crop per axis and roughly halves the step time (``--planned-patch`` keeps
  nnU-Net's). Measured on 2 cores (train step of the stock trainer, batch 2): 0.35 s at 40x96x112 and 0.62 s
  at 48x112x128 with 4 -> 64 features; 0.55 s and 1.15 s with 8 -> 64. In that setting stock nnU-Net
  segments the lesion after ~400-450 iterations (lesion pseudo-Dice 0 until then), so 600 iterations leave
  a margin. Estimated total on an otherwise idle 2-core machine, from those step times (not yet timed end to
  end on an idle machine): about 22-23 minutes for three trainers (about 1 min data + preprocessing,
  ~5.5 min training + ~1 min final validation per trainer, ~1.5 min of test predictions for stock, under 1 min
  for each multitask trainer), so about 30 minutes for the four default trainers. On a shared CPU it takes
  proportionally longer.
- CUDA: ``--device cuda`` defaults to ``--plans default`` (nnU-Net's plans unchanged), 40 epochs x 50 iterations
  (+10 validation iterations) and nnUNet_n_proc_DA 8; set ``--epochs`` etc. as needed.
- ``nnUNet_def_n_proc`` (nnU-Net's export and metric pools) is set to the number of cores, at most 8, unless
  already set; ``OMP_NUM_THREADS`` to ``--threads``. nnU-Net's training uses all cores for torch on CPU.

Usage:
    python benchmarks/classification_learning.py --workdir /tmp/cls_bench --json cls_bench.json
    python benchmarks/classification_learning.py --workdir /tmp/cls_bench --device cuda --json cls_bench_gpu.json
    python benchmarks/classification_learning.py --workdir /tmp/cls_bench --trainers MultitasknnUNetTrainer_ClsBench
    python benchmarks/classification_learning.py --workdir /tmp/cls_bench --difficulty hard --oracle-only
"""
import argparse
import contextlib
import io
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TRAINER_FOLDER = Path(__file__).resolve().parent / "trainers"

DATASET_ID = 601
DATASET = f"Dataset{DATASET_ID}_ClsBenchQuiz"
CONFIGURATION = "3d_fullres"
SMALL_PLANS = "nnUNetSmallPlans"
STOCK_TRAINER = "nnUNetTrainer_ClsBench"
DEFAULT_TRAINERS = [STOCK_TRAINER, "MultitasknnUNetTrainer_ClsBenchGAP", "MultitasknnUNetTrainer_ClsBench",
                    "MultitasknnUNetTrainer_ClsBenchTF"]
CPU_SCHEDULE = {"epochs": 12, "iterations": 50, "val_iterations": 10}
CUDA_SCHEDULE = {"epochs": 40, "iterations": 50, "val_iterations": 10}
SMALL_FEATURES = {"base_features": 4, "max_features": 64}
SMALL_PATCH = [40, 96, 112]  # nnU-Net plans 48x112x128 for these crops (median 45x98x123): larger than the crop
PANCREAS_LABELS = {"labels": {"background": 0, "whole_pancreas": [1, 2], "pancreas_lesion": 2},
                   "regions_class_order": [1, 2]}  # as dataset_conversion/convert_pancreas_quiz.py
TRAIN_SEED_VARIABLE = "MULTITASK_BENCH_TRAIN_SEED"  # read by benchmarks/trainers
SCHEDULE_VARIABLES = {"epochs": "MULTITASK_BENCH_EPOCHS", "iterations": "MULTITASK_BENCH_ITERATIONS",
                      "val_iterations": "MULTITASK_BENCH_VAL_ITERATIONS"}
ECHO = ("Epoch ", "Current learning rate", "train_loss", "val_loss", "Pseudo dice", "macro-F1", "Epoch time",
        "Yayy", "Traceback", "Error", "error:")


def command(name: str, *args) -> list:
    """A console script of this environment (nnU-Net's or ours)."""
    from multitask_nnunet.registration import console_script

    return [console_script(name), *map(str, args)]


def run(cmd: list, env: dict, log: Path = None, echo: bool = False) -> float:
    """Runs ``cmd``; output to ``log`` (lines with ECHO keywords also to stdout when ``echo``) or to stdout.
    Returns the wall time in seconds; raises on a non-zero exit."""
    print("+ " + " ".join(cmd), flush=True)
    start = time.perf_counter()
    if log is None:
        code = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL).returncode
    else:
        log.parent.mkdir(parents=True, exist_ok=True)
        print(f"  log: {log}", flush=True)
        with open(log, "a", buffering=1) as f, subprocess.Popen(
                cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                bufsize=1) as p:
            for line in p.stdout:
                f.write(line)
                if echo and any(k in line for k in ECHO):
                    print("  | " + line.rstrip(), flush=True)
            code = p.wait()
    seconds = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"'{' '.join(cmd)}' failed with exit code {code}" + (f"; see {log}" if log else ""))
    return seconds


def load(path: Path):
    with open(path) as f:
        return json.load(f)


def save(data, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=2)


# ---------------------------------------------------------------------------------------------------- steps


def make_data(args, data: Path, env: dict) -> Path:
    """The synthetic data (``data/synthetic``), made unless there already."""
    source = data / "synthetic"
    if not (source / "test_labels").is_dir():  # make-synthetic writes the folder complete or not at all
        run(command("multitask-nnunet", "make-synthetic", "-o", source, "--geometry", "quiz", "--cases", args.cases,
                    "--validation-cases", args.validation_cases, "--test-cases", args.test_cases,
                    "--classes", args.classes, "--seed", args.seed, "--difficulty", args.difficulty,
                    "--overwrite"), env)
    return source


def prepare_data(args, data: Path, env: dict) -> Path:
    """Synthetic data -> raw dataset -> stock plan and preprocess; returns the preprocessed dataset folder."""
    raw, preprocessed = data / "nnUNet_raw" / DATASET, data / "nnUNet_preprocessed" / DATASET
    started = time.perf_counter()
    source = make_data(args, data, env)
    if not (raw / "dataset.json").is_file():  # convert, too
        save(PANCREAS_LABELS, data / "labels.json")
        run(command("multitask-nnunet", "convert", "-i", source, "-d", DATASET_ID, "-n", DATASET.split("_", 1)[1],
                    "--labels-json", data / "labels.json"), env)
    done = data / "prepared.json"
    if not done.is_file():
        n_proc = str(min(os.cpu_count() or 1, 8))
        run(command("nnUNetv2_plan_and_preprocess", "-d", DATASET_ID, "-c", CONFIGURATION, "-np", n_proc,
                    "-npfp", n_proc, "--verify_dataset_integrity"), env, data / "plan_and_preprocess.log")
        save({"prepare_seconds": time.perf_counter() - started}, done)
    return preprocessed


def write_plans(args, preprocessed: Path) -> dict:
    """Writes the small plans (unless ``--plans default``); returns their name, tag and network settings.

    Small plans at the default settings are ``nnUNetSmallPlans``; other settings get their own name
    (``nnUNetSmallPlans_f8-64-b2-p48x112x128``), so that runs with different settings never share a plans
    file. The file is replaced (atomically) only when its content changes."""
    if args.plans == "default":
        name, tag = "nnUNetPlans", "default"
    else:
        from multitask_nnunet.tiny_plans import write_tiny_plans
        planned = load(preprocessed / "nnUNetPlans.json")["configurations"][CONFIGURATION]
        patch = list(planned["patch_size"] if args.planned_patch else args.patch_size)
        strides = np.prod(planned["architecture"]["arch_kwargs"]["strides"], axis=0)
        if len(patch) != len(strides) or any(p % s for p, s in zip(patch, strides)):
            raise SystemExit(f"--patch-size {patch}: needs {len(strides)} values divisible by the network's total "
                             f"strides {strides.tolist()}")
        settings = f"f{args.base_features}-{args.max_features}-b{args.batch_size}-p{'x'.join(map(str, patch))}"
        tag = f"small-{settings}"
        default = (args.base_features, args.max_features, args.batch_size, patch) == \
            (SMALL_FEATURES["base_features"], SMALL_FEATURES["max_features"], 2, SMALL_PATCH)
        name = SMALL_PLANS if default else f"{SMALL_PLANS}_{settings}"
        staging = f"{name}.writing{os.getpid()}"
        write_tiny_plans(str(preprocessed), target_plans=staging, configuration=CONFIGURATION,
                         base_features=args.base_features, max_features=args.max_features, batch_size=args.batch_size)
        plans = load(preprocessed / f"{staging}.json")
        plans["plans_name"] = name
        plans["configurations"][CONFIGURATION]["patch_size"] = patch
        target = preprocessed / f"{name}.json"
        if target.is_file() and load(target) == plans:
            (preprocessed / f"{staging}.json").unlink()
        else:
            save(plans, preprocessed / f"{staging}.json")
            os.replace(preprocessed / f"{staging}.json", target)
    config = load(preprocessed / f"{name}.json")["configurations"][CONFIGURATION]
    return {"name": name, "tag": tag, "patch_size": config["patch_size"],
            "features_per_stage": config["architecture"]["arch_kwargs"]["features_per_stage"],
            "n_conv_per_stage": config["architecture"]["arch_kwargs"]["n_conv_per_stage"],
            "batch_size": config["batch_size"]}


def is_multitask(trainer: str, env: dict) -> bool:
    """Finds the trainer class as nnU-Net does (this fails early on a typo) and tells whether it is ours."""
    os.environ["nnUNet_extTrainer"] = env["nnUNet_extTrainer"]
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from multitask_nnunet import MultitasknnUNetTrainer
    with contextlib.redirect_stdout(io.StringIO()):
        cls = recursive_find_trainer_class_by_name(trainer)
    return issubclass(cls, MultitasknnUNetTrainer)


def train(args, trainer: str, plans: str, run_dir: Path, env: dict) -> dict:
    model = run_dir / "nnUNet_results" / DATASET / f"{trainer}__{plans}__{CONFIGURATION}"
    fold = model / "fold_0"
    record_file = run_dir / "records" / f"{trainer}_train.json"
    if (fold / "checkpoint_final.pth").is_file() and (fold / "validation" / "summary.json").is_file() \
            and record_file.is_file():
        print(f"{trainer}: trained already ({model})")
        return {**load(record_file), "model": str(model)}
    resume = ["--c"] if any((fold / c).is_file() for c in ("checkpoint_latest.pth", "checkpoint_final.pth")) else []
    seconds = run(command("nnUNetv2_train", DATASET_ID, CONFIGURATION, "0", "-tr", trainer, "-p", plans,
                          "-device", args.device, *resume), env, run_dir / "logs" / f"{trainer}_train.log", echo=True)
    record = {"train_seconds": seconds, "resumed": bool(resume)}
    save(record, record_file)
    print(f"{trainer}: nnUNetv2_train took {seconds / 60:.1f} min", flush=True)
    return {**record, "model": str(model)}


def training_figures(model: Path, multitask: bool) -> dict:
    import torch
    fold = model / "fold_0"
    log = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)["logging"]
    epoch_seconds = np.subtract(log["epoch_end_timestamps"], log["epoch_start_timestamps"])
    per_region = np.array(log["dice_per_class_or_region"], dtype=float)
    figures = {"epochs": len(log["epoch_end_timestamps"]),
               "median_epoch_seconds": float(np.median(epoch_seconds)),
               "val_pseudo_dice_per_epoch": per_region.round(4).tolist(),
               "val_pseudo_dice_lesion_per_epoch": per_region[:, -1].round(4).tolist(),
               "train_loss_per_epoch": np.round(log["train_losses"], 4).tolist(),
               # unrounded, for the pairing check: stock's train loss is its segmentation loss
               "train_seg_loss_per_epoch_exact": [float(v) for v in log["train_seg_losses" if multitask
                                                                        else "train_losses"]],
               "val_pseudo_dice_per_epoch_exact": per_region.tolist()}
    if multitask:
        figures["val_macro_f1_per_epoch"] = np.round(log["val_macro_f1"], 4).tolist()
        figures["train_cls_loss_per_epoch"] = np.round(log["train_cls_losses"], 4).tolist()
        if "train_guide_share" in log:  # the head's pooling weight on the ground-truth lesion (SegGuidedHead)
            figures["train_guide_share_per_epoch"] = np.round(log["train_guide_share"], 4).tolist()
        summary = fold / "validation" / "classification_summary.json"
        figures["final_val_macro_f1"] = load(summary)["macro_f1"] if summary.is_file() else None
    summary = load(fold / "validation" / "summary.json")
    figures["final_val_dice_foreground_mean"] = summary["foreground_mean"]["Dice"]
    figures["final_val_dice_per_region"] = {k: v["Dice"] for k, v in summary["mean"].items()}
    return figures


def predict_and_evaluate(args, trainer: str, multitask: bool, model: Path, plans: str, source: Path, raw: Path,
                         run_dir: Path, env: dict) -> dict:
    out = run_dir / "predictions" / trainer
    def ours(folder: Path, *extra) -> list:  # mirroring on, like stock's default: masks compared at equal TTA
        return command("multitask-nnunet", "predict", "-i", source / "test", "-o", folder, "-m", model, "-f", "0",
                       "--device", args.device, "--tta", *extra)

    if multitask:
        cmd = ours(out)
        tta = "mirroring (multitask-nnunet predict --tta, auto mode)"
    else:
        n_proc = "1" if args.device == "cpu" else "3"
        cmd = command("nnUNetv2_predict", "-i", source / "test", "-o", out, "-d", DATASET_ID, "-c", CONFIGURATION,
                      "-f", "0", "-tr", trainer, "-p", plans, "-device", args.device, "-npp", n_proc, "-nps", n_proc,
                      "--continue_prediction")
        tta = "mirroring (nnUNetv2_predict defaults: sliding window, step 0.5)"
    record_file = run_dir / "records" / f"{trainer}_predict.json"
    if record_file.is_file():
        print(f"{trainer}: predicted already ({out})")
    else:
        save({"predict_seconds": run(cmd, env, run_dir / "logs" / f"{trainer}_predict.log")}, record_file)
    result = {**load(record_file), "test_tta": tta, "predictions": str(out)}

    if multitask:
        metrics_file = run_dir / "evaluation" / f"{trainer}.json"
        run(command("multitask-nnunet", "evaluate", "--pred", out, "--gt", source / "test_labels", "--dataset-json",
                    raw / "dataset.json", "--json", metrics_file), env, run_dir / "logs" / f"{trainer}_evaluate.log")
        metrics = load(metrics_file)
        result.update({"test_macro_f1": metrics["macro_f1"], "test_accuracy": metrics["accuracy"],
                       "test_confusion_matrix": metrics["confusion_matrix"],
                       "test_dice": dict(metrics["dice"])})
    else:  # no subtype_results.csv, which multitask-nnunet evaluate requires: Dice only, same functions
        result.update({"test_macro_f1": None,
                       "test_dice": segmentation_dice(out, source / "test_labels", raw / "dataset.json")})
    missed = missed_lesions(out, source / "test_labels", raw)
    result.update({"test_missed_lesions": sum(missed.values()),
                   "test_missed_cases": sorted(c for c, m in missed.items() if m)})
    if multitask:
        result.update(missed_and_found(out, metrics, missed))
    result["test_dice_whole"], result["test_dice_lesion"] = whole_and_lesion(result["test_dice"], raw)
    if multitask:  # stock's inference too (sliding window, step 0.5, mirroring): Dice at equal inference
        sliding = run_dir / "predictions_sliding" / trainer
        record_file = run_dir / "records" / f"{trainer}_predict_sliding.json"
        if not record_file.is_file():
            save({"predict_seconds": run(ours(sliding, "--mode", "sliding"), env,
                                         run_dir / "logs" / f"{trainer}_predict_sliding.log")}, record_file)
        result["test_dice_sliding"] = segmentation_dice(sliding, source / "test_labels", raw / "dataset.json")
    else:
        result["test_dice_sliding"] = result["test_dice"]
    result["test_dice_whole_sliding"], result["test_dice_lesion_sliding"] = \
        whole_and_lesion(result["test_dice_sliding"], raw)
    return result


def segmentation_dice(pred_dir: Path, gt: Path, dataset_json: Path) -> dict:
    """Mean Dice per region of a segmentation-only prediction folder (no subtype_results.csv, which
    ``multitask-nnunet evaluate`` requires), with the evaluator's own functions."""
    from multitask_nnunet.evaluation.ground_truth import read_ground_truth
    from multitask_nnunet.evaluation.evaluate import prediction_file
    from multitask_nnunet.evaluation.metrics import case_dice, segmentation_summary
    from multitask_nnunet.io.nifti import check_same_grid, read_label_map

    truth = read_ground_truth(str(gt), str(dataset_json))
    regions, ignore = truth.region_spec.regions, truth.region_spec.ignore_label
    rows, has_gt = [], []
    for case, mask in sorted(truth.masks.items()):
        pred = prediction_file(str(pred_dir), case, truth.file_ending)
        check_same_grid(case, pred, mask, ("prediction", "ground truth"))
        dice = case_dice(read_label_map(mask), read_label_map(pred), regions, ignore)
        rows.append([(dice or {}).get(n, np.nan) for n in regions])
        has_gt.append(dice is not None)
    summary = segmentation_summary(np.array(rows, dtype=float), list(regions), np.array(has_gt))
    return {name: summary[name]["mean_dice"] for name in regions}


def whole_and_lesion(dice: dict, raw: Path):
    """(whole-region Dice, lesion Dice): the region with the most labels and the one of the highest label."""
    labels = {name: value if isinstance(value, list) else [value]
              for name, value in load(raw / "dataset.json")["labels"].items() if name != "background"}
    whole = max((n for n in dice if n in labels), key=lambda n: len(labels[n]))
    lesion = max((n for n in dice if n in labels), key=lambda n: (max(labels[n]), -len(labels[n])))
    return dice[whole], dice[lesion]


# ---------------------------------------------------------------------------------------------------- oracle


def truth_feature_rows(source: Path) -> list:
    """The truth features of every case: make-synthetic's truth_features.csv, or, for data made before
    make-synthetic wrote it, measured here on the images and true masks by the same function."""
    from multitask_nnunet.io.class_csv import GROUND_TRUTH_CSV, read_case_classes
    from multitask_nnunet.io.class_labels import parse_class_folder
    from multitask_nnunet.conversion import synthetic
    from multitask_nnunet.io.nifti import read_label_map
    import SimpleITK as sitk

    path = source / synthetic.TRUTH_FEATURES_CSV
    if path.is_file():
        return synthetic.read_truth_features(path)
    cases = [(mask, mask.parent, split, parse_class_folder(mask.parent.name)[1])
             for split in ("train", "validation") for mask in sorted((source / split).glob("*/*.nii.gz"))
             if not mask.name.endswith("_0000.nii.gz")]
    gt = source / synthetic.TEST_LABELS
    cases += [(gt / f"{case}.nii.gz", source / "test", "test", k)
              for case, k in sorted(read_case_classes(str(gt / GROUND_TRUTH_CSV)).items())]
    return [{"Names": mask.name, "split": split, "Subtype": k,
             **synthetic.truth_features(sitk.ReadImage(str(images / mask.name.replace(".nii.gz", "_0000.nii.gz"))),
                                        read_label_map(mask))}
            for mask, images, split, k in cases]


def oracle(source: Path) -> dict:
    """Macro-F1 on the test cases of a logistic regression fitted on the ``train`` cases' truth features (fold
    0's training set): with every feature, and with the volumes alone."""
    from multitask_nnunet.conversion.synthetic import TRUTH_FEATURES, VOLUME_FEATURES, oracle_macro_f1
    rows = truth_feature_rows(source)
    train, test = [r for r in rows if r["split"] == "train"], [r for r in rows if r["split"] == "test"]
    return {"macro_f1": oracle_macro_f1(train, test), "macro_f1_volumes_only": oracle_macro_f1(train, test,
                                                                                              VOLUME_FEATURES),
            "features": list(TRUTH_FEATURES), "volume_features": list(VOLUME_FEATURES),
            "n_train": len(train), "n_test": len(test),
            "model": "logistic regression: standardised features, balanced class weights, random_state 0"}


def training_images(source: Path, run_dir: Path) -> Path:
    """The training cases' images, flat, as ``nnUNetv2_predict`` and ``multitask-nnunet predict`` read them."""
    images = run_dir / "train_images"
    images.mkdir(parents=True, exist_ok=True)
    for image in sorted((source / "train").glob("*/*_0000.nii.gz")):
        if not (images / image.name).exists():
            (images / image.name).symlink_to(image)
    return images


def mask_oracle(train: list, train_images: Path, train_masks: Path, test: list, test_images: Path,
                test_masks: Path) -> float:
    """The oracle's regression on the truth features measured on predicted masks instead of the true ones:
    fitted on ``train`` (truth-feature rows: their names and classes) as ``train_masks`` segments them, scored on
    ``test`` as ``test_masks`` does. What a head that reads these features perfectly could reach from those
    masks; the oracle on the true masks minus this is the segmentation's share of the gap."""
    import SimpleITK as sitk
    from multitask_nnunet.conversion.synthetic import oracle_macro_f1, truth_features
    from multitask_nnunet.io.nifti import read_label_map

    def measured(rows: list, images: Path, masks: Path) -> list:
        return [{"Names": r["Names"], "Subtype": r["Subtype"],
                 **truth_features(sitk.ReadImage(str(images / r["Names"].replace(".nii.gz", "_0000.nii.gz"))),
                                  read_label_map(masks / r["Names"]))} for r in rows]

    return oracle_macro_f1(measured(train, train_images, train_masks), measured(test, test_images, test_masks))


def stock_predictions(args, plans: str, images: Path, out: Path, run_dir: Path, env: dict, name: str) -> Path:
    """``nnUNetv2_predict --disable_tta`` of stock's fold 0 on ``images`` into ``out`` (reused when done)."""
    record_file = run_dir / "records" / f"{STOCK_TRAINER}_{name}.json"
    if not record_file.is_file():
        n_proc = "1" if args.device == "cpu" else "3"
        save({"predict_seconds": run(command(
            "nnUNetv2_predict", "-i", images, "-o", out, "-d", DATASET_ID, "-c", CONFIGURATION, "-f", "0",
            "-tr", STOCK_TRAINER, "-p", plans, "-device", args.device, "-npp", n_proc, "-nps", n_proc,
            "--disable_tta", "--continue_prediction"), env, run_dir / "logs" / f"{STOCK_TRAINER}_{name}.log")},
            record_file)
    return out


def stock_mask_oracle(args, plans: str, source: Path, run_dir: Path, env: dict, test_masks: Path,
                      pool: Path = None) -> dict:
    """``mask_oracle`` on stock's masks: fitted on its masks of its own training cases (``nnUNetv2_predict
    --disable_tta``), scored on its test masks (as predicted above) and, with ``pool``, on the pool's cases
    (``--disable_tta``, as the multitask trainers' pool masks: ``predict`` at its defaults mirrors nothing)."""
    rows = truth_feature_rows(source)
    images = training_images(source, run_dir)
    train_masks = stock_predictions(args, plans, images, run_dir / "predictions_train" / STOCK_TRAINER, run_dir,
                                    env, "predict_train")
    train = [r for r in rows if r["split"] == "train"]
    figures = {"macro_f1_stock_masks": mask_oracle(train, images, train_masks, [r for r in rows if r["split"] == "test"],
                                                   source / "test", test_masks),
               "stock_masks": "train: nnUNetv2_predict --disable_tta on the training cases; test: stock's test masks"}
    if pool is not None:
        pool_masks = stock_predictions(args, plans, pool / "test", run_dir / "predictions_pool" / STOCK_TRAINER,
                                       run_dir, env, f"predict_pool_{pool.parent.name}")
        figures["pool_macro_f1_stock_masks"] = mask_oracle(
            train, images, train_masks, [r for r in truth_feature_rows(pool) if r["split"] == "test"], pool / "test",
            pool_masks)
    return figures


def missed_lesions(pred_dir: Path, gt: Path, raw: Path) -> dict:
    """``{case: missed}`` over the test cases: missed when the predicted lesion (the highest label) shares no
    voxel with the true lesion."""
    from multitask_nnunet.io.class_csv import GROUND_TRUTH_CSV, read_case_classes
    from multitask_nnunet.io.nifti import read_label_map
    dataset = load(raw / "dataset.json")
    lesion = max(max(v) if isinstance(v, list) else v for v in dataset["labels"].values())
    ending = dataset["file_ending"]
    missed = {}
    for case in sorted(read_case_classes(str(gt / GROUND_TRUTH_CSV), ending)):
        truth = read_label_map(gt / f"{case}{ending}") == lesion
        missed[case] = not (truth & (read_label_map(pred_dir / f"{case}{ending}") == lesion)).any()
    return missed


def missed_and_found(pred_dir: Path, metrics: dict, missed: dict) -> dict:
    """Macro-F1 and mean confidence (max probability) on the test cases whose lesion was missed and on the
    others (None for an empty group), and the ECE of ``multitask-nnunet evaluate``."""
    from multitask_nnunet.io.class_csv import PROBABILITIES_CSV, read_probabilities_csv, strip_ending
    from multitask_nnunet.evaluation.metrics import classification_metrics
    path = pred_dir / PROBABILITIES_CSV
    confidence = {strip_ending(name, ".nii.gz"): float(np.max(p))
                  for name, p in (read_probabilities_csv(str(path)) if path.is_file() else {}).items()}
    figures = {"test_ece": metrics.get("ece")}
    for group, is_missed in (("missed", True), ("found", False)):
        cases = [c for c in metrics["per_case"] if missed[c["case"]] == is_missed]
        figures[f"test_macro_f1_{group}"] = classification_metrics(
            np.array([c["true_class"] for c in cases]), np.array([c["predicted_class"] for c in cases]),
            metrics["class_names"])["macro_f1"] if cases else None
        figures[f"test_confidence_{group}"] = float(np.mean([confidence[c["case"]] for c in cases])) \
            if cases and confidence else None
    return figures


def make_pool(args, workdir: Path, env: dict) -> Path:
    """The pool of extra test cases (``make-synthetic``, seed ``--pool-seed``, test split only; three training
    cases because make-synthetic needs one per class, unused), made unless there already."""
    pool = workdir / (f"pool_quiz_s{args.pool_seed}_c{args.classes}_n{args.pool_cases}"
                      + ("_hard" if args.difficulty == "hard" else "")) / "synthetic"
    if not (pool / "test_labels").is_dir():
        run(command("multitask-nnunet", "make-synthetic", "-o", pool, "--geometry", "quiz", "--cases", args.classes,
                    "--validation-cases", 0, "--test-cases", args.pool_cases, "--classes", args.classes,
                    "--seed", args.pool_seed, "--difficulty", args.difficulty, "--overwrite"), env)
    return pool


def pool_oracle(source: Path, pool: Path) -> dict:
    """The oracle's regression, fitted on the benchmark's ``train`` cases as for the test cases, scored on the
    pool's cases."""
    from multitask_nnunet.conversion.synthetic import oracle_macro_f1
    train = [r for r in truth_feature_rows(source) if r["split"] == "train"]
    cases = [r for r in truth_feature_rows(pool) if r["split"] == "test"]
    return {"pool_macro_f1": oracle_macro_f1(train, cases), "n_pool": len(cases), "pool": str(pool)}


def pool_scores(args, trainer: str, model: Path, pool: Path, raw: Path, run_dir: Path, env: dict,
                folds=(0,)) -> dict:
    """A multitask model's figures on the pool: ``multitask-nnunet predict -f FOLDS`` at its defaults, then
    ``evaluate``; ``trainer`` names the files of this prediction in ``run_dir``."""
    out = run_dir / "predictions_pool" / trainer
    record_file = run_dir / "records" / f"{trainer}_predict_pool_{pool.parent.name}.json"
    if not record_file.is_file():
        save({"predict_seconds": run(command("multitask-nnunet", "predict", "-i", pool / "test", "-o", out, "-m",
                                             model, "-f", *folds, "--device", args.device), env,
                                     run_dir / "logs" / f"{trainer}_predict_pool.log")}, record_file)
    metrics_file = run_dir / "evaluation" / f"{trainer}_pool.json"
    run(command("multitask-nnunet", "evaluate", "--pred", out, "--gt", pool / "test_labels", "--dataset-json",
                raw / "dataset.json", "--json", metrics_file), env, run_dir / "logs" / f"{trainer}_evaluate_pool.log")
    metrics = load(metrics_file)
    source = raw.parents[1] / "synthetic"  # the training cases (DATA/nnUNet_raw/DATASET beside DATA/synthetic)
    images = training_images(source, run_dir)
    train_masks = run_dir / "predictions_train" / trainer
    if not (train_masks / "subtype_results.csv").is_file():
        run(command("multitask-nnunet", "predict", "-i", images, "-o", train_masks, "-m", model, "-f", *folds,
                    "--device", args.device), env, run_dir / "logs" / f"{trainer}_predict_train.log")
    own_masks = mask_oracle([r for r in truth_feature_rows(source) if r["split"] == "train"], images, train_masks,
                            [r for r in truth_feature_rows(pool) if r["split"] == "test"], pool / "test", out)
    missed = missed_lesions(out, pool / "test_labels", raw)
    whole, lesion = whole_and_lesion(dict(metrics["dice"]), raw)
    return {"pool_macro_f1": metrics["macro_f1"], "pool_macro_f1_own_masks": own_masks,
            "pool_dice_whole": whole, "pool_dice_lesion": lesion,
            "pool_missed_lesions": sum(missed.values()), "pool_predict_seconds": load(record_file)["predict_seconds"],
            **{"pool_" + k[len("test_"):]: v for k, v in missed_and_found(out, metrics, missed).items()}}


# ---------------------------------------------------------------------------------------------------- report


def fmt(value, digits=3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def compact(values, digits=2) -> str:
    return "-" if not values else "[" + " ".join(f"{v:.{digits}f}" for v in values) + "]"


def identical_epochs(r: dict, stock: dict) -> int:
    """How many epochs, from the first, have exactly stock's segmentation loss and pseudo-Dice."""
    n = 0
    for ours, theirs in zip(zip(r["train_seg_loss_per_epoch_exact"], r["val_pseudo_dice_per_epoch_exact"]),
                            zip(stock["train_seg_loss_per_epoch_exact"], stock["val_pseudo_dice_per_epoch_exact"])):
        if ours != theirs:
            break
        n += 1
    return n


def table(results: dict) -> str:
    header = (f"{'trainer':<36} {'train min':>9} {'s/epoch':>7} {'final cls loss':>14} {'final-val F1':>12} "
              f"{'test F1':>7} {'test Dice whole':>15} {'test Dice lesion':>16}")
    lines = [header, "-" * len(header)]
    for trainer, r in results.items():
        losses = r.get("train_cls_loss_per_epoch")
        minutes = f"{r['train_seconds'] / 60:.1f}" + ("*" if r["resumed"] else "")
        lines.append(f"{trainer:<36} {minutes:>9} {r['median_epoch_seconds']:>7.1f} "
                     f"{fmt(losses[-1] if losses else None):>14} {fmt(r.get('final_val_macro_f1')):>12} "
                     f"{fmt(r['test_macro_f1']):>7} {fmt(r['test_dice_whole'], 4):>15} "
                     f"{fmt(r['test_dice_lesion'], 4):>16}")
    if any(r["resumed"] for r in results.values()):
        lines.append("* resumed (--c): the time of the last invocation only")
    lines.append("\nper-epoch validation macro-F1 (multitask) | per-epoch validation pseudo-Dice of the lesion:")
    for trainer, r in results.items():
        lines.append(f"  {trainer:<36} F1 {compact(r.get('val_macro_f1_per_epoch'))}")
        lines.append(f"  {'':<36} lesion {compact(r['val_pseudo_dice_lesion_per_epoch'])}")
        if r.get("train_guide_share_per_epoch") and not all(np.isnan(r["train_guide_share_per_epoch"])):
            lines.append(f"  {'':<36} head weight on the lesion (train) "
                         f"{compact(r['train_guide_share_per_epoch'])}")
    stock = results.get(STOCK_TRAINER)
    if stock:
        lines.append(f"\ntest Dice minus stock {STOCK_TRAINER} (whole, lesion), as predicted above | at equal "
                     f"inference (ours with --tta --mode sliding, as stock's nnUNetv2_predict):")
        for trainer, r in results.items():
            if trainer != STOCK_TRAINER:
                lines.append(f"  {trainer:<36} {r['test_dice_whole'] - stock['test_dice_whole']:+.4f}  "
                             f"{r['test_dice_lesion'] - stock['test_dice_lesion']:+.4f} | "
                             f"{r['test_dice_whole_sliding'] - stock['test_dice_whole']:+.4f}  "
                             f"{r['test_dice_lesion_sliding'] - stock['test_dice_lesion']:+.4f}")
        lines.append(f"\nepochs whose segmentation figures (training loss, validation pseudo-Dice, unrounded) equal "
                     f"{STOCK_TRAINER}'s, from epoch 0 (with --train-seed, stock's own through phases 0 and 1):")
        for trainer, r in results.items():
            if trainer != STOCK_TRAINER:
                lines.append(f"  {trainer:<36} {identical_epochs(r, stock)} of {r['epochs']}")
    lines.append("\ntest-time augmentation: " + "; ".join(sorted({r["test_tta"] for r in results.values()})))
    return "\n".join(lines)


def oracle_lines(figures: dict) -> list:
    return [f"oracle: logistic regression on the true masks' features, fitted on the {figures['n_train']} train "
            f"cases, scored on the {figures['n_test']} test cases (macro-F1)",
            f"  {'oracle, all truth features':<36} {figures['macro_f1']:.3f}",
            *([f"  {'oracle on stock masks':<36} {figures['macro_f1_stock_masks']:.3f}  (the same features "
               f"measured on {STOCK_TRAINER}'s predicted masks, train and test)"]
              if figures.get("macro_f1_stock_masks") is not None else []),
            f"  {'oracle, volumes only':<36} {figures['macro_f1_volumes_only']:.3f}  "
            f"({', '.join(figures['volume_features'])})"]


def oracle_table(results: dict, figures: dict) -> str:
    """Test classification beside the oracle: F1 and its share of the oracle's, calibration, missed lesions."""
    header = (f"{'trainer':<36} {'test F1':>7} {'/oracle':>7} {'/stock masks':>12} {'ECE':>6} {'missed':>9} "
              f"{'F1 missed':>9} {'F1 found':>8} {'conf missed':>11} {'conf found':>10}")
    lines = oracle_lines(figures) + ["", header, "-" * len(header)]
    for trainer, r in results.items():
        lines.append(f"{trainer:<36} {fmt(r['test_macro_f1']):>7} {fmt(r.get('test_f1_over_oracle')):>7} "
                     f"{fmt(r.get('test_f1_over_stock_mask_oracle')):>12} "
                     f"{fmt(r.get('test_ece')):>6} {r['test_missed_lesions']:>3} of {figures['n_test']:<2} "
                     f"{fmt(r.get('test_macro_f1_missed')):>9} {fmt(r.get('test_macro_f1_found')):>8} "
                     f"{fmt(r.get('test_confidence_missed')):>11} {fmt(r.get('test_confidence_found')):>10}")
    lines.append("missed: the predicted lesion (highest label) shares no voxel with the true one; ECE: 15 bins on the "
                 "max probability (multitask-nnunet evaluate); conf: mean max probability")
    return "\n".join(lines)


def pool_table(results: dict, figures: dict) -> str:
    """The multitask trainers on the pool, beside the oracle on the same cases: on the true masks, on stock's and
    on the trainer's own predicted masks."""
    header = (f"{'trainer':<36} {'pool F1':>7} {'/oracle':>7} {'/stock masks':>12} {'/own masks':>10} "
              f"{'Dice whole':>10} {'lesion':>7} {'ECE':>6} {'missed':>10} {'F1 missed':>9} {'conf missed':>11} "
              f"{'conf found':>10}")
    stock = figures.get("pool_macro_f1_stock_masks")
    lines = [f"pool: {figures['n_pool']} more test cases (another seed); oracle on them {figures['pool_macro_f1']:.3f} "
             f"(fitted on the same {figures['n_train']} train cases); multitask-nnunet predict at its defaults",
             f"  oracle on {STOCK_TRAINER}'s masks (train and pool, --disable_tta) {fmt(stock)}; on each trainer's "
             f"own masks (train and pool, predict at its defaults): /own masks", header, "-" * len(header)]
    for trainer, r in results.items():
        if r.get("pool_macro_f1") is None:
            continue
        lines.append(f"{trainer:<36} {r['pool_macro_f1']:>7.3f} {r['pool_macro_f1'] / figures['pool_macro_f1']:>7.2f} "
                     f"{fmt(r.get('pool_f1_over_stock_mask_oracle'), 2):>12} "
                     f"{fmt(r.get('pool_f1_over_own_mask_oracle'), 2):>10} "
                     f"{r['pool_dice_whole']:>10.4f} {r['pool_dice_lesion']:>7.4f} {fmt(r.get('pool_ece')):>6} "
                     f"{r['pool_missed_lesions']:>3} of {figures['n_pool']:<3} {fmt(r.get('pool_macro_f1_missed')):>9} "
                     f"{fmt(r.get('pool_confidence_missed')):>11} {fmt(r.get('pool_confidence_found')):>10}")
    return "\n".join(lines)


def machine(device: str) -> dict:
    import torch
    from importlib.metadata import version
    info = {"cpu_cores": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "nnunetv2": version("nnunetv2")}
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                               info["cpu"])
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# ---------------------------------------------------------------------------------------------------- main


def parse_args(argv=None):
    import torch
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, type=Path, help="work folder (data, models, predictions, logs)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--plans", choices=["small", "default"],
                   help="small: nnUNetSmallPlans (few features); default: nnUNetPlans unchanged "
                        "(default: small on CPU, default on CUDA)")
    p.add_argument("--trainers", nargs="+", default=DEFAULT_TRAINERS, metavar="TRAINER",
                   help=f"trainer classes, in order (default: {' '.join(DEFAULT_TRAINERS)})")
    p.add_argument("--epochs", type=int, help=f"CPU default {CPU_SCHEDULE['epochs']}, CUDA {CUDA_SCHEDULE['epochs']}")
    p.add_argument("--iterations", type=int, help=f"training iterations per epoch (CPU default "
                                                  f"{CPU_SCHEDULE['iterations']}, CUDA {CUDA_SCHEDULE['iterations']})")
    p.add_argument("--val-iterations", type=int, help=f"validation iterations per epoch (CPU default "
                                                      f"{CPU_SCHEDULE['val_iterations']}, CUDA "
                                                      f"{CUDA_SCHEDULE['val_iterations']})")
    p.add_argument("--base-features", type=int, default=SMALL_FEATURES["base_features"],
                   help=f"small plans: features of the first stage, doubling per stage "
                        f"({SMALL_FEATURES['base_features']})")
    p.add_argument("--max-features", type=int, default=SMALL_FEATURES["max_features"],
                   help=f"small plans: feature cap ({SMALL_FEATURES['max_features']})")
    p.add_argument("--batch-size", type=int, default=2, help="small plans: batch size (2)")
    p.add_argument("--patch-size", type=int, nargs="+", metavar="N", default=SMALL_PATCH,
                   help=f"small plans: patch size (z y x) instead of nnU-Net's planned one "
                        f"(default: {' '.join(map(str, SMALL_PATCH))})")
    p.add_argument("--planned-patch", action="store_true", help="small plans: keep nnU-Net's planned patch size")
    p.add_argument("--cases", type=int, default=24, help="train cases (24)")
    p.add_argument("--validation-cases", type=int, default=9, help="validation cases (9)")
    p.add_argument("--test-cases", type=int, default=12, help="test cases (12)")
    p.add_argument("--classes", type=int, default=3, help="classes (3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic data (0)")
    p.add_argument("--difficulty", choices=["easy", "hard"], default="easy",
                   help="make-synthetic --difficulty: easy, the class unmistakable in the lesion's look; hard, "
                        "overlapping classes and the quiz's lesion sizes (easy)")
    p.add_argument("--pool-cases", type=int,
                   help="extra test cases from another seed, scored for the multitask trainers (default: 150 with "
                        "--difficulty hard, else 0)")
    p.add_argument("--pool-seed", type=int, default=11, help="seed of the pool's cases (11)")
    p.add_argument("--train-seed", type=int,
                   help="seed every trainer (stock too) with this: the same initial segmentation weights and batches "
                        "for all, so stock and multitask runs pair (default: unseeded, nnU-Net's behaviour)")
    p.add_argument("--num-proc-da", type=int,
                   help="nnUNet_n_proc_DA (default: 2 on CPU, 8 on CUDA; 1 with --train-seed)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="OMP_NUM_THREADS (default: all cores)")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write every figure here")
    p.add_argument("--prepare-only", action="store_true", help="stop after the data, preprocessing and plans")
    p.add_argument("--oracle-only", action="store_true",
                   help="make (or reuse) the synthetic data, print the oracle's figures and stop: no preprocessing, "
                        "no training")
    args = p.parse_args(argv)
    schedule = CPU_SCHEDULE if args.device == "cpu" else CUDA_SCHEDULE
    for key, value in schedule.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.plans = args.plans or ("small" if args.device == "cpu" else "default")
    if args.pool_cases is None:
        args.pool_cases = 150 if args.difficulty == "hard" else 0
    if args.pool_cases and args.pool_seed == args.seed:
        p.error(f"--pool-seed {args.pool_seed} is the data's --seed: the pool would repeat the benchmark's cases")
    # one augmentation worker with a seed: nnU-Net takes batches in the order its workers finish them
    args.num_proc_da = args.num_proc_da or (1 if args.train_seed is not None else 2 if args.device == "cpu" else 8)
    return args


def settings_of(args) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def main(argv=None) -> int:
    args = parse_args(argv)
    from multitask_nnunet.registration import environment_with_trainers

    started = time.perf_counter()
    data = args.workdir.resolve() / (f"data_quiz_s{args.seed}_c{args.classes}_"
                                     f"{args.cases}-{args.validation_cases}-{args.test_cases}"
                                     + ("_hard" if args.difficulty == "hard" else ""))
    env = environment_with_trainers()
    env["nnUNet_extTrainer"] = os.pathsep.join([str(TRAINER_FOLDER), env["nnUNet_extTrainer"]])
    for var in ("nnUNet_raw", "nnUNet_preprocessed"):
        (data / var).mkdir(parents=True, exist_ok=True)
        env[var] = str(data / var)
    env.setdefault("nnUNet_def_n_proc", str(min(os.cpu_count() or 1, 8)))  # nnU-Net's pools (validation export)
    env.update({"nnUNet_n_proc_DA": str(args.num_proc_da), "OMP_NUM_THREADS": str(args.threads),
                **{var: str(getattr(args, key)) for key, var in SCHEDULE_VARIABLES.items()}})
    env.pop(TRAIN_SEED_VARIABLE, None)
    if args.train_seed is not None:
        env[TRAIN_SEED_VARIABLE] = str(args.train_seed)

    if args.oracle_only:
        print(f"=== data: {data}", flush=True)
        figures = oracle(make_data(args, data, env))
        print("\n".join(oracle_lines(figures)))
        if args.json:
            save({"command": " ".join([sys.executable, *sys.argv]), "settings": settings_of(args),
                  "oracle": figures}, args.json)
            print(f"figures: {args.json}")
        return 0
    multitask = {t: is_multitask(t, env) for t in args.trainers}

    print(f"=== data and stock nnU-Net preprocessing: {data}", flush=True)
    preprocessed = prepare_data(args, data, env)
    oracle_figures = oracle(data / "synthetic")
    plans = write_plans(args, preprocessed)
    plans_tag = plans["tag"]
    run_dir = data / "runs" / (f"{plans_tag}_{args.device}_e{args.epochs}_i{args.iterations}_v{args.val_iterations}"
                               + ("" if args.train_seed is None else f"_t{args.train_seed}"))
    env["nnUNet_results"] = str(run_dir / "nnUNet_results")
    print(f"plans {plans['name']}: patch {plans['patch_size']}, features {plans['features_per_stage']}, "
          f"batch {plans['batch_size']}; schedule {args.epochs} epochs x {args.iterations} iterations "
          f"(+{args.val_iterations} validation iterations); device {args.device}, nnUNet_n_proc_DA "
          f"{args.num_proc_da}, nnUNet_def_n_proc {env['nnUNet_def_n_proc']}, OMP_NUM_THREADS {args.threads}\n"
          f"run folder {run_dir}", flush=True)
    if args.prepare_only:
        return 0

    pool = None
    if args.pool_cases:
        pool = make_pool(args, args.workdir.resolve(), env)
        oracle_figures.update(pool_oracle(data / "synthetic", pool))
    results, failed = {}, {}
    for trainer in args.trainers:
        print(f"\n=== {trainer} ({'multitask' if multitask[trainer] else 'stock, segmentation only'})", flush=True)
        try:
            record = train(args, trainer, plans["name"], run_dir, env)
            model = Path(record["model"])
            figures = training_figures(model, multitask[trainer])
            test = predict_and_evaluate(args, trainer, multitask[trainer], model, plans["name"], data / "synthetic",
                                        data / "nnUNet_raw" / DATASET, run_dir, env)
            if pool is not None and multitask[trainer]:
                test.update(pool_scores(args, trainer, model, pool, data / "nnUNet_raw" / DATASET, run_dir, env))
        except SystemExit as e:  # a failed command: report it, go on with the next trainer
            failed[trainer] = str(e)
            print(f"{trainer} FAILED: {e}", flush=True)
            continue
        results[trainer] = {"multitask": multitask[trainer], **record, **figures, **test}
        if trainer == STOCK_TRAINER:
            try:
                oracle_figures.update(stock_mask_oracle(args, plans["name"], data / "synthetic", run_dir, env,
                                                        Path(test["predictions"]), pool))
            except SystemExit as e:
                failed[f"{trainer} (training-case masks)"] = str(e)
    for r in results.values():
        for key, reference in (("test_f1_over_oracle", "macro_f1"),
                               ("test_f1_over_stock_mask_oracle", "macro_f1_stock_masks")):
            if r["test_macro_f1"] is not None and (oracle_figures.get(reference) or 0) > 0:
                r[key] = r["test_macro_f1"] / oracle_figures[reference]

    for r in results.values():
        if r.get("pool_macro_f1") is not None:
            r["pool_f1_over_oracle"] = r["pool_macro_f1"] / oracle_figures["pool_macro_f1"]
            for key, reference in (("pool_f1_over_own_mask_oracle", r.get("pool_macro_f1_own_masks")),
                                   ("pool_f1_over_stock_mask_oracle", oracle_figures.get("pool_macro_f1_stock_masks"))):
                if reference:
                    r[key] = r["pool_macro_f1"] / reference
    report = table(results) + "\n\n" + oracle_table(results, oracle_figures) + \
        ("\n\n" + pool_table(results, oracle_figures) if pool is not None else "") + \
        "".join(f"\nFAILED {t}: {message}" for t, message in failed.items())
    step_seconds = load(data / "prepared.json")["prepare_seconds"] + sum(
        r["train_seconds"] + r["predict_seconds"] + r.get("pool_predict_seconds", 0) for r in results.values())
    print(f"\n=== results ({args.device}, plans {plans_tag}, {args.epochs} epochs x {args.iterations} iterations, "
          f"{args.cases}/{args.validation_cases}/{args.test_cases} train/validation/test cases, seed {args.seed}, "
          f"{args.difficulty} data, "
          f"training {'unseeded' if args.train_seed is None else f'seed {args.train_seed}'})\n"
          + report + f"\n\nwall time of this invocation: {(time.perf_counter() - started) / 60:.1f} min; of every "
          f"step from scratch (data + preprocessing, trainings, predictions; as recorded when each ran): "
          f"{step_seconds / 60:.1f} min")
    if args.json:
        save({"command": " ".join([sys.executable, *sys.argv]), "settings": settings_of(args), "plans": plans,
              "run_folder": str(run_dir), "machine": machine(args.device),
              "invocation_seconds": time.perf_counter() - started, "from_scratch_seconds": step_seconds,
              "oracle": oracle_figures, "results": results, "failed": failed, "table": report}, args.json)
        print(f"figures: {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
