"""Atomic file writes: write to a temporary file in the same folder, then rename it into place.

A crash or Ctrl-C never leaves a half-written output, and a rerun can trust that an existing output file
is complete.
"""
import os
import tempfile
from contextlib import contextmanager


@contextmanager
def atomic_path(path: str, suffix: str = ""):
    """Yields a temporary path beside ``path``; on success it is renamed to ``path``, on error removed.
    ``suffix`` keeps the extension for writers that choose the format by it (e.g. '.nii.gz')."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=suffix, dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            f.write(text)
