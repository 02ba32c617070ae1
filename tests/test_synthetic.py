"""``multitask-nnunet make-synthetic``: layout, determinism and refusal to overwrite, through the real CLI."""
import csv
import hashlib
import subprocess
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from cli import ours, run



def make_synthetic(out: Path, *extra) -> subprocess.CompletedProcess:
    return run(ours("make-synthetic", "-o", out, "--cases", "4", "--validation-cases", "2", "--test-cases", "2",
                    "--classes", "2", *extra), {}, check=False)


def hashes(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_layout_and_content(tmp_path):
    out = tmp_path / "data"
    assert make_synthetic(out, "--seed", "1").returncode == 0
    assert sorted(p.name for p in out.iterdir()) == ["test", "test_labels", "train", "validation"]
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
