"""The demo's verdict on its own run (``health_report``); the demo itself is the whole pipeline, measured by
hand (README, TechReport 6.4), not run in the suite."""
import pytest

from multitask_nnunet.demo import HEALTHY, health_report
from multitask_nnunet.errors import InputWarning


def test_healthy_run_passes_quietly_and_a_weak_one_is_named(recwarn):
    floors = {keys[-1]: floor for keys, _, floor, _ in HEALTHY}
    healthy = {"dice": {"foreground": floors["foreground"] + 0.05, "label_2": floors["label_2"] + 0.05},
               "macro_f1": floors["macro_f1"] + 0.05}   # evaluate's schema
    lines = health_report(healthy)
    assert len(lines) == 1 + len(HEALTHY) and not [w for w in recwarn if w.category is InputWarning]

    weak = {"dice": {**healthy["dice"], "label_2": 0.2}, "macro_f1": None}
    with pytest.warns(InputWarning) as caught:
        health_report(weak)
    messages = sorted(str(w.message) for w in caught)
    assert len(messages) == 2
    assert messages[0].startswith("Dice, lesion (label 2) is 0.200, clearly below healthy demo runs")
    assert messages[1].startswith("macro-F1 (6 test cases) is n/a, clearly below healthy demo runs")
