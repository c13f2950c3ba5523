"""``python -m kdistill ...``: the same as the ``kdistill`` command."""

import sys

from kdistill.cli.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
