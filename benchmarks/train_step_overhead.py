"""Paired timing of one training step: MultitasknnUNetTrainer vs stock nnUNetTrainer.

Both trainers are built by nnU-Net's own ``get_trainer_from_args`` from the same plans, and both run
``train_step`` on the very same batch, alternating (ABBA order) so that load drifts hit both alike. Prints
the median step time of each, their ratio, and the peak memory of each trainer measured in its own child
process (CUDA: peak allocated; CPU: peak resident set size of the process, which includes the Python and
torch runtime).

    python benchmarks/train_step_overhead.py -d 501 -c 3d_fullres -p nnUNetPlans --device cpu --steps 10

Needs nnUNet_preprocessed with the dataset preprocessed (and its class labels in dataset.json). Trainer
output folders go to a temporary nnUNet_results.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("nnUNet_results", tempfile.mkdtemp(prefix="train_step_bench_"))
os.environ.setdefault("nnUNet_n_proc_DA", "0")  # one process: the data loader must not compete for cores

STOCK, OURS = "nnUNetTrainer", "MultitasknnUNetTrainer"


def make_trainer(name: str, args):
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args
    from multitask_nnunet.registration import ext_trainer_path
    os.environ["nnUNet_extTrainer"] = ext_trainer_path()
    trainer = get_trainer_from_args(str(args.dataset), args.configuration, args.fold, name, args.plans,
                                    device=torch.device(args.device))
    trainer.initialize()
    trainer.set_deep_supervision_enabled(trainer.enable_deep_supervision)
    trainer.network.train()
    return trainer


def one_batch(trainer):
    loader, _ = trainer.get_dataloaders()
    batch = next(loader)
    return batch


def timed_step(trainer, batch, device: str) -> float:
    import torch
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    trainer.train_step(batch)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def peak_memory_mb(name: str, args) -> float:
    """Runs in a child process: build one trainer, run warm-up + one step, report the peak."""
    import torch
    trainer = make_trainer(name, args)
    batch = one_batch(trainer)
    for _ in range(args.warmup + 1):
        trainer.train_step(batch)
    if args.device == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-d", "--dataset", required=True)
    parser.add_argument("-c", "--configuration", default="3d_fullres")
    parser.add_argument("-p", "--plans", default="nnUNetPlans")
    parser.add_argument("-f", "--fold", type=int, default=0)
    parser.add_argument("--device", default="cuda" if __import__("torch").cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per trainer")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per trainer")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--peak-only", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.peak_only:
        print(json.dumps({"peak_mb": peak_memory_mb(args.peak_only, args)}))
        return

    import torch
    torch.manual_seed(0)
    stock, ours = make_trainer(STOCK, args), make_trainer(OURS, args)
    batch = one_batch(stock)  # the same batch for both ('keys' gives our trainer the class labels)
    for _ in range(args.warmup):
        stock.train_step(batch), ours.train_step(batch)
    times = {STOCK: [], OURS: []}
    for i in range(args.steps):
        order = (stock, ours) if i % 2 == 0 else (ours, stock)
        for trainer in order:
            times[type(trainer).__name__].append(timed_step(trainer, batch, args.device))

    def median(v):
        return sorted(v)[len(v) // 2]

    peaks = {}
    for name in (STOCK, OURS):
        child = subprocess.run([sys.executable, __file__, "-d", str(args.dataset), "-c", args.configuration,
                                "-p", args.plans, "-f", str(args.fold), "--device", args.device,
                                "--warmup", str(args.warmup), "--peak-only", name],
                               capture_output=True, text=True, check=True)
        peaks[name] = json.loads(child.stdout.strip().splitlines()[-1])["peak_mb"]

    result = {
        "device": args.device, "plans": args.plans, "configuration": args.configuration,
        "patch_size": stock.configuration_manager.patch_size, "batch_size": stock.batch_size,
        "steps": args.steps, "torch_threads": torch.get_num_threads(),
        "stock_step_s": median(times[STOCK]), "multitask_step_s": median(times[OURS]),
        "ratio": median(times[OURS]) / median(times[STOCK]),
        "stock_peak_mb": peaks[STOCK], "multitask_peak_mb": peaks[OURS],
        "memory_kind": "CUDA peak allocated" if args.device == "cuda" else "process peak RSS",
    }
    print(f"train step, {args.configuration} {args.plans}, patch {result['patch_size']}, batch "
          f"{result['batch_size']}, device {args.device}, median of {args.steps} paired steps")
    print(f"  stock nnUNetTrainer          {result['stock_step_s']:.4f} s/step   peak {peaks[STOCK]:.0f} MB")
    print(f"  MultitasknnUNetTrainer       {result['multitask_step_s']:.4f} s/step   peak {peaks[OURS]:.0f} MB")
    print(f"  ratio multitask/stock        {result['ratio']:.3f}   ({result['memory_kind']})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
