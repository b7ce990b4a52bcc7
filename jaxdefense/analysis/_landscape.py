"""Loss landscapes along the FGSM direction (the In-ResNet paper's Fig. 2).

For an image ``x`` with label ``y`` the landscape is the cross-entropy on the grid

    ``L(a, b) = CE(model(clip(x + (a * d_fgsm + b * d_rand) / 255)), y)``

with ``a, b`` on ``[-radius, radius]`` in units of 1/255 (as the paper's axes), and the
predicted class at every grid point.  ``d_fgsm = sign(grad_x CE(model(x), y))`` is the
FGSM direction and ``d_rand`` a random sign vector orthogonal to it (see
:func:`loss_landscape`).  Both directions have l-inf norm 1, so moving ``t`` along an
axis changes every pixel by at most ``t / 255``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdefense import _checks
from jaxdefense import attacks as _attacks
from jaxdefense import data as _data
from jaxdefense import models as _models

__all__ = ["LossLandscape", "loss_landscape"]

Array = jax.Array


@dataclasses.dataclass(frozen=True, eq=False)   # array fields: compare by identity
class LossLandscape:
  """The loss surface and predicted-class map of a model around one or more images.

  Grid point ``[..., i, j]`` is the image ``clip(x + (coords[i] * fgsm_direction +
  coords[j] * random_direction) / 255)``: axis ``-2`` runs along the FGSM direction,
  axis ``-1`` along the random orthogonal one.  The centre ``[..., origin, origin]`` is
  the clean image.

  Attributes:
    coords: grid coordinates ``[num]`` (float32) in units of 1/255, symmetric about 0
      with ``coords[origin] == 0`` exactly.
    loss: cross-entropy ``[num, num]`` for one image, ``[B, num, num]`` for a batch
      (float32; for a stochastic model the mean over the noise draws, see
      :func:`loss_landscape`).
    pred: predicted class ``[num, num]`` / ``[B, num, num]`` (int32).
    label: the true label, ``()`` or ``[B]`` (int32).
    fgsm_direction: ``sign(grad_x CE)``, the shape of the input (entries -1, 0, 1).
    random_direction: the random orthogonal sign direction, the shape of the input.
    radius: the grid's half-width in units of 1/255.
    clip: whether grid images were clipped to ``[0, 1]``.
  """
  coords: np.ndarray
  loss: np.ndarray
  pred: np.ndarray
  label: np.ndarray
  fgsm_direction: np.ndarray
  random_direction: np.ndarray
  radius: float
  clip: bool

  @property
  def origin(self) -> int:
    """Index of the clean image on both grid axes, ``(num - 1) // 2``."""
    return (len(self.coords) - 1) // 2

  @property
  def clean_loss(self) -> np.ndarray:
    """The loss at the clean image, ``()`` or ``[B]``."""
    return self.loss[..., self.origin, self.origin]

  @property
  def clean_pred(self) -> np.ndarray:
    """The predicted class of the clean image, ``()`` or ``[B]``."""
    return self.pred[..., self.origin, self.origin]


def grid_coords(radius: float, num: int) -> np.ndarray:
  """``num`` (odd) float32 coordinates on ``[-radius, radius]`` with an exact 0 centre."""
  half = (num - 1) // 2
  steps = np.arange(-half, half + 1, dtype=np.float64)
  return (radius * steps / half).astype(np.float32)


def orthogonal_sign(d: Array, key: Array) -> Array:
  """A random sign vector of ``d``'s shape, exactly orthogonal to the sign vector ``d``.

  On the ``m`` entries where ``d != 0`` the result is ``d * s`` with ``s`` a random
  balanced pattern of ``m // 2`` pluses and ``m // 2`` minuses (one 0 when ``m`` is odd),
  so ``<d, result> = 0`` exactly; elsewhere it holds independent random signs.  It is a
  uniformly random sign vector among those orthogonal to ``d`` (for even ``m``).
  """
  flat = d.reshape(-1)
  k_rank, k_free = jax.random.split(key)
  on = flat != 0
  m = jnp.sum(on)
  u = jnp.where(on, jax.random.uniform(k_rank, flat.shape), 2.0)   # support first
  rank = jnp.argsort(jnp.argsort(u))
  half = m // 2
  balanced = jnp.where(rank < half, 1.0, jnp.where(rank >= m - half, -1.0, 0.0))
  free = jax.random.rademacher(k_free, flat.shape, dtype=flat.dtype)
  return jnp.where(on, flat * balanced.astype(flat.dtype), free).reshape(d.shape)


def _draws(model: _models.ModelFn, img: Array, keys: Array | None) -> Array:
  """Logits ``[S, K]`` (at least float32) of one image ``[H, W, C]``: one draw per key,
  or the one deterministic evaluation."""
  if keys is None:
    z = model(img[None])
  else:
    z = jax.vmap(lambda k: model(img[None], k)[0])(keys)
  return z.astype(jnp.promote_types(z.dtype, jnp.float32))


def _ce(z: Array, label: Array) -> Array:
  """Mean over draws of the cross-entropy of logits ``[S, K]``."""
  return jnp.mean(_attacks.cross_entropy(z, jnp.broadcast_to(label, z.shape[:1])))


@functools.partial(jax.jit, static_argnames=("chunk", "samples", "clip", "impl"))
def _landscape_batch(model: _models.ModelFn, x: Array, y: Array, key_data: Array,
                     coords: Array, *, chunk: int, samples: int, clip: bool,
                     impl: Any) -> tuple[Array, Array, Array, Array]:
  """Directions, loss ``[B, n, n]`` and predictions ``[B, n, n]`` of a batch of images.

  Every image's grid point is evaluated as a batch of one (``vmap`` over grid points,
  in chunks of ``chunk`` through ``lax.map``), so the value at a grid point does not
  depend on the other points (nor, for a stochastic model, on the noise of others).
  """
  n = coords.shape[0]
  a = jnp.repeat(coords, n)            # FGSM coordinate of grid point i * n + j
  b = jnp.tile(coords, n)              # random coordinate
  total = -(-(n * n) // chunk) * chunk
  a = jnp.pad(a, (0, total - n * n)).reshape(-1, chunk)
  b = jnp.pad(b, (0, total - n * n)).reshape(-1, chunk)
  scale = jnp.asarray(255.0, x.dtype)

  def per_image(xi, yi, kd):
    key = jax.random.wrap_key_data(kd, impl=impl)
    k_dir, k_noise = jax.random.split(key)
    keys = jax.random.split(k_noise, samples) if model.stochastic else None
    grad = jax.grad(lambda img: _ce(_draws(model, img, keys), yi))(xi)
    d1 = jnp.sign(grad).astype(xi.dtype)
    d2 = orthogonal_sign(d1, k_dir)

    def point(ai, bi):
      img = xi + (ai.astype(xi.dtype) * d1 + bi.astype(xi.dtype) * d2) / scale
      if clip:
        img = jnp.clip(img, 0.0, 1.0)
      z = _draws(model, img, keys)
      return _ce(z, yi), jnp.argmax(jnp.mean(z, axis=0)).astype(jnp.int32)

    loss, pred = jax.lax.map(lambda ab: jax.vmap(point)(*ab), (a, b))
    loss = loss.reshape(-1)[:n * n].reshape(n, n)
    pred = pred.reshape(-1)[:n * n].reshape(n, n)
    return d1, d2, loss, pred

  return jax.vmap(per_image)(x, y, key_data)


def loss_landscape(model: Any, x: Any, y: Any, *, key: Array | None = None,
                   radius: float = 8.0, num: int = 21, clip: bool = True,
                   samples: int = 1, stochastic: bool = False, batch_size: int = 256,
                   progress: bool = False) -> LossLandscape:
  """The loss surface around images along the FGSM direction and a random orthogonal one.

  As the In-ResNet paper's Fig. 2: for each image, the cross-entropy and the predicted
  class on a ``num x num`` grid ``clip(x + (a * d_fgsm + b * d_rand) / 255)``, ``a, b``
  in ``[-radius, radius]`` (units of 1/255).

  * ``d_fgsm = sign(grad_x CE(model(x), y))``, the FGSM direction (entries -1, 0, 1).
  * ``d_rand``: a random sign vector exactly orthogonal to ``d_fgsm``: on the pixels
    where ``d_fgsm`` is nonzero it agrees in sign with ``d_fgsm`` on a random half and
    disagrees on the other half (one pixel set to 0 when their number is odd); on the
    others it has random signs.  Both directions thus have l-inf norm 1 and (up to that
    one pixel) the same l2 norm, so the two axes share one scale.
  * Grid images are clipped to ``[0, 1]`` (``clip=True``, default): every grid point is
    a valid image, and the surface flattens where pixels saturate.  ``clip=False``
    evaluates the model on the unclipped affine grid.

  The centre of the grid is the clean image, so ``landscape.clean_loss`` equals the
  model's cross-entropy on ``x`` (``attacks.cross_entropy(model(x), y)``).  Every grid
  point is evaluated as a batch of one image (points are ``vmap``-ed, in chunks), in
  evaluation mode (a model bound in training mode is switched to evaluation mode); the
  whole grid of a batch of images is one ``jit``-compiled program, reused across calls
  with the same shapes and options, and images go through
  :func:`jaxdefense.data.run_batches`.

  A stochastic model (``model.stochastic``, e.g. EnResNet) is evaluated with the same
  ``samples`` noise draws at every grid point of an image (keys derived from ``key``):
  the loss is the mean over the draws of the per-draw cross-entropy (the EOT objective
  the attacks maximise; ``d_fgsm`` is the sign of its gradient) and the prediction the
  argmax of the mean logits.

  Args:
    model: a :class:`~jaxdefense.models.ModelFn` (``models.bind(module, variables)``)
      or a plain ``f(x [B, H, W, C]) -> logits [B, K]`` (``f(x, key)`` with
      ``stochastic=True``).
    x: one image ``[H, W, C]`` or a batch ``[B, H, W, C]``, floating, in ``[0, 1]``.
    y: the label (an int) for one image, integer labels ``[B]`` for a batch.
    key: PRNG key for the random direction (and the noise draws); default
      ``jax.random.key(0)``; required for a stochastic model.
    radius: half-width of the grid in units of 1/255 (> 0); default 8.
    num: grid points per axis, odd (so that the clean image is on the grid), >= 3;
      default 21.
    clip: clip grid images to ``[0, 1]``; default ``True``.
    samples: noise draws per grid point for a stochastic model (ignored otherwise);
      default 1.
    stochastic: a plain ``model`` function takes a key (as
      :func:`jaxdefense.evaluation.evaluate_robustness`); default ``False``.
    batch_size: model evaluations (images) per call; default 256.
    progress: show a progress bar over batches of images.

  Returns:
    A :class:`LossLandscape`; ``loss`` and ``pred`` are ``[num, num]`` for one image and
    ``[B, num, num]`` for a batch (per image, each with its own directions).

  Raises:
    TypeError: ``model`` is not callable; non-floating images; non-integer labels or
      arguments of the wrong type.
    ValueError: images of another rank or outside ``[0, 1]``; labels of the wrong shape
      or outside ``[0, K)``; ``radius <= 0``; ``num`` even or < 3; ``samples`` or
      ``batch_size`` < 1; a stochastic model without ``key``.
  """
  model = _models.ModelFn.wrap(model, stochastic=bool(stochastic))
  if model.fn is None and model.train:
    model = model.with_mode(False)
  _checks.check_images(x, "x", ranks=(3, 4))
  single = np.ndim(x) == 3
  x = jnp.asarray(x)
  if single:
    x = x[None]
  radius = _checks.check_float(radius, "radius", minimum=0.0, strict_min=True)
  num = _checks.check_int(num, "num", minimum=3)
  if num % 2 == 0:
    raise ValueError(f"num must be odd, so that the clean image (0, 0) is a grid point; "
                     f"got {num}.")
  samples = _checks.check_int(samples, "samples", minimum=1)
  batch_size = _checks.check_int(batch_size, "batch_size", minimum=1)
  if model.stochastic and key is None:
    raise ValueError("loss_landscape: the model draws noise (stochastic); pass "
                     "key=jax.random.key(...) for its draws and the random direction.")
  if key is None:
    key = jax.random.key(0)
  if not hasattr(key, "dtype") or not hasattr(key, "shape"):
    raise TypeError(f"key must be a PRNG key (jax.random.key(seed)); got "
                    f"{_checks._summary(key)}.")
  if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.wrap_key_data(key)

  b = x.shape[0]
  y_arr = np.asarray(y)
  if single:
    if y_arr.ndim != 0:
      raise ValueError(f"y must be one integer label for one image x {tuple(x.shape[1:])}; "
                       f"got {_checks._summary(y)}.")
    y_arr = y_arr.reshape(1)
  probe = (lambda img: model(img, key)) if model.stochastic else model
  k = int(jax.eval_shape(probe, x[:1]).shape[-1])
  _checks.check_labels(y_arr, k, "y", batch=b)
  y_arr = y_arr.astype(np.int32)

  coords = grid_coords(radius, num)
  draws = samples if model.stochastic else 1
  chunk = max(1, min(num * num, batch_size // draws))
  rows = max(1, batch_size // (chunk * draws))
  impl = jax.random.key_impl(key)
  key_data = jax.random.key_data(jax.random.split(key, b))
  coords_j = jnp.asarray(coords)

  def fn(batch, _):
    xb, yb, kb = batch
    return _landscape_batch(model, xb, yb, kb, coords_j, chunk=chunk, samples=draws,
                            clip=bool(clip), impl=impl)

  d1, d2, loss, pred = _data.run_batches(fn, (x, y_arr, key_data), batch_size=rows,
                                         jit=False, progress=progress,
                                         desc="loss landscape")
  if single:
    d1, d2, loss, pred, y_arr = d1[0], d2[0], loss[0], pred[0], y_arr[0]
  return LossLandscape(coords=coords, loss=np.asarray(loss, np.float32),
                       pred=np.asarray(pred, np.int32), label=np.asarray(y_arr, np.int32),
                       fgsm_direction=np.asarray(d1), random_direction=np.asarray(d2),
                       radius=radius, clip=bool(clip))
