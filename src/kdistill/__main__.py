"""``python -m kdistill ...``: the same as the ``kdistill`` command."""

import sys

from kdistill.cli.__main__ import main

__all__: list[str] = []

if __name__ == "__main__":
    sys.exit(main())
