"""Inference speed and agreement: stock nnU-Net vs ``multitask-nnunet predict``, paired.

Two modes, same model, same input cases, same device.

``--end-to-end``: the whole commands, each a subprocess timed by its wall clock (process start, imports, model
load, every case, exit), on one folder:

1. stock ``nnUNetv2_predict_from_modelfolder`` (nnUNetv2_predict's code for a model folder) at its defaults:
   sliding window, step 0.5, mirroring, 3 preprocessing and 3 export processes;
2. the same with ``--disable_tta``;
3. ``multitask-nnunet predict`` at its defaults (whole volume when it fits, no TTA);
4. the same with ``--tta``.

It prints the speed-ups (against stock's default, and against stock at the same TTA setting: ours default vs
stock ``--disable_tta``, ours ``--tta`` vs stock's default), our per-stage time breakdown (from ``--profile``),
the Dice of each of ours against stock at the same TTA setting, and the agreement of the preprocessing on the
device (device_preprocessing.py; on by default with CUDA) with nnU-Net's CPU preprocessing: largest absolute
difference and fraction of voxels within 1e-4, over the cases. Before the timed runs, the input files and
the libraries are read once (untimed), so that no command pays for a cold disk cache that another does not;
with ``--repeats N`` every command runs N times (interleaved) and the median counts.

Without ``--end-to-end``, in one process (the model load and imports excluded from stock's time):

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

Input: ``-i INPUT_DIR``, or, without ``-i``, ``GENERATED_CASES`` (72) synthetic cases at the sizes of the quiz's
test images (``multitask-nnunet make-synthetic --geometry quiz-sizes``: crops of 40-160 x 80-220 x 110-360
voxels at 0.75x0.75x2 mm, the quiz geometry's pancreas and lesion in each; ``--max-cases N`` generates only N),
written once to ``--data DIR`` and reused. Their ground truth is known, so every command's masks are also
scored against it (``--labels``, set automatically then): that shows whether the model's masks are noise. Pair
them with a model trained on ``--geometry quiz``, e.g. the default trainer's model of
``benchmarks/classification_learning.py`` (CPU: small plans, 12 epochs x 50 iterations; CUDA: default plans,
``benchmarks/gpu/run_checks.sh``), found under ``WORKDIR/data_*/runs/*/MultitasknnUNetTrainer_ClsBench*``.

Usage: python benchmarks/inference_speed.py -m MODEL_DIR [-i INPUT_DIR | --data DIR] [--labels DIR] [--end-to-end]
       [--device cpu] [--max-cases 5] [--json F]
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json

from multitask_nnunet.io.class_csv import PROBABILITIES_CSV, read_probabilities_csv
from multitask_nnunet.evaluation.metrics import case_dice
from multitask_nnunet.io.labels import regions_from_labels
from multitask_nnunet.inference.batch import BatchOptions, PredictorOptions, predict_folder
from multitask_nnunet.io.nifti import read_geometry, read_label_map
from multitask_nnunet.inference.cases import list_cases
from multitask_nnunet.inference.timing import STAGES
from multitask_nnunet.registration import console_script, environment_with_trainers, ext_trainer_path

GENERATED_CASES = 72  # the quiz's test set

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
    options = BatchOptions(PredictorOptions(folds, checkpoint, str(device), tta, mode), progress=False)
    predict_folder(os.path.join(work, "warmup_input"), out_dir + "_warmup", model_dir, options)
    start = time.perf_counter()
    predict_folder(os.path.join(work, "input"), out_dir, model_dir, options)
    return time.perf_counter() - start


def agreement(reference_dir, other_dir, cases, regions, ignore_label) -> dict:
    dice = []
    for case in cases:
        ref = read_label_map(os.path.join(reference_dir, case.output_name))
        d = case_dice(ref, read_label_map(os.path.join(other_dir, case.output_name)), regions, ignore_label)
        dice.append([1.0 if np.isnan(d[r]) else d[r] for r in regions])
    return dict(zip(regions, np.mean(dice, axis=0).round(4).tolist()))


E2E_STOCK, E2E_STOCK_NO_TTA = "stock nnUNetv2_predict (TTA)", "stock --disable_tta"
E2E_OURS, E2E_OURS_TTA = "ours (default, no TTA)", "ours --tta"
SAME_TTA = {E2E_OURS: E2E_STOCK_NO_TTA, E2E_OURS_TTA: E2E_STOCK}


def end_to_end_commands(model_dir, folds, checkpoint, device, input_dir, work) -> dict:
    """{method: (command, output folder)}; ours also write their per-case profile into the output folder."""
    folds = [str(f) for f in folds]
    stock = [console_script("nnUNetv2_predict_from_modelfolder"), "-i", input_dir, "-m", model_dir, "-f", *folds,
             "-chk", checkpoint, "-device", device, "--disable_progress_bar"]
    ours = [sys.executable, "-m", "multitask_nnunet.cli", "predict", "-i", input_dir, "-m", model_dir, "-f", *folds,
            "-chk", checkpoint, "--device", device]
    commands = {}
    for method, base, extra in ((E2E_STOCK, stock, []), (E2E_STOCK_NO_TTA, stock, ["--disable_tta"]),
                                (E2E_OURS, ours, []), (E2E_OURS_TTA, ours, ["--tta"])):
        out = os.path.join(work, method.split(" (")[0].replace(" ", "_").replace("-", ""))
        profile = ["--profile", os.path.join(work, os.path.basename(out) + ".profile.json")] if base is ours else []
        commands[method] = ([*base, "-o", out, *extra, *profile], out)
    return commands


def timed_command(command, env) -> float:
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} exited {result.returncode}:\n{result.stdout[-3000:]}\n"
                         f"{result.stderr[-3000:]}")
    return seconds


def warm_up(cases, env) -> None:
    """Read the inputs and import the libraries once, untimed: every timed command finds them in the page cache."""
    for case in cases:
        for file in case.files:
            with open(file, "rb") as f:
                while f.read(1 << 20):
                    pass
    subprocess.run([sys.executable, "-c", "import torch, SimpleITK, nnunetv2.inference.predict_from_raw_data"],
                   env=env, check=True, stdin=subprocess.DEVNULL, capture_output=True)


def preprocessing_agreement(model_dir, cases, checkpoint, device) -> dict:
    """nnU-Net's CPU preprocessing (``preprocessor.run_case_npy`` with the plans' configuration) against ours on
    ``device`` (device_preprocessing.py) for every case: the largest absolute difference, the fraction of voxels
    within 1e-4, and each side's time (s, mean per case; the device's synchronised)."""
    import copy
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager
    from multitask_nnunet.inference.case_predictor import CasePredictor
    ours = CasePredictor(model_dir, PredictorOptions(checkpoint=checkpoint, device=device, device_preprocessing=True),
                         load_network=False).io
    if not ours.on_device:
        return {"supported": False}
    reference = ConfigurationManager(ours.configuration_manager.configuration)
    worst, within, seconds = 0.0, [], {"nnU-Net CPU": 0.0, f"ours on {device}": 0.0}
    for case in cases:
        image, properties = ours.read(case.name, case.files)
        t0 = time.perf_counter()
        expected, _, _ = reference.preprocessor_class(verbose=False).run_case_npy(
            image, None, copy.deepcopy(properties), ours.plans_manager, reference, ours.dataset_json)
        t1 = time.perf_counter()
        data, _ = ours.preprocess(image, properties, case.name)
        if data.is_cuda:
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        difference = np.abs(data.cpu().numpy().astype(np.float64) - expected)
        worst, within = max(worst, float(difference.max())), within + [float(np.mean(difference <= 1e-4))]
        seconds["nnU-Net CPU"] += t1 - t0
        seconds[f"ours on {device}"] += t2 - t1
    return {"supported": True, "max_abs_difference": worst, "voxels_within_1e-4": float(np.mean(within)),
            "seconds_per_case": {k: v / len(cases) for k, v in seconds.items()}}


def end_to_end(args, model_dir, cases, folds, spec) -> int:
    env = {**os.environ, **environment_with_trainers()}  # stock nnU-Net must find our trainer class
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    with tempfile.TemporaryDirectory() as work:
        input_dir = link_cases(cases, os.path.join(work, "input"))
        commands = end_to_end_commands(model_dir, folds, args.checkpoint, args.device, input_dir, work)
        warm_up(cases, env)
        seconds = {method: [] for method in commands}
        for _ in range(args.repeats):
            for method, (command, out) in commands.items():
                shutil.rmtree(out, ignore_errors=True)
                seconds[method].append(timed_command(command, env))
                # each time as it comes: a run stopped at a time limit still leaves the finished commands' figures
                print(f"  {method}: {seconds[method][-1]:.2f} s ({seconds[method][-1] / len(cases):.2f} s/case)",
                      flush=True)
        wall = {m: statistics.median(s) for m, s in seconds.items()}
        dice = {m: agreement(commands[SAME_TTA[m]][1], commands[m][1], cases, spec.regions, spec.ignore_label)
                for m in SAME_TTA}
        truth = {m: agreement(args.labels, out, cases, spec.regions, spec.ignore_label)
                 for m, (_, out) in commands.items()} if args.labels else {}
        profiles = {}
        for m in SAME_TTA:
            with open(commands[m][0][commands[m][0].index("--profile") + 1]) as f:
                profiles[m] = json.load(f)
        classes = {m: {n: int(np.argmax(p)) for n, p in read_probabilities_csv(
            os.path.join(commands[m][1], PROBABILITIES_CSV)).items()} for m in SAME_TTA}
    same_class = sum(classes[E2E_OURS][c.output_name] == classes[E2E_OURS_TTA][c.output_name] for c in cases)
    preprocessing = preprocessing_agreement(model_dir, cases, args.checkpoint, args.device)
    n = len(cases)
    lines = [f"model {model_dir} (folds {folds}, {args.checkpoint})",
             f"input {args.i}: {n} cases ({_sizes(cases)}), device {args.device}, {os.cpu_count()} CPU cores, "
             f"whole commands as subprocesses, median of {args.repeats} run(s)",
             f"{'command':<30} {'wall s':>8} {'s/case':>7} {'vs stock':>9} {'vs stock, same TTA':>19}   "
             f"Dice vs stock at the same TTA (mean over cases)"]
    for method in commands:
        same = f"{wall[SAME_TTA[method]] / wall[method]:>18.2f}x" if method in SAME_TTA else f"{'':>19}"
        regions = "   " + ", ".join(f"{r} {v:.4f}" for r, v in dice[method].items()) if method in dice else ""
        lines.append(f"{method:<30} {wall[method]:>8.2f} {wall[method] / n:>7.2f} "
                     f"{wall[E2E_STOCK] / wall[method]:>8.2f}x {same}{regions}")
    if truth:
        lines.append(f"Dice against the ground truth ({args.labels}), mean over cases: " + "; ".join(
            f"{m}: " + ", ".join(f"{r} {v:.4f}" for r, v in d.items()) for m, d in truth.items()))
    lines += [f"class agreement ours vs ours --tta: {same_class}/{n}", "",
              "our time breakdown (s; wall: the main thread's time line, adds up to the wall time; busy: in any "
              "thread), last run:",
              f"  {'stage':<11}" + "".join(f" {m + ' wall':>24} {'busy':>6}" for m in SAME_TTA)]
    for stage in STAGES:
        lines.append(f"  {stage:<11}" + "".join(
            f" {profiles[m]['stages'][stage]['wall_s']:>24.2f} {profiles[m]['stages'][stage]['busy_s']:>6.2f}"
            for m in SAME_TTA))
    lines.append(f"  {'other':<11}" + "".join(f" {profiles[m]['other_s']:>24.2f} {'':>6}" for m in SAME_TTA))
    lines.append(f"  {'total':<11}" + "".join(f" {profiles[m]['wall_s']:>24.2f} {'':>6}" for m in SAME_TTA))
    paths = {m: sorted({c["path"] for c in profiles[m]["cases"]}) for m in SAME_TTA}
    lines.append("paths: " + "; ".join(f"{m}: {', '.join(p)}" for m, p in paths.items()))
    on_device = "on by default" if args.device == "cuda" else "off by default on CPU, measured here on CPU"
    lines.append(f"preprocessing on the device ({on_device}) vs nnU-Net's CPU preprocessing: " + (
        f"max abs difference {preprocessing['max_abs_difference']:.2e}, voxels within 1e-4 "
        f"{preprocessing['voxels_within_1e-4']:.6f}; s/case " + ", ".join(
            f"{k} {v:.3f}" for k, v in preprocessing["seconds_per_case"].items())
        if preprocessing["supported"] else "not supported by these plans (nnU-Net's CPU preprocessing runs)"))
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": model_dir, "folds": folds, "device": args.device, "cases": [c.name for c in cases],
                       "cpu_count": os.cpu_count(), "repeats": args.repeats, "wall_s": seconds,
                       "median_wall_s": wall,
                       "speedup_vs_stock_default": {m: wall[E2E_STOCK] / s for m, s in wall.items()},
                       "speedup_vs_stock_same_tta": {m: wall[SAME_TTA[m]] / wall[m] for m in SAME_TTA},
                       "dice_vs_stock_same_tta": dice, "dice_vs_ground_truth": truth,
                       "class_agreement_ours_vs_tta": same_class / n,
                       "device_preprocessing_vs_nnunet": preprocessing,
                       "breakdown": {m: {k: v for k, v in p.items() if k not in ("cases", "definition")}
                                     for m, p in profiles.items()}}, f, indent=2)
    return 0


def _sizes(cases) -> str:
    """The range of the cases' image sizes (voxels, z y x), from their headers."""
    shapes = [read_geometry(case.files[0]).shape for case in cases]
    low, high = np.min(shapes, 0), np.max(shapes, 0)
    return "sizes " + " x ".join(f"{a}-{b}" for a, b in zip(low, high))


def generated_input(data: str, count: int, seed: int) -> tuple:
    """(images, labels) folders of ``count`` quiz-size synthetic cases (make-synthetic --geometry quiz-sizes),
    written under ``data`` on the first run and reused by the next."""
    from multitask_nnunet.conversion.synthetic import TEST_LABELS, make_synthetic_dataset
    folder = os.path.join(data, f"quiz_sizes_s{seed}_n{count}")
    if not os.path.isdir(os.path.join(folder, TEST_LABELS)):  # written complete or not at all
        make_synthetic_dataset(folder, cases=3, validation_cases=0, test_cases=count, seed=seed,
                               geometry="quiz-sizes", overwrite=True)
    return os.path.join(folder, "test"), os.path.join(folder, TEST_LABELS)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-m", required=True, metavar="MODEL_DIR")
    parser.add_argument("-i", metavar="INPUT_DIR", help=f"input images (default: {GENERATED_CASES} generated "
                        "quiz-size cases, see --data)")
    parser.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "multitask_speed_cases"),
                        metavar="DIR", help="without -i: where the generated cases are written once and reused")
    parser.add_argument("--seed", type=int, default=0, help="without -i: seed of the generated cases (0)")
    parser.add_argument("--labels", metavar="DIR", help="ground-truth label maps <case>.nii.gz of the input: every "
                        "command's masks are scored against them too (set automatically for generated cases)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--folds", nargs="+", help="default: every fold with the checkpoint")
    parser.add_argument("--checkpoint", default="checkpoint_final.pth")
    parser.add_argument("--max-cases", type=int, metavar="N", help="only the first N cases (sorted by name)")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="torch threads of this process (default: torch's); e.g. 1 on a busy shared CPU, where "
                             "OpenMP threads waiting for each other slow every network pass down. With --end-to-end: "
                             "OMP_NUM_THREADS of the commands (stock sets its own on CPU)")
    parser.add_argument("--also-sliding", action="store_true", help="also time ours with stock's algorithm")
    parser.add_argument("--end-to-end", action="store_true",
                        help="time the whole commands as subprocesses (stock default, stock --disable_tta, ours, "
                             "ours --tta) instead of the predictors in this process")
    parser.add_argument("--repeats", type=int, default=1, metavar="N", help="with --end-to-end: runs per command "
                        "(interleaved; the median counts)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ["nnUNet_extTrainer"] = ext_trainer_path()  # so that stock nnU-Net finds our trainer class

    if args.i is None:
        args.i, generated_labels = generated_input(args.data, args.max_cases or GENERATED_CASES, args.seed)
        args.labels = args.labels or generated_labels
    model_dir, device = os.path.abspath(args.m), torch.device(args.device)
    dataset_json = load_json(os.path.join(model_dir, "dataset.json"))
    cases, _ = list_cases(args.i, dataset_json["file_ending"], dataset_json["channel_names"])
    cases = cases[:args.max_cases] if args.max_cases else cases
    spec = regions_from_labels(dataset_json["labels"], "dataset.json")
    folds = args.folds
    if folds is None:
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
        folds = nnUNetPredictor.auto_detect_available_folds(model_dir, args.checkpoint)
    if args.end_to_end:
        return end_to_end(args, model_dir, cases, folds, spec)

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
