"""Where the saliency lies: for each saliency method and encoder stage, the share of the map's mass inside the
dilated ground-truth structure (the lesion by default), over the correctly classified cases of a labelled test
folder, next to the guided head's pooling weights (issue 11's goal: most of the mass, >= 50%).

Runs the one-case predictor (``CasePredictor``, as ``multitask-nnunet predict --saliency``) in this process:
the maps are the ones ``predict`` writes, in the input's geometry.

Usage: python benchmarks/saliency_localisation.py -m MODEL_DIR -i IMAGES -l LABELS [--label 2] [--dilate 2]
           [--stages 0 1 2 3 4] [--methods gradcam hirescam] [--device cpu] [--json OUT]
LABELS holds ``<case>.nii.gz`` label maps and ``classes.csv`` (``Names,Subtype``), as make-synthetic's
``test_labels/``.
"""
import argparse
import glob
import json
import os
import sys
import time

import numpy as np


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", required=True, help="model folder (Trainer__Plans__configuration)")
    p.add_argument("-i", required=True, help="test images (nnU-Net naming, one channel)")
    p.add_argument("-l", required=True, help="label maps and classes.csv of the test images")
    p.add_argument("--label", type=int, default=None, help="the structure's label (default: the highest)")
    p.add_argument("--dilate", type=int, default=2, help="dilation of the structure, in voxels (default 2)")
    p.add_argument("--stages", type=int, nargs="+", default=None, help="encoder stages (default: all)")
    p.add_argument("--methods", nargs="+", default=None, help="saliency methods (default: all)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", help="write the per-case shares here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from scipy.ndimage import binary_dilation

    from multitask_nnunet.io.class_csv import GROUND_TRUTH_CSV, read_case_classes
    from multitask_nnunet.inference.case_predictor import CasePredictor
    from multitask_nnunet.inference.options import SALIENCY_METHODS, PredictorOptions
    from multitask_nnunet.io.nifti import read_label_map

    images = sorted(glob.glob(os.path.join(args.i, "*_0000.nii.gz")))
    truth = read_case_classes(os.path.join(args.l, GROUND_TRUTH_CSV))
    regions = {}
    for image in images:
        case = os.path.basename(image)[:-len("_0000.nii.gz")]
        labels = read_label_map(os.path.join(args.l, case + ".nii.gz"))
        label = args.label if args.label is not None else int(labels.max())
        regions[case] = binary_dilation(labels == label, iterations=args.dilate)

    methods = args.methods or list(SALIENCY_METHODS)
    probe = CasePredictor(args.m, PredictorOptions(device=args.device))
    stages = args.stages if args.stages is not None else list(range(len(probe.predictor._module().encoder.strides)))
    del probe

    def share(values, region):
        total = float(values.sum())
        return float(values[region].sum()) / total if total > 0 else float("nan")

    results, pooling = {}, {}
    for method in methods:
        for stage in stages:
            predictor = CasePredictor(args.m, PredictorOptions(device=args.device, saliency=True, saliency_stage=stage,
                                                                saliency_method=method))
            t = time.perf_counter()
            shares = {}
            for image in images:
                case = os.path.basename(image)[:-len("_0000.nii.gz")]
                result = predictor.predict_case([image])
                if result.class_index != truth[case]:
                    continue
                shares[case] = share(result.saliency, regions[case])
                if result.pooling_weights is not None:
                    pooling[case] = share(result.pooling_weights, regions[case])
            results[f"{method}@{stage}"] = shares
            values = np.array(list(shares.values()))
            print(f"{method:9s} stage {stage}: {len(values)} correct cases, share in the dilated structure median "
                  f"{np.median(values):.3f} (min {values.min():.3f}, max {values.max():.3f}); "
                  f"{time.perf_counter() - t:.1f} s", flush=True)
    if pooling:
        values = np.array(list(pooling.values()))
        print(f"pooling weights: median {np.median(values):.3f} (min {values.min():.3f}, max {values.max():.3f})")
    share_of_volume = [float(r.mean()) for r in regions.values()]
    print(f"the dilated structure is {min(share_of_volume):.3%} to {max(share_of_volume):.3%} of each volume")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"saliency": results, "pooling": pooling, "region_share_of_volume": share_of_volume}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
