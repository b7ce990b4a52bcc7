"""Common corruptions: the CIFAR-10-C noise family in JAX, and a reader for the
official CIFAR-10-C / CIFAR-100-C ``.npy`` files.

The noise formulas and severity constants follow Hendrycks & Dietterich,
"Benchmarking Neural Network Robustness to Common Corruptions and Perturbations"
(ICLR 2019), CIFAR variant, with images in ``[0, 1]``:

* ``gaussian_noise``: ``x + N(0, c^2)``, ``c`` in ``[0.04, 0.06, 0.08, 0.09, 0.10]``;
* ``shot_noise``:     ``Poisson(x c) / c``, ``c`` in ``[500, 250, 100, 75, 50]``;
* ``impulse_noise``:  salt-and-pepper, a fraction ``c`` in
  ``[0.01, 0.02, 0.03, 0.05, 0.07]`` of the entries set to 0 or 1 (half each);
* ``speckle_noise``:  ``x + x N(0, c^2)``, ``c`` in ``[0.06, 0.1, 0.12, 0.16, 0.2]``;

each clipped to ``[0, 1]``.  Noise is drawn independently per array entry (pixel and
channel), as in the reference implementation.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdefense import _checks
from ._datasets import Dataset

__all__ = ["corrupt", "corruption_kinds", "corruption_constant", "load_corrupted",
           "CIFAR_C_CORRUPTIONS"]

_CONSTANTS: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
    "shot_noise": (500.0, 250.0, 100.0, 75.0, 50.0),
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),
    "speckle_noise": (0.06, 0.1, 0.12, 0.16, 0.2),
}

#: Corruption names of the official CIFAR-10-C / CIFAR-100-C releases (file stems).
CIFAR_C_CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "defocus_blur",
    "glass_blur", "motion_blur", "zoom_blur", "gaussian_blur", "snow", "frost", "fog",
    "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
    "spatter", "saturate",
)


def corruption_kinds() -> tuple[str, ...]:
  """Kinds accepted by `corrupt`: gaussian, shot, impulse and speckle noise."""
  return tuple(_CONSTANTS)


def _check_kind_severity(kind: Any, severity: Any) -> tuple[str, int]:
  _checks.check_choice(kind, "kind", tuple(_CONSTANTS))
  severity = _checks.check_int(severity, "severity", minimum=1, maximum=5)
  return kind, severity


def _check_key(key: Any) -> None:
  """A single PRNG key: a typed key of shape ``()`` or a raw ``uint32`` key ``[2]``/``[4]``."""
  hint = "pass e.g. key=jax.random.key(0)"
  if key is None:
    raise TypeError(f"key must be a JAX PRNG key (the corruption noise is drawn from it); "
                    f"got None; {hint}.")
  dtype, shape = getattr(key, "dtype", None), getattr(key, "shape", None)
  if dtype is None or shape is None:
    raise TypeError(f"key must be a JAX PRNG key; got {_checks._summary(key)}; {hint}.")
  if jnp.issubdtype(dtype, jax.dtypes.prng_key):
    if tuple(shape) != ():
      raise ValueError(f"key must be one PRNG key (shape ()); got a key array of shape "
                       f"{tuple(shape)}; split it and pass one key per call.")
    return
  if np.dtype(dtype) != np.uint32 or len(shape) != 1 or shape[0] not in (2, 4):
    raise TypeError(f"key must be a JAX PRNG key (jax.random.key(seed), or a raw uint32 "
                    f"key from jax.random.PRNGKey); got {_checks._summary(key)}.")


def _is_traced_severity(severity: Any) -> bool:
  return isinstance(severity, jax.core.Tracer)


def _traced_constants(kind: str, severity: Any) -> tuple[jax.Array, jax.Array]:
  """``(c, 1 / c)`` of a traced integer ``severity`` (clamped to ``1..5``).

  Both come from float32 tables computed on the host, so a severity ``s`` gives the
  same float32 constants as the Python severity ``s``.
  """
  dtype = getattr(severity, "dtype", None)
  if (dtype is None or not jnp.issubdtype(dtype, jnp.integer)
      or tuple(getattr(severity, "shape", (1,))) != ()):
    raise TypeError(f"severity must be an integer 1..5 (a Python int, or an integer "
                    f"scalar inside jit); got {_checks._summary(severity)}.")
  table = _CONSTANTS[kind]
  index = jnp.clip(severity, 1, 5) - 1
  c = jnp.asarray(np.asarray(table, np.float32))[index]
  inv_c = jnp.asarray(np.asarray([1.0 / v for v in table], np.float32))[index]
  return c, inv_c


def corruption_constant(kind: str, severity: int) -> float:
  """The Hendrycks & Dietterich constant ``c`` of ``kind`` at ``severity``.

  Args:
    kind: one of `corruption_kinds()`.
    severity: integer in ``1..5``.

  Returns:
    ``c`` as a Python float (noise std, Poisson photon count, impulse fraction or
    speckle std, see the module docstring).

  Raises:
    ValueError: unknown kind or severity outside ``1..5``.
    TypeError: non-integer severity.
  """
  kind, severity = _check_kind_severity(kind, severity)
  return _CONSTANTS[kind][severity - 1]


def _apply(images: jax.Array, key: jax.Array, kind: str, c: Any, inv_c: Any) -> jax.Array:
  """The corruption formula; ``c`` and ``1 / c`` are Python floats or traced scalars.

  ``1 / c`` comes precomputed from the host so that the result is bit-identical
  whether or not XLA sees ``c`` as a constant (it would rewrite a division).
  """
  x = images
  dtype = x.dtype
  c = jnp.asarray(c, jnp.float32)
  # The barrier keeps XLA from folding a constant ``c`` into the normal sampler's own
  # scale factor, which changed results by 1 ulp between jit and non-jit callers.
  normal = lambda: jax.lax.optimization_barrier(
      jax.random.normal(key, x.shape, jnp.float32))
  if kind == "gaussian_noise":
    out = x + (c * normal()).astype(dtype)
  elif kind == "shot_noise":
    counts = jax.random.poisson(key, x.astype(jnp.float32) * c, x.shape)
    out = (counts.astype(jnp.float32) * jnp.asarray(inv_c, jnp.float32)).astype(dtype)
  elif kind == "impulse_noise":
    # One uniform draw per entry: u < c/2 -> pepper (0), c/2 <= u < c -> salt (1).
    u = jax.random.uniform(key, x.shape, jnp.float32)
    out = jnp.where(u < c / 2, jnp.zeros_like(x), jnp.where(u < c, jnp.ones_like(x), x))
  elif kind == "speckle_noise":
    out = x + x * (c * normal()).astype(dtype)
  else:  # pragma: no cover - guarded by _check_kind_severity
    raise ValueError(kind)
  return jnp.clip(out, 0, 1).astype(dtype)


# One compilation per (kind, shape, dtype): the severity constant is passed as a traced
# scalar, so the five severities share the compiled program.
_apply_jit = jax.jit(_apply, static_argnames=("kind",))


def corrupt(images: Any, kind: str, severity: Any, key: jax.Array) -> jax.Array:
  """Apply a CIFAR-10-C noise corruption to a batch of images.

  Deterministic for a given ``key`` and jittable with ``kind`` static (a Python
  string): ``jax.jit(lambda x, k: corrupt(x, "shot_noise", 3, k))`` works.  The
  severity may be a Python int, or an integer scalar traced inside ``jit`` (then the
  five severities share one compiled program: ``jax.jit(lambda x, s, k: corrupt(x,
  "shot_noise", s, k))``); a traced severity cannot be range-checked and is clamped to
  ``1..5``.  Severity ``s`` gives the same result whether it is traced or not.

  Args:
    images: float ``[B, H, W, C]`` (or one image ``[H, W, C]``) in ``[0, 1]``.  The
      range is checked for NumPy inputs only; JAX arrays are not copied back to the
      host for a check.
    kind: one of `corruption_kinds()`: ``"gaussian_noise"``, ``"shot_noise"``,
      ``"impulse_noise"``, ``"speckle_noise"``.
    severity: integer in ``1..5`` (see the module docstring for the constants), or a
      traced integer scalar.
    key: one JAX PRNG key (``jax.random.key(seed)`` or ``jax.random.PRNGKey(seed)``);
      noise is independent per entry.

  Returns:
    A ``jax.Array`` with the shape and dtype of ``images``, values in ``[0, 1]``.

  Raises:
    ValueError: unknown ``kind``, ``severity`` outside ``1..5``, images not of rank 3 or
      4, NumPy images outside ``[0, 1]`` or with NaNs, a key array holding several keys.
    TypeError: non-floating images, a non-integer severity, or a ``key`` that is not a
      PRNG key (``None`` included).
  """
  if _is_traced_severity(severity):
    _checks.check_choice(kind, "kind", tuple(_CONSTANTS))
  else:
    kind, severity = _check_kind_severity(kind, severity)
  _check_key(key)
  if isinstance(images, np.ndarray):
    _checks.check_images(images, "images", ranks=(3, 4))
  else:
    _checks.check_rank(images, "images", (3, 4), "images [B, H, W, C] or [H, W, C]")
    _checks.check_floating(images, "images")
  if _is_traced_severity(severity):
    c, inv_c = _traced_constants(kind, severity)
    return _apply_jit(jnp.asarray(images), key, kind, c, inv_c)
  c = _CONSTANTS[kind][severity - 1]
  return _apply_jit(jnp.asarray(images), key, kind, c, 1.0 / c)


def _find_c_dir(root: str, name: str) -> str:
  sub = {"cifar10": "CIFAR-10-C", "cifar100": "CIFAR-100-C"}[name]
  for folder in (root, os.path.join(root, sub)):
    if os.path.isfile(os.path.join(folder, "labels.npy")):
      return folder
  raise FileNotFoundError(
      f"no {sub} files found: neither {root!r} nor {os.path.join(root, sub)!r} holds "
      f"labels.npy. Download {sub}.tar from https://zenodo.org/records/"
      f"{'2535967' if name == 'cifar10' else '3555552'}, extract it and pass "
      "root=the extracted folder.")


def load_corrupted(root: str | os.PathLike, corruption: str,
                   severity: int | None = None, name: str = "cifar10",
                   num_examples: int | None = None) -> Dataset:
  """Read one corruption of the official CIFAR-10-C / CIFAR-100-C release.

  The release holds ``<corruption>.npy`` (``uint8 [5 * M, 32, 32, 3]``, severities 1 to
  5 stacked in blocks of ``M = 10000``) and ``labels.npy`` (``[5 * M]``).  Files are
  memory-mapped, so reading one severity does not load the others; pickles are
  refused.

  Args:
    root: folder holding the ``.npy`` files, or its parent containing
      ``CIFAR-10-C/`` (``CIFAR-100-C/``).
    corruption: file stem, one of `CIFAR_C_CORRUPTIONS` (e.g. ``"gaussian_noise"``).
    severity: ``1..5`` for one block of ``M`` images, or None (default) for all
      ``5 * M`` (example ``i`` then has severity ``i // M + 1``).
    name: ``"cifar10"`` (default) or ``"cifar100"``: the clean data set.
    num_examples: read only the first ``num_examples`` images of each severity block
      (the corrupted copies of the first ``num_examples`` test images; only those rows
      are read from disk); default None: all ``M``.

  Returns:
    A `Dataset` with images ``np.float32 [n or 5n, H, W, C]`` (``n = M`` or
    ``num_examples``) in ``[0, 1]``,
    labels ``np.int32``, ``name`` the clean data set's name (so `channel_stats`
    applies) and ``split`` ``"<corruption>/<severity>"`` or ``"<corruption>/all"``.

  Raises:
    ValueError: unknown ``name`` / ``corruption``, severity outside ``1..5``,
      ``num_examples`` outside ``1..M``, or files whose shapes do not fit (count not
      divisible by 5, labels mismatch).
    TypeError: a non-integer ``severity`` or ``num_examples``.
    FileNotFoundError: missing files (the message says where to download them).
  """
  _checks.check_choice(name, "name", ("cifar10", "cifar100"))
  _checks.check_choice(corruption, "corruption", CIFAR_C_CORRUPTIONS)
  if severity is not None:
    severity = _checks.check_int(severity, "severity", minimum=1, maximum=5)
  if num_examples is not None:
    num_examples = _checks.check_int(num_examples, "num_examples", minimum=1)
  folder = _find_c_dir(os.fspath(root), name)
  path = os.path.join(folder, f"{corruption}.npy")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path!r} not found (corruption {corruption!r} of "
                            f"{name}-C); the folder holds "
                            f"{sorted(f for f in os.listdir(folder) if f.endswith('.npy'))}.")
  images = np.load(path, mmap_mode="r", allow_pickle=False)
  labels = np.load(os.path.join(folder, "labels.npy"), mmap_mode="r", allow_pickle=False)
  if images.ndim != 4 or images.shape[0] % 5 or labels.ndim != 1:
    raise ValueError(f"{path!r} has shape {images.shape} and labels.npy {labels.shape}; "
                     "expected [5 * M, H, W, C] and [5 * M].")
  if labels.shape[0] != images.shape[0]:
    raise ValueError(f"{path!r} holds {images.shape[0]} images but labels.npy holds "
                     f"{labels.shape[0]} labels.")
  m = images.shape[0] // 5
  if num_examples is not None and num_examples > m:
    raise ValueError(f"num_examples must be <= {m}: {path!r} holds {m} images per "
                     f"severity; got num_examples={num_examples}.")
  n = m if num_examples is None else num_examples
  blocks = range(5) if severity is None else (severity - 1,)
  if n == m and severity is None:
    rows: Any = slice(None)
  elif len(blocks) == 1:
    rows = slice(blocks[0] * m, blocks[0] * m + n)
  else:
    rows = np.concatenate([np.arange(b * m, b * m + n) for b in blocks])
  block = np.asarray(images[rows])
  if block.dtype == np.uint8:
    data = block.astype(np.float32) * np.float32(1 / 255)
  else:
    data = block.astype(np.float32)
    _checks.check_images(data, f"images in {path!r}")
  lab = np.asarray(labels[rows]).astype(np.int32)
  num_classes = 10 if name == "cifar10" else 100
  _checks.check_labels(lab, num_classes, name=f"labels in {folder!r}")
  split = f"{corruption}/{'all' if severity is None else severity}"
  return Dataset(images=data, labels=lab, num_classes=num_classes, name=name,
                 split=split, source=path)
