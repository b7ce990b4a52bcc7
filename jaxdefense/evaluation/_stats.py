"""Statistics for experiment reports: standard errors and the tests behind a verdict.

Accuracies measured once (one seed) on ``n`` test images carry the binomial standard
error ``sqrt(p (1 - p) / n)``; accuracies measured over ``k >= 2`` seeds carry the
standard error of their mean, ``sample std / sqrt(k)``.  A claim "A > B" (or "A < B")
is decided by a two-sided test at level ``alpha``:

* one value per side, on ``n`` test images each: the two-proportion z-test with the
  pooled proportion (:func:`two_proportion_z`);
* two or more values (seeds) per side: Welch's unequal-variance t-test
  (:func:`welch_t`).

The verdict is ``"held"`` when the difference is significant and in the claimed
direction, ``"did not hold"`` when it is significant and in the opposite direction,
and ``"inconclusive"`` otherwise (never a verdict from the sign of a difference inside
the noise).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

__all__ = ["Comparison", "Estimate", "VERDICTS", "binomial_se", "compare", "estimate",
           "mcnemar", "two_proportion_z", "welch_t"]

VERDICTS = ("held", "did not hold", "inconclusive")


def _check_fraction(name: str, p: float) -> float:
  try:
    p = float(p)
  except (TypeError, ValueError):
    raise TypeError(f"{name} must be a number in [0, 1], got {p!r}.") from None
  if not 0.0 <= p <= 1.0 or math.isnan(p):
    raise ValueError(f"{name} must be a fraction in [0, 1], got {p!r}.")
  return p


def _check_count(name: str, n: int) -> int:
  if isinstance(n, bool) or not isinstance(n, int) and not (
      isinstance(n, float) and n.is_integer()):
    raise TypeError(f"{name} must be a positive integer, got {n!r}.")
  if n < 1:
    raise ValueError(f"{name} must be a positive integer, got {n!r}.")
  return int(n)


def binomial_se(p: float, n: int) -> float:
  """Standard error of an accuracy ``p`` measured on ``n`` independent images.

  Args:
    p: the measured fraction, in [0, 1].
    n: the number of images (>= 1).

  Returns:
    ``sqrt(p (1 - p) / n)`` (0 when ``p`` is 0 or 1).

  Raises:
    ValueError / TypeError: ``p`` outside [0, 1] or ``n`` not a positive integer.
  """
  p = _check_fraction("p", p)
  n = _check_count("n", n)
  return math.sqrt(p * (1.0 - p) / n)


@dataclasses.dataclass(frozen=True)
class Estimate:
  """A mean with its standard error.

  Attributes:
    mean: the mean over seeds (or the single measured value).
    se: its standard error (``nan`` when neither ``n`` nor two seeds were given).
    k: the number of seeds (values) averaged.
    n: test images per value (``None`` if unknown).
    kind: ``"binomial"`` (one seed, ``sqrt(p(1-p)/n)``), ``"seeds"`` (``k >= 2``,
      sample std / sqrt(k)) or ``"none"``.
    values: the values averaged.
  """
  mean: float
  se: float
  k: int
  n: int | None
  kind: str
  values: tuple[float, ...]

  def format(self, scale: float = 100.0, digits: int = 1) -> str:
    """``"mean ± se"`` scaled (default: percent with one decimal); ``"–"`` for no data."""
    if self.k == 0:
      return "–"
    if math.isnan(self.se):
      return f"{scale * self.mean:.{digits}f}"
    return f"{scale * self.mean:.{digits}f} ± {scale * self.se:.{digits}f}"


def estimate(values: Sequence[float] | float, n: int | None = None) -> Estimate:
  """Mean and standard error of an accuracy measured once or over several seeds.

  Args:
    values: one value, or one per seed (fractions in [0, 1] when ``n`` is given).
    n: test images per value; used for the binomial error of a single value.

  Returns:
    An :class:`Estimate`: ``kind="seeds"`` for two or more values (sample standard
    deviation, ``ddof=1``, over ``sqrt(k)``), ``"binomial"`` for one value with ``n``,
    ``"none"`` (``se = nan``) for one value without ``n`` or no value at all.

  Raises:
    ValueError / TypeError: a value that is not a number, or (with ``n``) outside
      [0, 1]; ``n`` not a positive integer.
  """
  if isinstance(values, (int, float)) and not isinstance(values, bool):
    values = [values]
  vals = []
  for i, v in enumerate(values):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
      raise TypeError(f"values[{i}] must be a number, got {v!r}.")
    vals.append(_check_fraction(f"values[{i}]", v) if n is not None else float(v))
  if n is not None:
    n = _check_count("n", n)
  k = len(vals)
  if k == 0:
    return Estimate(math.nan, math.nan, 0, n, "none", ())
  mean = sum(vals) / k
  if k >= 2:
    var = sum((v - mean) ** 2 for v in vals) / (k - 1)
    return Estimate(mean, math.sqrt(var / k), k, n, "seeds", tuple(vals))
  if n is not None:
    return Estimate(mean, binomial_se(mean, n), 1, n, "binomial", tuple(vals))
  return Estimate(mean, math.nan, 1, None, "none", tuple(vals))


def _normal_two_sided(z: float) -> float:
  return math.erfc(abs(z) / math.sqrt(2.0))


def two_proportion_z(p1: float, n1: int, p2: float, n2: int) -> tuple[float, float]:
  """Two-sided two-proportion z-test of ``p1 == p2`` (pooled proportion).

  ``z = (p1 - p2) / sqrt(q (1 - q) (1/n1 + 1/n2))`` with ``q = (p1 n1 + p2 n2) /
  (n1 + n2)``; ``p = 2 (1 - Phi(|z|))``.  It treats the two accuracies as
  independent samples, which is conservative for two models scored on the same images
  (their errors are positively correlated).

  Args:
    p1, p2: measured fractions in [0, 1].
    n1, n2: images behind each (>= 1).

  Returns:
    ``(z, p_value)``; ``(0.0, 1.0)`` when the pooled proportion is 0 or 1 (no
    variance, and then ``p1 == p2``).

  Raises:
    ValueError / TypeError: a fraction outside [0, 1] or a count that is not a
      positive integer.
  """
  p1, p2 = _check_fraction("p1", p1), _check_fraction("p2", p2)
  n1, n2 = _check_count("n1", n1), _check_count("n2", n2)
  q = (p1 * n1 + p2 * n2) / (n1 + n2)
  var = q * (1.0 - q) * (1.0 / n1 + 1.0 / n2)
  if var <= 0.0:
    return 0.0, 1.0
  z = (p1 - p2) / math.sqrt(var)
  return z, _normal_two_sided(z)


def mcnemar(a: Sequence[Any], b: Sequence[Any]) -> tuple[int, int, float]:
  """Exact two-sided McNemar test of two paired per-image outcomes.

  For two models (or attacks, or domains) scored on the same images: only the
  discordant images count, and under "no difference" each is equally likely to favour
  either side (a binomial with p = 1/2).

  Args:
    a, b: per-image successes of the same length: strings of ``"0"`` / ``"1"`` (as the
      studies store them) or sequences of bools / 0-1 numbers.

  Returns:
    ``(b_only, a_only, p)``: images where only ``b`` succeeds, where only ``a``
    succeeds, and the exact two-sided p-value on those discordant pairs (1.0 without
    any).

  Raises:
    ValueError: different lengths, or a value other than 0 / 1.
  """
  av, bv = _outcomes(a, "a"), _outcomes(b, "b")
  if len(av) != len(bv):
    raise ValueError(f"mcnemar: a and b must score the same images; got {len(av)} and "
                     f"{len(bv)} outcomes.")
  only_a = sum(1 for u, v in zip(av, bv) if u and not v)
  only_b = sum(1 for u, v in zip(av, bv) if v and not u)
  m, k = only_a + only_b, min(only_a, only_b)
  if m == 0:
    return only_b, only_a, 1.0
  tail = sum(math.comb(m, i) for i in range(k + 1)) / 2 ** m
  return only_b, only_a, min(1.0, 2 * tail)


def _outcomes(values: Sequence[Any], name: str) -> list[bool]:
  out = []
  for v in values:
    if v in ("0", "1"):
      out.append(v == "1")
    elif isinstance(v, (bool, int, float)) and v in (0, 1):
      out.append(bool(v))
    else:
      try:                                  # numpy scalars
        f = float(v)
      except (TypeError, ValueError):
        f = None
      if f not in (0.0, 1.0):
        raise ValueError(f"mcnemar: {name} must hold 0/1 outcomes (a '0'/'1' string or "
                         f"bools); got the value {v!r}.")
      out.append(f == 1.0)
  return out


def welch_t(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
  """Two-sided Welch t-test of equal means (unequal variances).

  ``t = (mean_a - mean_b) / sqrt(s_a^2 / k_a + s_b^2 / k_b)`` with sample variances
  (``ddof=1``) and the Welch-Satterthwaite degrees of freedom.

  Args:
    a, b: values (e.g. one accuracy per seed), at least 2 each.

  Returns:
    ``(t, df, p_value)``.  When both samples have zero variance: ``(0, nan, 1)`` if the
    means are equal, ``(+-inf, nan, 0)`` otherwise.

  Raises:
    ValueError: fewer than 2 values on a side.
    TypeError: a value that is not a number.
  """
  from scipy import special  # jax depends on scipy
  for name, xs in (("a", a), ("b", b)):
    if len(xs) < 2:
      raise ValueError(f"welch_t needs at least 2 values in {name}, got {list(xs)!r}.")
    for v in xs:
      if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must hold numbers, got {v!r}.")
  ea, eb = estimate(list(a)), estimate(list(b))
  va, vb = ea.se ** 2, eb.se ** 2  # s^2 / k
  diff = ea.mean - eb.mean
  if va + vb == 0.0:
    if diff == 0.0:
      return 0.0, math.nan, 1.0
    return math.copysign(math.inf, diff), math.nan, 0.0
  t = diff / math.sqrt(va + vb)
  df = (va + vb) ** 2 / (va ** 2 / (ea.k - 1) + vb ** 2 / (eb.k - 1))
  p = 2.0 * float(special.stdtr(df, -abs(t)))
  return t, df, p


@dataclasses.dataclass(frozen=True)
class Comparison:
  """The decision on a claim "A > B" or "A < B".

  Attributes:
    relation: ``">"`` or ``"<"``, the claimed direction.
    a, b: the two :class:`Estimate` s.
    diff: ``a.mean - b.mean - margin``.
    margin: the claimed minimum gap (``A > B + margin``; ``A < B + margin``).
    test: the test's name, e.g. ``"two-sided two-proportion z-test"``.
    statistic: z or t.
    p_value: two-sided p-value.
    alpha: significance level.
    verdict: ``"held"``, ``"did not hold"`` or ``"inconclusive"``.
  """
  relation: str
  a: Estimate
  b: Estimate
  diff: float
  margin: float
  test: str
  statistic: float
  p_value: float
  alpha: float
  verdict: str

  def evidence(self, scale: float = 100.0, unit: str = "pt") -> str:
    """A short text: the difference, the test statistic and the p-value."""
    name = "z" if "z-test" in self.test else "t"
    if self.margin:
      # e.g. "difference +0.5 pt (claimed > -3.0 pt: +3.5 pt beyond it)"
      raw = self.diff + self.margin
      m = (f"difference {scale * raw:+.1f} {unit} (claimed {self.relation} "
           f"{scale * self.margin:+.1f} {unit}: {scale * self.diff:+.1f} {unit} beyond it)")
    else:
      m = f"difference {scale * self.diff:+.1f} {unit}"
    return f"{m}, {name} = {self.statistic:.2f}, p = {self.p_value:.3g}"


def compare(a: Sequence[float] | float, b: Sequence[float] | float, relation: str = ">", *,
            n: int | None = None, n_b: int | None = None, alpha: float = 0.05,
            margin: float = 0.0) -> Comparison:
  """Decide a claim "A > B + margin" (or "<") with a stated two-sided test.

  With one value per side the values are accuracies on ``n`` (and ``n_b``, default
  ``n``) test images, compared by :func:`two_proportion_z` (``a`` shifted by
  ``-margin``, clipped to [0, 1]); with two or more values per side, by
  :func:`welch_t` on ``a - margin`` and ``b``; with one value on one side and several
  on the other (e.g. an ensemble against its members), by a normal test on
  ``(a - margin - b) / sqrt(se_a^2 + se_b^2)``, the single value's binomial error on its
  ``n`` images and the other side's standard error over seeds.

  Args:
    a, b: a value or one value per seed.
    relation: ``">"`` or ``"<"``.
    n, n_b: test images per value (required for single values).
    alpha: significance level in (0, 1), default 0.05.
    margin: the claimed gap (a fraction), default 0.

  Returns:
    A :class:`Comparison`.

  Raises:
    ValueError: a bad ``relation`` or ``alpha``; a single value without ``n``.
  """
  if relation not in (">", "<"):
    raise ValueError(f"relation must be '>' or '<', got {relation!r}.")
  if not isinstance(alpha, (int, float)) or not 0.0 < alpha < 1.0:
    raise ValueError(f"alpha must be in (0, 1), got {alpha!r}.")
  single = lambda v: isinstance(v, (int, float)) or len(v) == 1
  av = [a] if isinstance(a, (int, float)) else list(a)
  bv = [b] if isinstance(b, (int, float)) else list(b)
  if single(av) and single(bv):
    if n is None:
      raise ValueError("compare: one value per side needs n, the number of test images.")
    nb = n if n_b is None else n_b
    ea, eb = estimate(av, n), estimate(bv, nb)
    shifted = min(1.0, max(0.0, ea.mean - margin))
    stat, p = two_proportion_z(shifted, ea.n, eb.mean, nb)
    test = "two-sided two-proportion z-test"
  elif len(av) >= 2 and len(bv) >= 2:
    ea, eb = estimate(av, n), estimate(bv, n_b if n_b is not None else n)
    stat, _, p = welch_t([v - margin for v in av], bv)
    test = "two-sided Welch t-test over seeds"
  else:
    # one measured value (binomial error on its test images) against a mean over
    # seeds (standard error over seeds): a normal test on the difference
    one_n = n if single(av) else (n_b if n_b is not None else n)
    if one_n is None:
      raise ValueError(f"compare: one value against several ({len(av)} vs {len(bv)}) "
                       "needs n, the number of test images of the single value.")
    ea = estimate(av, one_n if single(av) else None)
    eb = estimate(bv, one_n if single(bv) else None)
    se = math.sqrt(ea.se ** 2 + eb.se ** 2)
    stat = (ea.mean - margin - eb.mean) / se if se > 0 else math.copysign(
        math.inf, ea.mean - margin - eb.mean) if ea.mean - margin != eb.mean else 0.0
    p = _normal_two_sided(stat) if math.isfinite(stat) else (0.0 if stat else 1.0)
    test = ("two-sided z-test of one value (binomial error) against a mean over seeds "
            "(standard error over seeds)")
  diff = ea.mean - eb.mean - margin
  if p < alpha and diff != 0.0:
    verdict = "held" if (diff > 0) == (relation == ">") else "did not hold"
  else:
    verdict = "inconclusive"
  return Comparison(relation, ea, eb, diff, float(margin), f"{test} at alpha = {alpha:g}",
                    stat, p, float(alpha), verdict)
