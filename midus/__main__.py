"""``python -m midus``: the same as the ``midus`` command (see :mod:`midus.cli`)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
