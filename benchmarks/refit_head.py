"""Refit a trained model's head again, with the package's current refit, into a copy of the model folder.

The refit runs inside ``nnUNetv2_train`` after the last epoch (``MultitasknnUNetTrainer.refit_head``). To measure a
change of the refit on networks already trained, without training them again, this copies the model folder
(``--model``, an nnU-Net trainer folder with ``fold_F/checkpoint_final.pth``) under ``--out`` (an
``nnUNet_results`` folder), builds the trainer as ``nnUNetv2_train`` would (``nnUNet_raw`` and
``nnUNet_preprocessed`` must be those of the training; the trainer's module must be on ``nnUNet_extTrainer``),
loads the final checkpoint, refits its head as ``on_train_end`` does and saves it; the copy has no
``calibration.json`` (its temperature belonged to the previous head). Predict with the copy::

    python benchmarks/refit_head.py --model RESULTS/Dataset601_X/TRAINER__PLANS__3d_fullres --out REFIT_RESULTS
    multitask-nnunet predict -i IMAGES -o OUT -m REFIT_RESULTS/Dataset601_X/TRAINER__PLANS__3d_fullres -f 0

``benchmarks/classification_learning.py`` trainings need its schedule variables (``MULTITASK_BENCH_*``) set
as in that run, since the trainer reads them when it is built.
"""
import argparse
import os
import shutil
import sys
from pathlib import Path

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True, help="the trained model's folder (TRAINER__PLANS__CONFIG)")
    p.add_argument("--out", type=Path, required=True, help="an nnUNet_results folder for the refitted copy")
    p.add_argument("-f", "--fold", type=int, default=0)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    trainer_name, plans, configuration = args.model.name.split("__")
    dataset = args.model.parent.name
    copy = args.out / dataset / args.model.name
    if copy.exists():
        shutil.rmtree(copy)
    shutil.copytree(args.model, copy)

    os.environ["nnUNet_results"] = str(args.out.resolve())
    from nnunetv2.run.run_training import get_trainer_from_args
    trainer = get_trainer_from_args(dataset, configuration, args.fold, trainer_name, plans,
                                    device=torch.device(args.device))
    checkpoint = str(copy / f"fold_{args.fold}" / "checkpoint_final.pth")
    trainer.load_checkpoint(checkpoint)
    trainer.refit_head(" (benchmarks/refit_head.py)")
    trainer.save_checkpoint(checkpoint)
    # the temperature was fitted on the previous head's validation probabilities: predict then uses none
    (copy / f"fold_{args.fold}" / "calibration.json").unlink(missing_ok=True)
    print(f"refitted: {copy} (calibration.json removed: final validation fits it, this refit does not)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
