"""Methods that follow a method of nnU-Net's instead of overriding one of its hooks, and the version they follow.

Where nnU-Net offers a hook we override the hook. Where it does not (the class outputs must come from the same
forward pass as the segmentation, the checkpoint holds the head), our method follows nnU-Net's step for step
and is marked at its definition::

    @follows(nnUNetTrainer.train_step, "141e91e02072")
    def train_step(self, batch): ...

``fingerprint`` is a hash of nnU-Net's method's source (``NNUNET_VERSION``'s), without blank lines, comments and
indentation. ``tests/test_nnunet_copies.py`` recomputes it from the installed nnU-Net: when nnU-Net changes such
a method, the test fails and names our copy, which is then reviewed against nnU-Net's new code and given the new
fingerprint (and version).
"""
import hashlib
import inspect
from typing import Callable, Dict, Tuple

NNUNET_VERSION = "2.8.1"

#: "our module.Class.method" -> (nnU-Net's method as installed, its fingerprint in NNUNET_VERSION)
FOLLOWED: Dict[str, Tuple[Callable, str]] = {}


def follows(nnunet_method: Callable, fingerprint: str) -> Callable:
    """Mark the decorated method as following ``nnunet_method`` as of ``NNUNET_VERSION``."""
    def mark(method):
        FOLLOWED[f"{method.__module__}.{method.__qualname__}"] = (nnunet_method, fingerprint)
        return method
    return mark


def fingerprint(function) -> str:
    """12 hex digits of the SHA-256 of a function's source lines, stripped, without blank and comment lines."""
    lines = [line.strip() for line in inspect.getsource(function).splitlines()]
    code = "\n".join(line for line in lines if line and not line.startswith("#"))
    return hashlib.sha256(code.encode()).hexdigest()[:12]
