"""``multitask-nnunet demo``: the whole job on a built-in synthetic dataset, in minutes on a CPU.

make-synthetic -> convert -> stock nnUNetv2_plan_and_preprocess -> tiny plans -> stock nnUNetv2_train with
MultitasknnUNetTrainer_Demo -> multitask-nnunet predict on the synthetic test images -> evaluate against
their ground truth. nnU-Net's own steps run as the same CLI commands a user types, with nnUNet_raw,
nnUNet_preprocessed and nnUNet_results inside the work folder. A step whose output already exists is
skipped, so an interrupted demo resumes where it stopped; ``--fresh`` starts over.

Reproducible where nnU-Net allows it: the data are generated with a fixed seed, the trainer seeds itself and
its data-augmentation workers (``MultitasknnUNetTrainer_Demo.seed``), and training uses one augmentation
worker (``nnUNet_n_proc_DA=1``), so a rerun on the same machine and device repeats the run. At the end the
test metrics are compared with what healthy runs reached (``HEALTHY``); a run clearly below gets a warning.
"""
import codecs
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from multitask_nnunet.console import ChatterFilter, python_warnings_setting
from multitask_nnunet.errors import InputError, warn
from multitask_nnunet.registration import console_script

DATASET_ID = 999
DATASET = f"Dataset{DATASET_ID}_SyntheticDemo"
CONFIGURATION = "3d_fullres"
PLANS = "nnUNetTinyPlans"
TRAINER = "MultitasknnUNetTrainer_Demo"
DATA_SEED = 0
DA_WORKERS = "1"  # nnUNet_n_proc_DA: nnU-Net's augmenter takes batches in the order its workers finish them

#: the test metrics of healthy runs: (metric key of the evaluation, what it is, warn below, range measured so
#: far). Update the range, and MEASURED_RUNS, with each measured run.
HEALTHY = [
    (("dice", "foreground"), "Dice, whole region (labels 1+2)", 0.85, "0.9 or more"),
    (("dice", "label_2"), "Dice, lesion (label 2)", 0.55, "0.69 to 0.93"),
    (("macro_f1",), "macro-F1 (6 test cases)", 0.5, "0.556 to 1.000"),
]
MEASURED_RUNS = "seeded runs of this demo on 2-core CPUs; TechReport, 'Demo', has the current figures"
EXPECTED_TIME = "about 2.5 to 5 minutes on 2 idle CPU cores, longer when other jobs share them"


def _step(number: int, text: str) -> None:
    print(f"\n=== [{number}/6] {text}", flush=True)


def _run(cmd: list, env: dict) -> None:
    """Run a stock nnU-Net command; its stdout passes through the chatter filter (console.py), its stderr as is."""
    print("+ " + " ".join(cmd), flush=True)
    out = ChatterFilter(sys.stdout)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    with subprocess.Popen([console_script(cmd[0]), *cmd[1:]], env={**env, "PYTHONUNBUFFERED": "1"},
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE) as process:
        for chunk in iter(lambda: process.stdout.read1(65536), b""):
            out.write(decoder.decode(chunk))
            out.flush()
    out.write(decoder.decode(b"", final=True))
    out.close()
    if process.returncode != 0:
        raise InputError(f"'{' '.join(cmd)}' failed with exit code {process.returncode} (see its output above)")


def health_report(results: dict) -> list:
    """Lines comparing ``results`` (the evaluation of the test set) with HEALTHY; warns for each metric that
    falls clearly below."""
    lines = [f"Healthy demo runs reach ({MEASURED_RUNS}):"]
    for keys, what, floor, measured in HEALTHY:
        value = results
        for key in keys:  # e.g. results["dice"]["foreground"]
            value = value.get(key) if isinstance(value, dict) else None
        shown = "n/a" if value is None else f"{value:.3f}"
        lines.append(f"  {what:<34} {measured:<16} this run {shown}")
        if value is None or value < floor:
            warn(f"{what} is {shown}, clearly below healthy demo runs ({measured}; warning below {floor}); "
                 f"see README, 'The demo'")
    return lines


def run_demo(workdir: str, device: str = None, fresh: bool = False) -> dict:
    import torch

    from multitask_nnunet.conversion.convert import convert_dataset
    from multitask_nnunet.conversion.synthetic import make_synthetic_dataset
    from multitask_nnunet.evaluation.evaluate import evaluate, format_table
    from multitask_nnunet.inference.batch import BatchOptions, PredictorOptions, predict_folder
    from multitask_nnunet.registration import environment_with_trainers
    from multitask_nnunet.tiny_plans import write_tiny_plans

    work = Path(workdir).resolve()
    if fresh and work.exists():
        shutil.rmtree(work)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    env = environment_with_trainers()
    env["nnUNet_n_proc_DA"] = DA_WORKERS
    # nnU-Net's export and metric pools (final validation): one process per core, at most nnU-Net's default 8
    # (on 2 cores its 8 spawned processes made the final validation 71 s instead of 19 s)
    env.setdefault("nnUNet_def_n_proc", str(min(8, os.cpu_count() or 1)))
    env["PYTHONWARNINGS"] = python_warnings_setting(env.get("PYTHONWARNINGS", ""))
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (work / var).mkdir(parents=True, exist_ok=True)
        env[var] = os.environ[var] = str(work / var)  # for our in-process steps too
    os.environ["nnUNet_extTrainer"] = env["nnUNet_extTrainer"]
    source, raw = work / "synthetic_quiz_layout", work / "nnUNet_raw" / DATASET
    preprocessed = work / "nnUNet_preprocessed" / DATASET
    model = work / "nnUNet_results" / DATASET / f"{TRAINER}__{PLANS}__{CONFIGURATION}"
    predictions = work / "predictions"
    started = time.time()
    print(f"multitask-nnunet demo in {work} on {device}; expected time {EXPECTED_TIME}")

    _step(1, f"synthetic dataset in the quiz layout (train/subtypeK, validation/subtypeK, test), seed {DATA_SEED}")
    if not source.is_dir():
        make_synthetic_dataset(source, seed=DATA_SEED)
    print(f"{source}")

    _step(2, "convert to an nnU-Net raw dataset with region labels and class labels")
    if not raw.is_dir():
        convert_dataset(source, DATASET_ID, "SyntheticDemo")
    print(f"{raw}")

    _step(3, "stock nnUNetv2_plan_and_preprocess, then a tiny copy of the plans for a CPU")
    if not (preprocessed / f"{PLANS}.json").is_file():
        _run(["nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", CONFIGURATION, "-np", "2", "-npfp", "2",
              "--verify_dataset_integrity"], env)
        write_tiny_plans(str(preprocessed), target_plans=PLANS)

    _step(4, f"stock nnUNetv2_train with -tr {TRAINER} (fold 0 = the original train/validation split; seeded, "
             f"nnUNet_n_proc_DA={DA_WORKERS} augmentation worker)")
    if not (model / "fold_0" / "checkpoint_final.pth").is_file():
        _run(["nnUNetv2_train", str(DATASET_ID), CONFIGURATION, "0", "-tr", TRAINER, "-p", PLANS,
              "-device", device], env)

    _step(5, "multitask-nnunet predict on the test images: masks + subtype_results.csv")
    predict_folder(source / "test", predictions, model, BatchOptions(PredictorOptions(folds=[0], device=device)))

    _step(6, "evaluate against the test ground truth")
    results = evaluate(str(predictions), str(source / "test_labels"), dataset_json=str(raw / "dataset.json"),
                       json_file=str(work / "evaluation.json"))
    print(format_table(results))
    print("\n" + "\n".join(health_report(results)))
    print(f"\nDone in {time.time() - started:.0f} s. Outputs:\n"
          f"  model        {model}\n"
          f"  predictions  {predictions} (masks, subtype_results.csv, class_probabilities.csv)\n"
          f"  metrics      {work / 'evaluation.json'}, {work / 'confusion_matrix.png'}\n"
          f"  training     {model / 'fold_0' / 'progress.png'}, {model / 'fold_0' / 'validation'}")
    return results


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("demo", help="run the whole pipeline on a synthetic dataset (minutes on a CPU)",
                              description=__doc__)
    p.add_argument("--workdir", default="multitask_nnunet_demo", help="work folder (default: ./multitask_nnunet_demo)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available, else cpu")
    p.add_argument("--fresh", action="store_true", help="delete the work folder first")
    p.set_defaults(func=lambda args: run_demo(args.workdir, args.device, args.fresh) and None)
