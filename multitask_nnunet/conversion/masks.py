"""The converter's label maps: a case's mask as the integer label map nnU-Net expects (rounded and checked by
``multitask_nnunet.io.nifti``, the one home of label-map rounding and grid checks), or an all-``ignore`` map for a
case that has a class but no mask.

A label the dataset does not declare is an error, like a voxel that is not an integer label.
"""
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from multitask_nnunet.io.atomic import atomic_path
from multitask_nnunet.errors import InputError
from multitask_nnunet.io.nifti import Geometry, read_label_map


def integer_label_map(mask: Path, allowed: Sequence[int]) -> sitk.Image:
    """The mask rounded to integers, on the mask's own grid; fails on non-integer or undeclared values."""
    labels = read_label_map(mask)
    found = np.unique(labels).astype(np.int64)
    unexpected = [int(v) for v in found if v not in set(allowed)]
    if unexpected:
        raise InputError(f"mask {mask}: contains label {', '.join(map(str, unexpected))}; "
                         f"the dataset declares only labels {', '.join(map(str, allowed))}")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(mask))
    reader.ReadImageInformation()
    return _label_image(labels, max(allowed), reader)


def ignore_label_map(geometry: Geometry, ignore: int) -> sitk.Image:
    """An all-``ignore`` label map on the image's grid, for a case that has a class but no mask."""
    reference = sitk.Image(list(reversed(geometry.shape)), sitk.sitkUInt8)
    reference.SetSpacing(geometry.spacing)
    reference.SetOrigin(geometry.origin)
    reference.SetDirection(geometry.direction)
    return _label_image(np.full(geometry.shape, ignore), ignore, reference)


def write_label_map(label_map: sitk.Image, path: Path) -> None:
    """Written atomically: SimpleITK's writer leaves a cut-off file on a full disk without an error, which
    ``atomic_path`` turns into a ``WriteError`` (the file checked before it gets its name)."""
    ending = ".nii.gz" if str(path).endswith(".nii.gz") else Path(path).suffix
    with atomic_path(str(path), suffix=ending) as tmp:
        sitk.WriteImage(label_map, tmp, useCompression=True)


def _label_image(values: np.ndarray, max_label: int, grid) -> sitk.Image:
    """``values`` as an image on ``grid``'s voxel grid (an image or an image file reader)."""
    out = sitk.GetImageFromArray(values.astype(np.uint8 if max_label < 256 else np.uint16))
    out.SetSpacing(grid.GetSpacing())
    out.SetOrigin(grid.GetOrigin())
    out.SetDirection(grid.GetDirection())
    return out
