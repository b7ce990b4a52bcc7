"""DiffAI's abstract layers: identity on arrays, precision knobs on abstract values.

Abstract layers (Mirman, Singh & Vechev 2019, section 3) change only how an abstract
value (a ``HybridZonotope`` of :mod:`jaxdefense.certify`) is represented, never the set
of points it stands for (correlation and decorrelation preserve the concretisation;
decorrelation only enlarges the *set*, exactly as defined in the paper), and they are
the identity on concrete arrays, so they cost nothing in ordinary execution.

Every layer takes ``train`` in its call (``Sequential`` passes it on) and has an
``only_train`` field: when ``True`` the layer acts only in training (``train=True``) and
is the identity at evaluation.  On a ``Box`` (no correlated generators) correlation and
decorrelation are the identity; ``DeepLoss`` works on any abstract value.

The generator counts are static: ``CorrelateMaxK(k)`` and ``CorrelateFixed(k)`` add
exactly ``k`` generators (``min(k, p)`` for ``p`` variables per example),
``CorrelateAll`` adds ``p``, ``CorrelateMaxPool`` one per pooling window,
``DecorrelateMinK(k)`` leaves ``min(k, m)``, ``DecorrelateAll`` / ``Concretize`` none.
The selections (which variables, which generators) are made per example.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdefense.nn._abstract import is_abstract

Array = jax.Array


def _active(x: Any, only_train: bool, train: bool) -> bool:
  return is_abstract(x) and (bool(train) or not only_train)


def _check_k(k: Any, name: str) -> int:
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
    raise ValueError(f"{name}: k must be an integer >= 0; got {k!r}.")
  return int(k)


def _per_example(shape: Sequence[int]) -> int:
  return int(np.prod(shape[1:], dtype=np.int64))


class CorrelateAll(nn.Module):
  """Give every variable's box radius its own correlated generator (adds ``p``).

  Attributes:
    only_train: act only when called with ``train=True``.
  """
  only_train: bool = False

  def __call__(self, x: Any, train: bool = False) -> Any:
    if not _active(x, self.only_train, train):
      return x
    return x.correlate_all()


class CorrelateFixed(nn.Module):
  """Correlate ``k`` fixed variables: ``P = {floor(i p / k) : 0 <= i < k}``.

  Attributes:
    k: number of new generators (at most ``p``, the variables per example).
    only_train: act only when called with ``train=True``.
  """
  k: int
  only_train: bool = False

  def __call__(self, x: Any, train: bool = False) -> Any:
    k = _check_k(self.k, "CorrelateFixed")
    if not _active(x, self.only_train, train) or k == 0:
      return x
    p = _per_example(x.shape)
    k = min(k, p)
    idx = np.unique((np.arange(k) * p) // k).astype(np.int32)
    indices = jnp.broadcast_to(jnp.asarray(idx), (x.shape[0], idx.size))
    return x.correlate(indices)


class CorrelateMaxK(nn.Module):
  """Correlate the ``k`` variables with the largest upper bound (per example).

  Attributes:
    k: number of new generators (exactly ``min(k, p)``, chosen with ``lax.top_k``).
    only_train: act only when called with ``train=True``.
  """
  k: int
  only_train: bool = False

  def __call__(self, x: Any, train: bool = False) -> Any:
    k = _check_k(self.k, "CorrelateMaxK")
    if not _active(x, self.only_train, train) or k == 0:
      return x
    p = _per_example(x.shape)
    _, hi = x.concretize()
    _, indices = jax.lax.top_k(jax.lax.stop_gradient(hi).reshape(x.shape[0], p), min(k, p))
    return x.correlate(indices)


def _window_indices(shape: Sequence[int], window: Sequence[int],
                    strides: Sequence[int]) -> np.ndarray:
  """Static ``[n_windows, window_size]`` flat indices of VALID pooling windows."""
  dims = tuple(shape)
  win = tuple(window) + (1,) * (len(dims) - len(window))
  st = tuple(strides) + (1,) * (len(dims) - len(strides))
  if len(win) != len(dims) or any(w < 1 or w > d for w, d in zip(win, dims)):
    raise ValueError(f"CorrelateMaxPool: window {tuple(window)} does not fit the "
                     f"per-example shape {dims}.")
  flat = np.arange(int(np.prod(dims))).reshape(dims)
  views = np.lib.stride_tricks.sliding_window_view(flat, win)
  views = views[tuple(slice(None, None, s) for s in st)]
  return views.reshape(-1, int(np.prod(win))).astype(np.int32)


class CorrelateMaxPool(nn.Module):
  """Correlate one variable per max-pooling window (the window's maximum).

  The pooled function is the centre (``by="center"``, the paper's choice before the
  first layer) or the box radius (``by="box"``, elsewhere).  Windows run over the
  leading per-example axes (for NHWC: ``(h, w)`` pools each channel, ``(h, w, c)`` also
  across channels), VALID padding.  A variable that wins several overlapping windows is
  correlated once (the extra slots stay zero), so the generator count is static: one
  per window.

  Attributes:
    window: window size per axis (int: the two spatial axes of NHWC input, or the
      feature axis of ``[B, N]`` input).
    strides: defaults to ``window``.
    by: ``"box"`` or ``"center"``.
    only_train: act only when called with ``train=True``.
  """
  window: int | Sequence[int] = 2
  strides: int | Sequence[int] | None = None
  by: str = "box"
  only_train: bool = False

  def __call__(self, x: Any, train: bool = False) -> Any:
    if self.by not in ("box", "center"):
      raise ValueError(f"CorrelateMaxPool.by must be 'box' or 'center'; got {self.by!r}.")
    if not _active(x, self.only_train, train):
      return x
    dims = tuple(x.shape[1:])
    spatial = 2 if len(dims) == 3 else 1
    window = (self.window,) * spatial if isinstance(self.window, int) else tuple(self.window)
    strides = window if self.strides is None else (
        (self.strides,) * len(window) if isinstance(self.strides, int) else tuple(self.strides))
    table = _window_indices(dims, window, strides)                 # [n, w]
    f = x.center() if self.by == "center" else x.uncorrelated_radius()
    f = jax.lax.stop_gradient(f).reshape(x.shape[0], -1)
    vals = f[:, table]                                             # [B, n, w]
    best = jnp.argmax(vals, axis=-1)                               # [B, n]
    n, p = table.shape[0], f.shape[1]
    indices = jnp.asarray(table)[jnp.arange(n)[None, :], best]     # [B, n] flat indices
    # First window that chose each variable keeps it; later duplicates are void.
    order = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), indices.shape)
    first = jax.vmap(lambda i, o: jnp.full((p,), n, jnp.int32).at[i].min(o))(indices, order)
    valid = jnp.take_along_axis(first, indices, axis=1) == order
    return x.correlate(indices, valid)


class DecorrelateAll(nn.Module):
  """Fold every correlated generator into the box radius (``b + sum |E_j|``).

  Attributes:
    only_train: act only when called with ``train=True``.
  """
  only_train: bool = False

  def __call__(self, x: Any, train: bool = False) -> Any:
    if not _active(x, self.only_train, train):
      return x
    return x.decorrelate(0)


class Concretize(DecorrelateAll):
  """:class:`DecorrelateAll` under the name of the paper's figures 7 and 8.

  Same attributes, behaviour and errors as :class:`DecorrelateAll`: on a hybrid
  zonotope it folds every generator into the box part (the identity on arrays and on
  boxes), in training only when ``only_train`` is set.
  """


class DecorrelateMinK(nn.Module):
  """Keep the ``k`` generators with the largest total ``|E_j|``; fold the rest into b.

  Kept generators stay in their original order (per example).

  Attributes:
    k: generators kept (``min(k, m)``).
    only_train: act only when called with ``train=True``.
  """
  k: int
  only_train: bool = False

  def __call__(self, x: Any, train: bool = False) -> Any:
    k = _check_k(self.k, "DecorrelateMinK")
    if not _active(x, self.only_train, train):
      return x
    return x.decorrelate(k)


def _top2_combine(a: tuple[Array, Array, Array], b: tuple[Array, Array, Array]
                  ) -> tuple[Array, Array, Array]:
  """Merge two running (max, index of the max, second max) triples; ``a`` comes first."""
  a_max, a_idx, a_2nd = a
  b_max, b_idx, b_2nd = b
  a_wins = a_max >= b_max
  return (jnp.where(a_wins, a_max, b_max), jnp.where(a_wins, a_idx, b_idx),
          jnp.where(a_wins, jnp.maximum(a_2nd, b_max), jnp.maximum(b_2nd, a_max)))


def _deep_loss_lb_sum(l: Array, u: Array, activation: Callable[[Array], Array]) -> Array:
  """``sum_i L_lb,i`` for one example: ``L_lb,i = max{f(u_j - l_i) : j != i, l_j <= l_i}``.

  Sorted by ``l``, the candidates of ``i`` are a prefix of the order that contains
  ``i`` itself; a running top-2 (value, position, runner-up) gives the prefix maximum
  without ``i`` in ``O(n log n)``.  An empty candidate set contributes 0.
  """
  n = l.shape[0]
  order = jnp.argsort(l, stable=True)
  ls, us = l[order], u[order]
  pos = jnp.arange(n, dtype=jnp.int32)
  run_max, run_idx, run_2nd = jax.lax.associative_scan(
      _top2_combine, (us, pos, jnp.full_like(us, -jnp.inf)))
  rank = jnp.zeros((n,), jnp.int32).at[order].set(pos)          # i's place in the order
  last = jnp.searchsorted(ls, l, side="right") - 1              # last j with l_j <= l_i
  best = jnp.where(run_idx[last] == rank, run_2nd[last], run_max[last])
  valid = last >= 1                                             # some j != i qualifies
  gap = jnp.where(valid, best - l, 0.0)
  return jnp.sum(jnp.where(valid, activation(gap), 0.0))


def deep_loss(lower: Array, upper: Array,
              activation: Callable[[Array], Array] = jax.nn.relu) -> Array:
  """DiffAI's DeepLoss on interval bounds, per example.

  Mirman, Singh & Vechev (2019), "A Provable Defense for Deep Residual Networks",
  section 3.3, on the interval concretisation ``c_i = [l_i, u_i]`` of the ``n``
  variables of an example::

      L_lb,i = max{ f(u_j - l_i) : j != i, l_j <= l_i }
      L_ub,i = max{ f(u_i - l_j) : j != i, u_i <= u_j }
      L_deep = 1 / (2 n) * sum_i (L_lb,i + L_ub,i)

  i.e. for each dimension the worst overlap between its lower bound and the upper
  bound of any *other* dimension ("and vice versa"); ``j = i`` is excluded (it would
  only add the dimension's own width), as in the authors' implementation, and the
  maximum over an empty set is 0 (``f`` is positive).  ``L_ub`` is ``L_lb`` of the
  mirrored bounds ``(-u, -l)``.  ``activation`` must be non-decreasing, so each maximum
  is ``f`` of a prefix maximum after a sort: ``O(n log n)`` time and ``O(n)`` memory
  instead of ``n^2``.

  Args:
    lower, upper: ``[B, ...]`` interval bounds.
    activation: the positive, non-decreasing ``f`` (ReLU in the paper).

  Returns:
    ``[B]`` losses (0 for an example with a single variable).
  """
  b = lower.shape[0]
  lo = lower.reshape(b, -1)
  hi = upper.reshape(b, -1)

  def one(l, u):
    total = (_deep_loss_lb_sum(l, u, activation)
             + _deep_loss_lb_sum(-u, -l, activation))
    return total / (2 * l.shape[0])
  return jax.vmap(one)(lo, hi)


class DeepLoss(nn.Module):
  """Identity layer that adds ``weight * DeepLoss`` of its abstract input to the loss.

  The term ``weight * mean_b deep_loss(lower, upper)`` (a scalar, the batch mean of
  :func:`deep_loss`) is sown into the ``"losses"`` collection under ``"deep_loss"``; it
  is recorded only when that collection is mutable, e.g. ``model.apply(variables, box,
  train=True, mutable=["losses"])``.  The certified objective of
  :mod:`jaxdefense.objectives` makes it mutable on its abstract pass, sums the terms of
  every DeepLoss layer, scales them by its ``deep_weight`` schedule (read at the
  fractional epoch) and mixes them with the base loss; the collection is transient and
  never part of a model's saved state.

  Attributes:
    weight: this layer's relative weight (a float; the schedule over epochs is the
      objective's ``deep_weight``).
    only_train: act only when called with ``train=True`` (default ``True``).
    activation: the non-decreasing ``f`` (ReLU).
  """
  weight: float = 1.0
  only_train: bool = True
  activation: Callable[[Array], Array] = jax.nn.relu

  @nn.compact
  def __call__(self, x: Any, train: bool = False) -> Any:
    if _active(x, self.only_train, train) and self.weight:
      lo, hi = x.concretize()
      self.sow("losses", "deep_loss", self.weight * jnp.mean(deep_loss(lo, hi, self.activation)))
    return x
