"""``python -m vitkern profile ...`` (same as the ``vitkern`` console script)."""
import sys

from vitkern.cli import main

if __name__ == "__main__":
    sys.exit(main())
