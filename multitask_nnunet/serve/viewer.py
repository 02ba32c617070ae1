"""What the browser viewer shows, rendered on the server: axial, coronal and sagittal slices of a case as PNG,
one layer each (the image, windowed; the mask; the saliency), which the page stacks.

A case is kept for the viewer as 8-bit volumes (``Views``): the first channel windowed (CT: the soft-tissue
window, level 40 HU, width 400; other modalities: the image's 0.5-99.5 percentiles), the label map, and the
saliency scaled to its maximum. They are turned to the patient's axes (LPS, as DICOM and SimpleITK) from the
image's direction, so that every case is shown the same way: axial slices seen from the feet (the patient's
right on the left of the picture, anterior at the top), coronal and sagittal slices with the head at the top.
Pixels are square in millimetres (the slices are resized by their spacing).
"""
import io
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

VIEWS = ("axial", "coronal", "sagittal")
LAYERS = ("image", "mask", "saliency")
CT_WINDOW = (40.0 - 200.0, 40.0 + 200.0)
MAX_SIDE = 1024   # pixels, the longest side of a rendered slice
# label 1, 2, ...: red, blue, yellow, green, purple, orange, cyan, pink (then again)
PALETTE = np.array([(230, 50, 50), (40, 120, 255), (250, 210, 0), (0, 200, 110), (170, 70, 240), (255, 140, 0),
                    (0, 210, 230), (255, 90, 200)], np.uint8)
MASK_ALPHA = 110


def display_window(image: np.ndarray, channel_name: str) -> Tuple[float, float]:
    if channel_name.strip().upper() == "CT":
        return CT_WINDOW
    low, high = np.percentile(image, (0.5, 99.5))
    return float(low), float(max(high, low + 1e-6))


def to_patient_axes(volume: np.ndarray, direction: Optional[Sequence[float]]) -> Tuple[Tuple[int, ...], Tuple[bool, ...]]:
    """For a SimpleITK array (z, y, x index axes) and the image's direction (row-major 3x3, columns the index
    axes): the transpose that orders the array axes as the patient's (S, P, L), and which of them to flip. The
    identity where the direction is missing or not near-axis-aligned."""
    if direction is None or len(direction) != 9 or volume.ndim != 3:
        return (0, 1, 2), (False, False, False)
    d = np.asarray(direction, float).reshape(3, 3)
    physical = [int(np.argmax(np.abs(d[:, i]))) for i in range(3)]  # index axis i (x, y, z) -> patient axis
    if sorted(physical) != [0, 1, 2]:
        return (0, 1, 2), (False, False, False)
    axes, flips = [], []
    for out in range(3):                # output axes: patient z (S), y (P), x (L)
        i = physical.index(2 - out)     # the index axis along that patient axis
        axes.append(2 - i)              # its array axis
        flips.append(bool(d[2 - out, i] < 0))
    return tuple(axes), tuple(flips)


def _orient(volume: np.ndarray, axes, flips) -> np.ndarray:
    volume = volume.transpose(axes)
    for axis, flip in enumerate(flips):
        if flip:
            volume = np.flip(volume, axis)
    return np.ascontiguousarray(volume)


@dataclass
class Views:
    image: np.ndarray                     # uint8 (z, y, x) in the patient's axes
    mask: np.ndarray                      # uint8 labels, same shape
    saliency: Optional[np.ndarray]        # uint8, same shape, or None
    spacing: Tuple[float, float, float]   # mm, (z, y, x)
    window: Tuple[float, float]

    @classmethod
    def from_case(cls, image: np.ndarray, mask: np.ndarray, saliency: Optional[np.ndarray], spacing: Sequence[float],
                  direction: Optional[Sequence[float]], channel_name: str) -> "Views":
        """``image``: the first channel (z, y, x), as the reader returns it; ``mask``, ``saliency`` the same shape."""
        window = display_window(image, channel_name)
        low, high = window
        scaled = np.clip((image.astype(np.float32) - low) * (255.0 / (high - low)), 0, 255).astype(np.uint8)
        axes, flips = to_patient_axes(image, direction)
        heat = None
        if saliency is not None:
            saliency = np.abs(saliency.astype(np.float32))
            top = float(saliency.max())
            heat = _orient((saliency * (255.0 / top) if top > 0 else saliency).astype(np.uint8), axes, flips)
        labels = np.clip(mask, 0, 255).astype(np.uint8)
        return cls(_orient(scaled, axes, flips), _orient(labels, axes, flips), heat,
                   tuple(float(spacing[a]) for a in axes), window)

    def sizes(self) -> Dict[str, int]:
        z, y, x = self.image.shape
        return {"axial": z, "coronal": y, "sagittal": x}

    def png(self, view: str, index: int, layer: str) -> bytes:
        """One slice of one layer as PNG (``view`` in VIEWS, ``layer`` in LAYERS; the caller checks both, the
        index and that the saliency exists)."""
        volume = {"image": self.image, "mask": self.mask, "saliency": self.saliency}[layer]
        sz, sy, sx = self.spacing
        if view == "axial":
            plane, spacing = volume[index], (sy, sx)
        elif view == "coronal":
            plane, spacing = volume[::-1, index, :], (sz, sx)   # head at the top
        else:
            plane, spacing = volume[::-1, :, index], (sz, sy)
        from PIL import Image
        if layer == "image":
            picture, resample = Image.fromarray(np.ascontiguousarray(plane), "L"), Image.BILINEAR
        elif layer == "mask":
            rgba = np.zeros(plane.shape + (4,), np.uint8)
            labelled = plane > 0
            rgba[labelled, :3] = PALETTE[(plane[labelled].astype(int) - 1) % len(PALETTE)]
            rgba[labelled, 3] = MASK_ALPHA
            picture, resample = Image.fromarray(rgba, "RGBA"), Image.NEAREST
        else:
            picture, resample = Image.fromarray(_heat(plane), "RGBA"), Image.BILINEAR
        rows, cols = plane.shape
        pixel = min(spacing)
        size = np.array([cols * spacing[1] / pixel, rows * spacing[0] / pixel])
        size = np.maximum(1, np.round(size * min(1.0, MAX_SIDE / size.max()))).astype(int)
        buffer = io.BytesIO()
        picture.resize(tuple(int(s) for s in size), resample).save(buffer, "PNG")
        return buffer.getvalue()


def _heat(plane: np.ndarray) -> np.ndarray:
    """A black-body colour scale (dark red to yellow to white), transparent where the saliency is low."""
    t = plane.astype(np.float32) / 255.0
    rgba = np.empty(plane.shape + (4,), np.uint8)
    rgba[..., 0] = np.clip(3 * t, 0, 1) * 255
    rgba[..., 1] = np.clip(3 * t - 1, 0, 1) * 255
    rgba[..., 2] = np.clip(3 * t - 2, 0, 1) * 255
    rgba[..., 3] = np.clip(t * 1.6, 0, 0.75) * 255
    return rgba
