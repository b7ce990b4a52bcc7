"""Configs as code: ``ml_collections.ConfigDict`` presets, files and overrides.

>>> config = jaxdefense.configs.get("demo", ["model.name=mlp", "epochs=3"])
>>> config = jaxdefense.configs.get("path/to/my_config.py")

Every config follows one schema, :func:`base_config` (documented field by field
there); presets and config files change a few fields of it.  :func:`get` returns a
validated, locked config: a typo in a key is an error that lists close matches.
"""

from __future__ import annotations

from jaxdefense.configs._base import base_config as base_config
from jaxdefense.configs._base import validate as validate
from jaxdefense.configs._loader import get as get
from jaxdefense.configs._loader import load_file as load_file
from jaxdefense.configs._loader import names as names
from jaxdefense.configs._loader import search_dirs as search_dirs
from jaxdefense.configs._overrides import override as override
from jaxdefense.configs._overrides import parse_value as parse_value
from jaxdefense.configs._overrides import split_override as split_override

__all__ = [
    "base_config", "get", "load_file", "names", "override", "parse_value",
    "search_dirs", "split_override", "validate",
]
