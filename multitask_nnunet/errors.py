"""The one exception type for bad user input.

The CLI turns it into a single line on stderr and a non-zero exit, so every message must name the file or
case and say what is wrong.
"""


class InputError(Exception):
    """Bad input (file, case, dataset, option). The message is shown to the user as one line."""
