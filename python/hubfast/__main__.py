"""``python -m hubfast``: the ``hubfast`` command (see ``hubfast.cli``)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
