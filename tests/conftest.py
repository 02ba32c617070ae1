"""Shared, session-scoped pipeline for the tests: synthetic quiz-layout data -> convert -> stock
nnUNetv2_plan_and_preprocess -> tiny plans -> stock nnUNetv2_train with the short demo trainer.

Every step runs the real command-line tools as subprocesses (see cli.py); nothing of nnU-Net is mocked.
The expensive steps run once per session and the tests share their outputs read-only.
"""
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from cli import nnunet, ours, run

DATASET_ID = 501
DATASET_NAME = "Dataset501_Synth"
TRAINER = "MultitasknnUNetTrainer_Demo"
PLANS = "nnUNetTinyPlans"
CONFIG = "3d_fullres"
TEST_TRAINERS = Path(__file__).resolve().parent / "trainers"
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@dataclass(frozen=True)
class Pipeline:
    root: Path
    env: dict
    source: Path              # quiz-layout synthetic data (train/, validation/, test/, test_labels/)
    raw: Path                 # nnUNet_raw/Dataset501_Synth
    preprocessed: Path        # nnUNet_preprocessed/Dataset501_Synth
    results: Path = None      # nnUNet_results/.../Trainer__Plans__config (after training)

    @property
    def fold0(self) -> Path:
        return self.results / "fold_0"


def nnunet_env(root: Path) -> dict:
    from multitask_nnunet.registration import environment_with_trainers
    env = environment_with_trainers()
    env["nnUNet_extTrainer"] += os.pathsep + str(TEST_TRAINERS)  # a user's own trainers go after ours, like this
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (root / var).mkdir(parents=True, exist_ok=True)
        env[var] = str(root / var)
    env["nnUNet_n_proc_DA"] = "1"
    env["nnUNet_def_n_proc"] = "2"  # nnU-Net's worker pools (final-validation export): 2 cores, not 8 processes
    env["OMP_NUM_THREADS"] = "2"
    return env


@pytest.fixture(scope="session")
def preprocessed(tmp_path_factory) -> Pipeline:
    root = tmp_path_factory.mktemp("pipeline")
    env = nnunet_env(root)
    source = root / "synthetic"
    run(ours("make-synthetic", "-o", source, "--seed", "0"), env)
    run(ours("convert", "-i", source, "-d", DATASET_ID, "-n", "Synth"), env)
    run(nnunet("nnUNetv2_plan_and_preprocess", "-d", DATASET_ID, "-c", CONFIG, "-np", "2", "-npfp", "2",
               "--verify_dataset_integrity"), env)
    preprocessed = root / "nnUNet_preprocessed" / DATASET_NAME
    from multitask_nnunet.tiny_plans import write_tiny_plans
    write_tiny_plans(str(preprocessed), target_plans=PLANS)
    return Pipeline(root, env, source, root / "nnUNet_raw" / DATASET_NAME, preprocessed)


@pytest.fixture(scope="session")
def trained(preprocessed) -> Pipeline:
    """Fold 0 (the original train/validation split) trained with the stock nnUNetv2_train CLI."""
    run(nnunet("nnUNetv2_train", DATASET_ID, CONFIG, "0", "-tr", TRAINER, "-p", PLANS, "-device", "cpu"),
        preprocessed.env, timeout=1800)
    results = preprocessed.root / "nnUNet_results" / DATASET_NAME / f"{TRAINER}__{PLANS}__{CONFIG}"
    return Pipeline(preprocessed.root, preprocessed.env, preprocessed.source, preprocessed.raw,
                    preprocessed.preprocessed, results)


def load_json(path) -> dict:
    with open(path) as f:
        return json.load(f)
