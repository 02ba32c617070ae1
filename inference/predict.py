"""``python inference/predict.py -i TEST_DIR -o OUT_DIR -m MODEL_DIR ...``: the same as
``multitask-nnunet predict`` (see ``multitask_nnunet/inference/batch.py``), runnable from a checkout."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, when the package is not installed

from multitask_nnunet.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["predict", *sys.argv[1:]]))
