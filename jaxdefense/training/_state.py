"""The training state: one pytree with parameters, model state, optimizer state, step, key."""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

__all__ = ["TrainState", "create_train_state"]


class TrainState(flax.struct.PyTreeNode):
  """Everything a training run carries from step to step, as one pytree.

  ``apply_fn`` and ``tx`` are static (part of the tree structure, not leaves), so a
  state passes through ``jit`` and checkpoints as arrays only.

  Attributes:
    step: ``int32 []`` number of optimizer updates applied so far.
    params: the ``params`` collection of the model.
    model_state: the other mutable collections, ``{"batch_stats": ...}`` or ``{}``.
    opt_state: the optax state of ``tx``.
    key: ``uint32 [2]`` root PRNG key of the run; the key of step ``s`` is
      ``jax.random.fold_in(key, s)``, so randomness resumes exactly from a checkpoint.
    apply_fn: ``model.apply`` (static).
    tx: the optax gradient transformation (static).
  """
  step: jax.Array
  params: Any
  model_state: Any
  opt_state: Any
  key: jax.Array
  apply_fn: Callable[..., Any] = flax.struct.field(pytree_node=False)
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

  @property
  def batch_stats(self) -> Any:
    """The ``batch_stats`` collection (``{}`` for models without batch norm)."""
    return self.model_state.get("batch_stats", {})

  @property
  def module(self) -> Any:
    """The Flax module whose ``apply`` is ``apply_fn`` (``None`` for another function)."""
    return getattr(self.apply_fn, "__self__", None)

  @property
  def variables(self) -> dict[str, Any]:
    """``{"params": ..., **model_state}``, the argument of ``model.apply``."""
    return {"params": self.params, **self.model_state}

  def apply_gradients(self, grads: Any, model_state: Any) -> "TrainState":
    """One optimizer update: new params, opt_state, model_state, and ``step + 1``."""
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    params = optax.apply_updates(self.params, updates)
    return self.replace(step=self.step + 1, params=params, opt_state=opt_state,
                        model_state=model_state)

  def to_tree(self) -> dict[str, Any]:
    """The array leaves as a plain dict (what checkpoints store)."""
    return {"step": self.step, "params": self.params, "model_state": self.model_state,
            "opt_state": self.opt_state, "key": self.key}

  def from_tree(self, tree: dict[str, Any]) -> "TrainState":
    """A state with the leaves of ``tree`` (the inverse of :meth:`to_tree`)."""
    return self.replace(**tree)


def create_train_state(model: Any, tx: optax.GradientTransformation, sample: Any,
                       key: jax.Array) -> TrainState:
  """Initialise a model and its optimizer state.

  Pure and jittable (``model``, ``tx`` closed over): call under ``jax.jit`` with
  replicated ``out_shardings`` to build the state directly on a device mesh, or under
  ``jax.eval_shape`` for an abstract state (checkpoint restoration).

  Args:
    model: a ``flax.linen.Module`` called as ``model(x, train=...)``.
    tx: an optax gradient transformation.
    sample: a batch ``[B, H, W, C]`` of the input shape (values unused beyond init).
    key: ``uint32 [2]`` root key (``jax.random.PRNGKey(seed)``); split for params,
      noise and dropout at init and kept as the state's root key.

  Returns:
    A :class:`TrainState` at step 0.
  """
  init_key = jax.random.fold_in(key, 0x1217)
  pkey, nkey, dkey = jax.random.split(init_key, 3)
  variables = model.init({"params": pkey, "noise": nkey, "dropout": dkey}, sample,
                         train=False)
  variables = dict(variables)
  params = variables.pop("params")
  model_state = {k: v for k, v in variables.items()}
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                    opt_state=tx.init(params), key=key, apply_fn=model.apply, tx=tx)
