"""``python -m jaxdefense``: the same command line as the ``jaxdefense`` script."""

import sys

from jaxdefense.cli import main

if __name__ == "__main__":
  sys.exit(main())
