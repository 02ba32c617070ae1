"""Our methods that follow nnU-Net's step for step (``multitask_nnunet.nnunet_copies``) still match the installed
nnU-Net: a changed method of nnU-Net's fails here, naming our copy to review."""
import importlib

import pytest

from multitask_nnunet.nnunet_copies import FOLLOWED, NNUNET_VERSION, fingerprint

MODULES = ["multitask_nnunet.training.trainer", "multitask_nnunet.inference.predictor",
           "multitask_nnunet.inference.export"]
for module in MODULES:
    importlib.import_module(module)


def test_the_copies_are_registered():
    names = {name.rsplit(".", 1)[-1] for name in FOLLOWED}
    assert {"train_step", "validation_step", "save_checkpoint", "load_checkpoint", "perform_actual_validation",
            "_mirror_and_predict", "_predict_sliding", "map_in_input_geometry"} <= names


@pytest.mark.parametrize("ours", sorted(FOLLOWED))
def test_nnunet_method_unchanged(ours):
    theirs, expected = FOLLOWED[ours]
    found = fingerprint(theirs)
    assert found == expected, (
        f"nnU-Net's {theirs.__qualname__} changed since nnunetv2 {NNUNET_VERSION} (fingerprint {found}, expected "
        f"{expected}): review {ours} against nnU-Net's new code, then update its @follows fingerprint")


def test_fingerprint_sees_code_not_layout(tmp_path, monkeypatch):
    """Blank lines, comments and indentation do not count; a changed statement does."""
    sources = {"same": "def f(x):\n    return x + 1\n",
               "layout": "def f(x):\n\n    # a comment\n    return x + 1\n",
               "changed": "def f(x):\n    return x + 2\n"}
    monkeypatch.syspath_prepend(str(tmp_path))
    prints = {}
    for name, source in sources.items():
        (tmp_path / f"fp_{name}.py").write_text(source)
        prints[name] = fingerprint(importlib.import_module(f"fp_{name}").f)
    assert prints["same"] == prints["layout"] != prints["changed"]
