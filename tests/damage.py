"""Damaging files as an interrupted copy or download does, for the bad-input tests."""
from pathlib import Path

import numpy as np
import SimpleITK as sitk


def noisy_labels(shape, seed=0, dtype=np.uint8) -> np.ndarray:
    """Random labels 0-2: they compress poorly, so that half of the compressed file still holds the header."""
    return np.random.default_rng(seed).integers(0, 3, size=shape).astype(dtype)


def truncate(path, keep: float = 0.5) -> None:
    """Keep the first ``keep`` of the file's bytes. Asserts that SimpleITK still reads the result without an
    error (it fills the missing voxels with zeros): only a check of our own can notice."""
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[:int(len(data) * keep)])
    sitk.ReadImage(str(path))
