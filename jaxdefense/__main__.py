"""``python -m jaxdefense``: the same command line as the ``jaxdefense`` script."""

from __future__ import annotations

import sys

from jaxdefense.commands import main

if __name__ == "__main__":
  sys.exit(main())
