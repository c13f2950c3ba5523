"""Entry point of the ``kdistill`` console script (and ``python -m kdistill``): parse, then call.

Subcommands are registered in ``COMMANDS`` (see :mod:`kdistill.cli` for the module interface).
"""

import argparse
import sys
from collections.abc import Sequence

import kdistill
from kdistill.cache import cli as _cache_teacher

from . import CLIError, _demo, _inspect

__all__ = ["COMMANDS", "build_parser", "main"]

# One module per subcommand, in the order ``kdistill --help`` lists them.
COMMANDS = (_demo, _inspect, _cache_teacher)


def build_parser() -> argparse.ArgumentParser:
    """The ``kdistill`` parser with every subcommand of ``COMMANDS``."""
    parser = argparse.ArgumentParser(
        prog="kdistill",
        description="Knowledge distillation for PyTorch (ModelOpt-compatible API).",
    )
    parser.add_argument("--version", action="version", version=f"kdistill {kdistill.__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (0 success, 1 user error, 2 bad arguments).

    Args:
        argv: The arguments after the program name (``None``: ``sys.argv[1:]``).
    """
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except CLIError as error:
        print(f"kdistill {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("kdistill: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
