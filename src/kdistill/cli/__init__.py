"""The ``kdistill`` command line: ``demo`` (and ``demo llm``), ``inspect``, ``cache-teacher``.

Each command lives in its own module of this package (``_demo``, ``_inspect``,
``_cache_teacher``), which exposes two functions:

- ``add_parser(subparsers)``: adds its parser to the ``argparse`` sub-parsers and sets
  ``handler=run`` on it with ``set_defaults``;
- ``run(args) -> int``: does the work and returns the exit status.

``cli/__main__.py`` lists these modules in ``COMMANDS``: adding a command is a new module plus one
entry there; ``cli/_args.py`` holds what the commands share. The CLI depends on the library, never
the reverse. Handlers raise :class:`UsageError` (exit status 2) or :class:`CLIError` (exit status
1) for mistakes the user can fix; ``main`` prints them on one line, without a traceback (unless
``kdistill --debug``).
"""

from ._args import CLIError as CLIError
from ._args import UsageError as UsageError

__all__ = ["CLIError", "UsageError"]
