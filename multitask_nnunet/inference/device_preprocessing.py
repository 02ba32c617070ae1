"""nnU-Net's preprocessing with its normalisation and resampling on the prediction device (the GPU under CUDA).

``DevicePreprocessor`` is nnU-Net's ``DefaultPreprocessor`` with two of its hooks moved onto a torch device;
``run_case_npy`` itself stays nnU-Net's (nnunetv2 2.8.1): float32 copy, ``transpose_forward``,
``crop_to_nonzero`` (on the CPU: its nonzero mask fills holes with scipy), the new shape, then

- ``_normalize``: the cropped image is copied to the device (from pinned memory, non-blocking) and normalised
  there. ``CTNormalization``, ``ZScoreNormalization`` (with or without the nonzero mask) and
  ``NoNormalization`` compute nnU-Net's arithmetic in torch; any other scheme runs nnU-Net's own class on the
  CPU for that channel and is copied to the device afterwards;
- ``resampling_fn_data`` (``DeviceConfiguration``): nnU-Net's default ``resample_data_or_seg_to_shape`` is
  scikit-image's ``resize`` (``scipy.ndimage.zoom``: cubic B-spline with ``mode='edge'``, then clipped to the
  input's range) per channel, or, for anisotropic spacing, per slice in-plane followed by
  ``map_coordinates`` (order ``order_z``, nearest by default) along the low-resolution axis. Each of these is
  separable: a linear operator per axis, applied one after the other, with the clip in between. The operators
  are computed *by those same scipy/scikit-image functions*, applied to an identity matrix (one small call per
  axis size, cached), and applied on the device as matrix products. So the result is nnU-Net's, up to
  float32 rounding (the test and ``benchmarks/inference_speed.py --end-to-end`` report the difference). Plans
  that resample with ``resample_torch_fornnunet`` run it with ``device`` set to the prediction device.

The result is a float32 tensor on the device; the network pass takes it from there without a copy back.
``supported`` says whether a configuration can be preprocessed this way (nnU-Net's default preprocessor and
one of the two resampling functions above); where it cannot, prediction uses nnU-Net's CPU preprocessing.
"""
from functools import lru_cache, partial
from typing import Optional, Tuple

import numpy as np
import torch
from nnunetv2.configuration import ANISO_THRESHOLD
from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
from nnunetv2.preprocessing.resampling.default_resampling import determine_do_sep_z_and_axis
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

from multitask_nnunet.inference.configuration import DEFAULT_RESAMPLING, TORCH_RESAMPLING, InferenceConfiguration

TORCH_NORMALIZATIONS = ("CTNormalization", "ZScoreNormalization", "NoNormalization")


def supported(configuration_manager: ConfigurationManager) -> bool:
    configuration = configuration_manager.configuration
    function = configuration["resampling_fn_data"]
    kwargs = configuration.get("resampling_fn_data_kwargs", {})
    return (configuration_manager.preprocessor_class is DefaultPreprocessor and not kwargs.get("is_seg", False)
            and (function == TORCH_RESAMPLING or (function == DEFAULT_RESAMPLING and kwargs.get("order", 3) in
                                                  (0, 1, 2, 3, 4, 5) and kwargs.get("order_z", 0) in (0, 1, 2, 3))))


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A CPU array on ``device``: on CUDA through pinned memory with a non-blocking copy."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


# ---------------------------------------------------------------- resampling
@lru_cache(maxsize=256)
def _zoom_operator(n_in: int, n_out: int, order: int) -> np.ndarray:
    """(n_out, n_in): scikit-image's ``resize`` (nnU-Net's kwargs: mode 'edge', no anti-aliasing; without the
    clip, which is not linear and applied afterwards) of each unit vector along one axis."""
    from skimage.transform import resize
    return resize(np.eye(n_in), (n_out, n_in), order, mode="edge", anti_aliasing=False, clip=False)


@lru_cache(maxsize=256)
def _map_coordinates_operator(n_in: int, n_out: int, order: int) -> np.ndarray:
    """(n_out, n_in): nnU-Net's resampling along the low-resolution axis (default_resampling.py, nnunetv2 2.8.1:
    ``map_coordinates`` at ``scale * (i + 0.5) - 0.5``, mode 'nearest') of each unit vector."""
    from scipy.ndimage import map_coordinates
    coordinates = np.stack(np.meshgrid(float(n_in) / n_out * (np.arange(n_out) + 0.5) - 0.5, np.arange(n_in),
                                       indexing="ij"))
    return map_coordinates(np.eye(n_in), coordinates, order=order, mode="nearest")


def _apply(data: torch.Tensor, operator: np.ndarray, axis: int) -> torch.Tensor:
    """``operator`` (n_out, n_in) applied along spatial ``axis`` of ``data`` (c, x, y, z)."""
    matrix = torch.from_numpy(operator).to(data.device, torch.float32)
    return torch.movedim(torch.tensordot(matrix, torch.movedim(data, axis + 1, 0), dims=1), 0, axis + 1)


def _clip(data: torch.Tensor, source: torch.Tensor, reduce_axes: Tuple[int, ...]) -> torch.Tensor:
    """scikit-image's ``clip=True``: to the range of the input of each ``resize`` call."""
    return torch.maximum(torch.minimum(data, source.amax(reduce_axes, keepdim=True)),
                         source.amin(reduce_axes, keepdim=True))


@torch.inference_mode()
def resample_data_on_device(data: torch.Tensor, new_shape, current_spacing, new_spacing, is_seg: bool = False,
                            order: int = 3, order_z: int = 0, force_separate_z: Optional[bool] = False,
                            separate_z_anisotropy_threshold: float = ANISO_THRESHOLD) -> torch.Tensor:
    """nnU-Net's ``resample_data_or_seg_to_shape`` for image data (same arguments), on ``data``'s device."""
    assert not is_seg and data.ndim == 4, "image data (c, x, y, z)"
    shape, new_shape = tuple(data.shape[1:]), tuple(int(i) for i in new_shape)
    if shape == new_shape:
        return data
    do_separate_z, axis = determine_do_sep_z_and_axis(force_separate_z, current_spacing, new_spacing,
                                                      separate_z_anisotropy_threshold)
    data = data.float()
    result = data
    in_plane = [a for a in range(3) if not (do_separate_z and a == axis)]
    for a in in_plane:
        if shape[a] != new_shape[a]:
            result = _apply(result, _zoom_operator(shape[a], new_shape[a], order), a)
    if do_separate_z:
        # one 2d resize per slice: clipped to each slice's range
        result = _clip(result, data, tuple(1 + a for a in in_plane))
        if shape[axis] != new_shape[axis]:
            result = _apply(result, _map_coordinates_operator(shape[axis], new_shape[axis], order_z), axis)
    else:
        result = _clip(result, data, (1, 2, 3))
    return result.contiguous()


class DeviceConfiguration(InferenceConfiguration):
    """The inference configuration (case_io.py) with the image resampling on ``device``."""

    def __init__(self, configuration: dict, device: torch.device):
        super().__init__(configuration)
        self.device = device

    @property
    def resampling_fn_data(self):
        kwargs = dict(self.configuration.get("resampling_fn_data_kwargs", {}))
        if self.configuration["resampling_fn_data"] == TORCH_RESAMPLING:
            from nnunetv2.preprocessing.resampling.resample_torch import resample_torch_fornnunet
            return partial(resample_torch_fornnunet, **{**kwargs, "device": self.device})
        return partial(resample_data_on_device, **kwargs)


# ---------------------------------------------------------------- normalisation
class DevicePreprocessor(DefaultPreprocessor):
    """nnU-Net's ``DefaultPreprocessor`` whose ``_normalize`` hook runs on ``device`` (see the module docstring);
    with a ``DeviceConfiguration``, ``run_case_npy`` returns a float32 tensor on ``device``."""

    def __init__(self, device: torch.device, verbose: bool = False):
        super().__init__(verbose=verbose)
        self.device = device

    @torch.inference_mode()
    def _normalize(self, data: np.ndarray, seg: np.ndarray, configuration_manager: ConfigurationManager,
                   foreground_intensity_properties_per_channel: dict) -> torch.Tensor:
        image = to_device(data, self.device)
        mask = None
        for c in range(data.shape[0]):
            scheme = configuration_manager.normalization_schemes[c]
            use_mask = configuration_manager.use_mask_for_norm[c]
            properties = foreground_intensity_properties_per_channel[str(c)]
            if scheme == "CTNormalization":
                image[c].clamp_(properties["percentile_00_5"], properties["percentile_99_5"])
                image[c].sub_(properties["mean"]).div_(max(properties["std"], 1e-8))
            elif scheme == "ZScoreNormalization":
                channel = image[c]
                if use_mask:
                    mask = to_device(seg[0] >= 0, self.device) if mask is None else mask
                    values = channel[mask].double()
                    mean, std = float(values.mean()), float(values.std(unbiased=False))
                    channel[mask] = ((channel[mask] - mean) / max(std, 1e-8)).to(channel.dtype)
                else:
                    values = channel.double()
                    mean, std = float(values.mean()), float(values.std(unbiased=False))
                    channel.sub_(mean).div_(max(std, 1e-8))
            elif scheme != "NoNormalization":  # nnU-Net's own class, on the CPU, for this channel
                single = super()._normalize(data[c:c + 1].copy(), seg, _OneChannel(configuration_manager, c),
                                            {"0": properties})
                image[c] = to_device(single[0], self.device)
        return image


class _OneChannel:
    """Channel ``c``'s normalisation settings, as nnU-Net's ``_normalize`` reads them, for a one-channel array."""

    def __init__(self, configuration_manager: ConfigurationManager, c: int):
        self.normalization_schemes = [configuration_manager.normalization_schemes[c]]
        self.use_mask_for_norm = [configuration_manager.use_mask_for_norm[c]]
