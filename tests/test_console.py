"""What our commands show on the terminal (console.py): the frameworks' known chatter is kept off it, through
the same code path the demo runs stock nnU-Net commands with; nnU-Net's log file keeps every line.

The child below is real nnU-Net: its trainer lookup for our trainer (through nnUNet_extTrainer, importing every
nnU-Net trainer module, which raises torch's torch.jit FutureWarning) and its trainer's ``print_to_log_file``,
which prints the two hiddenlayer lines of every training start. ``multitask-nnunet predict`` is checked on
the trained model in test_inference.py."""
import subprocess
import sys

from cli import run

NNUNET_CHILD = """
import sys
from types import SimpleNamespace
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
recursive_find_trainer_class_by_name('MultitasknnUNetTrainer_Demo')
trainer = SimpleNamespace(local_rank=0, log_file=sys.argv[1])   # what print_to_log_file uses of a trainer
nnUNetTrainer.print_to_log_file(trainer, 'Unable to plot network architecture:')
nnUNetTrainer.print_to_log_file(trainer, ModuleNotFoundError("No module named 'hiddenlayer'"))
nnUNetTrainer.print_to_log_file(trainer, 'Epoch', 0)
print('progress 50%', end='\\r', flush=True)
print('last line, unfinished', end='')
"""

DEMO_RUN = """
import sys
from multitask_nnunet.console import python_warnings_setting
from multitask_nnunet.demo import _run
from multitask_nnunet.registration import environment_with_trainers
env = environment_with_trainers()
env['PYTHONWARNINGS'] = python_warnings_setting(env.get('PYTHONWARNINGS', ''))
_run([sys.executable, sys.argv[1], sys.argv[2]], env)
"""

CHATTER = ("not found in nnunetv2.training.nnUNetTrainer", "Searching in", "Inspecting module", "Found class",
           "Using trainer", "Unable to plot network architecture", "hiddenlayer", "torch.jit")


def test_demo_keeps_nnunet_chatter_off_the_terminal_but_not_out_of_the_log(tmp_path):
    from multitask_nnunet.registration import environment_with_trainers
    raw_log, log, child = tmp_path / "raw_log.txt", tmp_path / "log.txt", tmp_path / "child.py"
    child.write_text(NNUNET_CHILD)
    # the child alone, and the child through the demo's filter, at once
    unfiltered = subprocess.Popen([sys.executable, str(child), str(raw_log)], env=environment_with_trainers(),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    shown = run([sys.executable, "-c", DEMO_RUN, str(child), str(log)], {}, timeout=1200)
    raw_output = "".join(unfiltered.communicate(timeout=1200))
    for chatter in CHATTER:  # the child really is this chatty
        assert chatter in raw_output, chatter

    echo, child_output = shown.stdout.split("\n", 1)
    assert echo == f"+ {sys.executable} {child} {log}"
    for chatter in CHATTER:
        assert chatter not in child_output + shown.stderr, chatter
    lines = child_output.split("\n")  # text mode: the progress bar's "\r" reads as a line end too
    assert lines[0].endswith(": Epoch 0") and lines[1:] == ["progress 50%", "last line, unfinished"]
    assert "No module named 'hiddenlayer'" in log.read_text() and "Epoch 0" in log.read_text()
