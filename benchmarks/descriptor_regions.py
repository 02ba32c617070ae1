"""Where the head should read its descriptors: ``SegGuidedHead``'s regions compared on fixed masks.

The descriptor branch of ``SegGuidedHead`` is a logistic regression on what ``describe`` measures in the
predicted structures. This benchmark measures those descriptors on masks that are already there (a trained
model's predictions, or the true masks), once per region setting of the head (``interior`` off: the whole
predicted structures; on: their interiors), fits the oracle's logistic regression
(``synthetic.oracle_macro_f1``: standardised, balanced, C = 1) on the training cases and scores macro-F1 on the
test cases. With one model's masks for both it isolates the regions from the training: the same segmentation,
two ways to read it. It also scores the model's own class (``--classes``: its ``subtype_results.csv``) and the
truth oracle on the same cases.

    python benchmarks/descriptor_regions.py --data DATA/synthetic --train-masks TRAIN_PRED --test DIR/synthetic \
        --test-masks TEST_PRED [--classes TEST_PRED/subtype_results.csv]

``--data``: make-synthetic's folder of the training cases (``truth_features.csv``, ``train/``); ``--test``:
the folder of the test cases (the benchmark's pool, ``pool_*/synthetic``, or the same as ``--data``);
``--train-masks``/``--test-masks``: flat folders of label maps named as the cases (``synth_NNN.nii.gz``), e.g.
``multitask-nnunet predict`` on the training images with the model's defaults (what the head's refit reads) and
on the test images. ``truth`` for either reads the true masks. Intensities are the images' HU: the regression
standardises each descriptor, so nnU-Net's linear normalisation would give the same fit.
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from multitask_nnunet.conversion.synthetic import TEST_LABELS, oracle_macro_f1, read_truth_features
from multitask_nnunet.io.class_csv import read_case_classes
from multitask_nnunet.io.nifti import read_label_map
from multitask_nnunet.model.heads import SegGuidedHead

DESCRIPTORS = ("lesion_ml", "organ_ml", "lesion_share", "found", "lesion_mean", "lesion_sd", "rim_mean", "rim_sd",
               "parenchyma_mean", "parenchyma_sd")
INTENSITIES = DESCRIPTORS[4:]
SETTINGS = {"whole structures": {}, "interior": {"interior": True}}


def _mask(folder, source: Path, split: str, name: str) -> Path:
    if folder != "truth":
        return Path(folder) / name
    return source / TEST_LABELS / name if split == "test" else next((source / split).glob(f"*/{name}"))


def measured(source: Path, split: str, masks) -> dict:
    """``{setting: rows}``: per case of ``split``, the head's descriptors (NaN where not measured) on its mask."""
    heads = {k: SegGuidedHead([1, 1], 3, [1], [0], descriptors=True, **kw) for k, kw in SETTINGS.items()}
    out = {k: [] for k in heads}
    for row in read_truth_features(source / "truth_features.csv"):
        if row["split"] != split:
            continue
        image_name = row["Names"].replace(".nii.gz", "_0000.nii.gz")
        image_path = next(p for p in [source / split / image_name, *(source / split).glob(f"*/{image_name}")]
                          if p.is_file())
        image = torch.from_numpy(sitk.GetArrayFromImage(sitk.ReadImage(str(image_path))).astype(np.float32))
        labels = torch.from_numpy(np.asarray(read_label_map(_mask(masks, source, split, row["Names"]))).astype(np.int64))
        guide, organ = (labels == 2)[None].float(), (labels > 0)[None].float()
        for k, head in heads.items():
            regions = head.intensity_regions(guide, organ)
            values = head.describe(image[None, None], guide, organ, regions)[0].tolist()
            present = head.descriptor_presence(guide, organ, regions)[0].tolist()
            out[k].append({"Names": row["Names"], "Subtype": row["Subtype"],
                           **{d: v if p else float("nan") for d, v, p in zip(DESCRIPTORS, values, present)}})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="make-synthetic folder of the training cases")
    p.add_argument("--train-masks", required=True, help="folder of the training cases' masks, or 'truth'")
    p.add_argument("--test", type=Path, required=True, help="make-synthetic folder of the test cases")
    p.add_argument("--test-masks", required=True, help="folder of the test cases' masks, or 'truth'")
    p.add_argument("--classes", type=Path, help="the model's subtype_results.csv on the test cases")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    train, test = measured(args.data, "train", args.train_masks), measured(args.test, "test", args.test_masks)
    truth_train = [r for r in read_truth_features(args.data / "truth_features.csv") if r["split"] == "train"]
    truth_test = [r for r in read_truth_features(args.test / "truth_features.csv") if r["split"] == "test"]
    print(f"{len(train[next(iter(SETTINGS))])} train cases (masks: {args.train_masks}), "
          f"{len(truth_test)} test cases (masks: {args.test_masks})")
    print(f"truth oracle (all truth features, true masks): {oracle_macro_f1(truth_train, truth_test):.3f}")
    if args.classes:
        predicted = read_case_classes(args.classes)
        from sklearn.metrics import f1_score
        names = [r["Names"].replace(".nii.gz", "") for r in truth_test]
        print(f"the model's own class: {f1_score([r['Subtype'] for r in truth_test], [predicted[n] for n in names], average='macro'):.3f}")
    print(f"{'regions':<18} {'all descriptors':>15} {'intensities only':>16}")
    for setting in SETTINGS:
        print(f"{setting:<18} {oracle_macro_f1(train[setting], test[setting], DESCRIPTORS):>15.3f} "
              f"{oracle_macro_f1(train[setting], test[setting], INTENSITIES):>16.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
