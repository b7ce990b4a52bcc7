"""Griffe extension for the docs build: make reST-flavoured docstrings read as Markdown.

The docstrings of `jaxdefense` are Google style but use a few reStructuredText habits
(Sphinx roles such as ``:class:`~jaxdefense.nn.Dense` ``, ``::`` before a literal block,
bare ``>>>`` doctest lines).  Markdown would show the roles verbatim and run doctest lines
together into one paragraph, so before mkdocstrings renders a docstring this extension

* turns a role into inline code (``~`` keeps only the last dotted component, as in Sphinx),
* turns a reST literal block (a paragraph ending in ``::``, or a line holding only
  ``::``, followed by an indented block) into a fenced code block,
* fences runs of ``>>>`` / ``...`` lines as Python code, except in docstrings that have a
  Google ``Examples:`` section (griffe parses those itself).

A public constant documented the Sphinx way gets its docstring too: the ``#:`` comment
lines right above its assignment, or else (initialisers such as ``nn.he_normal``) the
``__doc__`` the module sets on the object at run time.

It changes only the text handed to the renderer; the source is untouched.
"""

from __future__ import annotations

import importlib
import inspect
import re

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|func|mod|data|meth|attr|obj|exc|const):`(~?)([^`]+)`")
_EXAMPLES = re.compile(r"^\s*Examples?:\s*$", re.MULTILINE)


def _role(match: re.Match) -> str:
  tilde, target = match.groups()
  target = target.strip()
  if tilde:
    target = target.rsplit(".", 1)[-1]
  return f"`{target}`"


def _fence_doctests(text: str) -> str:
  out, lines, i = [], text.split("\n"), 0
  while i < len(lines):
    stripped = lines[i].lstrip()
    if stripped.startswith(">>>"):
      indent = lines[i][: len(lines[i]) - len(stripped)]
      block = []
      while i < len(lines) and lines[i].lstrip().startswith((">>>", "...")):
        line = lines[i].lstrip()
        block.append(line[4:] if len(line) > 3 else "")
        i += 1
      if out and out[-1].strip():
        out.append("")
      out += [indent + "```python", *(indent + b for b in block), indent + "```"]
      if i < len(lines) and lines[i].strip():
        out.append("")
      continue
    out.append(lines[i])
    i += 1
  return "\n".join(out)


def _indent(line: str) -> int:
  return len(line) - len(line.lstrip())


def _fence_literals(text: str) -> str:
  out, lines, i = [], text.split("\n"), 0
  while i < len(lines):
    line = lines[i]
    if not line.rstrip().endswith("::"):
      out.append(line)
      i += 1
      continue
    base = _indent(line)
    head = line.rstrip()[:-2].rstrip()
    j = i + 1
    while j < len(lines) and not lines[j].strip():
      j += 1
    block = []
    while j < len(lines) and (not lines[j].strip() or _indent(lines[j]) > base):
      block.append(lines[j])
      j += 1
    while block and not block[-1].strip():
      block.pop()
    if not block:  # not a literal block after all: keep one colon
      out.append(head + ":" if head.strip() else line)
      i += 1
      continue
    if head.strip():
      out += [head + ":", ""]
    cut = min(_indent(b) for b in block if b.strip())
    pad = " " * (cut if base else 0)  # inside a section item: stay in its description
    out += [pad + "```text", *(pad + b[cut:] if b.strip() else "" for b in block), pad + "```"]
    if j < len(lines) and lines[j].strip() and not base:
      out.append("")
    i = j
  return "\n".join(out)


def markdownify(text: str) -> str:
  """Return ``text`` with roles, ``::`` blocks and doctest lines rewritten for Markdown."""
  text = _ROLE.sub(_role, text)
  text = _fence_literals(text)
  if not _EXAMPLES.search(text):
    text = _fence_doctests(text)
  return text


def _doc_comment(obj: griffe.Object) -> str | None:
  """The ``#:`` lines right above the assignment of attribute ``obj``, if any."""
  if obj.lineno is None or obj.parent is None:
    return None
  try:
    lines = obj.parent.module.lines
  except Exception:  # noqa: BLE001 - no source available
    return None
  found, i = [], obj.lineno - 2
  while i >= 0 and lines[i].lstrip().startswith("#:"):
    found.append(lines[i].lstrip()[2:].removeprefix(" "))
    i -= 1
  return "\n".join(reversed(found)) or None


def _runtime_doc(obj: griffe.Object) -> str | None:
  """``__doc__`` set on a public function-like object at run time (not its type's)."""
  try:
    value = getattr(importlib.import_module(obj.parent.module.path), obj.name)
  except Exception:  # noqa: BLE001 - not importable here: no docstring
    return None
  doc = getattr(value, "__doc__", None)
  if callable(value) and doc and doc != getattr(type(value), "__doc__", None):
    return inspect.cleandoc(doc)
  return None


class ReSTRoles(griffe.Extension):
  """Rewrite every docstring of the loaded package with :func:`markdownify`."""

  def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:  # noqa: D102
    if obj.docstring is None and obj.is_attribute and not obj.name.startswith("_"):
      text = _doc_comment(obj) or _runtime_doc(obj)
      if text:
        obj.docstring = griffe.Docstring(text, parent=obj)
    if obj.docstring is not None:
      obj.docstring.value = markdownify(obj.docstring.value)
