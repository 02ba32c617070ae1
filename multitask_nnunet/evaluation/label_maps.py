"""Reading label maps and checking that a prediction lies on its ground truth's voxel grid.

Dice compares arrays voxel by voxel, so a prediction on another grid (other shape, spacing, origin or
direction) would give a meaningless number; we refuse it. Tolerance ``GEOMETRY_ATOL`` (mm for spacing and
origin, plain number for direction cosines) absorbs the float32 rounding of NIfTI headers.
"""
import numpy as np
import SimpleITK as sitk

from multitask_nnunet.errors import InputError

GEOMETRY_ATOL = 1e-3


def _header(path: str) -> sitk.ImageFileReader:
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise InputError(f"{path}: cannot read image ({str(e).strip().splitlines()[-1]})")
    return reader


def check_same_geometry(case: str, gt_file: str, pred_file: str) -> None:
    """Headers only, so that a mismatch is reported before any voxel is read."""
    gt, pred = _header(gt_file), _header(pred_file)
    if gt.GetSize() != pred.GetSize():
        raise InputError(f"case '{case}': prediction {pred_file} has size {pred.GetSize()}, "
                         f"ground truth {gt_file} has {gt.GetSize()}")
    for what in ("Spacing", "Origin", "Direction"):
        a, b = getattr(gt, "Get" + what)(), getattr(pred, "Get" + what)()
        if not np.allclose(a, b, rtol=0, atol=GEOMETRY_ATOL):
            raise InputError(f"case '{case}': prediction {pred_file} has {what.lower()} "
                             f"{tuple(round(v, 4) for v in b)}, ground truth {gt_file} has "
                             f"{tuple(round(v, 4) for v in a)}")


def read_label_map(path: str) -> np.ndarray:
    """Integer labels; masks saved as floats are accepted when they hold whole numbers."""
    array = sitk.GetArrayFromImage(sitk.ReadImage(path))
    if np.issubdtype(array.dtype, np.integer):
        return array
    if not np.array_equal(array, np.round(array)):
        raise InputError(f"{path}: label map holds non-integer values")
    return array.astype(np.int32)
