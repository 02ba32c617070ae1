"""Convert the pancreas quiz data to an nnU-Net v2 dataset with subtype labels.

The quiz's masks hold 1 = pancreas and 2 = lesion; they are trained as the nested regions whole pancreas
(1 + 2) and lesion (2), as in nnU-Net's BraTS setup. Everything else is ``multitask-nnunet convert``.

    python dataset_conversion/convert_pancreas_quiz.py -i data -d 501 [-n PancreasQuiz] [--folds K] [--overwrite]

``data`` holds train/subtype{0,1,2}/, validation/subtype{0,1,2}/ and test/ as distributed with the quiz.
"""
import argparse
import sys
from pathlib import Path

from multitask_nnunet.console import our_command
from multitask_nnunet.conversion.convert import convert_dataset
from multitask_nnunet.io.labels import LabelSpec
from multitask_nnunet.errors import InputError

PANCREAS_LABELS = LabelSpec({"background": 0, "whole_pancreas": [1, 2], "pancreas_lesion": 2},
                            regions_class_order=[1, 2])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-i", "--input", required=True, type=Path, help="the quiz's data folder")
    parser.add_argument("-d", "--dataset-id", required=True, type=int, help="nnU-Net dataset id")
    parser.add_argument("-n", "--name", default="PancreasQuiz", help="dataset name (PancreasQuiz)")
    parser.add_argument("--folds", type=int, default=1,
                        help="1: fold 0 = the quiz's train/validation split (default); K>1: K stratified folds")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset with this id")
    args = parser.parse_args(argv)
    try:
        with our_command(parser.prog):
            convert_dataset(args.input, args.dataset_id, args.name, labels=PANCREAS_LABELS, folds=args.folds,
                            overwrite=args.overwrite)
    except InputError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
