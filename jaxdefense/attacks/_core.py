"""Shared machinery of the attacks: models, losses, projections, ascent rules, the loop.

Everything here is a pure function of arrays.  An iterative attack is assembled from
four pieces (STYLE.md practices 4 and 7):

* a *value-and-gradient* function ``vg(z, key) -> (loss [B], logits [B, K] | None,
  grad)`` of the attack objective (autodiff, an EOT average, or the SPSA estimator);
* a *projection* onto the threat model (l-inf or l2 ball intersected with [0, 1]);
* an :class:`AscentRule`, an optax-like pair of pure functions ``init`` / ``update``
  that carries its own state (momentum, Adam moments, APGD step sizes, ...);
* :func:`ascent_loop`, a single ``jax.lax.fori_loop`` driver, so compile time does not
  grow with the number of steps.

Conventions
-----------
A *logits function* is either a deterministic ``f(x) -> logits`` or an :class:`EOT`
wrapper (made by :func:`eot`) around a stochastic ``f(x, key) -> logits``.  Attacks
derive every key they hand to the model from their own ``key`` argument, so an attack
is a deterministic function of its inputs and key.

Every loss is per example (``[B]``) and is *maximised*; the gradient of the batch sum
is the per-example gradient, so examples never interact as long as the model treats
them independently (evaluation-mode batch norm), and the whole attack can be
``vmap``-ed over examples or keys.

Precision: images are float32 or float64 (:func:`validate` rejects float16 and
bfloat16 images).  The model may compute in lower precision: logits are upcast to at
least float32 before the loss, and per-example losses are float32 (:data:`LOSS_DTYPE`)
whatever the dtypes of the images and logits, so loop states that store losses have
one dtype.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdefense import _checks

Array = jax.Array
LogitsFn = Callable[..., Array]
LossFn = Callable[[Array], Array]

NORMS = ("linf", "l2")
LOSSES = ("ce", "margin", "dlr")
# dtype of every per-example loss (and of the loop states that store losses).
LOSS_DTYPE = jnp.float32
# Image dtypes the attacks accept: the attacks' small constants (1e-12 guards, C&W's
# tanh margin) round away in float16 / bfloat16.
IMAGE_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


# --------------------------------------------------------------------------- models


@dataclasses.dataclass(frozen=True)
class EOT:
  """Expectation over Transformation of a stochastic model (Athalye et al., 2018).

  Wraps a stochastic ``logits_fn(x, key) -> logits``.  Called as ``eot_fn(x, key)`` it
  returns the logits averaged over ``n`` noise draws (the ensemble prediction).  When an
  attack is given an ``EOT`` it maximises the *mean of the per-draw losses*, so its
  gradient is the mean of the ``n`` per-draw gradients; every iteration draws fresh
  keys derived from the attack's ``key``.

  Attributes:
    logits_fn: stochastic model ``f(x [B, H, W, C], key) -> logits [B, K]``.
    n: number of noise draws per evaluation (>= 1).
    vectorize: evaluate the draws with ``jax.vmap`` (fast, ``n`` times the memory);
      ``False`` runs them sequentially with ``jax.lax.map``.
  """

  logits_fn: LogitsFn
  n: int = 5
  vectorize: bool = True

  def draws(self, x: Array, key: Array) -> Array:
    """Logits of ``n`` independent draws, ``[n, B, K]``."""
    keys = jax.random.split(key, self.n)
    one = lambda k: self.logits_fn(x, k)
    if self.vectorize:
      return jax.vmap(one)(keys)
    return jax.lax.map(one, keys)

  def __call__(self, x: Array, key: Array) -> Array:
    """Mean logits over ``n`` draws, ``[B, K]``."""
    return jnp.mean(self.draws(x, key), axis=0)


def eot(logits_fn: LogitsFn, n: int = 5, *, vectorize: bool = True) -> EOT:
  """Wrap a stochastic model for Expectation-over-Transformation attacks.

  Reference: Athalye, Carlini & Wagner, "Obfuscated Gradients Give a False Sense of
  Security", ICML 2018; the EnResNet paper attacks its noisy nets with EOT over 5 draws.

  Every attack in :mod:`jaxdefense.attacks` accepts either a deterministic
  ``logits_fn(x)`` or the object returned here.  With an ``EOT`` model the attack's
  objective is the mean over ``n`` draws of the per-draw loss (so its gradient is the
  mean of the per-draw gradients), and each iteration uses fresh noise keys derived
  from the attack's ``key``.  On a deterministic model (one that ignores its key) the
  result equals the un-wrapped attack up to float rounding.

  Args:
    logits_fn: ``f(x [B, H, W, C], key) -> logits [B, K]``, e.g.
      ``lambda x, k: model.apply(variables, x, train=False, rngs={"noise": k})``.
    n: number of noise draws per gradient (EnResNet uses 5).
    vectorize: draw with ``vmap`` (default) or sequentially with ``lax.map``.

  Returns:
    An :class:`EOT` callable ``(x, key) -> mean logits [B, K]``.

  Raises:
    TypeError: ``logits_fn`` is not callable or ``n`` is not an integer.
    ValueError: ``n < 1``.
  """
  if not callable(logits_fn):
    raise TypeError(f"logits_fn must be callable f(x, key) -> logits; got {logits_fn!r}.")
  n = _checks.check_int(n, "n", minimum=1)
  return EOT(logits_fn, n, bool(vectorize))


def upcast_logits(logits: Array) -> Array:
  """Logits in at least float32 (a bfloat16 / float16 model's logits are upcast)."""
  return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))


def logit_draws(logits_fn: LogitsFn, x: Array, key: Optional[Array]) -> Array:
  """Logits as a stack of draws ``[n, B, K]`` (``n = 1`` for a deterministic model).

  The logits are upcast to at least float32 (:func:`upcast_logits`), so losses of a
  model computing in low precision are evaluated in float32.
  """
  if isinstance(logits_fn, EOT):
    return upcast_logits(logits_fn.draws(x, key))
  return upcast_logits(logits_fn(x))[None]


def loss_values(loss_fn: LossFn, draws: Array) -> Array:
  """Per-example loss ``[B]`` (dtype :data:`LOSS_DTYPE`): the mean over draws ``[n, B, K]``."""
  return jnp.mean(jax.vmap(loss_fn)(draws), axis=0).astype(LOSS_DTYPE)


def predict(logits_fn: LogitsFn, x: Array, *, key: Optional[Array] = None) -> Array:
  """Logits of a deterministic model, or the mean logits over draws of an :class:`EOT`.

  Args:
    logits_fn: ``f(x) -> logits`` or an :class:`EOT`.
    x: images ``[B, H, W, C]``.
    key: PRNG key, required for an :class:`EOT` model.

  Returns:
    Logits ``[B, K]``.

  Raises:
    ValueError: an :class:`EOT` model without a key.
  """
  if isinstance(logits_fn, EOT):
    if key is None:
      raise ValueError("predict: an EOT (stochastic) model needs key=jax.random.key(...); "
                       "got key=None.")
    return logits_fn(x, key)
  return logits_fn(x)


# --------------------------------------------------------------------------- losses


def _other_max(z: Array, label: Array) -> Array:
  """``max_{j != label} z_j`` for one logit vector ``[K]``."""
  return jnp.max(jnp.where(jnp.arange(z.shape[-1]) == label, -jnp.inf, z))


def _ce_one(z: Array, label: Array) -> Array:
  return jax.nn.logsumexp(z) - z[label]


def _margin_one(z: Array, label: Array) -> Array:
  return _other_max(z, label) - z[label]


def _dlr_one(z: Array, label: Array) -> Array:
  zs = jnp.sort(z)
  return (_other_max(z, label) - z[label]) / (zs[-1] - zs[-3] + 1e-12)


def _dlr_targeted_one(z: Array, label: Array, target: Array) -> Array:
  zs = jnp.sort(z)
  return -(z[label] - z[target]) / (zs[-1] - 0.5 * (zs[-3] + zs[-4]) + 1e-12)


def cross_entropy(logits: Array, labels: Array) -> Array:
  """Per-example softmax cross-entropy ``[B]`` of logits ``[B, K]`` and labels ``[B]``."""
  return jax.vmap(_ce_one)(logits, labels)


def margin(logits: Array, labels: Array) -> Array:
  """Per-example C&W margin ``max_{j != y} z_j - z_y`` (``> 0`` iff misclassified)."""
  return jax.vmap(_margin_one)(logits, labels)


def dlr(logits: Array, labels: Array) -> Array:
  """Per-example Difference-of-Logits-Ratio loss (Croce & Hein, 2020), to maximise.

  ``-(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3)`` with ``z_pi`` the sorted logits; it is
  invariant to shifts and rescalings of the logits.  Needs ``K >= 3``.
  """
  return jax.vmap(_dlr_one)(logits, labels)


def dlr_targeted(logits: Array, labels: Array, targets: Array) -> Array:
  """Targeted DLR ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)``; needs ``K >= 4``."""
  return jax.vmap(_dlr_targeted_one)(logits, labels, targets)


def make_loss(loss: Union[str, Callable], y: Array, target: Optional[Array]) -> LossFn:
  """The per-example objective ``logits [B, K] -> [B]`` that an attack maximises.

  Untargeted: ``ce`` = CE(z, y), ``margin`` = max_{j != y} z_j - z_y, ``dlr`` = DLR(z, y).
  Targeted (``target`` given): ``ce`` = -CE(z, t), ``margin`` = z_t - max_{j != t} z_j,
  ``dlr`` = targeted DLR.  A callable ``loss(logits, y, target) -> [B]`` is used as is.
  """
  if callable(loss):
    return lambda z: loss(z, y, target)
  if target is None:
    fn = {"ce": cross_entropy, "margin": margin, "dlr": dlr}[loss]
    return lambda z: fn(z, y)
  if loss == "ce":
    return lambda z: -cross_entropy(z, target)
  if loss == "margin":
    return lambda z: -margin(z, target)
  return lambda z: dlr_targeted(z, y, target)


def success(logits: Array, y: Array, target: Optional[Array]) -> Array:
  """Per-example attack success ``[B]``: misclassified, or classified as ``target``."""
  pred = jnp.argmax(logits, axis=-1)
  return pred != y if target is None else pred == target


def better(succ_a: Array, loss_a: Array, succ_b: Array, loss_b: Array) -> Array:
  """Lexicographic comparison (success first, then loss): is candidate a better than b?"""
  return (succ_a & ~succ_b) | ((succ_a == succ_b) & (loss_a > loss_b))


# ----------------------------------------------------------------- value and gradient


def make_value_and_grad(logits_fn: LogitsFn, loss_fn: LossFn,
                        transform: Optional[Callable[[Array], Array]] = None,
                        penalty: Optional[Callable[[Array], Array]] = None):
  """``vg(z, key) -> (loss [B], mean logits [B, K], d sum(loss) / dz)``.

  The attack variable ``z`` is the image itself, or ``transform(z)`` is (C&W's tanh
  reparametrisation).  ``penalty(z) -> [B]`` is added to the loss (C&W's distance
  term).  For an :class:`EOT` model the loss is the mean over draws of the per-draw
  loss and the returned logits are the mean logits.  The loss is float32
  (:data:`LOSS_DTYPE`) and the logits at least float32, whatever the model's precision;
  the gradient has the dtype of ``z``.
  """

  def total(z, key):
    x_adv = z if transform is None else transform(z)
    draws = logit_draws(logits_fn, x_adv, key)
    per_example = loss_values(loss_fn, draws)
    if penalty is not None:
      per_example = (per_example + penalty(z)).astype(LOSS_DTYPE)
    return jnp.sum(per_example), (per_example, jnp.mean(draws, axis=0))

  grad_fn = jax.grad(total, has_aux=True)

  def vg(z, key):
    grad, (loss, logits) = grad_fn(z, key)
    return loss, logits, grad

  return vg


def evaluate(logits_fn: LogitsFn, loss_fn: LossFn, z: Array, key: Optional[Array],
             transform: Optional[Callable[[Array], Array]] = None,
             penalty: Optional[Callable[[Array], Array]] = None) -> tuple[Array, Array]:
  """Per-example loss ``[B]`` and mean logits ``[B, K]`` at ``z`` (no gradient).

  ``transform`` and ``penalty`` have the meaning of :func:`make_value_and_grad`; the
  loss is float32 (:data:`LOSS_DTYPE`) as there.
  """
  x_adv = z if transform is None else transform(z)
  draws = logit_draws(logits_fn, x_adv, key)
  value = loss_values(loss_fn, draws)
  if penalty is not None:
    value = (value + penalty(z)).astype(LOSS_DTYPE)
  return value, jnp.mean(draws, axis=0)


# ------------------------------------------------------------------ per-example maths


def per_example(value: Any, x: Array) -> Array:
  """Broadcast a scalar or per-example ``[B]`` value against images ``[B, ...]``."""
  value = jnp.asarray(value, dtype=x.dtype)
  if value.ndim == 1:
    return value.reshape((-1,) + (1,) * (x.ndim - 1))
  return value


def expand_mask(mask: Array, x: Array) -> Array:
  """Reshape a per-example boolean ``[B]`` to broadcast against ``x [B, ...]``."""
  return mask.reshape((-1,) + (1,) * (x.ndim - 1))


def _l2_norm_one(v: Array) -> Array:
  return jnp.sqrt(jnp.sum(jnp.square(v)))


def l2_normalize(g: Array) -> Array:
  """``g / ||g||_2`` per example (zero stays zero)."""
  return jax.vmap(lambda gi: gi / jnp.maximum(_l2_norm_one(gi), 1e-12))(g)


def l1_normalize(g: Array) -> Array:
  """``g / ||g||_1`` per example (zero stays zero)."""
  return jax.vmap(lambda gi: gi / jnp.maximum(jnp.sum(jnp.abs(gi)), 1e-12))(g)


def steepest_direction(g: Array, norm: str) -> Array:
  """Steepest ascent direction of unit norm: ``sign(g)`` (l-inf) or ``g / ||g||_2``."""
  return jnp.sign(g) if norm == "linf" else l2_normalize(g)


def _l2_norms(v: Array) -> Array:
  """Per-example l2 norms of ``v [B, ...]``, shaped ``[B, 1, ...]`` to broadcast."""
  return jnp.sqrt(jnp.sum(jnp.square(v), axis=tuple(range(1, v.ndim)), keepdims=True))


def make_projection(norm: str, x: Array, eps: Any) -> Callable[[Array], Array]:
  """Projection onto ``{x' : ||x' - x|| <= eps} ∩ [0, 1]^d`` (per-example ``eps``).

  Exact for l-inf; for l2 it scales into the ball and then clips to the box (feasible,
  the usual approximation of the exact projection).  Written with broadcasting rather
  than ``vmap`` over examples, so a batch sharded over devices (explicit sharding
  included) keeps its sharding.
  """
  eps_e = per_example(eps, x)
  if norm == "linf":
    return lambda x_adv: jnp.clip(jnp.clip(x_adv, x - eps_e, x + eps_e), 0.0, 1.0)

  def project_l2(x_adv: Array) -> Array:
    delta = x_adv - x
    factor = jnp.minimum(1.0, eps_e / jnp.maximum(_l2_norms(delta), 1e-12))
    # Clipping to the box after scaling only shrinks |delta| coordinate-wise, so the
    # result stays inside the ball.
    return jnp.clip(x + delta * factor, 0.0, 1.0)

  return project_l2


def random_start(key: Array, x: Array, eps: Any, norm: str, kind: str = "uniform",
                 scale: Any = None) -> Array:
  """A random starting point inside the threat model.

  ``uniform``: uniform in the l-inf ball, or uniform in the l2 ball (Gaussian direction,
  radius ``eps * U^(1/d)``).  ``normal``: ``x + scale * N(0, I)`` (TRADES).  The point is
  projected onto the ball and [0, 1].
  """
  project = make_projection(norm, x, eps)
  if kind == "normal":
    return project(x + per_example(scale, x) * jax.random.normal(key, x.shape, x.dtype))
  eps_e = per_example(eps, x)
  if norm == "linf":
    noise = jax.random.uniform(key, x.shape, x.dtype, -1.0, 1.0)
    return project(x + eps_e * noise)
  k_dir, k_rad = jax.random.split(key)
  direction = l2_normalize(jax.random.normal(k_dir, x.shape, x.dtype))
  d = math.prod(x.shape[1:])
  radius = jax.random.uniform(k_rad, (x.shape[0],), x.dtype) ** (1.0 / d)
  return project(x + eps_e * per_example(radius, x) * direction)


# ------------------------------------------------------------------- ascent rules


class AscentRule(NamedTuple):
  """An optax-like pair of pure functions driving one attack iteration.

  Attributes:
    init: ``init(z0) -> state``.
    update: ``update(i, z, loss, logits, grad, state) -> (z_next, state)`` where
      ``loss [B]``, ``logits [B, K]`` (or ``None``) and ``grad`` are evaluated at ``z``
      and ``z_next`` is already projected onto the threat model.
  """

  init: Callable[[Array], Any]
  update: Callable[..., tuple[Array, Any]]


def sign_ascent(step_size: Any, project: Callable, norm: str = "linf") -> AscentRule:
  """Projected steepest ascent ``z <- P(z + step_size * dir(g))`` (FGSM / IFGSM / PGD).

  ``dir`` is ``sign`` for l-inf and ``g / ||g||_2`` for l2 (Madry et al., 2018).
  """

  def init(z):
    del z
    return ()

  def update(i, z, loss, logits, grad, state):
    del i, loss, logits
    step = per_example(step_size, z)
    return project(z + step * steepest_direction(grad, norm)), state

  return AscentRule(init, update)


def momentum_sign_ascent(step_size: Any, mu: Any, project: Callable,
                         norm: str = "linf") -> AscentRule:
  """MI-FGSM: ``m <- mu m + g / ||g||_1``, ``z <- P(z + step_size * dir(m))``.

  ``step_size`` and ``mu`` are scalars or per example ``[B]``.

  Reference: Dong et al., "Boosting Adversarial Attacks with Momentum", CVPR 2018.
  """

  def init(z):
    return jnp.zeros_like(z)

  def update(i, z, loss, logits, grad, m):
    del i, loss, logits
    m = per_example(mu, z) * m + l1_normalize(grad)
    step = per_example(step_size, z)
    return project(z + step * steepest_direction(m, norm)), m

  return AscentRule(init, update)


def optax_ascent(tx: optax.GradientTransformation, project: Callable) -> AscentRule:
  """Ascent with an optax optimiser, projecting every step.

  ``tx`` minimises, so it is handed ``-grad``.  Its hyper-parameters are whatever
  ``tx`` broadcasts against the images; for a per-example learning rate use
  :func:`adam_ascent`.
  """

  def init(z):
    return tx.init(z)

  def update(i, z, loss, logits, grad, state):
    del i, loss, logits
    updates, state = tx.update(-grad, state, z)
    return project(optax.apply_updates(z, updates)), state

  return AscentRule(init, update)


def adam_updates(lr: Any) -> optax.GradientTransformation:
  """Adam with a scalar or per-example ``[B]`` learning rate, as an optax transformation.

  ``optax.scale_by_adam()`` followed by a multiplication by ``-lr``, with ``lr``
  broadcast over the leading (batch) axis of the parameters (:func:`per_example`);
  ``optax.adam(lr)`` would align a ``[B]`` learning rate with the last (channel) axis.
  For a scalar ``lr`` it equals ``optax.adam(lr)``.  The parameters must be one array
  ``[B, ...]``.
  """
  moments = optax.scale_by_adam()

  def update(grads, state, params=None):
    updates, state = moments.update(grads, state, params)
    return updates * -per_example(lr, updates), state

  return optax.GradientTransformation(moments.init, update)


def adam_ascent(lr: Any, project: Callable) -> AscentRule:
  """Adam ascent (C&W and SPSA) with a scalar or per-example ``[B]`` learning rate.

  :func:`optax_ascent` of :func:`adam_updates`: the step of example ``b`` is
  ``lr[b]`` times its Adam direction (optax's defaults b1 0.9, b2 0.999, eps 1e-8),
  then the point is projected.

  Args:
    lr: learning rate, ``>= 0``: a scalar or one value per example ``[B]`` (may be
      traced; then only its rank is checked).
    project: ``P(z) -> z`` applied after every step, e.g. :func:`make_projection`.

  Returns:
    An :class:`AscentRule` for :func:`ascent_loop` over attack variables ``[B, ...]``.

  Raises:
    TypeError: ``lr`` is a bool or not numeric, or ``project`` is not callable.
    ValueError: ``lr`` has more than one axis, or a concrete ``lr`` is negative or
      not finite.
  """
  if not callable(project):
    raise TypeError(f"adam_ascent: project must be callable P(z) -> z; got {project!r}.")
  if isinstance(lr, bool) or lr is None:
    raise TypeError(f"adam_ascent: lr must be a non-negative number; got {lr!r}.")
  lr = as_param(lr)
  if np.ndim(lr) > 1:
    raise ValueError(f"adam_ascent: lr must be a scalar or one value per example [B]; "
                     f"got shape {np.shape(lr)}.")
  arr = _checks.as_concrete_numpy(lr)
  if arr is not None:
    if not np.issubdtype(arr.dtype, np.number):
      raise TypeError(f"adam_ascent: lr must be a non-negative number; got {lr!r}.")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
      raise ValueError(f"adam_ascent: lr must be finite and >= 0; got {lr!r}.")
  return optax_ascent(adam_updates(lr), project)


class BestState(NamedTuple):
  """State of :func:`track_best`: the wrapped rule's state and the best point so far."""

  inner: Any
  x_best: Array
  succ_best: Array
  loss_best: Array


def track_best(rule: AscentRule, decode: Callable[[Array], Array], y: Array,
               target: Optional[Array]) -> AscentRule:
  """Wrap ``rule`` so that its state also keeps each example's best iterate.

  "Best" is lexicographic: an iterate that fools the model (or reaches ``target``)
  beats one that does not, then the higher loss wins.  ``decode(z)`` maps the attack
  variable to images.  Finish with :func:`best_with_last` to include the last iterate.
  """

  def init(z):
    x0 = decode(z)
    b = x0.shape[0]
    return BestState(rule.init(z), x0, jnp.zeros((b,), bool),
                     jnp.full((b,), -jnp.inf, LOSS_DTYPE))

  def update(i, z, loss, logits, grad, state):
    x_now = decode(z)
    succ = success(logits, y, target)
    take = better(succ, loss, state.succ_best, state.loss_best)
    best = BestState(state.inner,
                     jnp.where(expand_mask(take, x_now), x_now, state.x_best),
                     jnp.where(take, succ, state.succ_best),
                     jnp.where(take, loss, state.loss_best))
    z_next, inner = rule.update(i, z, loss, logits, grad, state.inner)
    return z_next, best._replace(inner=inner)

  return AscentRule(init, update)


def best_with_last(state: BestState, x_last: Array, loss_last: Array, logits_last: Array,
                   y: Array, target: Optional[Array]) -> Array:
  """The best point of a :func:`track_best` run, the last iterate included."""
  take = better(success(logits_last, y, target), loss_last, state.succ_best,
                state.loss_best)
  return jnp.where(expand_mask(take, x_last), x_last, state.x_best)


# ------------------------------------------------------------------------ driver


def fold_in(key: Optional[Array], data: Any) -> Optional[Array]:
  """``jax.random.fold_in`` that passes ``None`` (no randomness needed) through."""
  return None if key is None else jax.random.fold_in(key, data)


def model_key(logits_fn: LogitsFn, key: Optional[Array], data: Any) -> Optional[Array]:
  """A key for the model's noise: derived from ``key`` for an :class:`EOT`, else ``None``."""
  return fold_in(key, data) if isinstance(logits_fn, EOT) else None


def ascent_loop(vg: Callable, rule: AscentRule, z0: Array, steps: int,
                key: Optional[Array]) -> tuple[Array, Any]:
  """Run ``steps`` iterations of ``rule`` from ``z0`` inside one ``lax.fori_loop``.

  Iteration ``i`` evaluates ``vg(z_i, fold_in(key, i))`` (``vg(z_i, None)`` when ``key``
  is ``None``, for deterministic models) and applies ``rule.update``.

  Returns:
    ``(z_steps, final rule state)``.
  """

  def body(i, carry):
    z, state = carry
    loss, logits, grad = vg(z, fold_in(key, i))
    return rule.update(i, z, loss, logits, grad, state)

  return jax.lax.fori_loop(0, steps, body, (z0, rule.init(z0)))


def best_of_restarts(run: Callable[[Optional[Array]], Array], score: Callable, x: Array,
                     restarts: int, key: Optional[Array]) -> Array:
  """Run an attack ``restarts`` times and keep the worst case for each example.

  ``run(key) -> x_adv``; ``score(x_adv, key) -> (success [B], loss [B])``.  Restart
  ``r`` uses ``fold_in(key, r)``, so ``restarts=1`` reproduces restart 0 of a longer
  run.  An example keeps the restart that succeeded, or else the one with the highest
  loss.  ``key`` may be ``None`` when nothing is random.
  """
  if restarts == 1:
    return run(fold_in(key, 0))

  def body(r, carry):
    best_x, best_succ, best_loss = carry
    k = fold_in(key, r)
    x_r = run(k)
    succ, loss = score(x_r, fold_in(k, 1_000_003))
    take = better(succ, loss, best_succ, best_loss)
    best_x = jnp.where(expand_mask(take, x_r), x_r, best_x)
    return (best_x, jnp.where(take, succ, best_succ), jnp.where(take, loss, best_loss))

  b = x.shape[0]
  init = (x, jnp.zeros((b,), bool), jnp.full((b,), -jnp.inf, LOSS_DTYPE))
  return jax.lax.fori_loop(0, restarts, body, init)[0]


# --------------------------------------------------------------------- validation


def _check_key(attack: str, key: Any, required: bool) -> None:
  if key is None:
    if required:
      raise ValueError(f"{attack}: key is required (e.g. key=jax.random.key(0)); got None.")
    return
  if not hasattr(key, "shape") or not hasattr(key, "dtype"):
    raise TypeError(f"{attack}: key must be a PRNG key (jax.random.key(seed)); "
                    f"got {_checks._summary(key)}.")


def as_param(value: Any) -> Any:
  """A hyper-parameter as the attacks use it: a list or tuple becomes an array.

  Scalars, NumPy and JAX arrays (tracers included) pass through unchanged.
  """
  if isinstance(value, (list, tuple)):
    return np.asarray(value)
  return value


def check_nonneg(value: Any, name: str, batch: int, attack: str,
                 upper: Optional[float] = None) -> Any:
  """A hyper-parameter that may be traced: scalar or ``[B]``, finite, ``>= 0``.

  ``value`` may be a Python number, a list / tuple of ``B`` numbers, or a NumPy or JAX
  array (a tracer under ``jit``).  Returns it as the attacks use it (:func:`as_param`:
  a list becomes an array).
  """
  if isinstance(value, bool) or value is None:
    raise TypeError(f"{attack}: {name} must be a non-negative number; got {value!r}.")
  try:
    shape = tuple(np.shape(value))
  except ValueError:  # a ragged sequence
    shape = None
  if shape not in ((), (batch,)):
    raise ValueError(f"{attack}: {name} must be a scalar or have one value per example "
                     f"(shape ({batch},)); got {_checks._summary(value)}.")
  arr = _checks.as_concrete_numpy(value)
  if arr is None:
    return as_param(value)
  if not np.issubdtype(arr.dtype, np.number) or not np.all(np.isfinite(arr)):
    raise ValueError(f"{attack}: {name} must be a finite number; got {_checks._summary(value)}.")
  if np.any(arr < 0):
    raise ValueError(f"{attack}: {name} must be >= 0; got {value!r}.")
  if upper is not None and np.any(arr > upper):
    raise ValueError(f"{attack}: {name} must be <= {upper}; got {value!r}.")
  return as_param(value)


def validate(attack: str, logits_fn: Any, x: Any, y: Any, *, key: Any = None,
             key_required: bool = False, eps: Any = None, norm: str = "linf",
             target: Any = None, loss: Any = "ce") -> int:
  """Check an attack's inputs at the API boundary; return the number of classes ``K``.

  Shape and dtype checks always run; value checks (ranges, NaNs, label bounds) run only
  on concrete inputs, so they cost nothing under ``jit``.  The model is traced once with
  ``jax.eval_shape`` to find ``K`` and to check that it maps ``[B, H, W, C]`` to
  ``[B, K]``.

  Raises:
    TypeError / ValueError naming the argument, its value and what was expected.
  """
  if not callable(logits_fn):
    raise TypeError(f"{attack}: logits_fn must be callable f(x) -> logits (or eot(f, n)); "
                    f"got {logits_fn!r}.")
  _checks.check_images(x, "x")
  if np.dtype(x.dtype) not in IMAGE_DTYPES:
    raise ValueError(
        f"{attack}: x must hold float32 or float64 images; got {_checks._summary(x)}. "
        "The attacks' small constants round away in float16 / bfloat16; pass "
        "x.astype(jnp.float32) (the model may still compute in low precision "
        "internally).")
  batch = x.shape[0]
  _checks.check_labels(y, None, "y", batch=batch)
  if target is not None:
    _checks.check_labels(target, None, "target", batch=batch)
  _checks.check_choice(norm, "norm", NORMS)
  if not callable(loss):
    _checks.check_choice(loss, "loss", LOSSES)
  stochastic = isinstance(logits_fn, EOT)
  _check_key(attack, key, key_required or stochastic)
  if eps is not None:
    upper = 1.0 if norm == "linf" else math.sqrt(math.prod(x.shape[1:]))
    check_nonneg(eps, "eps", batch, attack)
    _checks.check_eps(eps, "eps", upper=upper)
  x_spec = jax.ShapeDtypeStruct(x.shape, x.dtype)
  try:
    if stochastic:
      key_spec = jax.ShapeDtypeStruct(key.shape, key.dtype)
      out = jax.eval_shape(logits_fn.logits_fn, x_spec, key_spec)
    else:
      out = jax.eval_shape(logits_fn, x_spec)
  except TypeError as err:
    raise TypeError(
        f"{attack}: calling logits_fn on x ({_checks._summary(x)}) failed: {err}. "
        "logits_fn must map images [B, H, W, C] to logits [B, K]; wrap a stochastic "
        "model f(x, key) with jaxdefense.attacks.eot(f, n).") from err
  shape = tuple(getattr(out, "shape", ()))
  if len(shape) != 2 or shape[0] != batch:
    raise ValueError(f"{attack}: logits_fn must return logits [B, K] = [{batch}, K]; got "
                     f"output of shape {shape}.")
  num_classes = shape[1]
  if num_classes < 2:
    raise ValueError(f"{attack}: need at least 2 classes; logits_fn returned shape {shape}.")
  _checks.check_labels(y, num_classes, "y", batch=batch)
  if target is not None:
    _checks.check_labels(target, num_classes, "target", batch=batch)
  if loss == "dlr":
    need = 4 if target is not None else 3
    if num_classes < need:
      raise ValueError(f"{attack}: the {'targeted ' if target is not None else ''}DLR loss "
                       f"needs at least {need} classes; logits_fn returns {num_classes}.")
  return num_classes
