"""The label specs of io/labels.py against nnU-Net's own ``LabelManager``."""
import subprocess
import sys

import pytest
from nnunetv2.utilities.label_handling.label_handling import LabelManager

from multitask_nnunet.io.labels import DEFAULT_LABELS, LabelSpec

SPECS = [
    DEFAULT_LABELS,
    DEFAULT_LABELS.with_ignore(),
    LabelSpec({"background": 0, "pancreas": 1, "lesion": 2}),
    LabelSpec({"background": 0, "pancreas": 1, "lesion": 2, "ignore": 3}),
    LabelSpec({"background": 0, "kidney": [1, 2, 3], "tumour": [2, 3], "cyst": 3}, [1, 2, 3]),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: ",".join(s.labels))
def test_mask_values_are_those_nnunet_reads(spec):
    manager = LabelManager(label_dict=spec.labels, regions_class_order=spec.regions_class_order)
    ignore = [manager.ignore_label] if manager.has_ignore_label else []
    assert spec.values == sorted({*map(int, manager.all_labels), *ignore})
    if spec.regions_class_order:
        assert manager.has_regions


def test_checking_input_does_not_import_torch():
    """Conversion and evaluation refuse bad input before nnU-Net's torch-based label handling is imported."""
    code = ("import sys, multitask_nnunet.conversion.convert, multitask_nnunet.evaluation.evaluate; "
            "from multitask_nnunet.io.labels import DEFAULT_LABELS; DEFAULT_LABELS.with_ignore().values; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
