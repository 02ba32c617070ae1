"""(being written)"""


def add_parser(subparsers):
    pass
