"""Inference speed and agreement: stock nnU-Net vs ``multitask-nnunet predict``, paired, in one process.

Same model, same input cases, same device:

1. stock ``nnUNetPredictor`` at its defaults (sliding window, step 0.5, mirroring on) through
   ``predict_from_files`` with nnUNetv2_predict's default 3 preprocessing and 3 export processes;
2. ours with mirroring TTA (default mode: whole volume when it fits), i.e. the same TTA work as stock;
3. ours at its defaults (whole volume, no TTA);
4. with ``--also-sliding``: ours with stock's algorithm (sliding window, step 0.5, TTA), which separates what
   the pipeline (background I/O, export on torch) gains from what the whole-volume pass gains, and whose
   agreement with stock shows that preprocessing and export match nnU-Net's.

Each method first predicts one case untimed (warm-up), then all cases timed. Stock's time excludes loading
the model; ours includes it (``predict_folder`` loads the model itself), so ours is if anything overstated.
Agreement: Dice per region (the model's dataset.json labels) between each of ours and stock's masks, mean
over cases (a region empty in both counts as 1); class agreement between ours-TTA and ours-default.

Usage: python benchmarks/inference_speed.py -m MODEL_DIR -i INPUT_DIR [--device cpu] [--max-cases 5] [--json F]
"""
import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json

from multitask_nnunet.class_csv import PROBABILITIES_CSV, read_probabilities_csv
from multitask_nnunet.evaluation.label_maps import read_label_map
from multitask_nnunet.evaluation.metrics import case_dice
from multitask_nnunet.evaluation.regions import regions_from_labels
from multitask_nnunet.inference.batch import predict_folder
from multitask_nnunet.inference.cases import list_cases
from multitask_nnunet.registration import ext_trainer_path

STOCK, OURS_TTA, OURS = "stock nnU-Net (sliding, TTA)", "ours, auto mode + TTA", "ours, default (auto, no TTA)"
OURS_SLIDING = "ours, sliding + TTA (as stock)"


def link_cases(cases, folder: str) -> str:
    os.makedirs(folder)
    for case in cases:
        for file in case.files:
            os.symlink(os.path.abspath(file), os.path.join(folder, os.path.basename(file)))
    return folder


def run_stock(model_dir, folds, checkpoint, device, cases, out_dir):
    """(seconds, patch size)"""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True, device=device,
                                allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(model_dir, folds, checkpoint)

    def predict(subset, folder):
        predictor.predict_from_files([list(c.files) for c in subset], [os.path.join(folder, c.name) for c in subset],
                                     save_probabilities=False, overwrite=True, num_processes_preprocessing=3,
                                     num_processes_segmentation_export=3)
    os.makedirs(out_dir + "_warmup")
    predict(cases[:1], out_dir + "_warmup")
    os.makedirs(out_dir)
    start = time.perf_counter()
    predict(cases, out_dir)
    return time.perf_counter() - start, predictor.configuration_manager.patch_size


def run_ours(model_dir, folds, checkpoint, device, work, out_dir, tta, mode="auto") -> float:
    predict_folder(os.path.join(work, "warmup_input"), out_dir + "_warmup", model_dir, folds, checkpoint,
                   str(device), tta=tta, mode=mode, progress=False)
    start = time.perf_counter()
    predict_folder(os.path.join(work, "input"), out_dir, model_dir, folds, checkpoint, str(device), tta=tta,
                   mode=mode, progress=False)
    return time.perf_counter() - start


def agreement(reference_dir, other_dir, cases, regions, ignore_label) -> dict:
    dice = []
    for case in cases:
        ref = read_label_map(os.path.join(reference_dir, case.output_name))
        d = case_dice(ref, read_label_map(os.path.join(other_dir, case.output_name)), regions, ignore_label)
        dice.append([1.0 if np.isnan(d[r]) else d[r] for r in regions])
    return dict(zip(regions, np.mean(dice, axis=0).round(4).tolist()))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-m", required=True, metavar="MODEL_DIR")
    parser.add_argument("-i", required=True, metavar="INPUT_DIR")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--folds", nargs="+", help="default: every fold with the checkpoint")
    parser.add_argument("--checkpoint", default="checkpoint_final.pth")
    parser.add_argument("--max-cases", type=int, metavar="N", help="only the first N cases (sorted by name)")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="torch threads of this process (default: torch's); e.g. 1 on a busy shared CPU, where "
                             "OpenMP threads waiting for each other slow every network pass down")
    parser.add_argument("--also-sliding", action="store_true", help="also time ours with stock's algorithm")
    parser.add_argument("--json", metavar="FILE", help="also write the figures here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ["nnUNet_extTrainer"] = ext_trainer_path()  # so that stock nnU-Net finds our trainer class

    model_dir, device = os.path.abspath(args.m), torch.device(args.device)
    dataset_json = load_json(os.path.join(model_dir, "dataset.json"))
    cases, _ = list_cases(args.i, dataset_json["file_ending"], dataset_json["channel_names"])
    cases = cases[:args.max_cases] if args.max_cases else cases
    spec = regions_from_labels(dataset_json["labels"], "dataset.json")
    folds = args.folds
    if folds is None:
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
        folds = nnUNetPredictor.auto_detect_available_folds(model_dir, args.checkpoint)

    with tempfile.TemporaryDirectory() as work:
        link_cases(cases, os.path.join(work, "input"))
        link_cases(cases[:1], os.path.join(work, "warmup_input"))
        out = {k: os.path.join(work, k) for k in ("stock", "ours_tta", "ours", "ours_sliding")}
        stock_seconds, patch_size = run_stock(model_dir, folds, args.checkpoint, device, cases, out["stock"])
        seconds = {STOCK: stock_seconds,
                   OURS_TTA: run_ours(model_dir, folds, args.checkpoint, device, work, out["ours_tta"], True),
                   OURS: run_ours(model_dir, folds, args.checkpoint, device, work, out["ours"], False)}
        if args.also_sliding:
            seconds[OURS_SLIDING] = run_ours(model_dir, folds, args.checkpoint, device, work, out["ours_sliding"],
                                             True, "sliding")
        dice = {method: agreement(out["stock"], out[key], cases, spec.regions, spec.ignore_label)
                for method, key in ((OURS_TTA, "ours_tta"), (OURS, "ours"), (OURS_SLIDING, "ours_sliding"))
                if method in seconds}
        classes = {k: {n: int(np.argmax(p)) for n, p in read_probabilities_csv(
            os.path.join(out[k], PROBABILITIES_CSV)).items()} for k in ("ours_tta", "ours")}
    same_class = sum(classes["ours_tta"][c.output_name] == classes["ours"][c.output_name] for c in cases)

    lines = [f"model {model_dir} (folds {folds}, {args.checkpoint}), patch size {patch_size}",
             f"input {args.i}: {len(cases)} cases (+1 untimed warm-up per method), device {device}, "
             f"{os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}",
             f"{'method':<30} {'s/case':>8} {'speed-up':>9}   Dice vs stock (mean over cases)"]
    stock_per_case = seconds[STOCK] / len(cases)
    for method, total in seconds.items():
        per_case = total / len(cases)
        regions = "   " + ", ".join(f"{r} {v:.4f}" for r, v in dice[method].items()) if method in dice else ""
        lines.append(f"{method:<30} {per_case:>8.2f} {stock_per_case / per_case:>8.2f}x{regions}")
    lines.append(f"class agreement ours-TTA vs ours-default: {same_class}/{len(cases)}")
    print("\n" + "\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": model_dir, "folds": folds, "device": str(device), "cases": [c.name for c in cases],
                       "seconds_per_case": {m: s / len(cases) for m, s in seconds.items()},
                       "speedup_vs_stock": {m: seconds[STOCK] / s for m, s in seconds.items()},
                       "dice_vs_stock": dice, "class_agreement_tta_vs_default": same_class / len(cases)}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
