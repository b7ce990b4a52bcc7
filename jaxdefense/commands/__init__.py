"""The top floor: the ``jaxdefense`` command line and the quick-start demo.

``jaxdefense.commands.main(argv)`` runs the command line (the ``jaxdefense`` script and
``python -m jaxdefense`` call it).  The subcommands live one per module (``train``,
``eval``, ``config``, ``demo``, ``attack``, ``certify``, ``report``), each defining
``COMMAND``, listed explicitly in ``_main.py``.  This package imports the library; no
library package imports it (``tests/test_layers_imports.py`` checks it).
"""

from __future__ import annotations

from jaxdefense.commands._main import main as main

__all__ = ["main"]
