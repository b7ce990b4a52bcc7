"""The parser of DiffAI's training language (a lark LALR grammar; nothing is evaluated).

Grammar (whitespace free between tokens)::

    start   : expr
    expr    : NAME "(" [arg ("," arg)* [","]] ")"   a goal, schedule or DiffAI(...)
            | NAME                                  a goal without arguments: Point,
                                                    IFGSM3, or a preset at the top
            | SIGNED_NUMBER                         1, 0.5, -2, 1e-3
    arg     : expr | NAME "=" expr

The tree is then checked against each constructor's signature (names, number and kind
of arguments: goal, number-or-schedule, integer, epoch count) and the constructors'
own range checks; every error is a :class:`LanguageError` (a ``ValueError``) with the
line, column, a caret under the offending text and what was expected there.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from typing import Any, Optional

import lark

from jaxdefense.objectives import _language as L

__all__ = ["LanguageError", "PRESETS", "parse"]

_GRAMMAR = r"""
?start: expr
?expr: call
     | name_ref
     | number
call: NAME "(" [arg ("," arg)* [","]] ")"
?arg: expr
    | kwarg
kwarg: NAME "=" expr
name_ref: NAME
number: SIGNED_NUMBER

%import common.CNAME -> NAME
%import common.SIGNED_NUMBER
%import common.WS
%ignore WS
"""

_PARSER = lark.Lark(_GRAMMAR, parser="lalr", propagate_positions=True,
                    maybe_placeholders=False)

#: Longest text accepted, and deepest nesting of calls.
MAX_LENGTH = 20_000
MAX_DEPTH = 64

_TERMINALS = {
    "LPAR": "'('", "RPAR": "')'", "COMMA": "','", "EQUAL": "'='", "NAME": "a name",
    "SIGNED_NUMBER": "a number", "$END": "the end of the text",
}


class LanguageError(ValueError):
  """A DiffAI objective string outside the language (position and expectation shown).

  Attributes:
    line, column: 1-based position of the error in the text.
    expected: what the grammar or the signature accepts there.
  """

  def __init__(self, message: str, text: str, line: int, column: int, expected: str):
    self.line, self.column, self.expected = line, column, expected
    lines = text.splitlines() or [""]
    src = lines[line - 1] if 0 < line <= len(lines) else ""
    start = max(0, column - 1 - 60)          # a window of the line around the column
    src = src[start:column - 1 + 60]
    super().__init__(f"{message} at line {line}, column {column}; expected {expected}.\n"
                     f"  {src}\n  {' ' * max(column - 1 - start, 0)}^")


# ---------------------------------------------------------------- signatures
GOAL, VALUE, INT, EPOCHS, NUMBER = (
    "goal", "number or schedule", "integer", "number of epochs", "number")


@dataclasses.dataclass(frozen=True)
class _Sig:
  """A constructor: its positional orders (by count), argument kinds, language-name ->
  Python-keyword map and defaults filled in by the parser."""
  build: Any
  orders: tuple[tuple[str, ...], ...]
  kinds: dict
  rename: dict = dataclasses.field(default_factory=dict)
  defaults: dict = dataclasses.field(default_factory=dict)
  required: tuple[str, ...] = ()
  result: str = GOAL

  def usage(self, name: str) -> str:
    return " or ".join(f"{name}({', '.join(o)})" for o in self.orders)


_SIGS: dict[str, _Sig] = {
    "Point": _Sig(L.Point, ((),), {}),
    "Normal": _Sig(L.Normal, ((),), {}),
    "Uniform": _Sig(L.Uniform, ((),), {}),
    "Box": _Sig(L.Box, ((),), {}),
    "HBox": _Sig(L.HBox, ((),), {}),
    "Zonotope": _Sig(L.Zonotope, ((),), {}),
    "DeepZ": _Sig(L.DeepZ, (("budget",),), {"budget": INT}),
    "IFGSM": _Sig(L.IFGSM, (("k",),), {"k": INT}),
    "Mix": _Sig(L.Mix, (("a", "b", "lam"), ("a", "b", "aw", "bw")),
                {"a": GOAL, "b": GOAL, "lam": VALUE, "aw": VALUE, "bw": VALUE},
                rename={"lam": "bw"}, required=("a", "b")),
    "Sub": _Sig(L.Sub, (("delta", "g"),), {"delta": VALUE, "g": GOAL},
                rename={"g": "goal"}, required=("delta", "g")),
    "Sample": _Sig(L.Sample, (("delta", "r", "gs", "gt"), ("delta", "gs", "gt")),
                   {"delta": VALUE, "r": VALUE, "gs": GOAL, "gt": GOAL},
                   defaults={"r": 1.0}, required=("delta", "gs", "gt")),
    "BiSample": _Sig(L.BiSample, (("g1", "g2"),), {"g1": GOAL, "g2": GOAL},
                     required=("g1", "g2")),
    "DeepLoss": _Sig(L.DeepLossWeight, (("weight", "g"),), {"weight": VALUE, "g": GOAL},
                     rename={"g": "goal"}, required=("weight", "g")),
    "Lin": _Sig(L.Lin, (("a", "b", "m", "n"),),
                {"a": VALUE, "b": VALUE, "m": EPOCHS, "n": EPOCHS},
                rename={"a": "start", "b": "end", "m": "hold", "n": "ramp"},
                required=("a", "b"), result="schedule"),
    "Until": _Sig(L.Until, (("m", "s1", "s2"),), {"m": EPOCHS, "s1": VALUE, "s2": VALUE},
                  required=("m", "s1", "s2"), result="schedule"),
}
_TOP = "DiffAI"
_TOP_SIG = _Sig(L.DiffAIObjective, (("goal", "eps"),), {"goal": GOAL, "eps": NUMBER},
                required=("goal",), result="objective")
_GOAL_NAMES = sorted(n for n, s in _SIGS.items() if s.result == GOAL)
_SCHEDULE_NAMES = sorted(n for n, s in _SIGS.items() if s.result == "schedule")
_IFGSM_K = re.compile(r"IFGSM([0-9]+)$")

# ---------------------------------------------------------------- presets
_TABLE2 = {
    "Baseline": "Mix(Point, Sub(Lin(0, 1, 150, 10), Box), Lin(0, 0.5, 150, 10))",
    "InSamp": "Mix(Point, Sample(Lin(0, 1, 150, 10), 0.5, Normal, Box), Lin(0, 0.5, 150, 10))",
    "InSampLPA": "Mix(Point, Sub(Lin(0, 1, 150, 10), Sample(Lin(0, 1, 150, 10), 0.5, Normal, "
                 "Box)), Lin(0, 0.5, 150, 10))",
    "Adv{k}IS": "Mix(Sub(Lin(0, 1, 20, 20), IFGSM({k})), Sample(Lin(0, 1, 150, 10), 0.5, "
                "Normal, Box), Lin(0, 0.5, 150, 10))",
    "Adv{k}ISLPA": "Mix(Sub(Lin(0, 1, 20, 20), IFGSM({k})), Sub(Lin(0, 1, 150, 10), "
                   "Sample(Lin(0, 1, 150, 10), 0.5, Normal, Box)), Lin(0, 0.5, 150, 10))",
    "Adv{k}ISLPAUS": "Mix(Sub(Lin(0, 1, 20, 20), IFGSM({k})), Sub(Lin(0, 1, 150, 10), "
                     "Sample(Lin(0, 1, 150, 10), 1, Uniform, Box)), Lin(0, 0.35, 150, 10))",
    "BaselineS18": "Mix(Point, Sub(Lin(0, 1, 200, 40), Box), Lin(0, 0.5, 200, 40))",
    "InSampS18": "Mix(Point, Sample(Lin(0, 1, 200, 40), 0.5, Normal, Box), "
                 "Lin(0, 0.5, 200, 40))",
    "Adv{k}ISS18": "Mix(Sub(Lin(0, 1, 20, 20), IFGSM({k})), Sample(Lin(0, 1, 200, 40), 0.5, "
                   "Normal, Box), Lin(0, 0.5, 200, 40))",
    "Adv{k}ISLPAR18": "Mix(Sub(Lin(0, 1, 20, 20), IFGSM({k})), Sub(Lin(0, 1, 200, 40), "
                      "Sample(Lin(0, 1, 200, 40), 1, Uniform, Box)), Lin(0, 0.5, 200, 40))",
    "InSampLPAR34": "Mix(Point, Sub(Lin(0, 1, 200, 40), Sample(Lin(0, 1, 200, 40), 1, "
                    "Uniform, Box)), Lin(0, 0.5, 200, 40))",
    "Adv{k}ISLPAD100": "Mix(IFGSM({k}), Sub(Lin(0, 1, 150, 50), Sample(Lin(0, 1, 150, 50), 1, "
                       "Uniform, Box)), Lin(0, 0.5, 150, 50))",
    # The extracted text of this row lost BiSample's second goal and a parenthesis; the
    # training goal is taken to be Box, as in every other row.
    "BiAdvL": "Mix(IFGSM(2), BiSample(Sub(Lin(0, 1, 150, 30), IFGSM(3)), Box), "
              "Lin(0, 0.6, 200, 30))",
}

#: The training schemes of the paper's table 2 (``Adv{k}...`` for k = 1..5), name -> text.
PRESETS: dict[str, str] = {}
for _name, _text in _TABLE2.items():
  for _k in (range(1, 6) if "{k}" in _name else (None,)):
    PRESETS[_name.format(k=_k)] = _text.format(k=_k)
del _name, _text, _k


# ---------------------------------------------------------------- building
class _Builder:
  """Checks a lark tree against the signatures and builds the objects."""

  def __init__(self, text: str):
    self.text = text

  def error(self, message: str, at: Any, expected: str) -> LanguageError:
    line = getattr(at, "line", None) or 1
    column = getattr(at, "column", None) or 1
    return LanguageError(message, self.text, line, column, expected)

  def build(self, tree: Any, want: str, depth: int = 0, top: bool = False) -> Any:
    if depth > MAX_DEPTH:
      raise self.error(f"expression nested deeper than {MAX_DEPTH} calls", tree.meta,
                       "a shallower expression")
    kind = tree.data
    if kind == "number":
      tok = tree.children[0]
      if want == GOAL:
        raise self.error(f"a number ({tok}) where a goal is expected", tok,
                         f"a goal ({', '.join(_GOAL_NAMES)})")
      value = float(tok)
      if want == INT:
        if not value.is_integer():
          raise self.error(f"{tok} is not an integer", tok, "an integer")
        return int(value)
      return value
    if kind == "name_ref":
      return self.name_ref(tree.children[0], want, top)
    if kind == "call":
      return self.call(tree, want, depth, top)
    raise self.error(f"unexpected {kind}", tree.meta, "a goal, schedule or number")

  def name_ref(self, tok: Any, want: str, top: bool) -> Any:
    name = str(tok)
    m = _IFGSM_K.match(name)
    if m and want == GOAL:
      return self.construct("IFGSM", _SIGS["IFGSM"], {"k": int(m.group(1))}, tok)
    sig = _SIGS.get(name)
    if sig is not None:
      self.check_result(name, sig, want, tok)
      if sig.result == GOAL:
        return self.construct(name, sig, {}, tok)
      raise self.error(f"schedule {name} needs arguments", tok, sig.usage(name))
    raise self.unknown(name, tok, want)

  def unknown(self, name: str, tok: Any, want: str) -> LanguageError:
    names = _GOAL_NAMES if want == GOAL else _SCHEDULE_NAMES if want == VALUE else \
        _GOAL_NAMES + _SCHEDULE_NAMES
    close = difflib.get_close_matches(name, names + [_TOP], n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return self.error(f"unknown name {name!r}{hint}", tok, f"one of {', '.join(names)}")

  def check_result(self, name: str, sig: Optional[_Sig], want: str, tok: Any) -> None:
    if sig is None:
      return
    if want == GOAL and sig.result != GOAL:
      raise self.error(f"{sig.result} {name} where a goal is expected", tok,
                       f"a goal ({', '.join(_GOAL_NAMES)})")
    if want == VALUE and sig.result == GOAL:
      raise self.error(f"goal {name} where a number or schedule is expected", tok,
                       "a number, Lin(a, b, m, n) or Until(m, s1, s2)")
    if want in (INT, EPOCHS, NUMBER):
      raise self.error(f"{sig.result} {name} where a {want} is expected", tok, f"a {want}")

  def call(self, tree: Any, want: str, depth: int, top: bool) -> Any:
    name_tok, args = tree.children[0], tree.children[1:]
    name = str(name_tok)
    if name == _TOP:
      if not top:
        raise self.error("DiffAI(...) inside an expression", name_tok,
                         "a goal or schedule (DiffAI(goal, eps=...) only at the top)")
      sig = _TOP_SIG
    else:
      sig = _SIGS.get(name)
      if sig is None:
        raise self.unknown(name, name_tok, want)
      self.check_result(name, sig, want, name_tok)
    positional, keywords = [], {}
    for a in args:
      if getattr(a, "data", None) == "kwarg":
        key_tok, value = a.children
        if str(key_tok) in keywords:
          raise self.error(f"{name}: argument {key_tok} given twice", key_tok,
                           "each argument once")
        keywords[str(key_tok)] = (key_tok, value)
      else:
        if keywords:
          raise self.error(f"{name}: a positional argument after a keyword", a.meta,
                           "keyword arguments after positional ones")
        positional.append(a)
    exact = [o for o in sig.orders if len(o) == len(positional)]
    longer = [o for o in sig.orders if len(o) > len(positional)]
    order = (exact or longer or [None])[0]
    if order is None:
      raise self.error(f"{name} takes at most {max(len(o) for o in sig.orders)} "
                       f"positional arguments; got {len(positional)}", name_tok,
                       sig.usage(name))
    named: dict[str, tuple[Any, Any]] = {p: (a.meta, a) for p, a in zip(order, positional)}
    for key, (key_tok, value) in keywords.items():
      if key not in sig.kinds:
        raise self.error(f"{name} has no argument {key!r}", key_tok,
                         f"one of {', '.join(sig.kinds) or 'no arguments'}")
      if key in named:
        raise self.error(f"{name}: argument {key} given twice", key_tok, "each argument once")
      named[key] = (key_tok, value)
    if name == "Mix" and "lam" in named and ("aw" in named or "bw" in named):
      raise self.error("Mix: lam together with aw/bw", name_tok, sig.usage(name))
    missing = [p for p in sig.required if p not in named]
    if name == "Mix" and not {"lam", "bw"} & set(named):
      missing.append("lam")
    if missing:
      raise self.error(f"{name} misses argument(s) {', '.join(missing)}", name_tok,
                       sig.usage(name))
    values = dict(sig.defaults)
    for p, (_, sub) in named.items():
      values[p] = self.build(sub, sig.kinds[p], depth + 1)
    return self.construct(name, sig, values, name_tok)

  def construct(self, name: str, sig: _Sig, values: dict, tok: Any) -> Any:
    kwargs = {sig.rename.get(k, k): v for k, v in values.items()}
    try:
      return sig.build(**kwargs)
    except (TypeError, ValueError) as e:
      raise self.error(f"{name}: {str(e).rstrip('.')}", tok, sig.usage(name)) from None


def parse(text: str, *, eps: Optional[float] = None) -> L.DiffAIObjective:
  """The objective that a DiffAI language string describes.

  ``text`` is a goal in the paper's notation (``Mix(Point, Sub(Lin(0, 1, 150, 10), Box),
  Lin(0, 0.5, 150, 10))``; goals without arguments may drop the parentheses and
  ``IFGSM3`` is ``IFGSM(3)``), ``DiffAI(goal, eps=0.1)`` (what ``str(objective)``
  prints), or the name of a preset (:data:`PRESETS`).  Arguments go by position or
  keyword, as the paper writes them: ``Mix(a=Point(), b=Sub(Lin(0, 0.1, 2, 3), Box()),
  aw=1, bw=Lin(0, 0.5, 2, 3))``.  Nothing in the text is evaluated.

  Args:
    text: the objective string.
    eps: training radius in ``[0, 1]`` for a bare goal (default 0.1); with
      ``DiffAI(goal, eps=...)`` it must agree or be ``None``.

  Returns:
    A :class:`~jaxdefense.objectives.DiffAIObjective`; ``parse(str(o)) == o``.

  Raises:
    LanguageError: (a ``ValueError``) text outside the grammar, an unknown name, a wrong
      number, name or kind of arguments, an out-of-range value (negative ``delta``,
      ``eps`` outside ``[0, 1]``, ...); the message shows line, column and a caret.
    TypeError: ``text`` is not a string.
  """
  if not isinstance(text, str):
    raise TypeError(f"a DiffAI objective must be a string; got {type(text).__name__}.")
  if len(text) > MAX_LENGTH:
    raise LanguageError(f"text of {len(text)} characters", text, 1, MAX_LENGTH,
                        f"at most {MAX_LENGTH}")
  source = PRESETS.get(text.strip(), text)
  try:
    tree = _PARSER.parse(source)
  except lark.exceptions.UnexpectedInput as e:
    raise _syntax_error(e, source) from None
  builder = _Builder(source)
  if getattr(tree, "data", None) == "call" and str(tree.children[0]) == _TOP:
    obj = builder.build(tree, "objective", top=True)
    if eps is not None and float(eps) != obj.eps:
      raise LanguageError(f"eps={eps} given, but the text says eps={obj.eps}", source, 1, 1,
                          "one eps")
    return obj
  goal = builder.build(tree, GOAL, top=True)
  try:
    return L.DiffAIObjective(goal, 0.1 if eps is None else eps)
  except (TypeError, ValueError) as e:
    raise LanguageError(f"bad eps: {e}", source, 1, 1, "eps in [0, 1]") from None


def _syntax_error(e: Any, text: str) -> LanguageError:
  if isinstance(e, lark.exceptions.UnexpectedCharacters):
    expected = sorted(_TERMINALS.get(t, t) for t in (e.allowed or ()))
    char = text[e.pos_in_stream] if e.pos_in_stream < len(text) else ""
    what = f"unexpected character {char!r}"
  elif isinstance(e, lark.exceptions.UnexpectedEOF):
    expected = sorted(_TERMINALS.get(t, t) for t in (e.expected or ()))
    what = "unexpected end of text"
  else:
    expected = sorted(_TERMINALS.get(t, t) for t in (getattr(e, "expected", ()) or ()))
    tok = getattr(e, "token", None)
    what = ("unexpected end of text" if tok is None or tok.type == "$END"
            else f"unexpected {str(tok)!r}")
  line = getattr(e, "line", None)
  column = getattr(e, "column", None)
  tok = getattr(e, "token", None)
  at_end = isinstance(e, lark.exceptions.UnexpectedEOF) or (
      tok is not None and getattr(tok, "type", None) == "$END")
  if at_end or not line or line < 1:   # point just after the last character
    lines = text.rstrip().splitlines() or [""]
    line, column = len(lines), len(lines[-1]) + 1
  return LanguageError(what, text, line, column, " or ".join(expected) or "nothing more")
