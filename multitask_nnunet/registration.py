"""How stock nnU-Net finds our trainers: the ``nnUNet_extTrainer`` folder (nnunetv2 >= 2.8).

nnU-Net adds each folder in ``nnUNet_extTrainer`` (os.pathsep-separated) to ``sys.path`` and imports its
modules to look for the trainer class by name. ``ext_trainers/`` holds one module that re-exports our
trainers, so nothing is copied into nnU-Net's own folder.
"""
import os
import sys

# Our trainers (training/trainer.py, training/variants.py) whose segmentation architecture is nnU-Net's default
# builder, ``nnUNetTrainer.build_network_architecture`` (get_network_from_plans with the plans' architecture
# class and kwargs): prediction builds their network from the plans directly instead of through nnU-Net's trainer
# lookup, which imports every trainer module (seaborn, timm: about 1.2 s per run). A test checks this list
# against the classes; a trainer that overrides the builder must not be in it (it takes the lookup).
DEFAULT_ARCHITECTURE_TRAINERS = frozenset({
    "MultitasknnUNetTrainer", "MultitasknnUNetTrainer_5epochs", "MultitasknnUNetTrainer_100epochs",
    "MultitasknnUNetTrainer_250epochs", "MultitasknnUNetTrainer_Demo"})

EXT_TRAINER_FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ext_trainers")


def ext_trainer_path(existing: str = None) -> str:
    """The value for ``nnUNet_extTrainer``: our folder first, then any folders already configured."""
    existing = os.environ.get("nnUNet_extTrainer", "") if existing is None else existing
    parts = [EXT_TRAINER_FOLDER] + [p for p in existing.split(os.pathsep) if p and p != EXT_TRAINER_FOLDER]
    return os.pathsep.join(parts)


def environment_with_trainers(env: dict = None) -> dict:
    """A copy of ``env`` (default: os.environ) in which nnU-Net's CLIs find our trainers."""
    env = dict(os.environ if env is None else env)
    env["nnUNet_extTrainer"] = ext_trainer_path(env.get("nnUNet_extTrainer", ""))
    return env


def console_script(name: str) -> str:
    """The console script ``name`` (nnU-Net's or ours) of the running interpreter's environment, else ``name`` for
    PATH to resolve: a ``pip install --target`` puts the scripts in its own ``bin/``, not beside the interpreter."""
    exe = os.path.join(os.path.dirname(sys.executable), name)
    return exe if os.path.exists(exe) else name


def add_parser(subparsers):
    p = subparsers.add_parser(
        "trainer-path",
        help="print the value for nnUNet_extTrainer, so that stock nnU-Net finds MultitasknnUNetTrainer",
        description="Usage: export nnUNet_extTrainer=\"$(multitask-nnunet trainer-path)\". Folders already in "
                    "nnUNet_extTrainer (your own trainer subclasses) are kept after ours.")
    p.set_defaults(func=lambda args: print(ext_trainer_path()))
