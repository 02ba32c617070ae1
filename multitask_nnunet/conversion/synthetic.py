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
    truth_features.csv                         every case's truth features (below), all splits

Geometry (``--geometry``; spacing 0.75x0.75x2 mm (x, y, z) and a random origin in both):

- ``demo`` (default): crops of 36-44 x 60-68 x 60-68 voxels (z, y, x); the pancreas (labels 1+2) is 8-20% of
  the crop and the lesion (semi-axes 8-11 mm) 1.2-3%. Small enough that a tiny network learns both tasks on
  a CPU in minutes (the demo and the tests use it). Its output is unchanged from earlier versions.
- ``quiz``: the real quiz's proportions. Crops of 40-48 x 90-110 x 110-130 voxels (z, y, x), an elongated
  pancreas (labels 1+2) of about 5% of the crop (4.6-5.5%) and a lesion (label 2) of 0.3-0.7% (median 0.5%;
  semi-axes about 8-10 mm; ``--difficulty hard`` draws the quiz's spread of sizes instead), inside the
  pancreas. Both structures scale with the crop's size, as the quiz's crops are cut around the pancreas.
- ``quiz-sizes``: the size range of the quiz's test images (crops of 40-160 x 80-220 x 110-360 voxels), with
  ``quiz``'s pancreas and lesion at ``quiz``'s typical size whatever the crop (more background in larger
  crops), so that a model trained on ``--geometry quiz`` segments them. For inference-speed benchmarks
  (``benchmarks/inference_speed.py``), not for training.

Each case: noisy fat-like background, an ellipsoid "pancreas" (label 1) and a smaller ellipsoid lesion inside
it (label 2). Case numbers are shuffled, so neither names nor order reveal split or class. Same seed, geometry
and difficulty, same bytes.

Difficulty (``--difficulty``):

- ``easy`` (default): only the lesion's appearance tells the class, unmistakably: 0 dark, 1 bright, 2 ring
  (bright rim, dark core), 3 checkered. Once the lesion is found the class is certain. Its output is unchanged
  from earlier versions.
- ``hard`` (meant for ``--geometry quiz``; any geometry works): classes that overlap, as in the quiz.
  The lesion's share of the crop is log-normal, with the quiz masks' median per class (0.38%, 0.53%, 0.68% for
  classes 0, 1, 2; interpolated for other class counts) and a spread that puts about 7% of the cases under
  0.05% of the crop; clipped to at most 40% of the pancreas and at least 10 voxels, with random axis ratios,
  placed inside the pancreas. Each case draws, around its class's value, the lesion's mean HU (40, 55, 70 for
  classes 0, 1, 2; case sd 13), its voxel texture sd (8, 16, 24 times a log-normal factor, sd 0.4), the
  parenchyma's mean HU (115, 107, 99; sd 6.5) and a rim of 1 or 2 voxels around the lesion inside the
  pancreas (parenchyma plus 0, 12, 24; sd 10): neighbouring classes lie about one case sd apart in each.
  No single feature separates the classes; a logistic regression on all truth features reaches a macro-F1
  of about 0.82 (150 train / 150 test cases, quiz geometry; ``oracle_macro_f1``), on the volumes alone about
  chance.

Truth features (``truth_features.csv``: ``Names,split,Subtype,`` then the features), measured on each written
image and its true mask: lesion_ml, pancreas_ml (labels 1+2), lesion_share_of_pancreas, lesion_mean_hu,
lesion_sd_hu, rim_mean_hu (up to 2 voxel steps outside the lesion, inside the pancreas), parenchyma_mean_hu
and parenchyma_sd_hu (the pancreas minus the lesion). Names is the mask's file name, split train, validation
or test.
"""
import argparse
import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import SimpleITK as sitk

from multitask_nnunet.io.class_csv import GROUND_TRUTH_CSV, write_case_classes
from multitask_nnunet.conversion.staging import staged_folder
from multitask_nnunet.errors import InputError

SPACING = (0.75, 0.75, 2.0)         # mm, SimpleITK order (x, y, z)
MM_PER_VOXEL = np.array(SPACING[::-1])  # numpy order (z, y, x)
BACKGROUND_HU, PANCREAS_HU, DARK_HU, BRIGHT_HU, NOISE_HU = -60, 110, 20, 220, 15
ARTIFACT = 1.52e-5                  # the size of the float noise seen in the quiz's masks
TEST_LABELS = "test_labels"



@dataclass(frozen=True)
class SyntheticLayout:
    """Sizes of one geometry; numpy order (z, y, x) throughout."""
    shape: Tuple[int, int, int]                 # voxels: the crop's typical size
    shape_jitter: Tuple[int, int, int]          # each case's crop differs by up to +-this many voxels per axis
    pancreas_axes_mm: Tuple[Tuple[float, float, float], Tuple[float, float, float]]  # semi-axes, (low, high)
    lesion_axes_mm: Tuple[float, float]         # each semi-axis uniform in [low, high]
    reference_voxels: Optional[int] = None      # if set: both ellipsoids scale by (crop voxels / this) ** (1/3),
    #                                             so their share of the crop does not depend on the crop's size


GEOMETRIES: Dict[str, SyntheticLayout] = {
    # ~15% pancreas; small enough for CPU demos and tests. Do not change: its bytes are relied upon.
    "demo": SyntheticLayout(shape=(40, 64, 64), shape_jitter=(4, 4, 4),
                     pancreas_axes_mm=((14, 15, 16), (22, 20, 20)), lesion_axes_mm=(8.0, 11.0)),
    # the quiz's proportions: pancreas ~5% of the crop (elongated along x), lesion 0.3-0.7%
    "quiz": SyntheticLayout(shape=(44, 100, 120), shape_jitter=(4, 10, 10),
                     pancreas_axes_mm=((13.5, 15.5, 31.0), (14.5, 16.5, 33.0)), lesion_axes_mm=(8.0, 9.8),
                     reference_voxels=44 * 100 * 120),
    # the quiz test images' range of sizes, quiz's structures unscaled: inference-speed benchmarks
    "quiz-sizes": SyntheticLayout(shape=(100, 150, 235), shape_jitter=(60, 70, 125),
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

DIFFICULTIES = ("easy", "hard")
DEFAULT_DIFFICULTY = "easy"

# --difficulty hard, sizes: the lesion's share of the crop is log-normal, with the quiz masks' median per class
# (classes 0, 1, 2; with K classes the medians are interpolated from the first to the last) and one spread,
# chosen so that 7% of the cases (over the three classes) fall under 0.05% of the crop, as in the quiz.
HARD_SHARE_MEDIANS = (0.0038, 0.0053, 0.0068)
HARD_SHARE_SIGMA = 1.56                 # of ln(share)
HARD_MAX_SHARE_OF_PANCREAS = 0.4        # the lesion must fit inside the pancreas: larger draws are clipped
HARD_MIN_LESION_VOXELS = 10             # smaller draws are clipped; every semi-axis is at least one voxel
HARD_AXIS_LOG_SD = 0.25                 # random axis ratios: each semi-axis times exp(N(0, this)), volume kept


@dataclass(frozen=True)
class ClassSignal:
    """A per-case value that depends on the class: ``base + step * class index``, moved by the case's own jitter
    (added, normal with sd ``jitter``; or, if ``relative``, a factor exp(N(0, jitter)))."""
    base: float
    step: float
    jitter: float
    relative: bool = False

    def draw(self, rng: np.random.Generator, class_index: int) -> float:
        value = self.base + self.step * class_index
        noise = rng.normal(0, self.jitter)
        return float(value * np.exp(noise) if self.relative else value + noise)


# --difficulty hard, appearance (HU): every signal overlaps between neighbouring classes (steps of about one
# jitter), so that no single feature separates the classes and all of them together do not quite either. Part
# of the signal lies outside the lesion: the parenchyma's mean and a rim around the lesion inside the pancreas.
HARD_SIGNALS = {
    "lesion_hu": ClassSignal(base=40, step=15, jitter=13),                    # the lesion's mean
    "texture_sd_hu": ClassSignal(base=8, step=8, jitter=0.4, relative=True),  # voxel sd inside the lesion
    "parenchyma_hu": ClassSignal(base=115, step=-8, jitter=6.5),              # the rest of the pancreas
    "rim_delta_hu": ClassSignal(base=0, step=12, jitter=10),                  # the rim minus the parenchyma
}
HARD_RIM_WIDTHS = (1, 2)                # voxel steps (6-connected) around the lesion, inside the pancreas


@dataclass(frozen=True)
class HardCase:
    """What ``--difficulty hard`` draws for one case before drawing its voxels."""
    lesion_share: float                 # of the crop, before clipping to the pancreas and the voxel grid
    lesion_hu: float
    texture_sd_hu: float
    parenchyma_hu: float
    rim_delta_hu: float
    rim_width: int


def lesion_share_median(class_index: int, classes: int) -> float:
    """The median lesion share of the crop of a class (``HARD_SHARE_MEDIANS``, interpolated for ``classes``)."""
    anchors = np.linspace(0, 1, len(HARD_SHARE_MEDIANS))
    return float(np.interp(class_index / (classes - 1), anchors, HARD_SHARE_MEDIANS))


def draw_hard_case(rng: np.random.Generator, class_index: int, classes: int) -> HardCase:
    share = lesion_share_median(class_index, classes) * np.exp(rng.normal(0, HARD_SHARE_SIGMA))
    signals = {name: signal.draw(rng, class_index) for name, signal in HARD_SIGNALS.items()}
    return HardCase(lesion_share=float(share), rim_width=int(rng.choice(HARD_RIM_WIDTHS)), **signals)


# the truth features of every case (TRUTH_FEATURES_CSV), measured on the written image and the true mask;
# VOLUME_FEATURES: the shape-only ones
TRUTH_FEATURES_CSV = "truth_features.csv"
TRUTH_FEATURES = ("lesion_ml", "pancreas_ml", "lesion_share_of_pancreas", "lesion_mean_hu", "lesion_sd_hu",
                  "rim_mean_hu", "parenchyma_mean_hu", "parenchyma_sd_hu")
VOLUME_FEATURES = TRUTH_FEATURES[:3]
RIM_VOXELS = 2                          # rim_mean_hu: voxels up to this many 6-connected steps outside the lesion


def make_synthetic_dataset(out_dir, cases: int = 18, validation_cases: int = 9, test_cases: int = 6,
                           classes: int = 3, seed: int = 0, overwrite: bool = False,
                           geometry: str = DEFAULT_GEOMETRY, difficulty: str = DEFAULT_DIFFICULTY) -> Path:
    """Write the dataset described in the module docstring to ``out_dir`` and return it.

    ``geometry``: a key of ``GEOMETRIES`` (``demo``, ``quiz`` or ``quiz-sizes``, see the module docstring);
    ``difficulty``: ``easy`` or ``hard`` (``DIFFICULTIES``, see the module docstring).

    Each split is balanced over the ``classes`` classes. The folder appears complete or not at all; an
    existing non-empty ``out_dir`` is replaced only with ``overwrite``.
    """
    if geometry not in GEOMETRIES:
        raise InputError(f"--geometry {geometry}: must be one of {', '.join(GEOMETRIES)}")
    if difficulty not in DIFFICULTIES:
        raise InputError(f"--difficulty {difficulty}: must be one of {', '.join(DIFFICULTIES)}")
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
        features: List[dict] = []
        for split, count in counts.items():
            for class_index in rng.permutation(np.arange(count) % classes):
                name = f"synth_{next(numbers):03d}"
                image, labels = make_case(rng, int(class_index), classes, geometry, difficulty)
                features.append({"Names": f"{name}.nii.gz", "split": split, "Subtype": int(class_index),
                                 **truth_features(image, labels)})
                if split == "test":
                    _write(image, labels, staged / "test", staged / TEST_LABELS, name)
                    test_classes[name] = int(class_index)
                else:
                    folder = staged / split / f"subtype{class_index}"
                    _write(image, _with_artifacts(rng, labels), folder, folder, name)
        (staged / TEST_LABELS).mkdir(exist_ok=True)
        write_case_classes(staged / TEST_LABELS / GROUND_TRUTH_CSV,
                           {f"{name}.nii.gz": k for name, k in test_classes.items()})
        write_truth_features(staged / TRUTH_FEATURES_CSV, features)
    print(f"wrote {cases} train, {validation_cases} validation and {test_cases} test cases "
          f"({classes} classes, {geometry} geometry, {difficulty}) to {out_dir}")
    return out_dir


def _ellipsoid_radius(shape, center, semi_axes) -> np.ndarray:
    """Normalised ellipsoid radius per voxel: <= 1 inside."""
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    return np.sqrt(sum(((g - c) / a) ** 2 for g, c, a in zip(grid, center, semi_axes)))


def _crop_and_pancreas(rng: np.random.Generator, geometry: SyntheticLayout):
    """(crop shape, scale of the structures, pancreas semi-axes and centre in voxels), drawn as both
    difficulties do."""
    jitter = np.array(geometry.shape_jitter)
    shape = tuple(int(n) for n in np.array(geometry.shape) + rng.integers(-jitter, jitter + 1))
    scale = 1.0 if geometry.reference_voxels is None else (np.prod(shape) / geometry.reference_voxels) ** (1 / 3)
    pancreas_axes = rng.uniform(*geometry.pancreas_axes_mm) / MM_PER_VOXEL * scale
    pancreas_center = [rng.uniform(a + 2, n - a - 2) for a, n in zip(pancreas_axes, shape)]
    return shape, scale, pancreas_axes, pancreas_center


def _image(rng: np.random.Generator, hu: np.ndarray) -> sitk.Image:
    image = sitk.GetImageFromArray(np.rint(hu).astype(np.int16))
    image.SetSpacing(SPACING)
    image.SetOrigin(tuple(float(v) for v in np.round(rng.uniform(-10, 10, size=3) + (-100, -120, 500), 3)))
    return image


def _make_case(rng: np.random.Generator, class_index: int, geometry: SyntheticLayout) -> Tuple[sitk.Image, np.ndarray]:
    """An easy case: the lesion's look alone tells the class (``LESION_APPEARANCES``)."""
    shape, scale, pancreas_axes, pancreas_center = _crop_and_pancreas(rng, geometry)
    lesion_axes = rng.uniform(*geometry.lesion_axes_mm, size=3) / MM_PER_VOXEL * scale
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
    return _image(rng, hu), labels


def _make_hard_case(rng: np.random.Generator, class_index: int, classes: int,
                    geometry: SyntheticLayout) -> Tuple[sitk.Image, np.ndarray]:
    """A hard case (``HardCase``): a log-normal lesion size with random axis ratios, inside the pancreas, and a
    class that shows, overlapping with its neighbours', in the lesion's mean and texture, in its rim and in the
    parenchyma."""
    shape, _, pancreas_axes, pancreas_center = _crop_and_pancreas(rng, geometry)
    case = draw_hard_case(rng, class_index, classes)
    pancreas_voxels = 4 / 3 * np.pi * np.prod(pancreas_axes)
    lesion_voxels = np.clip(case.lesion_share * np.prod(shape), HARD_MIN_LESION_VOXELS,
                            HARD_MAX_SHARE_OF_PANCREAS * pancreas_voxels)
    ratios = np.exp(rng.normal(0, HARD_AXIS_LOG_SD, size=3))
    radius_mm = (lesion_voxels * np.prod(MM_PER_VOXEL) / (4 / 3 * np.pi)) ** (1 / 3)
    lesion_axes = np.clip(radius_mm * ratios / np.prod(ratios) ** (1 / 3) / MM_PER_VOXEL, 1.0, 0.9 * pancreas_axes)
    # on a voxel centre, so that even the smallest lesion (semi-axes of one voxel) holds 7 voxels
    lesion_center = np.rint([c + rng.uniform(-0.5, 0.5) * (p - l)
                             for c, p, l in zip(pancreas_center, pancreas_axes, lesion_axes)])
    in_pancreas = _ellipsoid_radius(shape, pancreas_center, pancreas_axes) <= 1
    in_lesion = in_pancreas & (_ellipsoid_radius(shape, lesion_center, lesion_axes) <= 1)
    in_rim = _around(in_lesion, case.rim_width) & in_pancreas

    labels = in_pancreas.astype(np.uint8)
    labels[in_lesion] = 2
    hu = np.full(shape, BACKGROUND_HU, dtype=np.float64)
    hu[in_pancreas] = case.parenchyma_hu
    hu[in_rim] = case.parenchyma_hu + case.rim_delta_hu
    hu[in_lesion] = case.lesion_hu + rng.normal(0, case.texture_sd_hu, size=int(in_lesion.sum()))
    hu += rng.normal(0, NOISE_HU, size=shape)
    return _image(rng, hu), labels


def _around(region: np.ndarray, steps: int) -> np.ndarray:
    """The voxels up to ``steps`` 6-connected steps outside ``region``."""
    from scipy.ndimage import binary_dilation, generate_binary_structure
    return binary_dilation(region, generate_binary_structure(3, 1), iterations=steps) & ~region


def make_case(rng: np.random.Generator, class_index: int, classes: int = 3, geometry: str = DEFAULT_GEOMETRY,
              difficulty: str = DEFAULT_DIFFICULTY) -> Tuple[sitk.Image, np.ndarray]:
    """One case as ``make_synthetic_dataset`` draws it (image, uint8 labels), without writing it."""
    if difficulty == "hard":
        return _make_hard_case(rng, class_index, classes, GEOMETRIES[geometry])
    return _make_case(rng, class_index, GEOMETRIES[geometry])


def truth_features(image: sitk.Image, labels: np.ndarray) -> Dict[str, float]:
    """``TRUTH_FEATURES`` of one case, measured on its image (HU) and true labels (1 pancreas, 2 lesion).

    Volumes in ml; lesion_share_of_pancreas: lesion / whole pancreas (lesion included); rim: up to
    ``RIM_VOXELS`` 6-connected steps outside the lesion, inside the pancreas; parenchyma: the pancreas minus the
    lesion. A mean or sd over no voxel is NaN."""
    hu = sitk.GetArrayFromImage(image).astype(np.float64)
    ml_per_voxel = float(np.prod(image.GetSpacing())) / 1000
    lesion, pancreas = labels == 2, labels > 0
    rim = _around(lesion, RIM_VOXELS) & pancreas
    parenchyma = pancreas & ~lesion

    def mean(region):
        return float(hu[region].mean()) if region.any() else float("nan")

    def sd(region):
        return float(hu[region].std()) if region.any() else float("nan")

    return {"lesion_ml": lesion.sum() * ml_per_voxel, "pancreas_ml": pancreas.sum() * ml_per_voxel,
            "lesion_share_of_pancreas": lesion.sum() / max(int(pancreas.sum()), 1),
            "lesion_mean_hu": mean(lesion), "lesion_sd_hu": sd(lesion), "rim_mean_hu": mean(rim),
            "parenchyma_mean_hu": mean(parenchyma), "parenchyma_sd_hu": sd(parenchyma)}


def write_truth_features(path: Path, rows: List[dict]) -> None:
    """``rows`` (Names, split, Subtype and ``TRUTH_FEATURES``) as a CSV, sorted by name."""
    header = ["Names", "split", "Subtype", *TRUTH_FEATURES]
    lines = [",".join(header)]
    for row in sorted(rows, key=lambda r: r["Names"]):
        lines.append(",".join([row["Names"], row["split"], str(int(row["Subtype"]))] +
                              [f"{float(row[f]):.6f}" for f in TRUTH_FEATURES]))
    Path(path).write_text("\n".join(lines) + "\n")


def read_truth_features(path: Path) -> List[dict]:
    """The rows of a ``TRUTH_FEATURES_CSV``: Names and split as text, Subtype as int, the features as floats."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    missing = [c for c in ("Names", "split", "Subtype", *TRUTH_FEATURES) if rows and c not in rows[0]]
    if not rows or missing:
        raise InputError(f"{path}: expected a header Names,split,Subtype,{','.join(TRUTH_FEATURES)} and rows"
                         + (f"; missing {', '.join(missing)}" if missing else ""))
    return [{"Names": r["Names"], "split": r["split"], "Subtype": int(r["Subtype"]),
             **{f: float(r[f]) for f in TRUTH_FEATURES}} for r in rows]


def oracle_macro_f1(train: List[dict], test: List[dict], features=TRUTH_FEATURES) -> float:
    """Macro-F1 on ``test`` of a logistic regression fitted on ``train`` (rows of truth features with their
    Subtype): how well the true masks' measurable features tell the classes, a reference for what a model that
    segments perfectly can reach from such features. Standardised features, balanced class weights, fixed seed;
    a missing value (NaN) takes the training median."""
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def matrix(rows):
        return np.array([[r[f] for f in features] for r in rows], dtype=float), np.array([r["Subtype"] for r in rows])

    x_train, y_train = matrix(train)
    x_test, y_test = matrix(test)
    model = make_pipeline(SimpleImputer(strategy="median"), StandardScaler(),
                          LogisticRegression(class_weight="balanced", max_iter=1000, random_state=0))
    model.fit(x_train, y_train)
    return float(f1_score(y_test, model.predict(x_test), average="macro"))


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
    p.add_argument("--difficulty", choices=list(DIFFICULTIES), default=DEFAULT_DIFFICULTY,
                   help="easy: the lesion's look alone tells the class, unmistakably; hard: overlapping classes "
                        "as in the quiz (log-normal lesion sizes, lesion mean, texture, rim and parenchyma "
                        "shifted by class with per-case spread), meant for --geometry quiz "
                        f"(default: {DEFAULT_DIFFICULTY})")
    p.add_argument("--overwrite", action="store_true", help="replace DIR if it exists and is not empty")
    p.set_defaults(func=_run)


def _run(args) -> None:
    make_synthetic_dataset(args.output, cases=args.cases, validation_cases=args.validation_cases,
                           test_cases=args.test_cases, classes=args.classes, seed=args.seed,
                           overwrite=args.overwrite, geometry=args.geometry, difficulty=args.difficulty)
