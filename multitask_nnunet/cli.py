"""The ``multitask-nnunet`` command: one subcommand per job, each defined by the module that does the job.

Every subcommand module exposes ``add_parser(subparsers)``, which registers its arguments and sets
``func`` to the function that runs it. Bad input raises ``InputError``, an output that cannot be written
``WriteError`` (errors.py); either is printed as one line and the command exits with status 1, as is any other
``OSError`` of a full, read-only or not writable file system that names its file. Warnings about the input
(``errors.warn``) are one line each, and the frameworks' known, harmless chatter is kept off the terminal
(console.py).
"""
import argparse
import importlib
import sys

from multitask_nnunet.console import our_command
from multitask_nnunet.errors import WRITE_ERRNOS, InputError, WriteError

SUBCOMMAND_MODULES = [
    "multitask_nnunet.conversion.synthetic",     # make-synthetic
    "multitask_nnunet.conversion.convert",       # convert
    "multitask_nnunet.inference.batch",          # predict
    "multitask_nnunet.evaluation.evaluate",      # evaluate
    "multitask_nnunet.demo",                     # demo
    "multitask_nnunet.registration",             # trainer-path
    "multitask_nnunet.serve.command",            # serve
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="multitask-nnunet",
                                     description="Multi-task (segmentation + classification) nnU-Net v2 plugin")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).add_parser(subparsers)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with our_command(f"multitask-nnunet {args.command}"):
            return args.func(args) or 0
    except (InputError, WriteError) as e:
        print(f"multitask-nnunet {args.command}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # full, read-only, not permitted, where no writer of ours said: one line naming the file
        if e.errno not in WRITE_ERRNOS or e.filename is None:
            raise
        print(f"multitask-nnunet {args.command}: error: {e.filename2 or e.filename}: {e.strerror}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
