"""What our commands show on the terminal: our warnings as one line each, and nnU-Net's and torch's known,
harmless chatter left out.

The chatter (each line below is printed by the framework on every run and means nothing is wrong):

- nnU-Net's trainer lookup first searches its own folder, prints "Trainer '...' not found in
  nnunetv2.training.nnUNetTrainer", then finds ours in ``nnUNet_extTrainer`` and prints each step of that;
- nnU-Net's predictor on a CPU: "perform_everything_on_device=True is only supported for cuda devices!";
- nnU-Net's trainer: "Unable to plot network architecture:" / "No module named 'hiddenlayer'";
- torch: "FutureWarning: `torch.jit.interface` is deprecated", raised while nnU-Net imports its trainers.

Only the terminal output of ``multitask-nnunet`` commands (and of the nnU-Net commands that ``demo`` starts)
is filtered; nnU-Net's own log files are written by nnU-Net and keep every line. Anything not listed here,
errors and tracebacks included, passes through unchanged.
"""
import contextlib
import re
import sys
import warnings

from multitask_nnunet.errors import InputWarning

CHATTER = [re.compile(p) for p in (
    r"^Trainer '[^']+' not found in nnunetv2\.training\.nnUNetTrainer\.$",
    r"^Searching in external trainer paths from environment variable 'nnUNet_extTrainer'\.\.\.$",
    r"^Searching in: ",
    r"^Searching for class \S+ in folder .+ with current module ",
    r"^  Inspecting module: ",
    r"^Found class \S+ in \S+$",
    r"^Using trainer '[^']+' from: ",
    r"^perform_everything_on_device=True is only supported for cuda devices! Setting this to False$",
    r": Unable to plot network architecture:$",
    r": No module named 'hiddenlayer'$",
)]
#: (message prefix, category) of warnings that are chatter, for ``warnings.filterwarnings`` and PYTHONWARNINGS
WARNINGS = [("`torch.jit.interface` is deprecated", FutureWarning)]


def is_chatter(line: str) -> bool:
    line = line.rstrip("\r\n")
    return any(p.search(line) for p in CHATTER)


class ChatterFilter:
    """A text stream that passes whole lines on to ``target``, except chatter. A line ends at a newline or at
    a carriage return (a progress bar's update), so progress bars stay live."""

    def __init__(self, target):
        self.target = target
        self._partial = ""

    def write(self, text: str) -> int:
        lines = re.split(r"(?<=[\r\n])", self._partial + text)
        self._partial = lines.pop()
        kept = "".join(line for line in lines if not is_chatter(line))
        if kept:
            self.target.write(kept)
        return len(text)

    def flush(self) -> None:
        """Flushes what has been passed on. An unfinished line stays back until it ends (``print(a, b)``
        writes a line in pieces; only the whole line tells whether it is chatter) or until ``close``."""
        self.target.flush()

    def close(self) -> None:
        """Pass on the unfinished line, if it is not chatter; the target stays open."""
        if self._partial and not is_chatter(self._partial):
            self.target.write(self._partial)
        self._partial = ""
        self.target.flush()

    def __getattr__(self, name):  # encoding, isatty, fileno, ... of the real stream
        return getattr(self.target, name)


def python_warnings_setting(existing: str = "") -> str:
    """A PYTHONWARNINGS value that hides ``WARNINGS`` in a child process (``existing`` entries are kept)."""
    ours = [f"ignore:{message}:{category.__name__}" for message, category in WARNINGS]
    return ",".join([e for e in existing.split(",") if e] + ours)


@contextlib.contextmanager
def our_command(prog: str):
    """Run one of our commands (``prog``, e.g. "multitask-nnunet convert"): chatter off stdout,
    ``InputWarning``s as one stderr line each (``PROG: warning: ...``)."""
    def show(message, category, filename, lineno, file=None, line=None):
        text = (f"{prog}: warning: {message}" if issubclass(category, InputWarning)
                else warnings.formatwarning(message, category, filename, lineno, line).rstrip("\n"))
        print(text, file=sys.stderr, flush=True)

    with warnings.catch_warnings():
        for message, category in WARNINGS:
            warnings.filterwarnings("ignore", message=re.escape(message), category=category)
        warnings.simplefilter("always", InputWarning)
        warnings.showwarning = show
        stdout = ChatterFilter(sys.stdout)
        try:
            with contextlib.redirect_stdout(stdout):
                yield
        finally:
            stdout.close()
