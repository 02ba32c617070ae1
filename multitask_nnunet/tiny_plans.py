"""A tiny copy of nnU-Net's plans, for CPU demos and tests (passed to nnU-Net's CLIs with ``-p``).

Same configuration, spacing and preprocessed data (the data identifier is kept), but a network with few
features per stage and one convolution per stage, so that a training step takes well under a second on a
CPU instead of ~7 s for nnU-Net's default 3D network.
"""
from copy import deepcopy

from batchgenerators.utilities.file_and_folder_operations import join, load_json, save_json


def write_tiny_plans(preprocessed_dataset_folder: str, source_plans: str = "nnUNetPlans",
                     target_plans: str = "nnUNetTinyPlans", configuration: str = "3d_fullres",
                     base_features: int = 8, max_features: int = 64, batch_size: int = 2) -> str:
    """Writes ``<target_plans>.json`` beside the source plans and returns its identifier."""
    plans = load_json(join(preprocessed_dataset_folder, source_plans + ".json"))
    tiny = deepcopy(plans)
    tiny["plans_name"] = target_plans
    config = tiny["configurations"][configuration]
    arch = config["architecture"]["arch_kwargs"]
    n_stages = arch["n_stages"]
    arch["features_per_stage"] = [min(base_features * 2 ** i, max_features) for i in range(n_stages)]
    arch["n_conv_per_stage"] = [1] * n_stages
    arch["n_conv_per_stage_decoder"] = [1] * (n_stages - 1)
    config["batch_size"] = batch_size
    tiny["configurations"] = {configuration: config}
    save_json(tiny, join(preprocessed_dataset_folder, target_plans + ".json"), sort_keys=False)
    return target_plans
