"""Bad user input: the one exception type, and the one warning type; and the one type of a failed write.

The CLI turns an ``InputError`` into a single line on stderr and a non-zero exit, so every message must name
the file or case and say what is wrong. ``warn`` is for input that works but is probably not what the user
meant; the CLI shows it as one line (``multitask-nnunet CMD: warning: ...``) and goes on.

An output that cannot be written because of where it goes (the file system is full, over quota, read-only or
not writable: ``WRITE_ERRNOS``) is a ``WriteError``, shown as one line too. It is not bad input: the same
command succeeds once the destination has room, and every later output would fail alike, so commands that go
on past bad input (``predict --continue-on-error``) stop on it. ``write_failure`` makes one from an ``OSError``.
"""
import errno
import os
import warnings
from typing import Optional


class InputError(Exception):
    """Bad input (file, case, dataset, option). The message is shown to the user as one line."""


class InputWarning(UserWarning):
    """Input that works but is probably not what was meant. The message names the thing, in one line."""


def warn(message: str) -> None:
    warnings.warn(message, InputWarning, stacklevel=2)


def one_line(error: Exception) -> str:
    """The informative line of an exception's message: SimpleITK's are several lines, the C++ source location
    first and the reason after ``ERROR: ``; other messages lose only their line breaks."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    errors = [line for line in lines if "ERROR" in line]
    return (errors or [" ".join(lines)])[-1].split("ERROR: ")[-1]


#: the errors of a write that say the destination is at fault, not the data: full, over quota, read-only, not
#: writable
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})
#: of those, the ones that more room fixes (the service answers them with 507 Insufficient Storage)
NO_ROOM_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


class WriteError(Exception):
    """An output could not be written: ``path`` (its final name), ``reason`` (e.g. the ``strerror``), ``errno``
    (None where the writer did not say), ``note`` (what the command adds: how far it got, how to resume). The
    message is one line: ``cannot write PATH: REASON; NOTE``."""

    def __init__(self, path, reason: str, errno_: Optional[int] = None, note: str = ""):
        self.path, self.reason, self.errno, self.note = os.fspath(path), reason, errno_, note
        super().__init__(f"cannot write {self.path}: {reason}" + (f"; {note}" if note else ""))

    @property
    def no_room(self) -> bool:
        """The file system is full or over quota (more room fixes it), rather than read-only or not writable."""
        return self.errno in NO_ROOM_ERRNOS

    def with_note(self, note: str) -> "WriteError":
        return WriteError(self.path, self.reason, self.errno, note)


def write_failure(error: BaseException, path) -> Optional[WriteError]:
    """The ``WriteError`` for writing ``path`` if ``error`` is one already, or an ``OSError`` that blames the
    destination (``WRITE_ERRNOS``); None for any other error, which is then no write failure of ours to report."""
    if isinstance(error, WriteError):
        return error
    if isinstance(error, OSError) and error.errno in WRITE_ERRNOS:
        return WriteError(path, error.strerror or os.strerror(error.errno), error.errno)
    return None
