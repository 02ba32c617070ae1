"""Refuse a NIfTI file that holds fewer voxel bytes than its header announces (a truncated copy or download).

SimpleITK reads a truncated ``.nii.gz`` without complaint and fills the missing voxels with zeros, so every
command that reads a NIfTI file (predict its images; convert its images and masks; evaluate its ground truth and
predictions) first calls ``check_complete``. The check is cheap: the header (read by nibabel) gives the byte
count of the uncompressed file, and a gzip file ends with the length of its uncompressed data (modulo 2^32).
Only when the two disagree (a truncated file, or a rare multi-member gzip file) is the file decompressed as a
stream, to tell which: truncated gzip data ends before its end-of-stream marker.
"""
import io
import os
import struct
import zlib

import nibabel
import numpy as np

from multitask_nnunet.errors import InputError

_CHUNK = 1 << 22


def check_complete(path) -> None:
    """Raises ``InputError`` naming ``path`` if it is a NIfTI file (``.nii``, ``.nii.gz``) with less data than
    its header says. Other files, and files that are missing or whose header cannot be read (the image reader
    then says what is wrong), pass."""
    path = os.fspath(path)
    if not path.endswith((".nii", ".nii.gz")) or not os.path.isfile(path):
        return
    expected = _expected_bytes(path)
    if expected is None:
        return
    if path.endswith(".nii"):
        size = os.path.getsize(path)
        if size < expected:
            raise InputError(f"{path}: truncated NIfTI file: {size} bytes, its header describes {expected}")
        return
    if _gzip_trailer_size(path) == expected % (1 << 32):
        return
    complete, size = _decompressed_size(path)
    if not complete:
        raise InputError(f"{path}: truncated or damaged file: its gzip stream breaks off after {size} of the "
                         f"{expected} bytes its NIfTI header describes")
    if size < expected:
        raise InputError(f"{path}: truncated NIfTI file: {size} bytes uncompressed, its header describes "
                         f"{expected}")


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
