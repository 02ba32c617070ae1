"""One rank of the trainer's multi-process validation, on the CPU under ``torch.distributed``'s gloo backend
(test_training.py::test_gather_under_gloo_equals_one_process starts it once alone and twice as two ranks).

nnU-Net's own DDP entry point (``nnUNetv2_train -num_gpus N``) cannot run on the CPU: it hardcodes the NCCL
backend and ``torch.cuda.set_device``, and the trainer moves itself to CUDA when it finds a process group. So
the trainer is built and initialised as one process on the CPU, then joins a gloo group of ``world`` processes
and is told it is rank ``rank`` of it (``is_ddp``, ``local_rank``, the network wrapped in
``DistributedDataParallel``): that is all our gather (``_gather``) and nnU-Net's validation code read.

Usage: gloo_worker.py RANK WORLD PORT DATASET CONFIGURATION TRAINER PLANS OUT_JSON
"""
import json
import sys

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from nnunetv2.run.run_training import get_trainer_from_args

BATCHES, PATCHES = 4, 2  # validation "iterations" of the epoch and patches per batch (equal per rank, as in DDP)


def epoch_outputs(trainer, val_keys):
    """What ``validation_step`` returns for each batch, made by hand so that every run sees the same numbers:
    each batch's patches come from the validation cases in turn (a case is sampled by more than one batch, and
    so, under DDP, by more than one rank); the class probabilities favour the true class of every case but the
    last (so that macro-F1 is neither 0 nor 1), and Dice counts follow from the batch index."""
    lm = trainer.label_manager
    regions = len(lm.foreground_regions if lm.has_regions else lm.foreground_labels)
    num_classes = len(trainer.class_labels.class_names)
    outputs = []
    for b in range(BATCHES):
        keys = [val_keys[(b * PATCHES + p) % len(val_keys)] for p in range(PATCHES)]
        probs = []
        for p, key in enumerate(keys):
            favoured = (trainer.class_labels.label_of(key) + (key == val_keys[-1])) % num_classes
            logits = np.array([2.0 * (k == favoured) + 0.3 * np.sin(3 * b + p + k) for k in range(num_classes)])
            probs.append((np.exp(logits) / np.exp(logits).sum()).tolist())
        counts = [np.arange(1, regions + 1, dtype=float) * (b + 1 + c) for c in range(3)]
        outputs.append({"loss": np.array(0.5 + 0.1 * b), "tp_hard": counts[0], "fp_hard": counts[1],
                        "fn_hard": counts[2], "case_keys": keys, "class_probs": probs})
    return outputs


def main():
    rank, world, port = (int(a) for a in sys.argv[1:4])
    dataset, configuration, trainer_name, plans, out = sys.argv[4:9]
    torch.manual_seed(0)      # the same (untrained) weights in every process
    torch.set_num_threads(1)  # and the same arithmetic, so that a case's outputs do not depend on the process
    trainer = get_trainer_from_args(dataset, configuration, 0, trainer_name, plans, device=torch.device("cpu"))
    trainer.initialize()
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        trainer.is_ddp, trainer.local_rank = True, rank
        trainer.network = DistributedDataParallel(trainer.network)  # as nnU-Net's initialize() does under DDP

    _, val_keys = trainer.do_split()
    outputs = epoch_outputs(trainer, sorted(val_keys))
    mine = outputs[rank::world]
    gathered_keys = trainer._gather(sorted({k for o in mine for k in o["case_keys"]}))
    trainer.on_validation_epoch_end(mine)
    log = {key: trainer.logger.get_value(key, step=-1) for key in (
        "val_macro_f1", "val_accuracy", "val_class_recall", "val_predicted_classes", "mean_fg_dice",
        "dice_per_class_or_region", "val_losses", "ema_macro_f1", "combined_metric")}
    result = {"rank": rank, "epoch_keys": [k for o in mine for k in o["case_keys"]], "gathered_keys": gathered_keys,
              "val_cases_seen": trainer._val_cases_seen,
              "log": {k: np.asarray(v).tolist() for k, v in log.items()}}

    trainer.perform_actual_validation()
    result["output_folder"] = trainer.output_folder
    with open(out, "w") as f:
        json.dump(result, f)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
