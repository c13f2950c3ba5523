"""The ``kdistill`` command line: ``kdistill demo``, ``kdistill demo llm``, ``kdistill inspect``.

Each subcommand lives in its own module of this package, which exposes two functions:

- ``add_parser(subparsers)``: adds its parser to the ``argparse`` sub-parsers and sets
  ``handler=run`` on it with ``set_defaults``;
- ``run(args) -> int``: does the work and returns the exit status.

``cli/__main__.py`` lists these modules in ``COMMANDS``: adding a subcommand is a new module plus
one entry there. Handlers raise :class:`CLIError` for mistakes the user can fix; ``main`` prints
its message on one line (no traceback) and exits with status 1.
"""

__all__ = ["CLIError"]


class CLIError(Exception):
    """A user error with a one-line message (bad ``MODULE:FACTORY``, missing extra, ...)."""
