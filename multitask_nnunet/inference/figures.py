"""The saliency figures of ``predict --saliency``: one PNG per case and an ``index.html`` showing them all.

A case's PNG has three orthogonal slices (the image's three array axes) through one point: the centre of mass
of the highest label in the predicted mask (the structure that carries the class in a label hierarchy; the
lesion for pancreas + lesion), or, without any foreground, the saliency peak. Each panel shows the image in
grey (a soft-tissue window, W 400 / L 40 HU, when the image looks like CT in HU, i.e. it spans -500..100;
otherwise its 0.5-99.5 percentiles), the mask's contour per label, and the saliency heatmap (transparent below
0.1 of its peak); the title holds the class probabilities, the predicted class and the entropy. Pixels are
drawn with the image's spacing.
"""
import html
import os
from typing import Dict, List, Optional, Sequence

import numpy as np

from multitask_nnunet.io.atomic import atomic_path, atomic_write_text

SALIENCY_PNG_SUFFIX = "_saliency.png"
INDEX_HTML = "index.html"
CT_WINDOW = (40 - 200, 40 + 200)  # soft tissue: level 40 HU, width 400 HU
HEATMAP_FLOOR = 0.1


def centre_point(segmentation: np.ndarray, saliency: Optional[np.ndarray]) -> tuple:
    labels = np.unique(segmentation)
    labels = labels[labels > 0]
    if len(labels):
        return tuple(int(round(c)) for c in np.argwhere(segmentation == labels.max()).mean(0))
    if saliency is not None and float(saliency.max()) > 0:
        return tuple(int(i) for i in np.unravel_index(int(np.argmax(saliency)), saliency.shape))
    return tuple(s // 2 for s in segmentation.shape)


def display_window(image: np.ndarray) -> tuple:
    low, high = float(image.min()), float(image.max())
    if low <= -500 and high >= 100:
        return CT_WINDOW
    low, high = (float(v) for v in np.percentile(image, [0.5, 99.5]))
    return (low, high) if high > low else (low, low + 1)


def write_case_png(path: str, name: str, image: np.ndarray, spacing: Sequence[float], segmentation: np.ndarray,
                   saliency: Optional[np.ndarray], probabilities: np.ndarray, class_names: List[str],
                   uncertainty: Optional[Dict[str, float]] = None) -> None:
    """``image``, ``segmentation``, ``saliency``: 3d arrays of one shape (the reader's axis order); ``spacing`` in
    that order."""
    from matplotlib.figure import Figure
    point = centre_point(segmentation, saliency)
    window = display_window(image)
    labels = [int(v) for v in np.unique(segmentation) if v > 0]
    fig = Figure(figsize=(12, 4.6))
    axes = fig.subplots(1, 3)
    for axis, ax in enumerate(axes):
        cut = tuple(point[axis] if a == axis else slice(None) for a in range(3))
        rows, cols = [a for a in range(3) if a != axis]
        aspect = float(spacing[rows]) / float(spacing[cols])
        ax.imshow(image[cut], cmap="gray", vmin=window[0], vmax=window[1], aspect=aspect, interpolation="nearest")
        if saliency is not None:  # below HEATMAP_FLOOR of the peak: transparent, the image shows through
            heat = np.ma.masked_less(saliency[cut], HEATMAP_FLOOR)
            ax.imshow(heat, cmap="jet", alpha=0.45, vmin=0, vmax=1, aspect=aspect, interpolation="bilinear")
        for i, label in enumerate(labels):
            mask = segmentation[cut] == label
            if mask.any() and not mask.all():
                ax.contour(mask.astype(float), levels=[0.5], colors=[f"C{(i + 1) % 10}"], linewidths=1.0)
        ax.set_title(f"axis {axis} = {point[axis]}", fontsize=9)
        ax.set_axis_off()
    predicted = int(np.argmax(probabilities))
    probs = ", ".join(f"{c} {float(p):.2f}" for c, p in zip(class_names, probabilities))
    extra = f"; entropy {uncertainty['entropy']:.3f}" if uncertainty and "entropy" in uncertainty else ""
    fig.suptitle(f"{name}: {class_names[predicted]} (p = {float(probabilities[predicted]):.2f}{extra})\n{probs}",
                 fontsize=10)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=80)


def write_index(folder: str) -> Optional[str]:
    """``index.html`` in ``folder`` showing every ``<case>_saliency.png`` there, written when it changes (None
    when there is no PNG)."""
    pngs = sorted(f for f in os.listdir(folder) if f.endswith(SALIENCY_PNG_SUFFIX) and not f.startswith("."))
    if not pngs:
        return None
    items = "\n".join(f'<figure><img src="{html.escape(p)}" alt="{html.escape(p)}" width="960">'
                      f'<figcaption>{html.escape(p[:-len(SALIENCY_PNG_SUFFIX)])}</figcaption></figure>' for p in pngs)
    text = ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>saliency</title></head><body>\n"
            f"<h1>Saliency: {len(pngs)} case(s)</h1>\n{items}\n</body></html>\n")
    path = os.path.join(folder, INDEX_HTML)
    if not os.path.isfile(path) or open(path, encoding="utf-8").read() != text:  # a rerun that adds nothing: kept
        atomic_write_text(path, text)
    return path
