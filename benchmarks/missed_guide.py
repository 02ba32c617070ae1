"""Does the class survive a missed lesion? Each test case is classified twice with the same model: as
``multitask-nnunet predict`` does, and with the guide structure (the lesion by default) removed from the
segmentation the head reads, as if the network had missed it. With the guide predicted empty, the guided head
falls back to the predicted foreground (the pancreas); with ``attention`` on it can still weight the voxels of
the foreground where the class shows (multitask_nnunet/model/heads.py). The segmentation output is not changed.

Runs the one-case predictor (``CasePredictor``) in this process. The guide is removed by a forward pre-hook on
the classification head that sets the guide channels' logits to -30 (probability ~1e-13) in the head's input
only, and, for the part of a head that reads the whole case in the sliding window (``case_logits``), the same
in the stitched segmentation it is given: nothing of the package is patched.

Usage: python benchmarks/missed_guide.py -m MODEL_DIR -i IMAGES -l CLASSES_CSV [--device cpu] [--tta]
           [--json OUT]
CLASSES_CSV is ``Names,Subtype`` (make-synthetic's ``test_labels/classes.csv``).
"""
import argparse
import glob
import json
import os
import sys

import numpy as np

MISSED_LOGIT = -30.0


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", required=True, help="model folder (Trainer__Plans__configuration)")
    p.add_argument("-i", required=True, help="test images (nnU-Net naming, one channel)")
    p.add_argument("-l", required=True, help="ground-truth classes (Names,Subtype CSV)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tta", action="store_true", help="mirroring TTA (default off, as predict's default)")
    p.add_argument("--json", help="write the per-case results here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from multitask_nnunet.model import heads
    from multitask_nnunet.io.class_csv import read_case_classes
    from multitask_nnunet.evaluation.metrics import classification_metrics
    from multitask_nnunet.inference.case_predictor import CasePredictor
    from multitask_nnunet.inference.options import PredictorOptions

    truth = read_case_classes(args.l)
    images = sorted(glob.glob(os.path.join(args.i, "*_0000.nii.gz")))
    predictor = CasePredictor(args.m, PredictorOptions(device=args.device, tta=args.tta))
    head = predictor.predictor._module().classification_head
    channels = head.guide_channels
    if not channels:
        print(f"{type(head).__name__} has no guide: nothing to remove", file=sys.stderr)
        return 2
    print(f"head {type(head).__name__}, attention {getattr(head, 'attention', None) is not None}, "
          f"guide channels {list(channels)}, foreground channels {list(head.foreground_channels)}")

    def remove_guide(module, inputs):
        skips, segmentation, *rest = inputs
        segmentation = segmentation.clone()
        segmentation[:, list(channels)] = MISSED_LOGIT
        return (skips, segmentation, *rest)

    case_logits = head.case_logits

    def case_logits_without_guide(tile_logits, segmentation_logits, image):
        segmentation_logits = segmentation_logits.clone()
        segmentation_logits[:, list(channels)] = MISSED_LOGIT
        return case_logits(tile_logits, segmentation_logits, image)

    guide_labels = heads.guide_labels(predictor.predictor.label_manager, channels)
    rows = {}
    for image in images:
        case = os.path.basename(image)[:-len("_0000.nii.gz")]
        if case not in truth:
            continue
        predicted = predictor.predict_case([image])
        handle = head.register_forward_pre_hook(remove_guide)
        head.case_logits = case_logits_without_guide  # this object only, for this prediction
        try:
            missed = predictor.predict_case([image])
        finally:
            handle.remove()
            del head.case_logits
        guide_voxels = int(np.isin(predicted.segmentation, guide_labels).sum())
        rows[case] = {"truth": truth[case], "predicted": predicted.class_index, "missed": missed.class_index,
                      "p_predicted": predicted.probabilities.tolist(), "p_missed": missed.probabilities.tolist(),
                      "predicted_guide_voxels": guide_voxels}
        print(f"{case}: truth {truth[case]}, with the predicted guide {predicted.class_index} "
              f"(p {predicted.probabilities.max():.2f}), guide removed {missed.class_index} "
              f"(p {missed.probabilities.max():.2f}); guide voxels in the mask {guide_voxels}", flush=True)

    y = np.array([r["truth"] for r in rows.values()])
    names = predictor.class_names
    summary = {}
    for key in ("predicted", "missed"):
        metrics = classification_metrics(y, np.array([r[key] for r in rows.values()]), names)
        confidence = float(np.mean([max(r[f"p_{key}"]) for r in rows.values()]))
        summary[key] = {"macro_f1": metrics["macro_f1"], "accuracy": metrics["accuracy"],
                        "mean_confidence": confidence}
    print(f"{len(rows)} cases: macro-F1 {summary['predicted']['macro_f1']:.3f} with the predicted guide, "
          f"{summary['missed']['macro_f1']:.3f} with the guide removed (accuracy "
          f"{summary['predicted']['accuracy']:.3f}, {summary['missed']['accuracy']:.3f}; mean confidence "
          f"{summary['predicted']['mean_confidence']:.3f}, {summary['missed']['mean_confidence']:.3f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": os.path.abspath(args.m), "tta": args.tta, "summary": summary, "cases": rows}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
