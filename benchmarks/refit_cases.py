"""What the head's refit reaches when it is fitted on other cases than the model's own training cases.

``SegGuidedHead``'s descriptor branch is refitted after the last epoch (``MultitasknnUNetTrainer.refit_head``) on
the fold's training cases, as the final network segments them: cases the network was trained on, and as many
as the fold has. This separates the two: the product's own ``refit`` (the same regression, the same
standardiser, the MLP's logits held fixed) fitted on

- the training cases, as in training (both of ``refit_passes``: the second with the guide removed);
- the training cases, first pass only;
- every case of ``--unseen`` (a make-synthetic folder's test split, predicted by the same network: cases it never
  saw), first pass only;
- ``--draws`` random draws from ``--unseen`` with the training cases' class counts: unseen cases, as many as the
  training cases,

each scored (macro-F1, mean max probability) on the test split of ``--pool`` as ``predict`` classifies it at its
defaults (auto mode, no mirroring), beside the oracle (``synthetic.oracle_macro_f1``) fitted on the true
features of the same cases (for the draws: on each draw) and scored on the same pool. Which cases a
regression is fitted on moves the oracle as much as the model: a row's own oracle, not the training cases',
says what the cases themselves allow. ``--unseen`` and ``--pool`` are two different seeds' cases, e.g. the
classification benchmark's pool and one more made by ``make-synthetic --seed 12``. Nothing is written to the model.

    python benchmarks/refit_cases.py --model RESULTS/Dataset601_X/TRAINER__PLANS__3d_fullres --data DATA/synthetic \
        --unseen UNSEEN/synthetic --pool POOL/synthetic

``nnUNet_raw`` and ``nnUNet_preprocessed`` must be those of the training, the trainer's module on
``nnUNet_extTrainer``, and for ``benchmarks/classification_learning.py`` trainings its ``MULTITASK_BENCH_*``
variables set as in that run (``refit_head.py`` likewise).
"""
import argparse
import copy
import os
import sys
from pathlib import Path

import numpy as np
import torch

from multitask_nnunet.conversion.synthetic import oracle_macro_f1, read_truth_features
from multitask_nnunet.evaluation.metrics import classification_metrics
from multitask_nnunet.io.class_labels import class_weights


def test_records(predictor, source: Path) -> tuple:
    """(records, labels): one refit record per test case of a make-synthetic folder, predicted by ``predictor``
    (a ``CasePredictor``: ``multitask-nnunet predict``'s own path) while its head records."""
    head = predictor.predictor._module().classification_head
    rows = [r for r in read_truth_features(source / "truth_features.csv") if r["split"] == "test"]
    records = []
    for row in rows:
        with head.recording() as recorded:
            predictor.predict_case([str(source / "test" / row["Names"].replace(".nii.gz", "_0000.nii.gz"))])
        records.extend(recorded)
    return records, [r["Subtype"] for r in rows]


def scored(head, passes, labels, weights, pool_records, pool_labels) -> tuple:
    """(macro-F1, mean max probability) on the pool of a copy of ``head`` refitted on ``passes``."""
    fitted = copy.deepcopy(head)
    fitted.refit(passes, labels, weights)
    probabilities = torch.softmax(fitted.recorded_logits(pool_records), 1).numpy()
    names = [str(k) for k in range(probabilities.shape[1])]
    metrics = classification_metrics(np.asarray(pool_labels), probabilities.argmax(1), names)
    return metrics["macro_f1"], float(probabilities.max(1).mean())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True, help="the trained model's folder (TRAINER__PLANS__CONFIG)")
    p.add_argument("--data", type=Path, required=True, help="make-synthetic folder of the training cases")
    p.add_argument("--unseen", type=Path, required=True, help="make-synthetic folder: unseen cases to refit on")
    p.add_argument("--pool", type=Path, required=True, help="make-synthetic folder: the cases scored")
    p.add_argument("-f", "--fold", type=int, default=0)
    p.add_argument("--draws", type=int, default=40, help="draws of unseen cases with the training class counts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    trainer_name, plans, configuration = args.model.name.split("__")
    os.environ["nnUNet_results"] = str(args.model.parent.parent.resolve())
    from nnunetv2.run.run_training import get_trainer_from_args
    from multitask_nnunet.inference.case_predictor import CasePredictor
    from multitask_nnunet.inference.options import PredictorOptions

    fold = args.model / f"fold_{args.fold}"
    before = set(fold.iterdir())
    trainer = get_trainer_from_args(args.model.parent.name, configuration, args.fold, trainer_name, plans,
                                    device=torch.device(args.device))
    for new in set(fold.iterdir()) - before:  # the log that nnU-Net's __init__ opened with its banner
        new.unlink()
    trainer.log_file = os.devnull  # the trainer's log lines go to the console only: the model folder stays as it is
    trainer.load_checkpoint(str(fold / "checkpoint_final.pth"))
    head = trainer._unwrapped_network().classification_head
    if not head.refit_passes():
        raise SystemExit(f"{args.model}: its head ({type(head).__name__}) has no refit")
    training = trainer.refit_records(trainer.do_split()[0])  # the training cases' records, as refit_head gathers them
    training_weights = trainer.classification_loss.weight.detach().cpu()  # the class weights refit_head passes
    predictor = CasePredictor(args.model, PredictorOptions(folds=(args.fold,), device=args.device))
    unseen, unseen_labels = test_records(predictor, args.unseen)
    pool, pool_labels = test_records(predictor, args.pool)

    train_truth = [r for r in read_truth_features(args.data / "truth_features.csv") if r["split"] == "train"]
    unseen_truth = [r for r in read_truth_features(args.unseen / "truth_features.csv") if r["split"] == "test"]
    pool_truth = [r for r in read_truth_features(args.pool / "truth_features.csv") if r["split"] == "test"]
    oracle = oracle_macro_f1(train_truth, pool_truth)
    labels, weights, passes = training.labels, training_weights, training.passes
    rows = [("training cases, as in training", len(labels), *scored(head, passes, labels, weights, pool, pool_labels),
             oracle, ""),
            ("training cases, first pass", len(labels),
             *scored(head, passes[:1], labels, weights, pool, pool_labels), oracle, "")]
    num_classes = head.descriptor_linear.out_features
    unseen_weights = torch.tensor(class_weights(np.bincount(unseen_labels, minlength=num_classes).tolist()))
    rows.append(("unseen cases, all", len(unseen),
                 *scored(head, [(1.0, unseen)], unseen_labels, unseen_weights, pool, pool_labels),
                 oracle_macro_f1(unseen_truth, pool_truth), ""))
    counts = np.bincount(labels, minlength=num_classes)
    rng = np.random.default_rng(args.seed)
    by_class = [np.flatnonzero(np.asarray(unseen_labels) == k) for k in range(num_classes)]
    short = [k for k in range(num_classes) if len(by_class[k]) < counts[k]]
    if short:
        raise SystemExit(f"{args.unseen}: class(es) {short} have fewer unseen cases than training cases "
                         f"({[len(by_class[k]) for k in short]} < {[int(counts[k]) for k in short]})")
    draws = []
    for _ in range(args.draws):
        chosen = np.concatenate([rng.choice(by_class[k], counts[k], replace=False) for k in range(num_classes)])
        draws.append((*scored(head, [(1.0, [unseen[i] for i in chosen])], [unseen_labels[i] for i in chosen], weights,
                              pool, pool_labels), oracle_macro_f1([unseen_truth[i] for i in chosen], pool_truth)))
    f1s, confidences, oracles = np.array(draws).T
    rows.append(("unseen cases, training counts", int(counts.sum()), f1s.mean(), confidences.mean(), oracles.mean(),
                 f"mean of {args.draws} draws, F1 sd {f1s.std():.3f}, oracle sd {oracles.std():.3f}, "
                 f"F1/oracle per draw {np.mean(f1s / oracles):.2f}"))
    mlp = torch.cat([r[2] for r in pool]).softmax(1).numpy()  # the learnt pooled features' part alone
    mlp_f1 = classification_metrics(np.asarray(pool_labels), mlp.argmax(1), [str(k) for k in range(num_classes)])
    rows.append(("none: the MLP's logits alone", 0, mlp_f1["macro_f1"], float(mlp.max(1).mean()), oracle, ""))
    print(f"{args.model} fold {args.fold}; scored on {len(pool)} cases of {args.pool}; oracle: the truth features' "
          f"regression fitted on the same cases, scored there")
    print(f"{'refit on':<34} {'cases':>5} {'pool F1':>8} {'oracle':>7} {'/oracle':>7} {'conf':>5}")
    for name, n, f1, confidence, reference, *note in rows:
        print(f"{name:<34} {n:>5} {f1:>8.3f} {reference:>7.3f} {f1 / reference:>7.2f} {confidence:>5.2f}  "
              f"{''.join(note)}".rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
