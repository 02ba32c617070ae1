"""Shared, session-scoped pipeline for the tests: synthetic quiz-layout data -> convert -> stock
nnUNetv2_plan_and_preprocess -> tiny plans -> stock nnUNetv2_train with the short demo trainer.

Every step runs the real command-line tools as subprocesses (see cli.py); nothing of nnU-Net is mocked.
The expensive steps run once per session and the tests share their outputs read-only.
"""
import json
import os
import shutil
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


#: fixtures that train or preprocess with the real command lines: a test that needs one is slow
PIPELINE_FIXTURES = {"preprocessed", "trained", "class_only", "class_only_trained"}
#: calls (tests/cli.py) that start a real command line
SUBPROCESS_CALLS = ("run(", "run_at_once(", "Started(", "kill_when(")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: drives real command lines (nnU-Net's or ours) as subprocesses; "
                                       "pytest -m 'not slow' runs the rest, the in-process unit tests")


def pytest_collection_modifyitems(config, items):
    """Marks as ``slow`` every test that needs a pipeline fixture or starts a command line itself."""
    import inspect
    for item in items:
        function = getattr(item, "function", None)
        source = inspect.getsource(function) if function is not None else ""
        if PIPELINE_FIXTURES & set(getattr(item, "fixturenames", ())) or any(c in source for c in SUBPROCESS_CALLS):
            item.add_marker(pytest.mark.slow)


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
    env["nnUNet_def_n_proc"] = "1"  # nnU-Net's worker pools (final-validation export, metrics): 1 beside the main
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


@dataclass(frozen=True)
class ClassOnly:
    pipeline: Pipeline        # dataset 502, planned and preprocessed (tiny plans too), not trained
    unmasked: tuple           # the cases whose mask was removed from the source before conversion
    convert_output: str       # what convert printed
    validation: tuple         # its validation cases


CLASS_ONLY_TRAINER = "MultitasknnUNetTrainer_TestShort"


@pytest.fixture(scope="session")
def class_only(preprocessed, tmp_path_factory) -> ClassOnly:
    """Part of the session's synthetic data (3 training and 1 validation case per class) with the masks of a third
    of the training cases and of one validation case removed (their class stays), converted with
    ``--allow-missing-masks`` as dataset 502 and planned and preprocessed by stock nnU-Net (test_conversion
    checks the conversion, test_training trains on it)."""
    root = tmp_path_factory.mktemp("class_only")
    env = nnunet_env(root)
    source = root / "source"
    kept = {}
    for split, per_class in (("train", 3), ("validation", 1)):
        for folder in sorted((preprocessed.source / split).iterdir()):
            images = sorted(folder.glob("*_0000.nii.gz"))[:per_class]
            (source / split / folder.name).mkdir(parents=True)
            for image in images:
                mask = image.with_name(image.name.replace("_0000.nii.gz", ".nii.gz"))
                shutil.copy(image, source / split / folder.name / image.name)
                shutil.copy(mask, source / split / folder.name / mask.name)
                kept.setdefault(split, []).append(source / split / folder.name / mask.name)
    removed = sorted(kept["train"])[::3] + sorted(kept["validation"])[:1]
    for p in removed:
        p.unlink()
    converted = run(ours("convert", "-i", source, "-d", 502, "-n", "ClassOnly", "--allow-missing-masks"), env)
    run(nnunet("nnUNetv2_plan_and_preprocess", "-d", 502, "-c", CONFIG, "-np", "2", "-npfp", "2",
               "--verify_dataset_integrity"), env)
    from multitask_nnunet.tiny_plans import write_tiny_plans
    write_tiny_plans(str(root / "nnUNet_preprocessed" / "Dataset502_ClassOnly"), target_plans=PLANS)
    pipeline = Pipeline(root, env, source, root / "nnUNet_raw" / "Dataset502_ClassOnly",
                        root / "nnUNet_preprocessed" / "Dataset502_ClassOnly")
    validation = tuple(sorted(p.name[:-len(".nii.gz")] for p in kept["validation"]))
    return ClassOnly(pipeline, tuple(p.name[:-len(".nii.gz")] for p in removed), converted.stdout, validation)


@pytest.fixture(scope="session")
def class_only_trained(class_only) -> Pipeline:
    """Dataset 502 trained with the short test trainer (3 epochs of 4 iterations, two optimizers) through the
    stock nnUNetv2_train CLI: the class-only training test checks it, the exact-resume test resumes it."""
    pipeline = class_only.pipeline
    run(nnunet("nnUNetv2_train", 502, CONFIG, "0", "-tr", CLASS_ONLY_TRAINER, "-p", PLANS, "-device", "cpu"),
        pipeline.env, timeout=900)
    results = pipeline.root / "nnUNet_results" / "Dataset502_ClassOnly" / f"{CLASS_ONLY_TRAINER}__{PLANS}__{CONFIG}"
    return Pipeline(pipeline.root, pipeline.env, pipeline.source, pipeline.raw, pipeline.preprocessed, results)


def load_json(path) -> dict:
    with open(path) as f:
        return json.load(f)
