"""The jit-compiled train and eval steps, and evaluation over a whole data set."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from jaxdefense import data as _data
from jaxdefense import models as _models
from jaxdefense.data import _sharding
from jaxdefense.training._state import TrainState

__all__ = ["CompiledStep", "make_train_step", "make_eval_step", "evaluate", "step_key",
           "eval_key", "bound_model", "EVAL_STREAM"]

#: Constant folded into the root key for evaluation noise (stochastic models), so that
#: evaluation is deterministic and independent of the training step.
EVAL_STREAM = 0x0E7A1

#: Transient collections (per-pass loss terms sown by ``jaxdefense.nn.DeepLoss``): read
#: by objectives inside the step, never kept in the training state or checkpoints.
TRANSIENT_COLLECTIONS = ("losses",)


def _persistent(collections: Mapping[str, Any]) -> dict[str, Any]:
  return {k: v for k, v in dict(collections).items() if k not in TRANSIENT_COLLECTIONS}


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


def bound_model(state: TrainState, *, train: bool = False,
                rngs: Mapping[str, jax.Array] | None = None,
                params: Any = None, compute_dtype: Any = None) -> _models.ModelFn:
  """``state``'s model ready to call: ``models.bind(state.module, variables, ...)``.

  Args:
    state: a :class:`TrainState` whose ``apply_fn`` is a Flax module's ``apply``.
    train: training mode (see :func:`jaxdefense.models.bind`).
    rngs: default ``rngs`` of the model (``None``: none).
    params: parameters to use instead of ``state.params`` (e.g. the ones being
      differentiated); the other collections come from ``state.model_state``.
    compute_dtype: ``None`` or e.g. ``"bfloat16"``: mixed precision (see
      :class:`~jaxdefense.models.ModelFn`).

  Returns:
    A :class:`~jaxdefense.models.ModelFn`.

  Raises:
    TypeError: ``state.apply_fn`` is not the ``apply`` of a Flax module.
  """
  module = state.module
  if module is None:
    raise TypeError(f"state.apply_fn must be a Flax module's apply (model.apply, as "
                    f"create_train_state stores it); got {state.apply_fn!r}.")
  variables = {"params": state.params if params is None else params,
               **_persistent(state.model_state)}
  return _models.bind(module, variables, train=train, rngs=rngs, compute_dtype=compute_dtype)


def _check_aux(aux: Any, state: TrainState, labels: jax.Array) -> None:
  if not isinstance(aux, Mapping) or "logits" not in aux or "model_state" not in aux:
    got = sorted(aux) if isinstance(aux, Mapping) else type(aux).__name__
    raise ValueError(f"an objective must return (loss, aux) with aux a dict holding at "
                     f"least 'logits' and 'model_state'; got aux keys {got}.")
  logits = aux["logits"]
  if logits.ndim != 2 or logits.shape[0] != labels.shape[0]:
    raise ValueError(f"objective aux['logits'] must be [B, K] with B = {labels.shape[0]} "
                     f"(the batch); got shape {logits.shape}.")
  want = jax.tree_util.tree_structure(_persistent(state.model_state))
  got = jax.tree_util.tree_structure(dict(aux["model_state"]))
  if want != got:
    raise ValueError("objective aux['model_state'] must have the structure of the model's "
                     f"state ({sorted(state.model_state)}); got "
                     f"{sorted(dict(aux['model_state']))}. Return the model_state of the "
                     "forward pass whose loss is used.")


def make_train_step(objective: Callable[..., Any], *,
                    augment: Mapping[str, Any] | None = None,
                    mesh: Mesh | None = None, donate: bool = True,
                    steps_per_epoch: int | None = None,
                    state_sharding: Any = None, compute_dtype: Any = None) -> CompiledStep:
  """Build the jit-compiled training step ``(state, images, labels) -> (state, metrics)``.

  One call: derive the step key ``fold_in(state.key, state.step)`` and split it into
  augmentation, noise, dropout and objective keys; augment the batch on device
  (``jaxdefense.data.augment``) if asked; evaluate ``objective(model, x, y, key) ->
  (loss, aux)`` and its gradient with respect to the parameters (DeepLoss terms that a
  certified objective collects from the transient ``"losses"`` collection of its
  abstract pass are part of both); apply the optimizer; keep ``aux["model_state"]``
  (batch statistics of the forward pass whose loss is used) minus the transient
  collections, so ``"losses"`` never reaches the saved state.  ``model`` is
  ``jaxdefense.models.bind(module, variables, train=True,
  rngs={"noise": noise_key, "dropout": dropout_key})`` with the current parameters:
  ``model.apply(x, key=None) -> (logits, model_state)`` runs in training mode (batch
  statistics from the batch), with the step's noise and dropout keys, or keys split
  from ``key`` when given (e.g. fresh noise per attack iteration).  Objectives whose
  inner attack runs in evaluation mode (``attack_mode == "eval"``, TRADES by default)
  take ``model.with_mode(False)`` themselves.

  Args:
    objective: a callable ``objective(model, x, y, key) -> (loss, aux)``, ``aux``
      a dict with at least ``"logits"`` ``[B, K]`` and ``"model_state"``; other
      scalar entries of ``aux`` are reported as metrics.
    augment: keyword arguments of ``jaxdefense.data.augment`` (``pad``, ``crop``,
      ``flip``), or ``None`` for no augmentation.
    mesh: device mesh; the batch is sharded over it and the state replicated (or placed
      as ``state_sharding`` says).  ``None``: no sharding constraints (one device).
    donate: donate the input state's buffers (the state is updated in place).
    steps_per_epoch: when given and the objective sets ``uses_epoch = True`` (the
      certified objective's eps / mixing ramps), it is called with
      ``epoch=state.step / steps_per_epoch`` (a traced fractional epoch).
    state_sharding: with ``mesh``, the sharding of the state (one ``NamedSharding``
      per leaf, e.g. ``Experiment.state_sharding(mesh)`` for an ensemble whose members
      are split over devices); ``None``: replicated.
    compute_dtype: ``None`` (float32) or ``"bfloat16"`` / ``"float16"``: the forward
      and backward passes (the objective's attacks included) run in that precision on
      float32 parameters, which the optimizer updates in float32; losses, logits and
      batch statistics are float32 (see :class:`~jaxdefense.models.ModelFn`).

  Returns:
    A :class:`CompiledStep`; its metrics are device scalars ``loss`` (sum over the
    batch), ``correct``, ``count`` and ``<name>`` (sum) for each scalar of ``aux``.

  Raises:
    ValueError: (at the first call) an objective whose ``aux`` misses ``logits`` or
      ``model_state``, or returns a model state of another structure.
    TypeError: (at the first call) a state whose ``apply_fn`` is not a module's apply.
  """
  augment = dict(augment) if augment is not None else None
  compute_dtype = _models.check_compute_dtype(compute_dtype)

  def train_step(state: TrainState, images: jax.Array, labels: jax.Array):
    key = step_key(state)
    aug_key, noise_key, dropout_key, obj_key = jax.random.split(key, 4)
    if augment is not None:
      images = _data.augment(aug_key, images, **augment)

    def loss_fn(params):
      # a key passed to model.apply(x, key) is split into (noise, dropout) keys
      model = bound_model(state, train=True, params=params,
                          rngs={"noise": noise_key, "dropout": dropout_key},
                          compute_dtype=compute_dtype)
      kwargs = {}
      if steps_per_epoch and getattr(objective, "uses_epoch", False):
        kwargs["epoch"] = state.step.astype(jnp.float32) / float(steps_per_epoch)
      return objective(model, images, labels, obj_key, **kwargs)

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    if isinstance(aux, Mapping) and isinstance(aux.get("model_state"), Mapping):
      # DeepLoss terms ("losses") live for one pass only: never in the saved state.
      aux = {**aux, "model_state": _persistent(aux["model_state"])}
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
    st = rep if state_sharding is None else state_sharding
    kwargs.update(in_shardings=(st, bat, bat), out_shardings=(st, rep))
  return CompiledStep(train_step, **kwargs)


def make_eval_step(mesh: Mesh | None = None, state_sharding: Any = None,
                   compute_dtype: Any = None) -> CompiledStep:
  """Build the jit-compiled per-example evaluation step.

  ``eval_step(state, (images, labels), key) -> {"loss": [B], "correct": [B]}`` runs the
  model in evaluation mode (running batch statistics) and returns the per-example
  cross-entropy and correctness (``float32`` 0/1), what :func:`evaluate` feeds to
  ``jaxdefense.data.run_batches``.  The noise of a stochastic model comes from ``key``
  (split into noise and dropout keys, see :class:`~jaxdefense.models.ModelFn`); in
  :func:`evaluate` batch ``i`` gets :func:`eval_key` ``(state, i)``, so evaluation is
  deterministic.  The state is an argument: one compile serves every evaluation.

  Args:
    mesh: device mesh (batch sharded, state replicated) or ``None``.
    state_sharding: with ``mesh``, the state's sharding (see :func:`make_train_step`);
      ``None``: replicated.
    compute_dtype: mixed precision of the forward pass (see :func:`make_train_step`).

  Returns:
    A :class:`CompiledStep`.
  """
  compute_dtype = _models.check_compute_dtype(compute_dtype)

  def eval_step(state: TrainState, batch: tuple[jax.Array, jax.Array], key: jax.Array):
    images, labels = batch
    logits = bound_model(state, compute_dtype=compute_dtype)(images, key)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    return {"loss": losses.astype(jnp.float32), "correct": correct}

  kwargs: dict[str, Any] = {}
  if mesh is not None:
    rep, bat = _sharding.replicated(mesh), _sharding.batch_sharding(mesh)
    st = rep if state_sharding is None else state_sharding
    kwargs.update(in_shardings=(st, (bat, bat), rep), out_shardings=bat)
  return CompiledStep(eval_step, **kwargs)


def _dataset_arrays(dataset: Any) -> tuple[Any, Any]:
  if hasattr(dataset, "images") and hasattr(dataset, "labels"):
    return dataset.images, dataset.labels
  if isinstance(dataset, (tuple, list)) and len(dataset) == 2:
    return dataset[0], dataset[1]
  raise TypeError("dataset must be a jaxdefense.data.Dataset or an (images, labels) pair "
                  f"of arrays; got {type(dataset).__name__}.")


def evaluate(state: TrainState, dataset: Any, batch_size: int, *,
             mesh: Mesh | None = None, eval_step: CompiledStep | None = None
             ) -> dict[str, float]:
  """Clean loss and accuracy of ``state`` on a whole data set (evaluation mode).

  Every example is seen exactly once, in stored order, through
  ``jaxdefense.data.run_batches``: batches of ``batch_size`` examples (the last one
  padded, and a data set smaller than ``batch_size`` too, so every call has the same
  shape and one compile serves every split), sharded over ``mesh``; batch ``i`` draws
  the model's noise from :func:`eval_key` ``(state, i)``.

  Args:
    state: a :class:`TrainState`.
    dataset: a ``jaxdefense.data.Dataset`` or ``(images, labels)`` NumPy arrays.
    batch_size: evaluation batch, divisible by the number of devices of ``mesh``.
    mesh: device mesh (default: a 1-D mesh over all devices).
    eval_step: a step from :func:`make_eval_step` to reuse (avoids a new compile).

  Returns:
    ``{"loss": mean cross-entropy, "accuracy": fraction correct, "count": N}``.

  Raises:
    ValueError: ``batch_size`` not divisible by the device count, an empty data set,
      images and labels of different lengths.
    TypeError: ``dataset`` of the wrong kind.
  """
  mesh = _sharding.make_mesh() if mesh is None else mesh
  _sharding.check_divisible(batch_size, mesh, "eval_batch_size")
  step = eval_step if eval_step is not None else make_eval_step(mesh)
  images, labels = _dataset_arrays(dataset)
  if np.shape(labels)[:1] == (0,):
    raise ValueError("cannot evaluate on an empty data set.")
  root = jax.random.fold_in(state.key, EVAL_STREAM)   # batch i: eval_key(state, i)
  out = _data.run_batches(lambda batch, key: step(state, batch, key), (images, labels),
                          batch_size=batch_size, key=root, mesh=mesh, jit=False,
                          fixed_batch=True)
  count = int(out["correct"].shape[0])
  return {"loss": float(np.mean(out["loss"], dtype=np.float64)),
          "accuracy": float(np.mean(out["correct"], dtype=np.float64)),
          "count": count}
