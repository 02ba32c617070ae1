"""The sliding window's class rule at realistic patch sizes, through ``multitask-nnunet predict``."""
import csv
import json
import shutil

import numpy as np

from cli import ours, run


def test_sliding_window_classifies_with_a_realistic_patch(trained, tmp_path):
    """nnU-Net's Gaussian importance map is float16; summed in float16 it overflows to inf for patches of
    ~10^5 voxels (the quiz's 40x96x112), which once turned every class probability into NaN. The tiny test
    model's patch is smaller, so the same model is used with a realistic patch in its plans (the architecture
    does not depend on the patch size; the sliding window does)."""
    model = tmp_path / "model"
    shutil.copytree(trained.results, model)
    plans = json.loads((model / "plans.json").read_text())
    for configuration in plans["configurations"].values():
        if "patch_size" in configuration:
            configuration["patch_size"] = [40, 96, 112]
    (model / "plans.json").write_text(json.dumps(plans))
    images = tmp_path / "in"
    images.mkdir()
    for p in sorted((trained.source / "test").glob("*_0000.nii.gz"))[:1]:
        shutil.copy(p, images / p.name)
    out = tmp_path / "out"
    run(ours("predict", "-i", images, "-o", out, "-m", model, "-f", "0", "--device", "cpu", "--mode", "sliding"),
        trained.env)
    with open(out / "class_probabilities.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    probabilities = np.array([float(v) for k, v in rows[0].items() if k.startswith("prob_")])
    assert np.isfinite(probabilities).all() and abs(probabilities.sum() - 1) < 1e-4
