"""Entry point of the ``kdistill`` console script (and ``python -m kdistill``): parse, then call.

Commands are registered in ``COMMANDS`` (see :mod:`kdistill.cli` for the module interface).
Exit status: 0 success, 1 an error while running, 2 a usage error, 130 interrupted. Every error is
one line on stderr, ``kdistill: error: ...``; ``kdistill --debug COMMAND ...`` shows the
traceback of errors that are not usage errors instead.
"""

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from .._version import __version__
from . import _cache_teacher, _demo, _inspect
from ._args import CLIError, first_line

__all__ = ["COMMANDS", "build_parser", "main"]

# One module per command, in the order ``kdistill --help`` lists them.
COMMANDS = (_demo, _inspect, _cache_teacher)


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line (its sub-parsers inherit it)."""

    def error(self, message: str) -> NoReturn:
        """Print ``kdistill: error: <message> (see '<prog> --help')`` and exit with status 2."""
        self.exit(2, f"kdistill: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``kdistill`` parser with every command of ``COMMANDS``."""
    parser = _Parser(
        prog="kdistill",
        description="Knowledge distillation for PyTorch (ModelOpt-compatible API).",
    )
    parser.add_argument("--version", action="version", version=f"kdistill {__version__}")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the traceback of an error instead of its one-line message",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (see the module docstring).

    Args:
        argv: The arguments after the program name (``None``: ``sys.argv[1:]``).
    """
    args = build_parser().parse_args(argv)  # exits with status 2 on a usage error
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("kdistill: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if args.debug:
            raise
        if isinstance(error, CLIError):
            message, status = " ".join(str(error).split("\n")), error.exit_status
        else:  # an error of the user's code or data (e.g. the teacher's forward)
            message = (
                f"{type(error).__name__}: {first_line(error)} (run `kdistill --debug "
                f"{args.command} ...` to see the traceback)"
            )
            status = 1
        print(f"kdistill: error: {message}", file=sys.stderr)
        return status


if __name__ == "__main__":
    sys.exit(main())
