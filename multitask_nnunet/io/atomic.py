"""Atomic file writes: write to a temporary file in the same folder, then rename it into place.

A crash or Ctrl-C never leaves a half-written output, and a rerun can trust that an existing output file
is complete. Only a process killed outright (SIGKILL, power loss) leaves its temporary file behind; every
temporary name therefore carries its owner (``owner_tag``: host and process id), and the next run of the
command removes the leftovers whose owner is no longer alive (``remove_leftover_temporaries``).

A write that fails because of its destination (a full, over-quota, read-only or not writable file system)
raises ``errors.WriteError`` naming the final path, and its temporary file is removed. A writer may also fail
silently: SimpleITK's NIfTI writer leaves an empty or cut-off file on a full disk and raises nothing, so a NIfTI
file is checked to be complete (``nifti.written_incompletely``) before the rename; a file under its final name
is therefore always complete.
"""
import errno
import os
import re
import socket
import tempfile
from contextlib import contextmanager
from typing import List

from multitask_nnunet.errors import WriteError, write_failure

#: below this much free space, a writer that stopped short is taken to have run out of room
_NEARLY_FULL_BYTES = 1 << 20

TEMPORARY_PREFIX = ".tmp_"
# .tmp_<host>-<pid>-<mkstemp's random letters, digits and _><suffix>
_TEMPORARY = re.compile(re.escape(TEMPORARY_PREFIX) + r"(?P<host>.+)-(?P<pid>\d+)-[a-z0-9_]+(\.[^-]*)?")


def owner_tag() -> str:
    """``<host>-<pid>`` of this process, for temporary names, so that a later run can tell whether the process
    that made one is still alive (``owner_is_gone``)."""
    return f"{_host()}-{os.getpid()}"


def owner_is_gone(host: str, pid: str) -> bool:
    """True only if the owner ran on this host and its process no longer exists. Temporary names of other hosts
    (a shared output folder) are never judged: their processes cannot be seen from here."""
    if host != _host():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError, ValueError):
        return False  # exists (another user's), or not a process id
    return False


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "localhost"


@contextmanager
def atomic_path(path: str, suffix: str = ""):
    """Yields a temporary path beside ``path``; on success it is renamed to ``path``, on error removed.
    ``suffix`` keeps the extension for writers that choose the format by it (e.g. '.nii.gz'). A NIfTI file is
    checked to be complete before the rename; a failure of the destination (``errors.WRITE_ERRNOS``), or a NIfTI
    file left incomplete, is a ``WriteError`` naming ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f"{TEMPORARY_PREFIX}{owner_tag()}-", suffix=suffix, dir=folder)
        os.close(fd)
    except OSError as e:
        failure = write_failure(e, path)
        if failure is None:
            raise
        raise failure from None
    try:
        yield tmp
        _check_written(tmp, path)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException as e:
        _discard(tmp)
        # only errors of writing this file blame its destination: an OSError naming another file is the writer's
        failure = write_failure(e, path) if getattr(e, "filename", None) in (None, tmp, path) else None
        if failure is None or failure is e:
            raise
        raise failure from None


def _check_written(tmp: str, path: str) -> None:
    """``WriteError`` if the writer left ``tmp`` (a NIfTI file) incomplete without an error; the reason is the
    full disk where the file system has (next to) no room left, else what is missing."""
    from multitask_nnunet.io.nifti import written_incompletely
    problem = written_incompletely(tmp)
    if problem is None:
        return
    try:
        stat = os.statvfs(tmp)
        full = stat.f_bavail * stat.f_frsize < _NEARLY_FULL_BYTES
    except OSError:
        full = False
    if full:
        raise WriteError(path, f"{os.strerror(errno.ENOSPC)} (the image writer gave no error, but its file is "
                               f"incomplete: {problem})", errno.ENOSPC)
    raise WriteError(path, f"the image writer gave no error, but its file is incomplete ({problem}); is the file "
                           f"system full or over quota?")


def _discard(tmp: str) -> None:
    """Remove a temporary file whose write failed; one that cannot be removed (a read-only file system) is left
    for the next run's ``remove_leftover_temporaries``."""
    try:
        os.remove(tmp)
    except OSError:
        pass


def remove_leftover_temporaries(folder: str) -> List[str]:
    """Remove the temporary files in ``folder`` that ``atomic_path`` left behind in a process that is gone
    (killed mid-write); returns their names. Those of live processes (another run writing into the same folder)
    are kept."""
    removed = []
    if not os.path.isdir(folder):
        return removed
    for name in sorted(os.listdir(folder)):
        match = _TEMPORARY.fullmatch(name)
        path = os.path.join(folder, name)
        if match and os.path.isfile(path) and owner_is_gone(match["host"], match["pid"]):
            try:
                os.remove(path)
            except FileNotFoundError:  # another run removed it first
                continue
            except OSError:  # e.g. a read-only file system: writing there fails next, naming the folder
                continue
            removed.append(name)
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            f.write(text)


def atomic_torch_save(obj, path: str) -> None:
    """``torch.save`` through ``atomic_path``. Through a file object: ``torch.save`` given a name takes the
    archive's name from it up to the first dot, which is empty for the temporary's dotted name."""
    import torch
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
