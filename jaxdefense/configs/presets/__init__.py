"""Built-in config presets, one module per preset, each with ``get_config()``.

They ship with the package, so ``jaxdefense.configs.get("demo")`` works wherever
`jaxdefense` is installed.  Each starts from
:func:`jaxdefense.configs.base_config` and changes only what differs.
"""

from __future__ import annotations

