"""Image files, read safely: completeness, voxel grids, label maps, and nnU-Net's channel naming (the one home
of all four).

``convert`` (images and masks), ``predict`` (images) and ``evaluate`` (ground truth and predictions) read image
files through this module, so they accept and refuse the same files:

- ``check_complete``: a NIfTI file that holds fewer voxel bytes than its header announces (a truncated copy or
  download) is refused;
- ``read_geometry`` / ``grid_differences`` / ``check_same_grid``: two files must lie on one voxel grid (shape,
  spacing, origin, direction within ``GEOMETRY_TOLERANCE``), e.g. a mask and its image, or a prediction and its
  ground truth;
- ``round_labels`` / ``read_label_map``: label maps stored as floats (the quiz's masks hold 1.0000152) are
  rounded, but a voxel farther than ``VALUE_TOLERANCE`` from an integer means a resampled or damaged mask, and
  is refused;
- ``channel_pattern``: nnU-Net's image naming ``<case>_XXXX<ending>`` (XXXX: the channel, 4 digits), which
  ``convert``, ``predict``, ``evaluate`` and the service parse alike.

Completeness: SimpleITK reads a truncated ``.nii.gz`` without complaint and fills the missing voxels with zeros, so every
command that reads a NIfTI file (predict its images; convert its images and masks; evaluate its ground truth and
predictions) first calls ``check_complete``. The check is cheap: the header (read by nibabel) gives the byte
count of the uncompressed file, and a gzip file ends with the length of its uncompressed data (modulo 2^32).
Only when the two disagree (a truncated file, or a rare multi-member gzip file) is the file decompressed as a
stream, to tell which: truncated gzip data ends before its end-of-stream marker. SimpleITK also *writes* such
files without complaint when the disk fills up, so every NIfTI file this project writes is checked the same way
(``written_incompletely``, called by atomic.py) before it gets its final name.
"""
import io
import os
import re
import struct
import zlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import nibabel
import numpy as np

from multitask_nnunet.errors import InputError, one_line

_CHUNK = 1 << 22
_NIFTI_ENDINGS = (".nii", ".nii.gz")
VALUE_TOLERANCE = 1e-3      # how far a stored label value may lie from its integer
GEOMETRY_TOLERANCE = 1e-4   # spacing, origin and direction: how far two grids may differ and still be one


# ---------------------------------------------------------------------------------------------- naming
def channel_pattern(*file_endings: str) -> "re.Pattern":
    """``<case>_XXXX<ending>`` for any of ``file_endings`` (``""``: a name without its ending), to be used with
    ``fullmatch``: groups case, channel (4 digits), ending."""
    return re.compile(r"(.+)_(\d{4})(" + "|".join(re.escape(e) for e in file_endings) + ")")


def describe_channels(channel_names: Dict[str, str]) -> str:
    """dataset.json's ``channel_names`` as the messages name them: ``0000=CT, 0001=T2``."""
    return ", ".join(f"{int(k):04d}={v}" for k, v in sorted(channel_names.items(), key=lambda kv: int(kv[0])))


def channel_gaps(present, expected: int) -> Tuple[List[int], List[int]]:
    """(missing, unexpected) channel indices of a case whose files carry the indices ``present``, for a model of
    ``expected`` channels (0 .. expected - 1)."""
    present = set(int(c) for c in present)
    return [c for c in range(expected) if c not in present], sorted(c for c in present if c >= expected)


# ---------------------------------------------------------------------------------------------- voxel grids
@dataclass(frozen=True)
class Geometry:
    shape: Tuple[int, ...]          # numpy order (z, y, x)
    spacing: Tuple[float, ...]      # SimpleITK order (x, y, z), as are origin and direction
    origin: Tuple[float, ...]
    direction: Tuple[float, ...]


def read_geometry(path) -> Geometry:
    """The voxel grid of an image file, from its header (no pixel data is read), after checking that the file is
    not truncated (``check_complete``: the NIfTI reader would fill the missing voxels with zeros)."""
    import SimpleITK as sitk
    check_complete(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(os.fspath(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise InputError(f"{path}: cannot read image header: {one_line(e)}") from None
    return Geometry(tuple(reversed(reader.GetSize())), reader.GetSpacing(), reader.GetOrigin(),
                    reader.GetDirection())


def grid_differences(first: Geometry, second: Geometry) -> List[Tuple[str, tuple, tuple]]:
    """``(field, first value, second value)`` for each field in which two grids differ beyond tolerance."""
    differences = []
    for field in ("shape", "spacing", "origin", "direction"):
        a, b = getattr(first, field), getattr(second, field)
        if len(a) != len(b) or not np.allclose(a, b, rtol=GEOMETRY_TOLERANCE, atol=GEOMETRY_TOLERANCE):
            differences.append((field, a, b))
    return differences


def check_same_grid(case: str, first, second, roles: Tuple[str, str] = ("image", "image"),
                    first_geometry: Geometry = None, second_geometry: Geometry = None) -> None:
    """``InputError`` if two files lie on different voxel grids, e.g. ``case 'a': prediction P has spacing
    (0.8, 0.8, 3) but ground truth G has (0.8, 0.8, 2)``, naming any further differing fields. ``roles`` name the
    files in the message. Geometries already read may be passed; otherwise the headers are read (no voxels)."""
    differences = grid_differences(first_geometry or read_geometry(first), second_geometry or read_geometry(second))
    if differences:
        field, a, b = differences[0]
        others = [d[0] for d in differences[1:]]
        raise InputError(f"case '{case}': {roles[0]} {first} has {field} {format_values(a)} but {roles[1]} {second} "
                         f"has {format_values(b)}" + (f" (also different: {', '.join(others)})" if others else ""))


def format_values(values) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"


# ---------------------------------------------------------------------------------------------- label maps
def round_labels(values: np.ndarray, path) -> np.ndarray:
    """Integer labels (int32) of a label map's voxel values; integer arrays pass as they are. A voxel farther than
    ``VALUE_TOLERANCE`` from an integer (or NaN) is an ``InputError`` naming ``path``, the count and an example."""
    if np.issubdtype(values.dtype, np.integer):
        return values
    rounded = np.rint(values)
    off = ~(np.abs(values - rounded) <= VALUE_TOLERANCE)   # NaN counts as off
    if off.any():
        where = tuple(int(i) for i in np.argwhere(off)[0])
        raise InputError(f"{path}: {int(off.sum())} voxel(s) are not integer labels, e.g. value "
                         f"{float(values[where]):.6g} at voxel (z, y, x) = {where}; values must lie within "
                         f"{VALUE_TOLERANCE:g} of an integer")
    return rounded.astype(np.int32)


def read_label_map(path) -> np.ndarray:
    """A label map's integer labels, numpy order (z, y, x); refuses a truncated file and non-integer values."""
    import SimpleITK as sitk
    check_complete(path)
    try:
        image = sitk.ReadImage(os.fspath(path))
    except RuntimeError as e:
        raise InputError(f"{path}: cannot read label map: {one_line(e)}") from None
    return round_labels(sitk.GetArrayFromImage(image), path)


# ---------------------------------------------------------------------------------------------- completeness


def check_complete(path) -> None:
    """Raises ``InputError`` naming ``path`` if it is a NIfTI file (``.nii``, ``.nii.gz``) with less data than
    its header says. Other files, and files that are missing or whose header cannot be read (the image reader
    then says what is wrong), pass."""
    path = os.fspath(path)
    if not path.endswith(_NIFTI_ENDINGS) or not os.path.isfile(path):
        return
    expected = _expected_bytes(path)
    shortfall = None if expected is None else _shortfall(path, expected)
    if shortfall:
        raise InputError(f"{path}: {shortfall}")


def written_incompletely(path) -> Optional[str]:
    """What is wrong with a NIfTI file just written (None: nothing, or not a NIfTI file name), for writers that
    run out of room without an error (SimpleITK's NIfTI writer on a full disk leaves an empty or cut-off file and
    raises nothing). Stricter than ``check_complete``: a header that cannot be read counts as well, since this
    project's writers always write one."""
    path = os.fspath(path)
    if not path.endswith(_NIFTI_ENDINGS):
        return None
    size = os.path.getsize(path)
    if size == 0:
        return "0 bytes"
    expected = _expected_bytes(path)
    if expected is None:
        return f"{size} bytes, cut off inside its NIfTI header"
    return _shortfall(path, expected)


def _shortfall(path: str, expected: int) -> Optional[str]:
    """How a NIfTI file falls short of the ``expected`` bytes its header describes; None if it does not."""
    if path.endswith(".nii"):
        size = os.path.getsize(path)
        return f"truncated NIfTI file: {size} bytes, its header describes {expected}" if size < expected else None
    if _gzip_trailer_size(path) == expected % (1 << 32):
        return None
    complete, size = _decompressed_size(path)
    if not complete:
        return (f"truncated or damaged file: its gzip stream breaks off after {size} of the {expected} bytes its "
                f"NIfTI header describes")
    if size < expected:
        return f"truncated NIfTI file: {size} bytes uncompressed, its header describes {expected}"
    return None


def _expected_bytes(path: str):
    """Header + extensions + voxel data, in bytes, of the uncompressed single-file NIfTI; None if its header
    cannot be read (nibabel.load is not used: it refuses some truncated files before reading their header)."""
    try:
        head = _first_bytes(path, nibabel.Nifti2Header.single_vox_offset)
    except OSError:  # e.g. no permission to read it
        return None
    header_class = next((c for c in (nibabel.Nifti1Header, nibabel.Nifti2Header) if len(head) >= c.sizeof_hdr
                         and c.sizeof_hdr in (struct.unpack("<i", head[:4])[0], struct.unpack(">i", head[:4])[0])),
                        None)
    if header_class is None:
        return None
    try:
        header = header_class.from_fileobj(io.BytesIO(head[:header_class.sizeof_hdr]), check=False)
        shape, itemsize = header.get_data_shape(), header.get_data_dtype().itemsize
    except Exception:
        return None
    offset = max(int(header["vox_offset"]), header.single_vox_offset)  # 0 means "right after the header"
    return offset + itemsize * int(np.prod(shape, dtype=np.int64))


def _first_bytes(path: str, count: int) -> bytes:
    with open(path, "rb") as f:
        if not path.endswith(".gz"):
            return f.read(count)
        decompressor, head = zlib.decompressobj(16 + zlib.MAX_WBITS), b""
        try:
            while len(head) < count and (chunk := f.read(1 << 12)):
                head += decompressor.decompress(chunk, count - len(head))
                while decompressor.unconsumed_tail and len(head) < count:
                    head += decompressor.decompress(decompressor.unconsumed_tail, count - len(head))
        except zlib.error:
            pass
        return head


def _gzip_trailer_size(path: str) -> int:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() < 18:  # shorter than an empty gzip member
            return -1
        f.seek(-4, os.SEEK_END)
        return struct.unpack("<I", f.read(4))[0]


def _decompressed_size(path: str):
    """(whether the gzip data ends with an end-of-stream marker, total decompressed bytes). Several members
    (e.g. bgzip output) are read one after the other; bytes after a complete member that are not gzip data
    are ignored, as ``gzip -d`` does."""
    total, decompressor, started = 0, zlib.decompressobj(16 + zlib.MAX_WBITS), False
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            while chunk:
                if decompressor.eof:  # the next member
                    decompressor, started = zlib.decompressobj(16 + zlib.MAX_WBITS), False
                try:
                    total += len(decompressor.decompress(chunk))
                except zlib.error:
                    return not started and total > 0, total
                started = True
                chunk = decompressor.unused_data if decompressor.eof else b""
    return decompressor.eof, total


def labels_volume_ml(label_map: np.ndarray, spacing, labels) -> float:
    """Millilitres of the voxels of ``label_map`` holding any of ``labels``, at voxel ``spacing`` (mm)."""
    voxel_ml = float(np.prod([float(s) for s in spacing])) / 1000.0
    return float(np.isin(label_map, list(labels)).sum()) * voxel_ml
