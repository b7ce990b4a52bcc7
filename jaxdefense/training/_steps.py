"""The jit-compiled train and eval steps, and evaluation over a whole data set."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from jaxdefense import data as _data
from jaxdefense.training import _sharding
from jaxdefense.training._state import TrainState

__all__ = ["CompiledStep", "make_train_step", "make_eval_step", "evaluate", "step_key",
           "eval_key", "EVAL_STREAM"]

#: Constant folded into the root key for evaluation noise (stochastic models), so that
#: evaluation is deterministic and independent of the training step.
EVAL_STREAM = 0x0E7A1


class CompiledStep:
  """A ``jax.jit``-compiled step that counts how often it was traced.

  Calling it calls the compiled function; ``traces`` is the number of times Python
  traced the step (1 after any number of calls with the same shapes and shardings:
  the loop guards against retracing with it).
  """

  def __init__(self, fn: Callable[..., Any], **jit_kwargs: Any):
    self._traces = 0

    def counted(*args, **kwargs):
      self._traces += 1
      return fn(*args, **kwargs)

    counted.__name__ = getattr(fn, "__name__", "step")
    self._jitted = jax.jit(counted, **jit_kwargs)

  @property
  def traces(self) -> int:
    """Number of times the step function has been traced."""
    return self._traces

  def lower(self, *args: Any) -> Any:
    """``jax.jit(...).lower(*args)``, e.g. to inspect the compiled program."""
    return self._jitted.lower(*args)

  def __call__(self, *args: Any) -> Any:
    return self._jitted(*args)


def step_key(state: TrainState) -> jax.Array:
  """The key of the current step: ``fold_in(state.key, state.step)``."""
  return jax.random.fold_in(state.key, state.step)


def eval_key(state: TrainState, index: jax.Array | int) -> jax.Array:
  """The evaluation key of batch ``index``: fixed for a given root key."""
  return jax.random.fold_in(jax.random.fold_in(state.key, EVAL_STREAM), index)


def _check_aux(aux: Any, state: TrainState, labels: jax.Array) -> None:
  if not isinstance(aux, Mapping) or "logits" not in aux or "model_state" not in aux:
    got = sorted(aux) if isinstance(aux, Mapping) else type(aux).__name__
    raise ValueError(f"an objective must return (loss, aux) with aux a dict holding at "
                     f"least 'logits' and 'model_state'; got aux keys {got}.")
  logits = aux["logits"]
  if logits.ndim != 2 or logits.shape[0] != labels.shape[0]:
    raise ValueError(f"objective aux['logits'] must be [B, K] with B = {labels.shape[0]} "
                     f"(the batch); got shape {logits.shape}.")
  want = jax.tree_util.tree_structure(dict(state.model_state))
  got = jax.tree_util.tree_structure(dict(aux["model_state"]))
  if want != got:
    raise ValueError("objective aux['model_state'] must have the structure of the model's "
                     f"state ({sorted(state.model_state)}); got "
                     f"{sorted(dict(aux['model_state']))}. Return the model_state of the "
                     "forward pass whose loss is used.")


def make_train_step(objective: Callable[..., Any], *,
                    augment: Mapping[str, Any] | None = None,
                    mesh: Mesh | None = None, donate: bool = True,
                    steps_per_epoch: int | None = None) -> CompiledStep:
  """Build the jit-compiled training step ``(state, images, labels) -> (state, metrics)``.

  One call: derive the step key ``fold_in(state.key, state.step)`` and split it into
  augmentation, noise, dropout and objective keys; augment the batch on device
  (``jaxdefense.data.augment``) if asked; evaluate ``objective(apply_fn, x, y, key) ->
  (loss, aux)`` and its gradient with respect to the parameters; apply the optimizer;
  keep ``aux["model_state"]`` (batch statistics of the forward pass whose loss is
  used).  ``apply_fn(x, *, key=None) -> (logits, model_state)`` runs the model in
  training mode with the current parameters (batch statistics from the batch); its
  noise and dropout come from the step key, or from ``key`` when given (e.g. fresh
  noise per attack iteration).

  Args:
    objective: a callable ``objective(apply_fn, x, y, key) -> (loss, aux)``, ``aux``
      a dict with at least ``"logits"`` ``[B, K]`` and ``"model_state"``; other
      scalar entries of ``aux`` are reported as metrics.
    augment: keyword arguments of ``jaxdefense.data.augment`` (``pad``, ``crop``,
      ``flip``), or ``None`` for no augmentation.
    mesh: device mesh; the batch is sharded over it and the state replicated.
      ``None``: no sharding constraints (one device).
    donate: donate the input state's buffers (the state is updated in place).
    steps_per_epoch: when given and the objective sets ``uses_epoch = True`` (the
      certified objective's eps / mixing ramps), it is called with
      ``epoch=state.step / steps_per_epoch`` (a traced fractional epoch).

  An objective with ``attack_mode == "eval"`` (TRADES by default) is also given
  ``attack_logits_fn(x, *, key=None) -> logits``: the model in evaluation mode
  (running batch statistics, no dropout) with the current parameters, for its inner
  attack.

  Returns:
    A :class:`CompiledStep`; its metrics are device scalars ``loss`` (sum over the
    batch), ``correct``, ``count`` and ``<name>`` (sum) for each scalar of ``aux``.

  Raises:
    ValueError: (at the first call) an objective whose ``aux`` misses ``logits`` or
      ``model_state``, or returns a model state of another structure.
  """
  augment = dict(augment) if augment is not None else None

  def train_step(state: TrainState, images: jax.Array, labels: jax.Array):
    key = step_key(state)
    aug_key, noise_key, dropout_key, obj_key = jax.random.split(key, 4)
    if augment is not None:
      images = _data.augment(aug_key, images, **augment)

    def loss_fn(params):
      variables = {"params": params, **state.model_state}

      def rngs(key):
        nk, dk = (noise_key, dropout_key) if key is None else jax.random.split(key)
        return {"noise": nk, "dropout": dk}

      def apply_fn(x, *, key=None):
        logits, new_state = state.apply_fn(variables, x, train=True, rngs=rngs(key),
                                           mutable=["batch_stats"])
        return logits, dict(new_state)

      kwargs = {}
      if getattr(objective, "attack_mode", "train") == "eval":
        # inner attacks on the evaluation-mode model: running batch statistics, no
        # dropout; noise as the model draws it at test time
        def attack_fn(x, *, key=None):
          return state.apply_fn(variables, x, train=False, rngs=rngs(key))
        kwargs["attack_logits_fn"] = attack_fn
      if steps_per_epoch and getattr(objective, "uses_epoch", False):
        kwargs["epoch"] = state.step.astype(jnp.float32) / float(steps_per_epoch)
      return objective(apply_fn, images, labels, obj_key, **kwargs)

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    _check_aux(aux, state, labels)
    new_state = state.apply_gradients(grads, dict(aux["model_state"]))
    b = labels.shape[0]
    predictions = jnp.argmax(aux["logits"], axis=-1)
    metrics = {"loss": loss * b,
               "correct": jnp.sum(predictions == labels).astype(jnp.float32),
               "count": jnp.asarray(b, jnp.float32)}
    for name, value in aux.items():
      if name not in ("logits", "model_state") and jnp.ndim(value) == 0:
        metrics[name] = jnp.asarray(value, jnp.float32) * b
    return new_state, metrics

  kwargs: dict[str, Any] = {"donate_argnums": (0,) if donate else ()}
  if mesh is not None:
    rep, bat = _sharding.replicated(mesh), _sharding.batch_sharding(mesh)
    kwargs.update(in_shardings=(rep, bat, bat), out_shardings=(rep, rep))
  return CompiledStep(train_step, **kwargs)


def make_eval_step(mesh: Mesh | None = None) -> CompiledStep:
  """Build the jit-compiled evaluation step.

  ``eval_step(state, images, labels, mask, index) -> {"loss", "correct", "count"}``
  runs the model in evaluation mode (running batch statistics) and returns sums over
  the rows where ``mask`` is 1 (padding rows of a last, partial batch have 0), so
  every batch has the same shape and the step compiles once.  Stochastic models get
  the noise key :func:`eval_key` ``(state, index)``: evaluation is deterministic.

  Args:
    mesh: device mesh (batch sharded, state replicated) or ``None``.

  Returns:
    A :class:`CompiledStep`.
  """

  def eval_step(state: TrainState, images: jax.Array, labels: jax.Array, mask: jax.Array,
                index: jax.Array):
    nk, dk = jax.random.split(eval_key(state, index))
    logits = state.apply_fn(state.variables, images, train=False,
                            rngs={"noise": nk, "dropout": dk})
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    return {"loss": jnp.sum(losses * mask), "correct": jnp.sum(correct * mask),
            "count": jnp.sum(mask)}

  kwargs: dict[str, Any] = {}
  if mesh is not None:
    rep, bat = _sharding.replicated(mesh), _sharding.batch_sharding(mesh)
    kwargs.update(in_shardings=(rep, bat, bat, bat, rep), out_shardings=rep)
  return CompiledStep(eval_step, **kwargs)


def evaluate(state: TrainState, dataset: Any, batch_size: int, *,
             mesh: Mesh | None = None, eval_step: CompiledStep | None = None
             ) -> dict[str, float]:
  """Clean loss and accuracy of ``state`` on a whole data set (evaluation mode).

  Every example is seen exactly once, in stored order; the last batch is padded to
  ``batch_size`` and masked.

  Args:
    state: a :class:`TrainState`.
    dataset: a ``jaxdefense.data.Dataset`` or ``(images, labels)`` NumPy arrays.
    batch_size: evaluation batch, divisible by the number of devices of ``mesh``.
    mesh: device mesh (default: a 1-D mesh over all devices).
    eval_step: a step from :func:`make_eval_step` to reuse (avoids a new compile).

  Returns:
    ``{"loss": mean cross-entropy, "accuracy": fraction correct, "count": N}``.

  Raises:
    ValueError: ``batch_size`` not divisible by the device count, an empty data set.
  """
  mesh = _sharding.make_mesh() if mesh is None else mesh
  _sharding.check_divisible(batch_size, mesh, "eval_batch_size")
  step = eval_step if eval_step is not None else make_eval_step(mesh)
  sharding = _sharding.batch_sharding(mesh)
  sums = []
  for i, (x, y) in enumerate(_data.batches(dataset, batch_size, shuffle=False,
                                           drop_remainder=False)):
    n = y.shape[0]
    mask = np.ones((batch_size,), np.float32)
    if n < batch_size:
      pad = batch_size - n
      x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
      y = np.concatenate([y, np.zeros((pad,), y.dtype)])
      mask[n:] = 0.0
    xb, yb, mb = _sharding.shard_batch((x, y, mask), sharding)
    sums.append(step(state, xb, yb, mb, jnp.asarray(i, jnp.int32)))
  if not sums:
    raise ValueError("cannot evaluate on an empty data set.")
  total = jax.tree_util.tree_map(lambda *a: float(np.sum(np.asarray(a, np.float64))),
                                 *jax.device_get(sums))
  count = total["count"]
  return {"loss": total["loss"] / count, "accuracy": total["correct"] / count,
          "count": int(count)}
