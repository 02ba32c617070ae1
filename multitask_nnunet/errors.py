"""Bad user input: the one exception type, and the one warning type.

The CLI turns an ``InputError`` into a single line on stderr and a non-zero exit, so every message must name
the file or case and say what is wrong. ``warn`` is for input that works but is probably not what the user
meant; the CLI shows it as one line (``multitask-nnunet CMD: warning: ...``) and goes on.
"""
import warnings


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
