"""``python -m feste``: the ``feste`` command (see :mod:`feste.cli`)."""

import sys

from feste.cli import main

if __name__ == "__main__":
    sys.exit(main())
