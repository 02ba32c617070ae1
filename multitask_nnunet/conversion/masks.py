"""Turn a float mask into the integer label map nnU-Net expects, refusing anything that is not clearly a label.

Masks of the quiz are stored as float with values like 1.0000152; they are rounded, but a voxel farther than
``VALUE_TOLERANCE`` from an integer means a resampled or otherwise damaged mask, and that is an error, as is
a label the dataset does not declare or a mask whose grid differs from its image's.
"""
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from multitask_nnunet.errors import InputError
from multitask_nnunet.nifti import check_complete

VALUE_TOLERANCE = 1e-3
GEOMETRY_TOLERANCE = 1e-4


@dataclass(frozen=True)
class Geometry:
    shape: Tuple[int, ...]          # numpy order (z, y, x)
    spacing: Tuple[float, ...]      # SimpleITK order (x, y, z), as are origin and direction
    origin: Tuple[float, ...]
    direction: Tuple[float, ...]


def read_geometry(path: Path) -> Geometry:
    """The voxel grid of an image file, from its header (no pixel data is read), after checking that the file is
    not truncated (``check_complete``: the NIfTI reader would fill the missing voxels with zeros)."""
    check_complete(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise InputError(f"{path}: cannot read image header: {_one_line(e)}") from None
    return Geometry(tuple(reversed(reader.GetSize())), reader.GetSpacing(), reader.GetOrigin(),
                    reader.GetDirection())


def grid_differences(first: Geometry, second: Geometry) -> List[Tuple[str, tuple, tuple]]:
    """``(field, first value, second value)`` for each field in which two grids differ beyond tolerance; the
    converter and the evaluator share it, so they accept the same grids."""
    differences = []
    for field in ("shape", "spacing", "origin", "direction"):
        a, b = getattr(first, field), getattr(second, field)
        if len(a) != len(b) or not np.allclose(a, b, rtol=GEOMETRY_TOLERANCE, atol=GEOMETRY_TOLERANCE):
            differences.append((field, a, b))
    return differences


def check_same_grid(case: str, first: Path, first_geometry: Geometry, second: Path, second_geometry: Geometry):
    differences = grid_differences(first_geometry, second_geometry)
    if differences:
        raise InputError(f"case {case}: {first.name} and {second.name} differ in " +
                         "; ".join(f"{field} {format_values(a)} vs {format_values(b)}" for field, a, b in differences))


def integer_label_map(mask: Path, allowed: Sequence[int]) -> sitk.Image:
    """The mask rounded to integers, on the mask's own grid; fails on non-integer or undeclared values."""
    check_complete(mask)
    try:
        image = sitk.ReadImage(str(mask))
    except RuntimeError as e:
        raise InputError(f"{mask}: cannot read mask: {_one_line(e)}") from None
    values = sitk.GetArrayViewFromImage(image)
    rounded = np.rint(values)
    off = ~(np.abs(values - rounded) <= VALUE_TOLERANCE)   # NaN counts as off
    if off.any():
        where = tuple(int(i) for i in np.argwhere(off)[0])
        raise InputError(f"mask {mask}: {int(off.sum())} voxel(s) are not integer labels, e.g. value "
                         f"{float(values[where]):.6g} at voxel (z, y, x) = {where}; values must lie within "
                         f"{VALUE_TOLERANCE:g} of an integer")
    found = np.unique(rounded).astype(np.int64)
    unexpected = [int(v) for v in found if v not in set(allowed)]
    if unexpected:
        raise InputError(f"mask {mask}: contains label {', '.join(map(str, unexpected))}; "
                         f"the dataset declares only labels {', '.join(map(str, allowed))}")
    return _label_image(rounded, max(allowed), image)


def ignore_label_map(geometry: Geometry, ignore: int) -> sitk.Image:
    """An all-``ignore`` label map on the image's grid, for a case that has a class but no mask."""
    reference = sitk.Image(list(reversed(geometry.shape)), sitk.sitkUInt8)
    reference.SetSpacing(geometry.spacing)
    reference.SetOrigin(geometry.origin)
    reference.SetDirection(geometry.direction)
    return _label_image(np.full(geometry.shape, ignore), ignore, reference)


def write_label_map(label_map: sitk.Image, path: Path) -> None:
    sitk.WriteImage(label_map, str(path), useCompression=True)


def _label_image(values: np.ndarray, max_label: int, grid: sitk.Image) -> sitk.Image:
    out = sitk.GetImageFromArray(values.astype(np.uint8 if max_label < 256 else np.uint16))
    out.CopyInformation(grid)
    return out


def format_values(values) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"


def _one_line(error: Exception) -> str:
    """SimpleITK's message without the C++ source location that precedes it."""
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return text.split("ERROR: ")[-1]
