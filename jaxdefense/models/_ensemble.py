"""Ensembles: one stacked parameter pytree applied with ``vmap``, logits averaged."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jax.sharding import PartitionSpec

from jaxdefense import _checks
from jaxdefense.data import _sharding
from jaxdefense.models._fields import check_fields
from jaxdefense.nn._abstract import is_abstract


class Ensemble(nn.Module):
  """Average of the logits of ``size`` copies of ``member``.

  ``average="logits"`` (default) averages logits, as in the EnResNet authors' code
  (``Ensemble_PreAct_ResNet_Cifar.forward``).  ``average="probs"`` averages
  probabilities, the paper's Feynman–Kac reading (its eq. 10 with ``f`` the softmax,
  ``E[softmax(.)]``; :func:`jaxdefense.dynamics.feynman_kac` is its Monte-Carlo
  estimator), and returns the log of the mean probabilities as logits (see
  :func:`combine`).

  * ``shared=False`` (``En_n``): ``size`` independently parametrised members trained
    jointly.  Their variables are one pytree whose leaves carry a leading ensemble
    axis of length ``size``, applied with ``flax.linen.vmap`` (parameters, batch
    statistics and noise keys split over the axis).
  * ``shared=True`` (shared-weights ensemble, "n x En_1"): one parameter set and
    ``size`` noise draws.  The batch is tiled ``size`` times and pushed through the
    member once; with ``EulerMaruyama(std="batch")`` the noise scale is then the
    standard deviation of the tiled tensor, which equals the single-batch one up to
    the earlier noise.

  Extra call arguments (``train``, ``perturbations``...) go to every member; in the
  shared mode, array arguments with the batch as leading axis (per-block
  perturbations) are tiled with the batch.  ``capture_states=True`` (a keyword the
  ensemble knows) is passed to the member, whose ``(logits, states)`` comes back as
  ``(averaged logits, states)`` with a leading member axis on every state,
  ``[size, B, ...]``; without it the member is called without the keyword and returns
  logits.

  ``vectorize=True`` evaluates the members with ``vmap`` (one batched program, fast on
  accelerators); ``False`` applies them one after another (a fully unrolled ``scan``,
  less memory).  ``None`` (default) picks ``vmap`` on GPU and TPU and the unrolled form
  on CPU, decided when the model is traced.  Initialisation always goes through
  ``vmap``, so ``init`` with one key gives the same variables in every mode and on
  every backend; the noise draws of ``apply`` depend on the mode (independent across
  members in both, but not the same numbers).  On CPU the ``vmap``
  form turns every convolution into a grouped one whose kernel gradient XLA:CPU runs
  very slowly: a training-mode gradient of a 2-member pre-activation ResNet-8 (batch 128,
  28 x 28) took 2.7 s with ``vmap`` and 4.2 s with a rolled ``scan`` (convolutions inside
  a loop miss XLA:CPU's fast path), against 0.26 s unrolled.

  ``member_mesh`` (a ``jax.sharding.Mesh`` with a ``"member"`` axis of ``k > 1``
  devices, from ``jaxdefense.data.make_mesh(members=k)``) splits the members of a
  non-shared ensemble over devices: the stacked variables are expected sharded on their
  leading axis over ``"member"`` (``jaxdefense.data.state_sharding``; the training loop
  places them so), and each device applies only its ``size / k`` members (a
  ``jax.shard_map`` over the member axis; the batch stays split over the mesh's
  ``"data"`` axis by the compiler, so training-mode batch statistics are still those of
  the whole batch).  The logits, batch statistics and gradients equal the unsharded
  ensemble's to float rounding; the noise draws differ from the other modes (one key
  per member, split from the module's key).  Without it (default) every device holds
  every member.

  Raises:
    ValueError: ``size < 1`` (at construction); an abstract input (certify one member
      at a time); a ``member_mesh`` whose member axis does not divide ``size``, or one
      given to a shared ensemble.
    TypeError: a non-integer ``size``.
  """
  member: nn.Module
  size: int = 2
  shared: bool = False
  vectorize: bool | None = None
  average: str = "logits"
  member_mesh: Any = None

  def __post_init__(self):
    check_fields(self, positive=("size",))
    _checks.check_choice(self.average, "Ensemble.average", AVERAGES)
    k = _sharding.member_size(self.member_mesh)
    if k > 1 and self.shared:
      raise ValueError(f"Ensemble.member_mesh splits members over {k} devices, but a shared "
                       "ensemble has one parameter set: use member_mesh=None (or "
                       "ensemble.member_devices=1).")
    if k > 1 and isinstance(self.size, int) and self.size % k:
      raise ValueError(f"Ensemble.size={self.size} is not divisible by the {k} devices of "
                       "member_mesh's 'member' axis: every device holds size / k members. "
                       f"Use a member axis that divides {self.size}.")
    super().__post_init__()

  @nn.compact
  def __call__(self, x: Any, *args: Any, capture_states: bool = False, **kwargs: Any) -> Any:
    """Averaged logits ``[B, K]`` of the members on ``x`` (``(logits, states)`` with
    ``capture_states=True``); ``args`` and ``kwargs`` go to every member."""
    size = _checks.check_int(self.size, "Ensemble.size", minimum=1)
    capture_states = bool(capture_states)
    if capture_states:
      kwargs = {**kwargs, "capture_states": True}
    if is_abstract(x):
      raise ValueError("Ensemble does not take abstract inputs: certify each member "
                       "(unstack the ensemble axis) instead.")
    if self.shared:
      b = x.shape[0]
      tile = lambda a: (jnp.concatenate([a] * size, axis=0)
                        if hasattr(a, "shape") and jnp.ndim(a) >= 1 and a.shape[0] == b
                        else a)
      args, kwargs = jax.tree_util.tree_map(tile, (args, kwargs))
      out = self.member(tile(x), *args, **kwargs)
      return _average(jax.tree_util.tree_map(
          lambda a: a.reshape((size, b) + a.shape[1:]), out), capture_states, self.average)
    if _sharding.member_size(self.member_mesh) > 1 and not self.is_initializing():
      return _average(self._sharded_members(x, args, kwargs), capture_states, self.average)
    def apply(member: nn.Module, x: Any) -> Any:
      # flax's lifted vmap drops keyword arguments: close over them instead.
      return member(x, *args, **kwargs)
    axes = {"params": 0, "batch_stats": 0}
    rngs = {"params": True, "noise": True, "dropout": True}
    vectorize = self.vectorize
    if vectorize is None:
      vectorize = jax.default_backend() != "cpu"
    # nn.vmap and nn.scan split the RNG streams differently: initialise through vmap
    # always, so one init key gives the same members whatever the mode or backend.
    if vectorize or self.is_initializing():
      stacked = nn.vmap(apply, variable_axes=axes, split_rngs=rngs, in_axes=None,
                        out_axes=0, axis_size=size)(self.member, x)
    else:
      def body(member, carry, x):
        return carry, apply(member, x)
      _, stacked = nn.scan(body, variable_axes=axes, split_rngs=rngs,
                           in_axes=nn.broadcast, out_axes=0, length=size,
                           unroll=size)(
                               self.member, None, x)
    return _average(stacked, capture_states, self.average)


  def _sharded_members(self, x: Any, args: tuple, kwargs: dict) -> Any:
    """The stacked member outputs ``[size, ...]``, each device running its own members.

    The member is applied functionally (``member.apply``) inside a ``jax.shard_map``
    that is manual over the ``"member"`` axis only; the variables of the mutable
    collections it updates (batch statistics...) are written back stacked.
    """
    mesh, size = self.member_mesh, int(self.size)
    vectorize = self.vectorize
    if vectorize is None:
      vectorize = jax.default_backend() != "cpu"
    stacked = {col: tree["member"] for col, tree in self.variables.items()
               if "member" in tree}
    rngs = {name: jax.random.split(self.make_rng(name), size)
            for name in ("noise", "dropout") if self.has_rng(name)}
    mutable = self.scope.mutable
    leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
    is_array = [hasattr(a, "dtype") for a in leaves]   # jax / NumPy arrays, tracers
    arrays = [a for a, arr in zip(leaves, is_array) if arr]
    member = self.member.clone(parent=None)

    def local(stacked: Any, rngs: Any, x: Any, arrays: list) -> Any:
      it = iter(arrays)
      a, kw = jax.tree_util.tree_unflatten(
          treedef, [next(it) if arr else leaf for leaf, arr in zip(leaves, is_array)])

      def one(variables: Any, keys: Any) -> Any:
        out = member.apply(variables, x, *a, rngs=keys, mutable=mutable, **kw)
        return out if mutable else (out, {})
      if vectorize:
        return jax.vmap(one)(stacked, rngs)
      n = jax.tree_util.tree_leaves(stacked)[0].shape[0]
      outs = [one(*jax.tree_util.tree_map(lambda v, i=i: v[i], (stacked, rngs)))
              for i in range(n)]
      return jax.tree_util.tree_map(lambda *o: jnp.stack(o), *outs)

    split, rep = PartitionSpec(_sharding.MEMBER_AXIS), PartitionSpec()
    out, updated = jax.shard_map(
        local, mesh=mesh, in_specs=(split, split, rep, rep), out_specs=split,
        axis_names={_sharding.MEMBER_AXIS})(stacked, rngs, x, arrays)
    for col, tree in updated.items():
      self.put_variable(col, "member", tree)
    return out


AVERAGES = ("logits", "probs")


def combine(stacked_logits: Any, average: str = "logits", weights: Any = None) -> Any:
  """Combine member logits ``[n, B, K]`` into one ``[B, K]``.

  ``"logits"``: the (weighted) mean of the logits, as the EnResNet authors' code.
  ``"probs"``: ``log`` of the (weighted) mean of the softmax probabilities, the
  Feynman–Kac reading ``u(x) = E[softmax(f(x))]`` of the paper (its softmax is that mean,
  its argmax the mean's, and cross-entropy on it is ``-log E[p_y]``).

  Args:
    stacked_logits: ``[n, B, K]``.
    average: ``"logits"`` or ``"probs"``.
    weights: optional ``[n]`` weights summing to 1 (default uniform).

  Raises:
    ValueError: an unknown ``average``.
  """
  _checks.check_choice(average, "average", AVERAGES)
  n = stacked_logits.shape[0]
  w = (jnp.full((n,), 1.0 / n, stacked_logits.dtype) if weights is None
       else jnp.asarray(weights, stacked_logits.dtype))
  w = w.reshape((n,) + (1,) * (stacked_logits.ndim - 1))
  if average == "logits":
    return jnp.sum(w * stacked_logits, axis=0)
  logp = jax.nn.log_softmax(stacked_logits, axis=-1)
  return jax.scipy.special.logsumexp(logp, axis=0, b=jnp.broadcast_to(w, logp.shape))


def _average(stacked: Any, capture_states: bool, average: str = "logits") -> Any:
  """Member average of logits ``[size, B, K]`` (:func:`combine`); with
  ``capture_states`` the members returned ``(logits, states)`` and the states are kept."""
  if capture_states:
    logits, states = stacked
    return combine(logits, average), states
  return combine(stacked, average)


def member_variables(variables: Any, i: int) -> Any:
  """Variables of member ``i`` of a (non-shared) :class:`Ensemble`.

  Args:
    variables: the ensemble's variables (leaves ``[size, ...]`` under ``"member"``).
    i: the member index, ``0 <= i < size``.

  Returns:
    Variables for ``ensemble.member`` alone (leading ensemble axis removed), e.g. to
    certify one member.
  """
  inner = {k: v["member"] for k, v in variables.items()}
  return jax.tree_util.tree_map(lambda a: a[i], inner)
