"""Certified bounds and verification of any model built from :mod:`jaxdefense.nn`.

The model is the ordinary Flax module: its layers dispatch on the type of their input,
so ``model.apply(variables, Box(...))`` runs interval bound propagation and
``model.apply(variables, HybridZonotope(...))`` the hybrid zonotope analysis, with no
second definition of the network.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdefense import _checks
from jaxdefense import data as _data
from jaxdefense.certify._domains import Box, HybridZonotope, margin_lower_bounds
from jaxdefense.nn._abstract import AbstractValue, is_abstract
from jaxdefense.nn._layers import ABS_KERNELS

Array = jax.Array

#: Abstract domains accepted by ``domain=`` (``"deepz"``: the zonotope with the DeepZ ReLU).
DOMAINS = ("box", "zonotope", "deepz")
RELUS = ("box", "deepz")


def _resolve(domain: str, relu: str | None) -> tuple[str, str]:
  _checks.check_choice(domain, "domain", DOMAINS)
  if domain == "deepz":
    if relu not in (None, "deepz"):
      raise ValueError(f"domain='deepz' is the zonotope with relu='deepz'; got relu={relu!r}.")
    return "zonotope", "deepz"
  relu = "box" if relu is None else relu
  _checks.check_choice(relu, "relu", RELUS)
  return domain, relu


def input_set(x: Array, eps: Any, domain: str = "box", *, relu: str | None = None,
              relu_budget: int | None = None, correlate_input: bool = True,
              sound: bool = False) -> AbstractValue:
  """The abstract input ``[max(x - eps, 0), min(x + eps, 1)]``.

  Args:
    x: images ``[B, H, W, C]`` in ``[0, 1]`` (any rank >= 2 is accepted here).
    eps: l-inf radius, a scalar or one per example (``[B]``).
    domain: ``"box"``, ``"zonotope"`` (hybrid zonotope) or ``"deepz"`` (the zonotope
      with ``relu="deepz"``).
    relu: zonotope ReLU relaxation, ``"box"`` (DiffAI default) or ``"deepz"``.
    relu_budget: DeepZ generator budget per ReLU layer (``None``: one per neuron).
    correlate_input: zonotope only.  ``True``: one generator per input pixel (exact
      under affine layers; the generator tensor is ``p`` times the input, ``p`` pixels
      per image).  ``False``: start as a box (``m = 0``) and rely on the model's
      correlation layers (DiffAI's HBox start), far cheaper for large inputs.
    sound: round outwards for the float32 network (``x -+ eps`` rounded outwards with
      ``nextafter``, and every transformer of the returned value widened by a bound on
      float rounding, see :mod:`jaxdefense.certify._domains`).  Default ``False``: the
      fast path that training uses.

  Returns:
    A :class:`Box` or :class:`HybridZonotope` of shape ``x.shape``.

  Raises:
    TypeError: ``sound`` is not a bool.
  """
  domain, relu = _resolve(domain, relu)
  sound = _check_sound(sound)
  x = jnp.asarray(x)
  eps = jnp.asarray(eps, x.dtype)
  if eps.ndim == 1:
    eps = eps.reshape((-1,) + (1,) * (x.ndim - 1))
  lo, hi = x - eps, x + eps
  if sound:
    lo = jnp.nextafter(lo, jnp.asarray(-jnp.inf, lo.dtype))
    hi = jnp.nextafter(hi, jnp.asarray(jnp.inf, hi.dtype))
  lo = jnp.clip(lo, 0.0, 1.0)
  hi = jnp.clip(hi, 0.0, 1.0)
  if domain == "box":
    return Box.from_bounds(lo, hi, sound=sound)
  return HybridZonotope.from_bounds(lo, hi, correlate=correlate_input, relu_mode=relu,
                                    relu_budget=relu_budget, sound=sound)


def _check_sound(sound: Any) -> bool:
  if not isinstance(sound, (bool, np.bool_)):
    raise TypeError(f"sound must be True or False (round bounds outwards so that they "
                    f"hold for the float32 network); got sound={sound!r}.")
  return bool(sound)


def _num_classes(model: nn.Module, variables: Any, x: Any, train: bool,
                 rngs: Any) -> int | None:
  """The number of logits ``K`` of ``model``, for the label check.

  A zoo model says it in its ``num_classes`` field; another module is traced once on an
  example of ``x``'s shape (``jax.eval_shape``, nothing is computed).  ``None`` when
  that trace fails: the certification itself then reports why the model cannot run.
  """
  k = getattr(model, "num_classes", None)
  if isinstance(k, (int, np.integer)) and not isinstance(k, bool) and k >= 1:
    return int(k)
  kwargs = {"train": train} if rngs is None else {"train": train, "rngs": rngs}
  example = jax.ShapeDtypeStruct((1,) + tuple(np.shape(x))[1:], jnp.float32)
  try:
    out = jax.eval_shape(lambda v, a: model.apply(v, a, **kwargs), variables, example)
  except Exception:  # noqa: BLE001 - reported by the certification run itself
    return None
  shape = getattr(out, "shape", ())
  return int(shape[-1]) if len(shape) >= 2 else None


def _check_args(model: Any, x: Any, eps: Any, y: Any = None, variables: Any = None,
                train: bool = False, rngs: Any = None) -> None:
  if not isinstance(model, nn.Module):
    raise TypeError(f"model must be a flax.linen Module (e.g. jaxdefense.models.create(...)); "
                    f"got {type(model).__name__}.")
  _checks.check_images(x, "x", ranks=(2, 3, 4, 5))
  _checks.check_eps(eps, "eps")
  e = _checks.as_concrete_numpy(eps)
  if e is not None and e.ndim not in (0, 1):
    raise ValueError(f"eps must be a scalar or one value per example [B]; got shape {e.shape}.")
  if e is not None and e.ndim == 1 and e.shape[0] != x.shape[0]:
    raise ValueError(f"eps has {e.shape[0]} entries for a batch of {x.shape[0]} images.")
  if y is not None:
    _checks.check_labels(y, None, "y", batch=x.shape[0])  # rank, dtype, length first
    if _checks.as_concrete_numpy(y) is not None:
      _checks.check_labels(y, _num_classes(model, variables, x, train, rngs), "y")


def _apply(model: nn.Module, variables: Any, value: AbstractValue, train: bool,
           rngs: Any) -> AbstractValue:
  """``model.apply(variables, value, train=train)``: the abstract logits ``[B, K]``."""
  kwargs = {"train": train}
  if rngs is not None:
    kwargs["rngs"] = rngs
  out = model.apply(variables, value, **kwargs)
  if not is_abstract(out):
    raise TypeError(f"{type(model).__name__} returned {type(out).__name__} for an abstract "
                    "input; certification needs a model built from jaxdefense.nn layers.")
  return out


def abstract_logits(model: nn.Module, variables: Any, x: Array, eps: Any,
                    domain: str = "box", *, relu: str | None = None,
                    relu_budget: int | None = None, correlate_input: bool = True,
                    train: bool = False, rngs: Any = None,
                    sound: bool = False) -> AbstractValue:
  """The abstract output of ``model`` on the input set (no checks, jittable).

  Same arguments as :func:`bounds`; returns the final :class:`Box` or
  :class:`HybridZonotope` (shape ``[B, K]``).
  """
  value = input_set(x, eps, domain, relu=relu, relu_budget=relu_budget,
                    correlate_input=correlate_input, sound=sound)
  return _apply(model, variables, value, train, rngs)


def _jitted(kind: str, model: nn.Module, domain: str, relu: str | None,
            relu_budget: int | None, correlate_input: bool, train: bool,
            sound: bool = False) -> Callable:
  """The compiled certification function (cached for hashable models)."""
  args = (kind, model, domain, relu, relu_budget, correlate_input, train, bool(sound))
  try:
    hash(model)
  except TypeError:  # e.g. a module with list attributes: compiled per call
    return _make_jitted(*args)
  return _cached_jitted(*args)


def _make_jitted(kind: str, model: nn.Module, domain: str, relu: str | None,
                 relu_budget: int | None, correlate_input: bool, train: bool,
                 sound: bool = False) -> Callable:
  def run(variables, x, eps, y, rngs):
    z = abstract_logits(model, variables, x, eps, domain, relu=relu, relu_budget=relu_budget,
                        correlate_input=correlate_input, train=train, rngs=rngs, sound=sound)
    if kind == "bounds":
      return z.concretize()
    return jnp.min(margin_lower_bounds(z, y), axis=-1)

  if not sound:
    return jax.jit(run)

  def run_f32(*args):
    # The rounding model assumes float32 accumulation in products and convolutions
    # (what XLA:CPU does anyway; on GPU/TPU it rules out TF32 / bfloat16 passes).
    with jax.default_matmul_precision("float32"):
      return run(*args)
  return jax.jit(run_f32)


_cached_jitted = functools.lru_cache(maxsize=64)(_make_jitted)


def bounds(model: nn.Module, variables: Any, x: Array, eps: Any, domain: str = "box", *,
           relu: str | None = None, relu_budget: int | None = None,
           correlate_input: bool = True, train: bool = False,
           rngs: Any = None, sound: bool = False) -> tuple[Array, Array]:
  """Sound lower and upper bounds of the logits over an l-inf ball.

  The input set is ``[max(x - eps, 0), min(x + eps, 1)]``; the model runs on it in the
  chosen abstract domain (the same ``model.apply``, jit-compiled once per model, domain
  and shape).

  Args:
    model: a Flax module built from :mod:`jaxdefense.nn` layers (any zoo model).
    variables: its variables (``{"params": ..., "batch_stats": ...}``).
    x: images ``[B, H, W, C]`` in ``[0, 1]``.
    eps: l-inf radius in ``[0, 1]`` units: a scalar or ``[B]``.
    domain: ``"box"`` (interval bound propagation; default), ``"zonotope"`` (DiffAI's
      hybrid zonotope) or ``"deepz"`` (zonotope with the DeepZ ReLU).
    relu: the zonotope's ReLU, ``"box"`` (DiffAI default) or ``"deepz"``.
    relu_budget: DeepZ generators per ReLU layer (``None``: one per neuron).
    correlate_input: zonotope: one generator per input pixel (default) or a box start.
    train: passed to the model (``True`` activates ``only_train`` abstract layers).
    rngs: passed to ``model.apply``.
    sound: ``True``: round outwards so that the bounds hold for the float32 network
      (every float32 input of the set, evaluated by ``model.apply`` in float32, gives
      logits inside them; the error model is in :mod:`jaxdefense.certify._domains`).
      Default ``False`` (bounds of the real-valued network, up to a few ulps).

  Returns:
    ``(lower, upper)``, each ``[B, K]``.

  Raises:
    ValueError: ``eps < 0`` or ``> 1``, images outside ``[0, 1]`` or of the wrong rank,
      an unknown ``domain``/``relu``, or a model that is not certifiable (a stochastic
      step such as ``EulerMaruyama(coef > 0)``, training-mode batch norm).
    TypeError: integer images, a model that is not a Flax module, a ``sound`` that is
      not a bool.
  """
  _check_args(model, x, eps)
  domain, relu = _resolve(domain, relu)
  sound = _check_sound(sound)
  fn = _jitted("bounds", model, domain, relu, relu_budget, bool(correlate_input), bool(train),
               sound)
  return fn(variables, jnp.asarray(x), jnp.asarray(eps, jnp.float32), None, rngs)


def certified_margins(model: nn.Module, variables: Any, x: Array, y: Array, eps: Any,
                      domain: str = "zonotope", *, relu: str | None = None,
                      relu_budget: int | None = None, correlate_input: bool = True,
                      train: bool = False, rngs: Any = None, sound: bool = True) -> Array:
  """``min_{j != y} lower bound of (z_y - z_j)`` per example, ``[B]``.

  The differences are computed inside the domain (an affine map of the abstract
  logits), which is tighter than subtracting interval bounds.  Positive means proved.
  Arguments as in :func:`bounds`, plus integer labels ``y`` ``[B]`` in ``[0, K)``;
  ``sound`` defaults to ``True`` here (a positive margin then proves the float32
  network; ``False`` is the real-valued network's margin, slightly larger).

  Raises:
    ValueError, TypeError: as :func:`bounds`; labels that are not integers ``[B]`` or
      lie outside ``[0, K)`` (``K`` the model's number of logits).
  """
  _check_args(model, x, eps, y, variables, bool(train), rngs)
  domain, relu = _resolve(domain, relu)
  sound = _check_sound(sound)
  fn = _jitted("verify", model, domain, relu, relu_budget, bool(correlate_input), bool(train),
               sound)
  return fn(variables, jnp.asarray(x), jnp.asarray(eps, jnp.float32), jnp.asarray(y), rngs)


def verify(model: nn.Module, variables: Any, x: Array, y: Array, eps: Any,
           domain: str = "zonotope", **kwargs: Any) -> Array:
  """Which examples are proved robust: ``bool [B]``.

  Label ``t = y[i]`` is proved for image ``i`` when, for every ``j != t``, the lower
  bound of ``z_t - z_j`` over the input set ``[max(x - eps, 0), min(x + eps, 1)]`` is
  positive.  A proved example is also correctly classified.

  By default (``sound=True``) the bounds are rounded outwards so that the certificate
  holds for the float32 network as it runs (every float32 input of the set, evaluated
  in float32, keeps label ``t`` strictly on top), as DiffAI's sound ReLU does; it never
  proves more than ``sound=False`` (the real-valued network's certificate).

  Args:
    model, variables, x, eps: as in :func:`bounds`.
    y: integer labels ``[B]`` in ``[0, K)``, ``K`` the model's number of logits.
    domain: ``"zonotope"`` (default), ``"box"`` or ``"deepz"``.
    **kwargs: ``relu``, ``relu_budget``, ``correlate_input``, ``train``, ``rngs`` as in
      :func:`bounds`; ``sound`` (default ``True``).

  Returns:
    ``bool [B]``.

  Raises:
    ValueError, TypeError: as :func:`bounds`, and bad labels: not integers ``[B]``, or
      outside ``[0, K)`` (checked on concrete labels before anything runs).
  """
  return certified_margins(model, variables, x, y, eps, domain, **kwargs) > 0


def prepare(variables: Any) -> dict:
  """``variables`` plus the absolute value of every kernel, for repeated certification.

  Interval and zonotope layers need ``|W|`` for every ``Conv`` and ``Dense`` kernel.
  Computed inside the certification function, it is recomputed on every call (every
  batch of a data set): for ResNet-Tiny's 32,768 x 500 dense layer that is 65 MB read
  and written per call.  The returned variables carry ``|W|`` in the
  ``"abs_kernels"`` collection (mirroring ``params``), which the layers' abstract path
  uses; :func:`verify_dataset` (hence ``evaluation.certified_accuracy``) prepares the
  variables itself.  Bounds are identical bit for bit.

  Use prepared variables for evaluation only: ``|W|`` is a constant here, so a gradient
  with respect to ``params`` through prepared variables misses the radius path (the
  training objectives build their variables from the parameters and never prepare).

  Args:
    variables: the model's variables (``{"params": ..., ...}``).

  Returns:
    A new dict: the same collections plus ``"abs_kernels"`` (replaced if present).

  Raises:
    TypeError: ``variables`` is not a mapping with ``"params"``.
  """
  if not isinstance(variables, Mapping) or "params" not in variables:
    raise TypeError("prepare needs the model's variables, a mapping with 'params'; got "
                    f"{type(variables).__name__}.")

  def kernels(tree: Any) -> Any:
    out = {}
    for name, value in dict(tree).items():
      if isinstance(value, Mapping):
        sub = kernels(value)
        if sub:
          out[name] = sub
      elif name == "kernel":
        out[name] = jnp.abs(jnp.asarray(value))
    return out
  return {**dict(variables), ABS_KERNELS: kernels(variables["params"])}


def verify_dataset(model: nn.Module, variables: Any, x: Any, y: Any, eps: float,
                   domain: str = "zonotope", *, batch_size: int = 100,
                   progress: bool = False, desc: str | None = None, relu: str | None = None,
                   relu_budget: int | None = None, correlate_input: bool = True,
                   train: bool = False, rngs: Any = None, sound: bool = True) -> np.ndarray:
  """:func:`verify` over a whole data set, batch by batch: ``bool [N]`` (NumPy).

  Runs through ``jaxdefense.data.run_batches``: fixed-shape batches (the last one
  padded, so the certification compiles once per model, domain and batch shape),
  sharded over every device.  Arguments are checked once, here.

  Args:
    model, variables: as in :func:`bounds`.
    x: images ``[N, H, W, C]`` in ``[0, 1]``; y: integer labels ``[N]``.
    eps: l-inf radius (a scalar).
    domain: ``"zonotope"`` (default), ``"box"`` or ``"deepz"``.
    batch_size: examples per call (the zonotope's memory grows with it).  Default 100.
    progress: show a tqdm progress bar labelled ``desc``.
    relu, relu_budget, correlate_input, train, rngs: as in :func:`bounds`.
    sound: round outwards for the float32 network (default ``True``, see :func:`verify`).

  Returns:
    ``bool [N]``: which examples are proved robust.

  Raises:
    ValueError, TypeError: as :func:`verify`, a non-scalar ``eps`` or a bad
      ``batch_size``.
  """
  _check_args(model, x, eps, y, variables, bool(train), rngs)
  if np.ndim(eps) != 0:
    raise ValueError(f"verify_dataset takes one eps for the whole data set; got shape "
                     f"{np.shape(eps)}.")
  domain, relu = _resolve(domain, relu)
  sound = _check_sound(sound)
  fn = _jitted("verify", model, domain, relu, relu_budget, bool(correlate_input), bool(train),
               sound)
  e = jnp.asarray(eps, jnp.float32)
  variables = prepare(variables)   # |W| once, not per batch
  # ``fn`` is compiled (and cached per model): the runner calls it as it is
  margins = _data.run_batches(lambda batch, _: fn(variables, batch[0], e, batch[1], rngs),
                              (np.asarray(x), np.asarray(y)), batch_size=batch_size,
                              progress=progress, desc=desc, jit=False)
  return np.asarray(margins) > 0


def make_bounds_fn(model: nn.Module, domain: str = "box", *, relu: str | None = None,
                   relu_budget: int | None = None, correlate_input: bool = True,
                   train: bool = False, sound: bool = False
                   ) -> Callable[[Any, Array, Any], tuple[Array, Array]]:
  """A pure ``fn(variables, x, eps) -> (lower, upper)`` to ``jit``/``vmap``/``grad``.

  No argument checks run inside (call :func:`bounds` for checked use); ``sound`` as in
  :func:`bounds`.
  """
  domain, relu = _resolve(domain, relu)
  sound = _check_sound(sound)

  def fn(variables, x, eps):
    return abstract_logits(model, variables, x, eps, domain, relu=relu,
                           relu_budget=relu_budget, correlate_input=correlate_input,
                           train=train, sound=sound).concretize()
  return fn


# ------------------------------------------------------------------- neuron counting
_COUNTER: list[int] = []


@jax.tree_util.register_pytree_node_class
class _CountingBox(Box):
  """A box whose ReLUs add their neuron counts to ``_COUNTER`` at trace time."""

  def _wrap(self, v: Any) -> Any:
    return _CountingBox(v.center(), v.radius) if type(v) is Box else v

  def affine(self, *a, **k):
    return self._wrap(super().affine(*a, **k))

  def linear(self, fn, **k):
    return self._wrap(super().linear(fn, **k))

  def scale_shift(self, *a, **k):
    return self._wrap(super().scale_shift(*a, **k))

  def reshape(self, shape):
    return self._wrap(super().reshape(shape))

  def monotone(self, fn):
    return self._wrap(super().monotone(fn))

  def add(self, other):
    return self._wrap(super().add(other))

  @classmethod
  def concatenate(cls, values, axis):
    out = Box.concatenate(values, axis)
    return _CountingBox(out.center(), out.radius) if type(out) is Box else out

  def relu(self):
    _COUNTER.append(int(np.prod(self.shape[1:])))
    return self._wrap(super().relu())


def count_neurons(model: nn.Module, variables: Any, x: Array, *, train: bool = False) -> int:
  """Number of ReLU neurons per example (the "Neurons" column of DiffAI's tables).

  Counts the outputs of every ReLU the model applies to one example of ``x``'s shape;
  nothing is computed (``jax.eval_shape``).
  """
  x = jnp.asarray(x)[:1]
  _COUNTER.clear()
  value = _CountingBox(x, jnp.zeros_like(x))
  jax.eval_shape(lambda v, b: model.apply(v, b, train=train), variables, value)
  total = sum(_COUNTER)
  _COUNTER.clear()
  return total


# --------------------------------------------------------------------------- report
def report(model: nn.Module, variables: Any, x: Array, y: Array, eps: float, *,
           domains: tuple[str, ...] = ("box", "zonotope"), key: Array | None = None,
           pgd_steps: int = 20, pgd_step_size: float | None = None, batch_size: int = 100,
           **kwargs: Any) -> dict[str, float]:
  """Standard, PGD and certified accuracy (in ``[0, 1]``) on ``(x, y)`` at ``eps``.

  Args:
    model, variables: a certifiable model and its variables.
    x: images ``[N, H, W, C]`` in ``[0, 1]``; y: labels ``[N]``.
    eps: l-inf radius.
    domains: certification domains; each gives a key ``"certified_<domain>"``.
    key: PRNG key for PGD's random start (default ``PRNGKey(0)``).
    pgd_steps: PGD iterations (``jaxdefense.attacks.pgd``); 0 skips the attack.
    pgd_step_size: default ``2.5 * eps / pgd_steps``.
    batch_size: examples per call; every evaluation goes through
      ``jaxdefense.data.run_batches`` (padded last batch, no recompilation; PGD's
      random start of batch ``i`` draws from ``fold_in(key, i)``).
    **kwargs: passed to :func:`verify` (``relu``, ``relu_budget``, ``correlate_input``,
      ``sound``).

  Returns:
    ``{"n": N, "standard": ..., "pgd": ..., "certified_box": ..., ...}`` (no ``"pgd"``
    when ``pgd_steps == 0``).

  Raises:
    ValueError, TypeError: as :func:`verify_dataset`.
  """
  _check_args(model, x, eps, y, variables, bool(kwargs.get("train", False)),
              kwargs.get("rngs"))
  x = np.asarray(x)
  y = np.asarray(y)
  key = jax.random.PRNGKey(0) if key is None else key
  step = pgd_step_size if pgd_step_size is not None else 2.5 * eps / max(pgd_steps, 1)
  def logits_fn(a):
    return model.apply(variables, a, train=False)
  if pgd_steps:
    from jaxdefense import attacks  # pylint: disable=import-outside-toplevel

  def point(batch, kb):
    xb, yb = batch
    out = {"standard": jnp.argmax(logits_fn(xb), -1) == yb}
    if pgd_steps:
      adv = attacks.pgd(logits_fn, xb, yb, key=kb, eps=eps, step_size=step, steps=pgd_steps)
      out["pgd"] = jnp.argmax(logits_fn(adv), -1) == yb
    return out

  # batch i's PGD start draws from fold_in(key, i)
  points = _data.run_batches(point, (x, y), batch_size=batch_size, key=key)
  n = x.shape[0]
  out: dict[str, float] = {"n": n}
  for k, v in points.items():
    out[k] = float(np.mean(v))
  for d in domains:
    out[f"certified_{d}"] = float(np.mean(verify_dataset(
        model, variables, x, y, eps, d, batch_size=batch_size, **kwargs)))
  return out
