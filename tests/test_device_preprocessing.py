"""Preprocessing on the prediction device (device_preprocessing.py) against nnU-Net's own CPU preprocessing
(``preprocessor.run_case_npy`` with the plans' configuration), on CPU: synthetic test images, real CT sizes
(one with 3 mm slices, nnU-Net's separate-z resampling), and the plans' other normalisation; then the
``predict`` command with ``--device-preprocessing`` against the default run."""
import copy
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from cli import ours, run_at_once

REAL_CT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real_ct"
REAL_CASES = ("quiz_512", "quiz_130")  # 2 mm and 3 mm slices (3 mm: anisotropic, resampled per slice, then z)
# float32 matrix products against nnU-Net's float64 scipy/scikit-image: differences of float32 rounding
TOLERANCE = 1e-4


def _nnunet_and_ours(plans: dict, dataset_json: dict, files, normalization: str = None, spacing=None):
    """(nnU-Net's preprocessed image, its properties, ours, ours' properties) for one case; ``spacing``: in place
    of the file's (the reader's axis order), so that the case is resampled."""
    import torch
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from multitask_nnunet.inference.case_io import CaseIO
    plans = copy.deepcopy(plans)
    if normalization:
        plans["configurations"]["3d_fullres"]["normalization_schemes"] = [normalization]
    plans_manager = PlansManager(plans)
    configuration = plans_manager.get_configuration("3d_fullres")
    image, properties = plans_manager.image_reader_writer_class().read_images([str(f) for f in files])
    if spacing is not None:
        properties["spacing"] = list(spacing)
    reference, _, reference_properties = configuration.preprocessor_class(verbose=False).run_case_npy(
        image, None, copy.deepcopy(properties), plans_manager, configuration, dataset_json)
    io = CaseIO(plans_manager, configuration, dataset_json, torch.device("cpu"))
    assert io.on_device
    data, data_properties = io.preprocess(image, properties, "case")
    assert isinstance(data, torch.Tensor) and data.dtype == torch.float32
    return reference, reference_properties, data.numpy(), data_properties


def _check(reference, reference_properties, data, data_properties, label: str) -> None:
    assert data.shape == reference.shape, label
    difference = np.abs(data.astype(np.float64) - reference)
    within = float(np.mean(difference <= TOLERANCE))
    print(f"{label}: {reference.shape[1:]}, max abs difference {difference.max():.2e}, voxels within "
          f"{TOLERANCE:g}: {within:.6f}")
    assert difference.max() <= TOLERANCE and within == 1.0, label
    assert float(np.abs(reference).max()) > 0.5, label  # a real image, not zeros on both sides
    for key in ("shape_before_cropping", "bbox_used_for_cropping", "shape_after_cropping_and_before_resampling"):
        assert np.array_equal(np.asarray(data_properties[key]), np.asarray(reference_properties[key])), key


def _plans(preprocessed):
    return (json.loads((preprocessed.preprocessed / "nnUNetTinyPlans.json").read_text()),
            json.loads((preprocessed.preprocessed / "dataset.json").read_text()))


def test_matches_nnunet_preprocessing_on_synthetic_images(preprocessed):
    plans, dataset_json = _plans(preprocessed)
    for image in sorted((preprocessed.source / "test").glob("*_0000.nii.gz"))[:3]:
        _check(*_nnunet_and_ours(plans, dataset_json, [image]), image.name)
        # z-score normalisation, with and without nnU-Net's nonzero mask
        for use_mask in (False, True):
            plans["configurations"]["3d_fullres"]["use_mask_for_norm"] = [use_mask]
            _check(*_nnunet_and_ours(plans, dataset_json, [image], "ZScoreNormalization"),
                   f"{image.name} ZScoreNormalization, mask {use_mask}")
        plans["configurations"]["3d_fullres"]["use_mask_for_norm"] = [False]
    # the last image resampled: finer and coarser in-plane, and 3.5 mm slices (anisotropic: nnU-Net resamples
    # each slice in-plane, clipped to the slice's range, then along z by nearest neighbour)
    for spacing in ((2.5, 0.6, 0.9), (3.5, 0.7, 0.8)):
        reference, reference_properties, data, data_properties = _nnunet_and_ours(plans, dataset_json, [image],
                                                                                  spacing=spacing)
        assert reference.shape[1:] != tuple(data_properties["shape_after_cropping_and_before_resampling"])
        _check(reference, reference_properties, data, data_properties, f"{image.name} spacing {spacing}")


@pytest.mark.skipif(not all((REAL_CT / f"{c}_0000.nii.gz").is_file() for c in REAL_CASES),
                    reason="../shared/data/real_ct not available")
def test_matches_nnunet_preprocessing_on_real_ct(preprocessed):
    plans, dataset_json = _plans(preprocessed)
    for case in REAL_CASES:
        reference, reference_properties, data, data_properties = _nnunet_and_ours(
            plans, dataset_json, [REAL_CT / f"{case}_0000.nii.gz"])
        assert reference.shape[1:] != tuple(data_properties["shape_after_cropping_and_before_resampling"])  # resampled
        _check(reference, reference_properties, data, data_properties, case)
        # a normalisation that is not computed in torch: nnU-Net's own class on the CPU, then the device resampling
        _check(*_nnunet_and_ours(plans, dataset_json, [REAL_CT / f"{case}_0000.nii.gz"], "RescaleTo01Normalization"),
               f"{case} RescaleTo01Normalization")


def test_predict_with_device_preprocessing_matches_the_default(trained, tmp_path):
    images = sorted((trained.source / "test").glob("*_0000.nii.gz"))[:3]
    (tmp_path / "in").mkdir()
    for image in images:
        (tmp_path / "in" / image.name).symlink_to(image)
    outputs = {name: tmp_path / name for name in ("cpu", "device")}
    run_at_once([ours("predict", "-i", tmp_path / "in", "-o", outputs[name], "-m", trained.results, "--device", "cpu",
                      f"--{'no-' if name == 'cpu' else ''}device-preprocessing") for name in outputs], trained.env)
    for image in images:
        name = image.name.replace("_0000", "")
        masks = [sitk.GetArrayFromImage(sitk.ReadImage(str(outputs[k] / name))) for k in ("cpu", "device")]
        agreement = float(np.mean(masks[0] == masks[1]))
        assert agreement >= 0.9999, (name, agreement)
        assert (masks[0] > 0).any()
    rows = [(outputs[k] / "subtype_results.csv").read_text() for k in ("cpu", "device")]
    assert rows[0] == rows[1]
