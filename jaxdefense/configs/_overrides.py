"""Overrides ``key=value`` typed by the existing field (the ``--config.key=value`` flags)."""

from __future__ import annotations

import ast
import difflib
from typing import Any, Iterable, Mapping

import ml_collections

from jaxdefense.configs._base import FREE_GROUPS, flatten_keys, unknown_key_error

__all__ = ["override", "parse_value", "split_override"]

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def _literal(text: str) -> Any:
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def parse_value(text: str, default: Any, field_type: type | None = None,
                path: str = "value") -> Any:
  """Parse a command-line string into the type of an existing config field.

  Args:
    text: the string after ``=``.
    default: the current value of the field (gives its type).
    field_type: the declared type of a ``None`` placeholder field, if any.
    path: the dotted key, for error messages.

  Returns:
    ``bool`` (true/false/yes/no/on/off/1/0), ``int``, ``float``, ``str`` or ``tuple``
    (``1,2`` / ``(1, 2)`` / ``[1, 2]``; ``()`` is empty) following ``default``; for a
    ``None`` field, ``field_type`` if given, else a Python literal or the raw string
    (``none`` / ``None`` gives ``None``).

  Raises:
    ValueError: ``text`` cannot be read as the field's type.
  """
  kind = type(default) if default is not None else field_type
  try:
    if kind is None:
      return None if text.lower() == "none" else _literal(text)
    if text.lower() == "none" and default is None:
      return None
    if kind is bool:
      low = text.strip().lower()
      if low in _TRUE:
        return True
      if low in _FALSE:
        return False
      raise ValueError("expected true or false")
    if kind is int:
      return int(text)
    if kind is float:
      return float(text)
    if kind is str:
      return text
    if kind in (tuple, list):
      stripped = text.strip()
      if stripped in ("", "()", "[]"):
        return ()
      value = _literal(stripped)
      if isinstance(value, (tuple, list)):
        return tuple(value)
      if isinstance(value, str) and "," in value:
        return tuple(_literal(v.strip()) for v in value.split(",") if v.strip())
      return (value,)
    value = _literal(text)
    if not isinstance(value, kind):
      raise ValueError(f"expected a {kind.__name__}")
    return value
  except ValueError as e:
    name = kind.__name__ if kind is not None else "value"
    article = "an" if name[0] in "aeiou" else "a"
    raise ValueError(f"cannot set config key {path!r} to {text!r}: it is {article} {name} field "
                     f"(current value {default!r}); {e}.") from None


def _not_a_group_error(path: str, prefix: str, value: Any) -> ValueError:
  """``path`` reaches through ``prefix``, which holds a value, not a group of fields."""
  kind = type(value).__name__
  what = (f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}, currently {value!r}"
          if value is not None else "currently None")
  return ValueError(f"cannot set config key {path!r}: {prefix!r} is a value ({what}), not "
                    f"a group of fields; set it as {prefix}=VALUE.")


def split_override(item: str) -> tuple[str, str]:
  """Split ``"a.b=value"`` (an optional leading ``--config.`` or ``config.`` is removed).

  Raises:
    ValueError: no ``=`` in ``item``.
  """
  text = item
  for prefix in ("--config.", "config."):
    if text.startswith(prefix):
      text = text[len(prefix):]
      break
  key, sep, value = text.partition("=")
  if not sep or not key:
    raise ValueError(f"a config override must look like key=value "
                     f"(e.g. --config.model.name=resnet8); got {item!r}.")
  return key.strip(), value


def override(config: ml_collections.ConfigDict,
             overrides: Iterable[str] | Mapping[str, Any]) -> ml_collections.ConfigDict:
  """Return a copy of ``config`` with overridden fields.

  Args:
    config: a ``ConfigDict``.
    overrides: strings ``"key.sub=value"`` (parsed with the type of the existing
      field, as the command line gives them) or a mapping ``{"key.sub": value}`` of
      Python values (checked against the field's type; a mapping given for a group
      replaces the whole group, e.g. ``{"objective": {"name": "trades", "beta": 6.0}}``).
      In the free groups
      ``model``, ``model.step`` and ``objective`` a new key may be added (as a model
      override or keyword argument); elsewhere the key must exist.

  Returns:
    A new ``ConfigDict`` (locked if ``config`` was).

  Raises:
    ValueError: an unknown key (the message lists close matches), a dotted key that
      reaches into a value as if it were a group (``epochs.x``), a value that does not
      parse as the field's type, or a malformed override string.
    TypeError: a mapping value of the wrong type.
  """
  out = ml_collections.ConfigDict(config.to_dict(preserve_field_references=True))
  locked = config.is_locked
  known = list(flatten_keys(out))
  known_set = set(known)
  if isinstance(overrides, Mapping):
    items = [(k, v, False) for k, v in overrides.items()]
  else:
    items = [(*split_override(s), True) for s in overrides]
  for path, value, is_text in items:
    parts = path.split(".")
    node = out
    for i, part in enumerate(parts[:-1]):
      if part not in node:
        raise unknown_key_error(".".join(parts[:i + 1]), known)
      if not isinstance(node[part], ml_collections.ConfigDict):
        raise _not_a_group_error(path, ".".join(parts[:i + 1]), node[part])
      node = node[part]
    last = parts[-1]
    group = ".".join(parts[:-1])
    if last not in node:
      if group not in FREE_GROUPS:
        raise unknown_key_error(path, known)
      # a likely typo of a key the config already had (not of one added by an earlier
      # override: objective.eps then objective.steps are two keyword arguments)
      given = [k for k in node.keys() if ".".join(parts[:-1] + [k]) in known_set]
      close = difflib.get_close_matches(last, given, n=1, cutoff=0.75)
      if close:
        raise ValueError(
            f"unknown config key {path!r}: did you mean {group}.{close[0]}? (A new key in "
            f"{group!r} is passed on as a keyword argument; set an existing one instead.)")
      node[last] = (None if is_text and value.lower() == "none" else
                    _literal(value) if is_text else value)
      if isinstance(node[last], list):
        node[last] = tuple(node[last])
      continue
    default = node[last]
    if (isinstance(default, ml_collections.ConfigDict) and not is_text
        and (isinstance(value, Mapping) or hasattr(value, "to_dict"))):
      # a mapping replaces the whole group (e.g. {"objective": {"name": "trades", ...}})
      node[last] = ml_collections.ConfigDict(
          dict(value.to_dict() if hasattr(value, "to_dict") else value))
      continue
    if isinstance(default, ml_collections.ConfigDict):
      raise ValueError(f"config key {path!r} is a group; set its fields instead "
                       f"({', '.join(f'{path}.{k}' for k in default.keys())}).")
    field_type = node.get_ref(last).get_type() if default is None else None
    if is_text:
      value = parse_value(value, default, field_type, path)
    elif isinstance(value, list):
      value = tuple(value)
    try:
      node[last] = value
    except TypeError as e:
      raise TypeError(f"cannot set config key {path!r} to {value!r}: {e}") from None
  if locked:
    out.lock()
  return out
