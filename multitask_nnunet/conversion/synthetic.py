"""``multitask-nnunet make-synthetic``: a synthetic dataset in the pancreas quiz's layout, so that the whole
pipeline can be run and tested without the real data. In the default geometry a tiny nnU-Net learns it on a
CPU in minutes; ``--geometry quiz`` has the real quiz's proportions (small pancreas, smaller lesion).

Layout written to DIR (feed DIR to ``multitask-nnunet convert``)::

    train/subtype<K>/synth_NNN.nii.gz          mask, float32 with quiz-like artifacts (1.0000152, 1.9999847)
    train/subtype<K>/synth_NNN_0000.nii.gz     CT-like image, int16
    validation/subtype<K>/...                  same naming
    test/synth_NNN_0000.nii.gz                 images only
    test_labels/synth_NNN.nii.gz               test ground truth masks (uint8), outside test/ on purpose
    test_labels/classes.csv                    test ground truth classes: Names,Subtype (synth_NNN.nii.gz,K)

Geometry (``--geometry``; spacing 0.75x0.75x2 mm (x, y, z) and a random origin in both):

- ``demo`` (default): crops of 36-44 x 60-68 x 60-68 voxels (z, y, x); the pancreas (labels 1+2) is 8-20% of
  the crop and the lesion (semi-axes 8-11 mm) 1.2-3%. Small enough that a tiny network learns both tasks on
  a CPU in minutes (the demo and the tests use it). Its output is unchanged from earlier versions.
- ``quiz``: the real quiz's proportions. Crops of 40-48 x 90-110 x 110-130 voxels (z, y, x), an elongated
  pancreas (labels 1+2) of about 5% of the crop (4.6-5.5%) and a lesion (label 2) of 0.3-0.7% (median 0.5%;
  semi-axes about 8-10 mm), inside the pancreas. Both structures scale with the crop's size, as the quiz's
  crops are cut around the pancreas.
- ``quiz-sizes``: the size range of the quiz's test images (crops of 40-160 x 80-220 x 110-360 voxels), with
  ``quiz``'s pancreas and lesion at ``quiz``'s typical size whatever the crop (more background in larger
  crops), so that a model trained on ``--geometry quiz`` segments them. For inference-speed benchmarks
  (``benchmarks/inference_speed.py``), not for training.

Each case: noisy fat-like background, an ellipsoid "pancreas" (label 1) and a smaller ellipsoid lesion inside
it (label 2). Only the lesion's appearance tells the class: 0 dark, 1 bright, 2 ring (bright rim, dark core),
3 checkered. Case numbers are shuffled, so neither names nor order reveal split or class. Same seed and
geometry, same bytes.
"""
import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import SimpleITK as sitk

from multitask_nnunet.class_csv import GROUND_TRUTH_CSV, write_case_classes
from multitask_nnunet.conversion.staging import staged_folder
from multitask_nnunet.errors import InputError

SPACING = (0.75, 0.75, 2.0)         # mm, SimpleITK order (x, y, z)
BACKGROUND_HU, PANCREAS_HU, DARK_HU, BRIGHT_HU, NOISE_HU = -60, 110, 20, 220, 15
ARTIFACT = 1.52e-5                  # the size of the float noise seen in the quiz's masks
TEST_LABELS = "test_labels"



@dataclass(frozen=True)
class Geometry:
    """Sizes of one geometry; numpy order (z, y, x) throughout."""
    shape: Tuple[int, int, int]                 # voxels: the crop's typical size
    shape_jitter: Tuple[int, int, int]          # each case's crop differs by up to +-this many voxels per axis
    pancreas_axes_mm: Tuple[Tuple[float, float, float], Tuple[float, float, float]]  # semi-axes, (low, high)
    lesion_axes_mm: Tuple[float, float]         # each semi-axis uniform in [low, high]
    reference_voxels: Optional[int] = None      # if set: both ellipsoids scale by (crop voxels / this) ** (1/3),
    #                                             so their share of the crop does not depend on the crop's size


GEOMETRIES: Dict[str, Geometry] = {
    # ~15% pancreas; small enough for CPU demos and tests. Do not change: its bytes are relied upon.
    "demo": Geometry(shape=(40, 64, 64), shape_jitter=(4, 4, 4),
                     pancreas_axes_mm=((14, 15, 16), (22, 20, 20)), lesion_axes_mm=(8.0, 11.0)),
    # the quiz's proportions: pancreas ~5% of the crop (elongated along x), lesion 0.3-0.7%
    "quiz": Geometry(shape=(44, 100, 120), shape_jitter=(4, 10, 10),
                     pancreas_axes_mm=((13.5, 15.5, 31.0), (14.5, 16.5, 33.0)), lesion_axes_mm=(8.0, 9.8),
                     reference_voxels=44 * 100 * 120),
    # the quiz test images' range of sizes, quiz's structures unscaled: inference-speed benchmarks
    "quiz-sizes": Geometry(shape=(100, 150, 235), shape_jitter=(60, 70, 125),
                           pancreas_axes_mm=((13.5, 15.5, 31.0), (14.5, 16.5, 33.0)), lesion_axes_mm=(8.0, 9.8)),
}
DEFAULT_GEOMETRY = "demo"

# lesion intensity from (normalised radius inside the lesion, y index, x index); one entry per class
LESION_APPEARANCES: List[Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]] = [
    lambda r, y, x: np.full(r.shape, DARK_HU),
    lambda r, y, x: np.full(r.shape, BRIGHT_HU),
    lambda r, y, x: np.where(r > 0.8, BRIGHT_HU, DARK_HU),  # thin bright rim: mean near the pancreas
    lambda r, y, x: np.where((y // 2 + x // 2) % 2 == 0, BRIGHT_HU, DARK_HU),
]


def make_synthetic_dataset(out_dir, cases: int = 18, validation_cases: int = 9, test_cases: int = 6,
                           classes: int = 3, seed: int = 0, overwrite: bool = False,
                           geometry: str = DEFAULT_GEOMETRY) -> Path:
    """Write the dataset described in the module docstring to ``out_dir`` and return it.

    ``geometry``: a key of ``GEOMETRIES`` (``demo``, ``quiz`` or ``quiz-sizes``, see the module docstring).

    Each split is balanced over the ``classes`` classes. The folder appears complete or not at all; an
    existing non-empty ``out_dir`` is replaced only with ``overwrite``.
    """
    if geometry not in GEOMETRIES:
        raise InputError(f"--geometry {geometry}: must be one of {', '.join(GEOMETRIES)}")
    if not 2 <= classes <= len(LESION_APPEARANCES):
        raise InputError(f"--classes {classes}: must be between 2 and {len(LESION_APPEARANCES)}")
    if cases < classes or validation_cases < 0 or test_cases < 0:
        raise InputError(f"--cases {cases}, --validation-cases {validation_cases}, --test-cases {test_cases}: need "
                         f"at least one train case per class ({classes}) and no negative counts")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise InputError(f"{out_dir} exists and is not empty; pass --overwrite to replace it")

    rng = np.random.default_rng(seed)
    counts = {"train": cases, "validation": validation_cases, "test": test_cases}
    numbers = iter(rng.permutation(np.arange(1, max(1000, sum(counts.values()) + 1)))[:sum(counts.values())])
    with staged_folder(out_dir, replaces=[out_dir]) as staged:
        test_classes: Dict[str, int] = {}
        for split, count in counts.items():
            for class_index in rng.permutation(np.arange(count) % classes):
                name = f"synth_{next(numbers):03d}"
                image, labels = _make_case(rng, int(class_index), GEOMETRIES[geometry])
                if split == "test":
                    _write(image, labels, staged / "test", staged / TEST_LABELS, name)
                    test_classes[name] = int(class_index)
                else:
                    folder = staged / split / f"subtype{class_index}"
                    _write(image, _with_artifacts(rng, labels), folder, folder, name)
        (staged / TEST_LABELS).mkdir(exist_ok=True)
        write_case_classes(staged / TEST_LABELS / GROUND_TRUTH_CSV,
                           {f"{name}.nii.gz": k for name, k in test_classes.items()})
    print(f"wrote {cases} train, {validation_cases} validation and {test_cases} test cases "
          f"({classes} classes, {geometry} geometry) to {out_dir}")
    return out_dir


def _ellipsoid_radius(shape, center, semi_axes) -> np.ndarray:
    """Normalised ellipsoid radius per voxel: <= 1 inside."""
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    return np.sqrt(sum(((g - c) / a) ** 2 for g, c, a in zip(grid, center, semi_axes)))


def _make_case(rng: np.random.Generator, class_index: int, geometry: Geometry) -> Tuple[sitk.Image, np.ndarray]:
    jitter = np.array(geometry.shape_jitter)
    shape = tuple(int(n) for n in np.array(geometry.shape) + rng.integers(-jitter, jitter + 1))
    scale = 1.0 if geometry.reference_voxels is None else (np.prod(shape) / geometry.reference_voxels) ** (1 / 3)
    mm_per_voxel = np.array(SPACING[::-1])
    pancreas_axes = rng.uniform(*geometry.pancreas_axes_mm) / mm_per_voxel * scale
    pancreas_center = [rng.uniform(a + 2, n - a - 2) for a, n in zip(pancreas_axes, shape)]
    lesion_axes = rng.uniform(*geometry.lesion_axes_mm, size=3) / mm_per_voxel * scale
    lesion_center = [c + rng.uniform(-0.5, 0.5) * (p - l)
                     for c, p, l in zip(pancreas_center, pancreas_axes, lesion_axes)]
    in_pancreas = _ellipsoid_radius(shape, pancreas_center, pancreas_axes) <= 1
    lesion_radius = _ellipsoid_radius(shape, lesion_center, lesion_axes)
    in_lesion = in_pancreas & (lesion_radius <= 1)

    labels = in_pancreas.astype(np.uint8)
    labels[in_lesion] = 2
    _, y, x = np.indices(shape)
    hu = np.full(shape, BACKGROUND_HU, dtype=np.float64)
    hu[in_pancreas] = PANCREAS_HU
    hu[in_lesion] = LESION_APPEARANCES[class_index](lesion_radius, y, x)[in_lesion]
    hu += rng.normal(0, NOISE_HU, size=shape)

    image = sitk.GetImageFromArray(np.rint(hu).astype(np.int16))
    image.SetSpacing(SPACING)
    image.SetOrigin(tuple(float(v) for v in np.round(rng.uniform(-10, 10, size=3) + (-100, -120, 500), 3)))
    return image, labels


def _with_artifacts(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
    """Float32 labels with about 1% of voxels off by +-1.5e-5, like the quiz's masks."""
    noisy = labels.astype(np.float32)
    hit = rng.random(labels.shape) < 0.01
    noisy[hit] += rng.choice(np.float32([ARTIFACT, -ARTIFACT]), size=int(hit.sum()))
    return noisy


def _write(image: sitk.Image, labels: np.ndarray, image_folder: Path, label_folder: Path, name: str) -> None:
    for folder in (image_folder, label_folder):
        folder.mkdir(parents=True, exist_ok=True)
    mask = sitk.GetImageFromArray(labels)
    mask.CopyInformation(image)
    sitk.WriteImage(image, str(image_folder / f"{name}_0000.nii.gz"), useCompression=True)
    sitk.WriteImage(mask, str(label_folder / f"{name}.nii.gz"), useCompression=True)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "make-synthetic", help="write a small synthetic dataset in the pancreas quiz's layout",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-o", "--output", required=True, type=Path, metavar="DIR", help="folder to create")
    p.add_argument("--cases", type=int, default=18, metavar="N", help="train cases, balanced over classes (18)")
    p.add_argument("--validation-cases", type=int, default=9, metavar="N", help="validation cases (9)")
    p.add_argument("--test-cases", type=int, default=6, metavar="M", help="test cases, images only (6)")
    p.add_argument("--classes", type=int, default=3, metavar="K",
                   help=f"number of classes, 2 to {len(LESION_APPEARANCES)} (3)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (0)")
    p.add_argument("--geometry", choices=list(GEOMETRIES), default=DEFAULT_GEOMETRY,
                   help="demo: ~40x64x64 crops, pancreas 8-20%%, for CPU demos and tests; quiz: the real quiz's "
                        "proportions, 40-48 x 90-110 x 110-130 crops, pancreas ~5%%, lesion 0.3-0.7%% of the crop; "
                        "quiz-sizes: the quiz test images' sizes (40-160 x 80-220 x 110-360) with quiz's structures, "
                        f"for speed benchmarks (default: {DEFAULT_GEOMETRY})")
    p.add_argument("--overwrite", action="store_true", help="replace DIR if it exists and is not empty")
    p.set_defaults(func=_run)


def _run(args) -> None:
    make_synthetic_dataset(args.output, cases=args.cases, validation_cases=args.validation_cases,
                           test_cases=args.test_cases, classes=args.classes, seed=args.seed,
                           overwrite=args.overwrite, geometry=args.geometry)
