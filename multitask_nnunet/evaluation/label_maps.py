"""Reading label maps for scoring and checking that a prediction lies on its ground truth's voxel grid.

Dice compares arrays voxel by voxel, so a prediction on another grid (shape, spacing, origin or direction)
would give a meaningless number; it is refused. Tolerances are the converter's, so whatever ``convert``
accepts as a mask on its image's grid is accepted here too, including the quiz's float masks (1.0000152).
"""
import numpy as np
import SimpleITK as sitk

from multitask_nnunet.conversion.masks import VALUE_TOLERANCE, format_values, grid_differences, read_geometry
from multitask_nnunet.errors import InputError
from multitask_nnunet.nifti import check_complete


def check_same_geometry(case: str, gt_file: str, pred_file: str) -> None:
    """Headers only, so that a mismatch is reported before any voxel is read."""
    differences = grid_differences(read_geometry(gt_file), read_geometry(pred_file))
    if differences:
        field, a, b = differences[0]
        raise InputError(f"case '{case}': prediction {pred_file} has {field} {format_values(b)} but ground truth "
                         f"{gt_file} has {format_values(a)}")


def read_label_map(path: str) -> np.ndarray:
    """Integer labels; float masks are rounded when every voxel lies within ``VALUE_TOLERANCE`` of an integer.
    A truncated file is refused (``check_complete``), not read with zeros in place of its missing voxels."""
    check_complete(path)
    array = sitk.GetArrayFromImage(sitk.ReadImage(path))
    if np.issubdtype(array.dtype, np.integer):
        return array
    rounded = np.rint(array)
    if not np.all(np.abs(array - rounded) <= VALUE_TOLERANCE):
        raise InputError(f"{path}: label map holds values that are not integer labels")
    return rounded.astype(np.int32)

