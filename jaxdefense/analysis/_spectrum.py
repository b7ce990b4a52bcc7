"""Jacobian spectra of residual networks: per block, of the whole feature map, and a
finite-time Lyapunov exponent (the In-ResNet paper's Lyapunov view, measured).

A residual network's feature map is ``Phi = g_{L-1} o ... o g_0`` with blocks
``g_n(x) = step(shortcut(x), f_n(x))`` (:class:`~jaxdefense.models.ResidualBlock`).  For
one example, with ``x_n`` the input of block ``n``:

* ``block_sigma[n]``: the largest singular values of ``J_n = dg_n/dx (x_n)``;
* ``residual_sigma[n]``: those of ``df_n/dx (x_n)``, the residual branch alone (for a
  pre-activation block ``f_n`` includes its leading BN-ReLU);
* ``feature_sigma``: those of ``dPhi/dx (x_0)``, from the input of the first block to the
  output of the last one (layers between blocks, such as SkipNet-18's ``block_convs``,
  are part of ``Phi``);
* ``product_bound = prod_n block_sigma[n, 0]``: by the chain rule and
  sub-multiplicativity an upper bound of ``feature_sigma[0]`` (the local Lipschitz
  constant of ``Phi`` at ``x_0``) when the blocks are composed directly (every ResNet of
  the zoo);
* ``lyapunov = log(feature_sigma[0]) / L``: the finite-time (maximal) Lyapunov exponent
  of the discrete flow over its ``L`` blocks; ``lyapunov_bound = log(product_bound) / L``
  is the mean per-block log stretch.

For a damped block (In-ResNet, ``x_{n+1} = (1 - a) x_n + rho(a) f_n(x_n)``) with a zero
branch, ``J_n = (1 - a) I``: every singular value is ``|1 - a|`` (``1`` for a ResNet block).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdefense import _checks
from jaxdefense import data as _data
from jaxdefense import dynamics as _dynamics
from jaxdefense import models as _models

__all__ = ["JacobianSpectrum", "jacobian_spectrum"]

Array = jax.Array


@dataclasses.dataclass(frozen=True, eq=False)   # array fields: compare by identity
class JacobianSpectrum:
  """Singular values of the Jacobians of a residual network's blocks and feature map.

  Per example (leading axis ``B``); ``L`` residual blocks; ``k`` singular values each,
  largest first (see the module docstring for the definitions).

  Attributes:
    blocks: the blocks' module paths (``"block3"``), in network order, length ``L``.
    block_sigma: ``[B, L, k]`` singular values of each whole block map ``dg_n/dx``.
    residual_sigma: ``[B, L, k]`` singular values of each residual branch ``df_n/dx``.
    feature_sigma: ``[B, k]`` singular values of the feature map (first block's input to
      last block's output).
    product_bound: ``[B]`` ``prod_n block_sigma[:, n, 0]``.
    lyapunov: ``[B]`` finite-time Lyapunov exponent ``log(feature_sigma[:, 0]) / L``.
    iters: power-iteration steps used.
  """
  blocks: tuple[str, ...]
  block_sigma: np.ndarray
  residual_sigma: np.ndarray
  feature_sigma: np.ndarray
  product_bound: np.ndarray
  lyapunov: np.ndarray
  iters: int

  @property
  def num_blocks(self) -> int:
    """``L``, the number of residual blocks."""
    return len(self.blocks)

  @property
  def lyapunov_bound(self) -> np.ndarray:
    """``[B]`` ``log(product_bound) / L``, the mean per-block log stretch (an upper bound
    of :attr:`lyapunov` for directly composed blocks)."""
    with np.errstate(divide="ignore"):
      return np.log(self.product_bound) / self.num_blocks


# ----------------------------------------------------------------------- matrix-free SVD
#
# The compiled spectrum program holds no LAPACK call.  ``jnp.linalg.qr`` / ``eigvalsh``
# lower on the CPU to LAPACK custom calls (``lapack_sgeqrf_ffi``, ``lapack_ssyevd_ffi``);
# batched by ``vmap`` they run their batch through ``ParallelBatchMap`` on XLA's intra-op
# thread pool and block on it from a thread of that same pool.  With the many
# independent power iterations of one program (two per block, one for the feature map)
# running side by side, every pool thread can end up waiting inside such a call for
# work that no free thread is left to run: the program deadlocks (seen with 32 examples
# per batch on a 2-core machine: both ``tf_XLAEigen`` threads parked in
# ``jax::ParallelBatchMap`` under ``QrFactorization``, no CPU used, never returning).
# So the re-orthonormalisation is a Gram-Schmidt in plain XLA ops and the small final
# eigenproblem is solved on the host (:func:`_ritz_values`).
def _orthonormal_rows(v: Array) -> Array:
  """Orthonormal rows spanning those of ``v [k, d]`` (classical Gram-Schmidt, applied
  twice per row for float32 stability), in plain XLA ops (no LAPACK call).

  A row in the span of the rows before it gives, as a Householder QR would, some unit
  vector orthogonal to them (its rounding residual, normalised), or 0 when that residual
  is exactly 0 (e.g. a zero row).
  """
  k = v.shape[0]

  def unit(w):
    norm = jnp.sqrt(jnp.sum(w * w))
    return w / jnp.where(norm > 0, norm, jnp.ones_like(norm))

  if k == 1:
    return unit(v)
  rows = jnp.arange(k)

  def body(i, q):
    w = jax.lax.dynamic_index_in_dim(v, i, keepdims=False)
    before = (rows < i).astype(v.dtype)
    for _ in range(2):          # "twice is enough" (Kahan / Parlett)
      w = w - ((q @ w) * before) @ q
    return jax.lax.dynamic_update_index_in_dim(q, unit(w), i, 0)

  return jax.lax.fori_loop(0, k, body, jnp.zeros_like(v))


def _top_gram(fn: Callable[[Array], Array], z: Array, v0: Array, iters: int) -> Array:
  """The ``[k, k]`` Gram matrix ``(J V)(J V)^T`` of subspace iteration on ``J^T J``.

  Its eigenvalues are the squared Ritz values (see :func:`top_singular_values`); the
  program holds no LAPACK call, so it can be ``vmap``-ed and compiled into large
  programs safely on the CPU.
  """
  _, jvp = jax.linearize(fn, z)
  vjp = jax.linear_transpose(jvp, z)
  k = v0.shape[0]

  def orthonormal(v):
    return _orthonormal_rows(v.reshape(k, -1)).reshape(v.shape)

  def step(_, v):
    w = jax.vmap(lambda t: vjp(jvp(t))[0])(v)
    # a zero Jacobian (a zero residual branch) leaves v as it is
    return jnp.where(jnp.sum(w * w) > 0, orthonormal(w), v)

  v = jax.lax.fori_loop(0, iters, step, orthonormal(v0))
  jv = jax.vmap(jvp)(v).reshape(k, -1)
  return jv @ jv.T


def _ritz_values(gram: Any) -> np.ndarray:
  """Singular values ``[..., k]``, descending, from Gram matrices ``[..., k, k]`` (NumPy,
  on the host, in float64; returned in the Gram matrices' dtype)."""
  g = np.asarray(gram)
  ev = np.linalg.eigvalsh(g.astype(np.float64))[..., ::-1]
  return np.sqrt(np.maximum(ev, 0.0)).astype(g.dtype)


def top_singular_values(fn: Callable[[Array], Array], z: Array, v0: Array,
                        iters: int) -> Array:
  """The ``k`` largest singular values of the Jacobian of ``fn`` at ``z``, matrix-free.

  Subspace (block power) iteration on ``J^T J`` with ``jax.linearize`` (``J v``) and its
  transpose (``J^T u``), re-orthonormalised (Gram-Schmidt) every step, then
  Rayleigh–Ritz: the singular values of ``J V`` for the final orthonormal ``V``.  Each
  estimate is at most the true singular value and converges to it at the rate
  ``(sigma_{k+1} / sigma_i)^(2 iters)``.

  The iteration runs in plain XLA ops; the final ``k x k`` eigenproblem uses
  ``jnp.linalg.eigvalsh`` (a LAPACK call on the CPU).  :func:`jacobian_spectrum` does
  not call this function inside its compiled program: it compiles the iteration alone
  and solves the small eigenproblems on the host (see the note above ``_orthonormal_rows``).

  Args:
    fn: a function of one array.
    z: the point (any shape).
    v0: ``[k, *z.shape]`` starting vectors (random).
    iters: iteration steps (>= 0).

  Returns:
    ``[k]`` singular values, descending (float32 or the dtype of ``fn``'s output).
  """
  gram = _top_gram(fn, z, v0, iters)
  ev = jnp.linalg.eigvalsh(gram)[::-1]
  return jnp.sqrt(jnp.maximum(ev, 0.0))


# ----------------------------------------------------------------------- the blocks
def _is_block_call(context: Any) -> bool:
  return isinstance(context.module, _models.ResidualBlock) and context.method_name == "__call__"


@dataclasses.dataclass(frozen=True, eq=False)
class _BranchProbe:
  """A step rule that behaves as ``inner`` and records the branch ``fx`` it is given."""
  inner: Any
  sink: list

  def param_specs(self, ctx, x):
    return self.inner.param_specs(ctx, x)

  def needs_noise(self, ctx):
    return self.inner.needs_noise(ctx)

  def __call__(self, x, fx, ctx, **kwargs):
    self.sink.append(fx)
    return self.inner(x, fx, ctx, **kwargs)


def _subtree(variables: Mapping[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
  """The variables of the submodule at ``path`` (every collection that has it)."""
  out = {}
  for col, tree in variables.items():
    for name in path:
      if not isinstance(tree, Mapping) or name not in tree:
        tree = None
        break
      tree = tree[name]
    if tree is not None:
      out[col] = tree
  return out


def _trace_blocks(module: nn.Module, variables: Any, x: Array) -> list[tuple[tuple, Any, Array]]:
  """``(path, unbound block, block input)`` of every residual block, in call order."""
  found = []

  def interceptor(next_fun, args, kwargs, context):
    if _is_block_call(context):
      found.append((tuple(context.module.scope.path), context.module.clone(parent=None),
                    args[0]))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    module.apply(variables, x, train=False)
  return found


def _feature_map(module: nn.Module, variables: Any, x: Array, num_blocks: int,
                 z: Array) -> Array:
  """The network from the first block's input (replaced by ``z``) to the last block's
  output, run inside the whole model on ``x`` (what the blocks do not use is dead code)."""
  seen = [0]
  out = []

  def interceptor(next_fun, args, kwargs, context):
    if not _is_block_call(context):
      return next_fun(*args, **kwargs)
    i = seen[0]
    seen[0] += 1
    if i == 0:
      args = (z,) + tuple(args[1:])
    y = next_fun(*args, **kwargs)
    if i == num_blocks - 1:
      out.append(y)
    return y

  with nn.intercept_methods(interceptor):
    module.apply(variables, x, train=False)
  return out[0]


@functools.partial(jax.jit, static_argnames=("k", "iters", "impl"))
def _spectrum_batch(model: _models.ModelFn, x: Array, key_data: Array, *, k: int,
                    iters: int, impl: Any) -> tuple[Array, Array, Array]:
  """The Gram matrices of the power iterations: ``block [B, L, k, k]``, ``residual
  [B, L, k, k]`` and ``feature [B, k, k]`` (singular values: :func:`_ritz_values`).

  The program holds no LAPACK custom call (see the note above ``_orthonormal_rows``).
  """
  module, variables = model.module, model.variables

  def per_example(xi, kd):
    key = jax.random.wrap_key_data(kd, impl=impl)
    img = xi[None]
    blocks = _trace_blocks(module, variables, img)
    block_s, resid_s = [], []
    for n, (path, block, xin) in enumerate(blocks):
      sub = _subtree(variables, path)
      z = xin[0]
      v0 = jax.random.normal(jax.random.fold_in(key, n), (k,) + z.shape, z.dtype)
      whole = lambda t, block=block, sub=sub: block.apply(sub, t[None], False)[0]
      block_s.append(_top_gram(whole, z, v0, iters))

      def branch(t, block=block, sub=sub):
        sink = []
        block.clone(step=_BranchProbe(block.step, sink)).apply(sub, t[None], False)
        return sink[0][0]

      resid_s.append(_top_gram(branch, z, v0, iters))
    z0 = blocks[0][2][0]
    v0 = jax.random.normal(jax.random.fold_in(key, len(blocks)), (k,) + z0.shape, z0.dtype)
    phi = lambda t: _feature_map(module, variables, img, len(blocks), t[None])[0]
    feature = _top_gram(phi, z0, v0, iters)
    return jnp.stack(block_s), jnp.stack(resid_s), feature

  return jax.vmap(per_example)(x, key_data)


def _drift(module: nn.Module) -> nn.Module:
  """``module`` with a noisy step rule replaced by its noise-free drift."""
  step = _models.step_of(module)
  if not _dynamics.is_stochastic(step, False):
    return module
  if isinstance(step, _dynamics.EulerMaruyama):
    return _models.with_step(module, dataclasses.replace(step, at_test=False))
  raise ValueError(f"jacobian_spectrum: the step rule {step!r} draws noise at evaluation "
                   "and has no known noise-free drift; give a deterministic model.")


def _resolve(model: Any, variables: Any, member: int) -> tuple[nn.Module, Any]:
  """The (module, variables) pair to analyse: ensembles unwrapped, noise switched off."""
  if isinstance(model, _models.ModelFn):
    if model.module is None:
      raise TypeError("jacobian_spectrum needs a Flax model with residual blocks "
                      "(models.bind(module, variables)); got a wrapped logits function.")
    module = model.module
    variables = model.variables if variables is None else variables
  elif isinstance(model, nn.Module):
    module = model
    if variables is None:
      raise ValueError("jacobian_spectrum: a module needs its variables "
                       "(module.init(...)); got variables=None.")
  else:
    raise TypeError(f"model must be a jaxdefense.models.ModelFn or a flax.linen Module; "
                    f"got {_checks._summary(model)}.")
  if not isinstance(variables, Mapping):
    raise TypeError(f"variables must be the mapping returned by module.init "
                    f"({{'params': ...}}); got {_checks._summary(variables)}.")
  variables = dict(variables)
  if isinstance(module, _models.Ensemble):
    if module.shared:
      variables = {col: tree["member"] for col, tree in variables.items() if "member" in tree}
    else:
      member = _checks.check_int(member, "member", minimum=0, maximum=module.size - 1)
      variables = _models.member_variables(variables, member)
    module = module.member
  return _drift(module), variables


def jacobian_spectrum(model: Any, variables: Any, x: Any, *, key: Array | None = None,
                      k: int = 1, iters: int = 30, member: int = 0, batch_size: int = 32,
                      progress: bool = False) -> JacobianSpectrum:
  """Per-block and whole-feature-map Jacobian spectra and a finite-time Lyapunov exponent.

  For every example of ``x`` and every residual block ``n`` (each
  :class:`~jaxdefense.models.ResidualBlock`, at its input ``x_n`` in the network), the
  ``k`` largest singular values of the Jacobian of the whole block map and of its
  residual branch; those of the feature map from the first block's input to the last
  block's output; the product of the blocks' largest singular values (an upper bound of
  the feature map's for directly composed blocks) and the finite-time Lyapunov exponent
  ``log(sigma_max(dPhi/dx)) / L`` over the ``L`` blocks (module docstring).

  Everything is matrix-free: ``jax.linearize`` and its transpose with subspace power
  iteration on ``J^T J`` (:func:`top_singular_values`), ``vmap``-ed over examples, one
  ``jit``-compiled program per batch shape, examples fed by
  :func:`jaxdefense.data.run_batches`; the program holds no LAPACK call (batched LAPACK
  calls can deadlock XLA:CPU's thread pool), the small ``k x k`` Rayleigh–Ritz
  eigenproblems are solved on the host.  Power iteration approaches each singular value
  from below; raise ``iters`` when the top two are close.

  The model is analysed in evaluation mode (batch norm with its running statistics, so
  examples are independent).  A non-shared :class:`~jaxdefense.models.Ensemble` is
  analysed one member at a time (``member``), a shared-weights one through its one
  member.  A noisy step rule (EnResNet's ``EulerMaruyama``) is analysed through its
  drift: the noise is switched off (``at_test=False``), as the Lyapunov argument concerns
  the deterministic flow.

  Args:
    model: a :class:`~jaxdefense.models.ModelFn` bound to a Flax module
      (``models.bind(module, variables)``) or a ``flax.linen`` Module with residual
      blocks (the ResNet zoo, the residual DiffAI nets, EnResNets, ensembles of these).
    variables: the module's variables; ``None`` with a ``ModelFn`` uses its own (given
      ones replace them).
    x: images ``[B, H, W, C]`` in ``[0, 1]``.
    key: PRNG key for the starting vectors; default ``jax.random.key(0)``.
    k: singular values per Jacobian (>= 1); default 1 (the largest).
    iters: power-iteration steps (>= 1); default 30.
    member: the ensemble member analysed (non-shared ensembles); default 0.
    batch_size: examples per compiled call; default 32.
    progress: show a progress bar over batches.

  Returns:
    A :class:`JacobianSpectrum` with per-example arrays.

  Raises:
    TypeError: ``model`` neither a ``ModelFn`` of a module nor a Module; ``variables``
      not a mapping; non-floating images; non-integer ``k`` / ``iters`` / ``member``.
    ValueError: a module without ``variables``; images of another rank or outside
      ``[0, 1]``; a model without residual blocks (the MLP, DiffAI's feed-forward nets);
      ``k`` larger than a block's input size; ``k``, ``iters`` or ``batch_size`` < 1;
      ``member`` out of range; a noisy step rule other than ``EulerMaruyama``.
  """
  module, variables = _resolve(model, variables, member)
  _checks.check_images(x, "x")
  x = jnp.asarray(x)
  k = _checks.check_int(k, "k", minimum=1)
  iters = _checks.check_int(iters, "iters", minimum=1)
  batch_size = _checks.check_int(batch_size, "batch_size", minimum=1)
  if key is None:
    key = jax.random.key(0)
  if not hasattr(key, "dtype") or not hasattr(key, "shape"):
    raise TypeError(f"key must be a PRNG key (jax.random.key(seed)); got "
                    f"{_checks._summary(key)}.")
  if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.wrap_key_data(key)

  shapes = []   # (path, block input shape), found by tracing the model once

  def discover(v, img):
    shapes.extend((p, xin.shape) for p, _, xin in _trace_blocks(module, v, img))
    return jnp.zeros(())

  jax.eval_shape(discover, variables, x[:1])
  if not shapes:
    raise ValueError(f"jacobian_spectrum: {type(module).__name__} has no residual blocks "
                     "(models.ResidualBlock); use a residual network (ResNet, "
                     "pre-activation ResNet, residual DiffAI nets).")
  paths = ["/".join(p) for p, _ in shapes]
  smallest = min(int(np.prod(shape[1:])) for _, shape in shapes)
  if k > smallest:
    raise ValueError(f"k must be <= {smallest}, the size of the smallest block input; "
                     f"got {k}.")

  bound = _models.bind(module, variables)
  impl = jax.random.key_impl(key)
  key_data = jax.random.key_data(jax.random.split(key, x.shape[0]))

  def fn(batch, _):
    return _spectrum_batch(bound, batch[0], batch[1], k=k, iters=iters, impl=impl)

  grams = _data.run_batches(fn, (x, key_data), batch_size=batch_size, jit=False,
                            progress=progress, desc="jacobian spectrum")
  block, resid, feature = (_ritz_values(g) for g in grams)
  num = len(paths)
  product = np.prod(block[:, :, 0].astype(np.float64), axis=1)
  with np.errstate(divide="ignore"):   # a zero Jacobian has exponent -inf
    lyap = np.log(feature[:, 0].astype(np.float64)) / num
  return JacobianSpectrum(blocks=tuple(paths), block_sigma=np.asarray(block),
                          residual_sigma=np.asarray(resid), feature_sigma=np.asarray(feature),
                          product_bound=product, lyapunov=lyap, iters=iters)
