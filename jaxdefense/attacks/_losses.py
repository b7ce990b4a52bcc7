"""Per-example attack losses (cross-entropy, C&W margin, DLR) and success tests.

Every loss maps logits ``[B, K]`` to a per-example value ``[B]`` that the attack
*maximises*; the gradient of the batch sum is the per-example gradient, so examples
never interact as long as the model treats them independently.  Per-example losses
stored by the attacks are float32 (:data:`LOSS_DTYPE`) whatever the dtypes of the
images and logits, so loop states that store losses have one dtype.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import jax
import jax.numpy as jnp

Array = jax.Array
LossFn = Callable[[Array], Array]

LOSSES = ("ce", "margin", "dlr")
# dtype of every per-example loss (and of the loop states that store losses).
LOSS_DTYPE = jnp.float32


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
  """Per-example softmax cross-entropy ``logsumexp(z) - z_y``, the loss PGD maximises.

  Args:
    logits: ``[B, K]`` unnormalised scores.
    labels: integer labels ``[B]`` in ``[0, K)``; not validated here (the attacks check
      them at their boundary; JAX indexing clamps an out-of-range label).

  Returns:
    ``[B]`` in the dtype of ``logits``, ``>= 0``; examples do not interact.
  """
  return jax.vmap(_ce_one)(logits, labels)


def margin(logits: Array, labels: Array) -> Array:
  """Per-example C&W margin ``max_{j != y} z_j - z_y`` (``> 0`` iff misclassified).

  Logits ``[B, K]`` and integer labels ``[B]`` give ``[B]``.
  """
  return jax.vmap(_margin_one)(logits, labels)


def dlr(logits: Array, labels: Array) -> Array:
  """Per-example Difference-of-Logits-Ratio loss (Croce & Hein, 2020), to maximise.

  ``-(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3)`` with ``z_pi`` the sorted logits; it is
  invariant to shifts and rescalings of the logits.  Logits ``[B, K]`` (``K >= 3``) and
  labels ``[B]`` give ``[B]``.
  """
  return jax.vmap(_dlr_one)(logits, labels)


def dlr_targeted(logits: Array, labels: Array, targets: Array) -> Array:
  """Per-example targeted DLR loss (Croce & Hein, 2020), to maximise.

  ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)`` with ``z_pi`` the logits sorted in
  decreasing order (a ``1e-12`` guards the denominator); positive once the target's
  logit exceeds the true label's.  Invariant to shifts and rescalings of the logits.

  Args:
    logits: ``[B, K]`` with ``K >= 4`` (the fourth-largest logit is used; with fewer
      classes JAX clamps that index, no error is raised and the value is not the DLR).
    labels: true integer labels ``[B]``.
    targets: target integer labels ``[B]``.  Neither is validated here (the attacks check
      them, and ``K``, at their boundary).

  Returns:
    ``[B]`` in the dtype of ``logits``.
  """
  return jax.vmap(_dlr_targeted_one)(logits, labels, targets)


def make_loss(loss: Union[str, Callable], y: Array, target: Optional[Array]) -> LossFn:
  """The per-example objective ``logits [B, K] -> [B]`` that an attack maximises.

  Untargeted: ``ce`` = CE(z, y), ``margin`` = max_{j != y} z_j - z_y, ``dlr`` = DLR(z, y).
  Targeted (``target`` given): ``ce`` = -CE(z, t), ``margin`` = z_t - max_{j != t} z_j,
  ``dlr`` = targeted DLR.  A callable ``loss(logits, y, target) -> [B]`` is used as is.
  ``y`` and ``target`` are integer labels ``[B]``; the name is not checked here (the
  attacks check it at their boundary), an unknown name raises ``KeyError``.
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
  """Per-example attack success ``[B]``: misclassified, or classified as ``target``.

  Logits ``[B, K]`` with a NaN or inf entry never count as a success (their argmax
  means nothing), so the attacks never prefer a point where the model failed.
  """
  pred = jnp.argmax(logits, axis=-1)
  hit = pred != y if target is None else pred == target
  return hit & jnp.all(jnp.isfinite(logits), axis=-1)


def better(succ_a: Array, loss_a: Array, succ_b: Array, loss_b: Array) -> Array:
  """Lexicographic comparison (success first, then loss): is candidate a better than b?

  All four arguments are per example ``[B]``; returns a boolean ``[B]``.
  """
  return (succ_a & ~succ_b) | ((succ_a == succ_b) & (loss_a > loss_b))
