"""Segmentation logits -> label map in the input image's geometry, with nnU-Net's own export.

``convert_predicted_logits_to_segmentation_with_correct_shape`` does it all (resample to the cropped input
shape, regions/argmax via the label manager, undo cropping and transpose); only the resampling function is
swapped: when the plans resample probabilities linearly with nnU-Net's default ``resample_data_or_seg_to_shape``
(scikit-image on CPU, stock nnU-Net's export bottleneck), nnU-Net's ``resample_torch_fornnunet`` computes the
same interpolation (linear, align-corners=False, edge clamping; nearest along a separately resampled
anisotropic axis) with torch on the prediction device: on the GPU under CUDA, about 10x faster on CPU. Any
other resampling in the plans is used as it is.
"""
import copy

import numpy as np
import torch
from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

from multitask_nnunet.inference.configuration import DEFAULT_RESAMPLING, TORCH_RESAMPLING
from multitask_nnunet.nnunet_copies import follows


def export_configuration(configuration_manager: ConfigurationManager, device: torch.device) -> ConfigurationManager:
    """The configuration to export with: the plans' own, with probability resampling moved onto ``device``
    where that computes the same thing."""
    configuration = configuration_manager.configuration
    function = configuration["resampling_fn_probabilities"]
    kwargs = configuration["resampling_fn_probabilities_kwargs"]
    if function == DEFAULT_RESAMPLING and kwargs.get("order") == 1 and not kwargs.get("is_seg", False):
        torch_kwargs = {"is_seg": False, "force_separate_z": kwargs.get("force_separate_z"),
                        "aniso_axis_mode": "nearest-exact" if kwargs.get("order_z", 0) == 0 else "linear"}
        if "separate_z_anisotropy_threshold" in kwargs:
            torch_kwargs["separate_z_anisotropy_threshold"] = kwargs["separate_z_anisotropy_threshold"]
    elif function == TORCH_RESAMPLING:
        torch_kwargs = dict(kwargs)
    else:
        return configuration_manager
    configuration = copy.deepcopy(configuration)
    configuration["resampling_fn_probabilities"] = TORCH_RESAMPLING
    configuration["resampling_fn_probabilities_kwargs"] = {**torch_kwargs, "device": device,
                                                           "num_threads": torch.get_num_threads()}
    return ConfigurationManager(configuration)


def segmentation_in_input_geometry(logits: torch.Tensor, properties: dict, plans_manager, export_configuration_manager,
                                   label_manager) -> np.ndarray:
    """Label map (uint8/uint16, the input image's array shape) from logits (c, x, y, z) on the CPU."""
    return convert_predicted_logits_to_segmentation_with_correct_shape(
        logits, plans_manager, export_configuration_manager, label_manager, properties,
        num_threads_torch=torch.get_num_threads())


@follows(convert_predicted_logits_to_segmentation_with_correct_shape, "b1fa6a0cf2e3")
def map_in_input_geometry(values: torch.Tensor, properties: dict, plans_manager,
                          export_configuration_manager) -> np.ndarray:
    """A continuous map (x, y, z) on the preprocessed grid (saliency, uncertainty) -> float32 in the input image's
    array shape, exported as nnU-Net exports a mask's probabilities (the geometry steps of
    ``convert_predicted_logits_to_segmentation_with_correct_shape``, nnunetv2 2.8.1, for one channel): resampled
    to the cropped input shape with the configuration's probability resampling, put into the cropping's bounding
    box (zeros outside), transposed back."""
    from acvl_utils.cropping_and_padding.bounding_boxes import insert_crop_into_image
    spacing_transposed = [properties['spacing'][i] for i in plans_manager.transpose_forward]
    cropped_shape = properties['shape_after_cropping_and_before_resampling']
    current_spacing = export_configuration_manager.spacing if \
        len(export_configuration_manager.spacing) == len(cropped_shape) else \
        [spacing_transposed[0], *export_configuration_manager.spacing]
    resampled = export_configuration_manager.resampling_fn_probabilities(
        torch.as_tensor(values, dtype=torch.float32)[None], cropped_shape, current_spacing, spacing_transposed)
    resampled = resampled[0].cpu().numpy() if isinstance(resampled, torch.Tensor) else np.asarray(resampled)[0]
    full = np.zeros(properties['shape_before_cropping'], dtype=np.float32)
    full = insert_crop_into_image(full, resampled.astype(np.float32, copy=False),
                                  properties['bbox_used_for_cropping'])
    return np.ascontiguousarray(full.transpose(plans_manager.transpose_backward))
