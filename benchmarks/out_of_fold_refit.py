"""The head refitted out of fold (``refit_folds.py``) against each fold's own refit, on the hard pool.

Takes the data of one ``benchmarks/classification_learning.py --difficulty hard`` run (its preprocessed dataset
and its pool) and:

1. copies the preprocessed dataset into ``--workdir`` with a 5-fold ``splits_final.json`` over the benchmark's
   training cases (nnU-Net's own split: KFold(5, shuffle, random_state 12345) over the sorted cases), so that the
   oracle, fitted on the same training cases, stays comparable; the benchmark's validation cases stay out;
2. trains the five folds with stock ``nnUNetv2_train`` and the benchmark's trainer (``--trainer``, schedule and
   seed from ``MULTITASK_BENCH_*`` as in ``classification_learning.py``), each fold with its own refit;
3. predicts the pool with ``multitask-nnunet predict`` at its defaults and scores it with ``evaluate``: fold 0
   alone and the five folds, with the folds' own refits (``own``); then runs ``refit_folds.py`` and predicts both
   again (``out_of_fold``). On CPU-A the five folds take ~20 minutes per prediction, idle;
4. prints macro-F1, its ratio to the pool oracle, ECE, mean confidence, and the lesions missed.

Every step is kept and reused on a rerun (trained folds, predictions, figures). The refit changes neither the
networks nor the MLPs, so the masks are the same before and after it.

    python benchmarks/out_of_fold_refit.py --data WORK/data_quiz_s0_c3_36-9-15_hard \
        --pool WORK/pool_quiz_s11_c3_n150_hard/synthetic --train-seed 1 --workdir WORK/oof_t1
"""
import argparse
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from classification_learning import (CONFIGURATION, DATASET, DATASET_ID, SCHEDULE_VARIABLES,  # noqa: E402
                                     TRAIN_SEED_VARIABLE, TRAINER_FOLDER, command, load, pool_oracle, pool_scores,
                                     run, save)

FOLDS = (0, 1, 2, 3, 4)


def five_folds(cases) -> list:
    """nnU-Net's own 5-fold split (``nnUNetTrainer.do_split`` without a splits file) of these cases."""
    from sklearn.model_selection import KFold
    keys = sorted(cases)
    return [{"train": [keys[i] for i in train], "val": [keys[i] for i in val]}
            for train, val in KFold(5, shuffle=True, random_state=12345).split(keys)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, required=True, help="a classification_learning.py data folder (data_*)")
    p.add_argument("--pool", type=Path, required=True, help="its pool's synthetic folder")
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--trainer", default="MultitasknnUNetTrainer_ClsBench")
    p.add_argument("--plans", default="nnUNetSmallPlans")
    p.add_argument("--train-seed", type=int, default=1)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--iterations", type=int, default=50)
    p.add_argument("--val-iterations", type=int, default=10)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path, help="write the figures here too")
    args = p.parse_args(argv)

    from multitask_nnunet.registration import environment_with_trainers
    work = args.workdir.resolve()
    env = environment_with_trainers()
    env["nnUNet_extTrainer"] = os.pathsep.join([str(TRAINER_FOLDER), env["nnUNet_extTrainer"]])
    env.update({"nnUNet_raw": str(args.data.resolve() / "nnUNet_raw"),
                "nnUNet_preprocessed": str(work / "nnUNet_preprocessed"), "nnUNet_results": str(work / "nnUNet_results"),
                "nnUNet_n_proc_DA": "1", "nnUNet_def_n_proc": "2", "OMP_NUM_THREADS": str(args.threads),
                TRAIN_SEED_VARIABLE: str(args.train_seed),
                **{var: str(getattr(args, key)) for key, var in SCHEDULE_VARIABLES.items()}})
    preprocessed = work / "nnUNet_preprocessed" / DATASET
    if not (preprocessed / "splits_final.json").is_file():
        shutil.copytree(args.data / "nnUNet_preprocessed" / DATASET, preprocessed, dirs_exist_ok=True)
        training = load(preprocessed / "splits_final.json")[0]["train"]
        save(five_folds(training), preprocessed / "splits_final.json")
    model = work / "nnUNet_results" / DATASET / f"{args.trainer}__{args.plans}__{CONFIGURATION}"
    for fold in FOLDS:
        if not (model / f"fold_{fold}" / "checkpoint_final.pth").is_file():
            resume = ["--c"] if (model / f"fold_{fold}" / "checkpoint_latest.pth").is_file() else []
            run(command("nnUNetv2_train", DATASET_ID, CONFIGURATION, fold, "-tr", args.trainer, "-p", args.plans,
                        "-device", args.device, *resume), env, work / "logs" / f"train_fold{fold}.log", echo=True)
    raw = args.data / "nnUNet_raw" / DATASET
    predictions = (("fold0", (0,)), ("folds5", FOLDS))
    refitted = model / "refit_folds.json"
    if not refitted.is_file():  # the folds' own refits first: predicted before the out-of-fold refit replaces them
        for name, folds in predictions:
            pool_scores(args, f"own_{name}", model, args.pool, raw, work, env, folds)
        run([sys.executable, str(Path(__file__).resolve().parent / "refit_folds.py"), str(DATASET_ID),
             CONFIGURATION, "-tr", args.trainer, "-p", args.plans, "-f", *map(str, FOLDS), "--device", args.device],
            env, work / "logs" / "refit_folds.log")
    figures = {head: {name: pool_scores(args, f"{head}_{name}", model, args.pool, raw, work, env, folds)
                      for name, folds in predictions} for head in ("own", "out_of_fold")}
    oracle = pool_oracle(args.data / "synthetic", args.pool)["pool_macro_f1"]
    print(f"\npool: {args.pool} ({oracle:.3f} oracle macro-F1)\nrefitted out of fold, cross-fitted on the training cases: "
          f"{json.dumps(load(refitted)['cross_fitted'])}")
    print(f"{'head':<12} {'folds':<6} {'macro-F1':>8} {'x oracle':>8} {'ECE':>6} {'conf.':>6} {'missed':>6} "
          f"{'whole':>6} {'lesion':>6}")
    for head, rows in figures.items():
        for name, r in rows.items():
            print(f"{head:<12} {'1' if name == 'fold0' else '5':<6} {r['pool_macro_f1']:>8.3f} "
                  f"{r['pool_macro_f1'] / oracle:>8.2f} {r['pool_ece']:>6.3f} {r['pool_confidence_found']:>6.3f} "
                  f"{r['pool_missed_lesions']:>6} {r['pool_dice_whole']:>6.3f} {r['pool_dice_lesion']:>6.3f}")
    if args.json:
        save({"command": " ".join([sys.executable, *sys.argv]), "oracle": oracle, "figures": figures,
              "refit_folds": load(refitted)}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
