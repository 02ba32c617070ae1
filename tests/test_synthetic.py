"""``multitask-nnunet make-synthetic``: layout, determinism and refusal to overwrite, through the real CLI; the
hard difficulty's size spread, truth features and oracle."""
import csv
import hashlib
import subprocess
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from cli import ours, run
from multitask_nnunet.conversion import synthetic
from multitask_nnunet.io.nifti import read_label_map



def make_synthetic(out: Path, *extra) -> subprocess.CompletedProcess:
    return run(ours("make-synthetic", "-o", out, "--cases", "4", "--validation-cases", "2", "--test-cases", "2",
                    "--classes", "2", *extra), {}, check=False)


def hashes(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_layout_and_content(tmp_path):
    out = tmp_path / "data"
    assert make_synthetic(out, "--seed", "1").returncode == 0
    assert sorted(p.name for p in out.iterdir()) == ["test", "test_labels", "train", "truth_features.csv",
                                                     "validation"]
    for split, count in (("train", 4), ("validation", 2)):
        assert sorted(p.name for p in (out / split).iterdir()) == ["subtype0", "subtype1"]
        for k in (0, 1):
            images = sorted((out / split / f"subtype{k}").glob("*_0000.nii.gz"))
            assert len(images) == count // 2
            for image_path in images:
                image = sitk.ReadImage(str(image_path))
                mask = sitk.ReadImage(str(image_path).replace("_0000.nii.gz", ".nii.gz"))
                values = sitk.GetArrayFromImage(mask)
                assert sitk.GetArrayFromImage(image).dtype == np.int16 and values.dtype == np.float32
                assert (image.GetSize(), image.GetSpacing(), image.GetOrigin()) == \
                    (mask.GetSize(), mask.GetSpacing(), mask.GetOrigin())
                assert image.GetSpacing() == (0.75, 0.75, 2.0)
                assert np.abs(values - np.rint(values)).max() > 1e-6           # float artifacts present
                assert np.abs(values - np.rint(values)).max() < 1e-3           # but clearly labels
                assert set(np.unique(np.rint(values))) == {0, 1, 2}

    test_images = sorted(p.name for p in (out / "test").iterdir())
    assert len(test_images) == 2 and all(n.endswith("_0000.nii.gz") for n in test_images)
    with open(out / "test_labels" / "classes.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["Names"] for r in rows) == sorted(n.replace("_0000", "") for n in test_images)
    assert sorted(r["Subtype"] for r in rows) == ["0", "1"]
    for row in rows:
        assert (out / "test_labels" / row["Names"]).is_file()


def test_same_seed_same_bytes(tmp_path):
    for name, seed in (("a", "5"), ("b", "5"), ("c", "6")):
        assert make_synthetic(tmp_path / name, "--seed", seed).returncode == 0
    assert hashes(tmp_path / "a") == hashes(tmp_path / "b")
    assert hashes(tmp_path / "a") != hashes(tmp_path / "c")


def test_refuses_non_empty_folder_without_overwrite(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = make_synthetic(out)
    assert result.returncode == 1
    assert "not empty" in result.stderr and "--overwrite" in result.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["data"]          # no staging folder left behind

    assert make_synthetic(out, "--overwrite").returncode == 0
    assert not (out / "keep.txt").exists() and (out / "train").is_dir()


def test_bad_class_count(tmp_path):
    result = make_synthetic(tmp_path / "data", "--classes", "9")
    assert result.returncode == 1 and "--classes 9" in result.stderr
    assert not (tmp_path / "data").exists()


def test_quiz_geometry_proportions(tmp_path):
    """--geometry quiz: crops, pancreas and lesion in the real quiz's proportions, for every case of every split."""
    out = tmp_path / "data"
    result = run(ours("make-synthetic", "-o", out, "--geometry", "quiz", "--cases", "3", "--validation-cases", "0",
                      "--test-cases", "3", "--seed", "4"), {}, check=False)
    assert result.returncode == 0, result.stderr
    masks = [p for p in sorted(out.glob("train/subtype*/*.nii.gz")) + sorted((out / "test_labels").glob("*.nii.gz"))
             if not p.name.endswith("_0000.nii.gz")]
    assert len(masks) == 6
    for path in masks:
        mask = sitk.ReadImage(str(path))
        labels = np.rint(sitk.GetArrayFromImage(mask)).astype(np.uint8)
        z, y, x = labels.shape
        assert 40 <= z <= 48 and 90 <= y <= 110 and 110 <= x <= 130, (path.name, labels.shape)
        assert mask.GetSpacing() == (0.75, 0.75, 2.0)
        pancreas, lesion = (labels > 0).mean(), (labels == 2).mean()
        assert 0.04 <= pancreas <= 0.06, (path.name, pancreas)                 # about 5%
        assert 0.003 <= lesion <= 0.007, (path.name, lesion)
        lesion_voxels = np.argwhere(labels == 2)
        assert lesion_voxels.min(axis=0).tolist() > [0, 0, 0]                   # away from the crop's border
        assert (lesion_voxels.max(axis=0) < np.array(labels.shape) - 1).all()


def test_quiz_sizes_geometry(tmp_path):
    """--geometry quiz-sizes: crops within the quiz test images' sizes, with quiz's structures at quiz's own size
    whatever the crop (so that a model trained on --geometry quiz segments them)."""
    out = tmp_path / "data"
    result = run(ours("make-synthetic", "-o", out, "--geometry", "quiz-sizes", "--cases", "3", "--validation-cases",
                      "0", "--test-cases", "3", "--seed", "1"), {}, check=False)
    assert result.returncode == 0, result.stderr
    shapes = []
    for path in sorted((out / "test_labels").glob("*.nii.gz")):
        labels = np.rint(sitk.GetArrayFromImage(sitk.ReadImage(str(path)))).astype(np.uint8)
        z, y, x = labels.shape
        assert 40 <= z <= 160 and 80 <= y <= 220 and 110 <= x <= 360, (path.name, labels.shape)
        shapes.append(labels.shape)
        # quiz's pancreas: ~5% of a 44 x 100 x 120 crop, in voxels, whatever this crop's size
        assert 0.6 <= (labels > 0).sum() / (0.05 * 44 * 100 * 120) <= 1.4, path.name
        assert (labels == 2).sum() > 0
    assert len(set(shapes)) == 3


def content_digest(folder: Path, leave_out=(synthetic.TRUTH_FEATURES_CSV,)) -> str:
    """One digest of a dataset's content: voxel values, dtypes and grids of the images and masks (not their gzip
    bytes, which depend on the zlib build) and the other files' bytes."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in leave_out):
        digest.update(str(path.relative_to(folder)).encode())
        if path.name.endswith(".nii.gz"):
            image = sitk.ReadImage(str(path))
            values = sitk.GetArrayFromImage(image)
            digest.update(repr((values.dtype.str, values.shape, image.GetSpacing(), image.GetOrigin(),
                                image.GetDirection())).encode())
            digest.update(np.ascontiguousarray(values).tobytes())
        else:
            digest.update(path.read_bytes())
    return digest.hexdigest()


def test_easy_content_unchanged(tmp_path):
    """The default difficulty (easy) writes what it always wrote: the demo and the tests rely on it."""
    assert make_synthetic(tmp_path / "demo", "--seed", "5", "--difficulty", "easy").returncode == 0
    assert content_digest(tmp_path / "demo") == "50b0f42cb578ffc6056e71dddf1e89c0d1962c600b60df6add8cca372c3eb585"
    run(ours("make-synthetic", "-o", tmp_path / "quiz", "--geometry", "quiz", "--cases", "3", "--validation-cases",
             "0", "--test-cases", "1", "--seed", "4"), {})
    assert content_digest(tmp_path / "quiz") == "0df00d08df7a3b2f2cb8e776a58dca93754cd9cea92b76841136d06891bc4f78"


def test_hard_lesion_share_spread():
    """Hard lesion sizes: log-normal share of the crop with the quiz's median per class and about 7% of the
    cases under 0.05% of the crop; K classes interpolate the medians."""
    rng = np.random.default_rng(0)
    shares = np.array([[synthetic.draw_hard_case(rng, k, 3).lesion_share for k in range(3)] for _ in range(20000)])
    assert np.allclose(np.median(shares, axis=0), [0.0038, 0.0053, 0.0068], rtol=0.05)
    assert 0.06 <= (shares < 0.0005).mean() <= 0.08
    assert (shares > 0.02).mean() > 0.1                                # a long tail, clipped to the pancreas later
    assert [synthetic.lesion_share_median(k, 2) for k in range(2)] == [0.0038, 0.0068]
    assert np.allclose([synthetic.lesion_share_median(k, 4) for k in range(4)], [0.0038, 0.0048, 0.0058, 0.0068])


def test_hard_truth_features_match_masks(tmp_path):
    """--difficulty hard: quiz layout and mask artifacts as easy, the same bytes for the same seed, and
    truth_features.csv holds every case of every split, as measured on its mask and image."""
    def make(out):
        return run(ours("make-synthetic", "-o", out, "--geometry", "quiz", "--difficulty", "hard", "--cases", "6",
                        "--validation-cases", "3", "--test-cases", "3", "--seed", "2"), {}, check=False)
    out = tmp_path / "data"
    for folder in (out, tmp_path / "again"):
        assert make(folder).returncode == 0
    assert hashes(out) == hashes(tmp_path / "again")

    rows = synthetic.read_truth_features(out / synthetic.TRUTH_FEATURES_CSV)
    assert sorted((r["split"], r["Subtype"]) for r in rows) == sorted(
        [("train", k) for k in (0, 0, 1, 1, 2, 2)] + [(s, k) for s in ("validation", "test") for k in (0, 1, 2)])
    assert len({r["Names"] for r in rows}) == 12
    ml_per_voxel = 0.75 * 0.75 * 2.0 / 1000
    for row in rows:
        folder = out / synthetic.TEST_LABELS if row["split"] == "test" else \
            out / row["split"] / f"subtype{row['Subtype']}"
        mask_path = folder / row["Names"]
        image_path = (out / "test" if row["split"] == "test" else folder) / row["Names"].replace(".nii.gz",
                                                                                              "_0000.nii.gz")
        if row["split"] != "test":                                       # float masks with the quiz's artifacts
            values = sitk.GetArrayFromImage(sitk.ReadImage(str(mask_path)))
            assert values.dtype == np.float32 and np.abs(values - np.rint(values)).max() > 1e-6
        labels = read_label_map(mask_path)
        image = sitk.GetArrayFromImage(sitk.ReadImage(str(image_path))).astype(float)
        lesion = labels == 2
        assert lesion.sum() >= 7
        assert np.isclose(row["lesion_ml"], lesion.sum() * ml_per_voxel, atol=1e-6)
        assert np.isclose(row["pancreas_ml"], (labels > 0).sum() * ml_per_voxel, atol=1e-6)
        assert np.isclose(row["lesion_share_of_pancreas"], lesion.sum() / (labels > 0).sum(), atol=1e-6)
        assert np.isclose(row["lesion_mean_hu"], image[lesion].mean(), atol=1e-5)
        assert np.isclose(row["parenchyma_mean_hu"], image[labels == 1].mean(), atol=1e-5)
        assert row["lesion_share_of_pancreas"] <= synthetic.HARD_MAX_SHARE_OF_PANCREAS + 0.02
        assert not np.isnan([row[f] for f in synthetic.TRUTH_FEATURES]).any()


def test_hard_oracle_between_chance_and_one():
    """The truth features of hard quiz cases tell the class often but not always: a logistic regression trained
    on 150 cases scores a macro-F1 on 150 others well above chance (1/3) and below 1; the volumes alone much
    less. Cases drawn as make-synthetic draws them, without writing them."""
    rng = np.random.default_rng(11)
    rows = [{"Subtype": int(k), **synthetic.truth_features(*synthetic.make_case(rng, int(k), 3, "quiz", "hard"))}
            for k in rng.permutation(np.arange(300) % 3)]
    full = synthetic.oracle_macro_f1(rows[:150], rows[150:])
    volumes = synthetic.oracle_macro_f1(rows[:150], rows[150:], synthetic.VOLUME_FEATURES)
    assert 0.7 <= full <= 0.95, full
    assert volumes < full - 0.2, (volumes, full)
